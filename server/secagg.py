"""Server side of SecAgg+: a wrapper strategy around the adapter FedAvg, four exchanges a round.

``configure_train`` opens the round on the wrapped strategy (cohort, bookkeeping), runs the
setup and share-keys exchanges itself (it has the grid) and returns the masked-input messages
that Flower's ``Strategy.start`` sends; ``aggregate_sum`` runs the unmask exchange and returns
the unmasked *sum*, which the next layer finishes (the plain mean, or user-level DP's noise and
division by the expected cohort). The server never sees an individual update.

Depends only on flwr and fedllm: the wrapped strategy is used through its public methods
(``core.start_round``, ``round_config``, ``collect``, ``parse_common``, ``mean_update``,
``apply``), see ``fedllm.server.strategy_wrapper``.
"""

from __future__ import annotations

import logging
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm import protocol
from fedllm.privacy.updates import UpdateRejected
from fedllm.secagg import primitives as sa
from fedllm.server.strategy_wrapper import StrategyWrapper

log = logging.getLogger(__name__)


class SecAggPlus(StrategyWrapper):
    """SecAgg+ around ``AdapterFedAvg`` (it replaces that strategy's message exchange)."""

    def __init__(self, strategy: Strategy, *, num_shares: int | str, threshold: int | str,
                 bits: int, clip_range: float, timeout: float) -> None:
        if getattr(strategy, "core", None) is not strategy:
            raise ValueError(f"SecAggPlus cannot wrap {type(strategy).__name__}: it replaces the "
                             "message exchange, so it wraps the AdapterFedAvg core directly")
        super().__init__(strategy)
        self.num_shares, self.threshold = num_shares, threshold
        self.bits, self.clip_range, self.timeout = bits, clip_range, timeout
        self._grid: Grid | None = None
        self._round_state: dict = {}

    # ------------------------------------------------------------------ helpers
    def _exchange(self, grid: Grid, server_round: int, stage: str,
                  configs: dict[int, dict], arrays: ArrayRecord | None = None
                  ) -> dict[int, Message]:
        messages = []
        for node, extra in configs.items():
            config = ConfigRecord({protocol.STAGE_KEY: stage, protocol.ROUND_KEY: server_round,
                                   "run-id": self.core.run_id, **extra})
            content = RecordDict({protocol.CONFIG_RECORD: config})
            if arrays is not None:
                content[protocol.ARRAYS_RECORD] = arrays
            messages.append(Message(content=content, dst_node_id=node,
                                    message_type=MessageType.TRAIN))
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        ok = {}
        rejected = self.core.rounds[-1].rejected  # keyed by node: each node counts once
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d dropped at SecAgg+ %s: %s", server_round, node,
                            stage, reply.error.reason)
                rejected.setdefault(f"node {node}", f"{stage}: {reply.error.reason}")
            else:
                ok[node] = reply
        for node in sorted(set(configs) - {r.metadata.src_node_id for r in replies}):
            log.warning("round %d: node %d dropped at SecAgg+ %s: no reply within %.0f s",
                        server_round, node, stage, self.timeout)
            rejected.setdefault(f"node {node}", f"{stage}: no reply within "
                                                "federation.client_timeout")
        return ok

    # ------------------------------------------------------------------ stages 1-3
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        core = self.core
        self._grid = grid
        server_round, sampled = core.start_round(server_round, arrays, grid)
        nodes = sorted(sampled)
        shares = sa.share_count(len(nodes), self.num_shares)
        threshold = sa.majority_threshold(shares, self.threshold)
        if len(nodes) < max(threshold, core.min_clients, 2):
            log.warning("round %d: %d sampled < SecAgg+ threshold %d (or 2); round skipped",
                        server_round, len(nodes), threshold)
            return []
        graph = sa.neighbours(nodes, shares)
        edges = sa.graph_edges(graph)
        setup = self._exchange(grid, server_round, "setup", {
            u: {"participants": nodes, "neighbours": graph[u], "threshold": threshold,
                "graph": edges} for u in nodes})
        keys = {u: dict(r.content[protocol.CONFIG_RECORD]) for u, r in setup.items()}
        alive = sorted(keys)
        share_cfg = {}
        for u in alive:
            peers = [v for v in graph[u] if v in keys]
            cfg = {"neighbours": peers}
            for v in peers:
                cfg[f"c_pk:{v}"], cfg[f"s_pk:{v}"] = keys[v]["c_pk"], keys[v]["s_pk"]
            share_cfg[u] = cfg
        shared = self._exchange(grid, server_round, "share", share_cfg)
        inbox: dict[int, dict[str, bytes]] = {u: {} for u in shared}
        for u, reply in shared.items():
            for key, blob in reply.content[protocol.CONFIG_RECORD].items():
                v = int(key.split(":")[1])
                if v in shared:  # only clients that completed sharing take part from here
                    inbox[v][f"from:{u}"] = blob
        participants = sorted(shared)
        dtype = sa.modulus_dtype(self.bits, len(participants))
        self._round_state = {"graph": {u: [v for v in graph[u] if v in shared]
                                       for u in participants},
                             "s_pk": {u: keys[u]["s_pk"] for u in participants},
                             "participants": participants, "threshold": threshold,
                             "dtype": dtype}
        core.rounds[-1].bytes_down = sum(len(a.data) for a in arrays.values()) * len(participants)
        core.expected_nodes = set(participants)
        messages = []
        for u in participants:
            cfg = core.round_config(server_round, config)
            cfg.update({protocol.STAGE_KEY: "masked", "run-id": core.run_id,
                        "secagg-range": float(self.clip_range), "secagg-bits": int(self.bits),
                        "secagg-dtype": dtype.name, **inbox[u]})
            messages.append(Message(content=RecordDict({protocol.ARRAYS_RECORD: arrays,
                                                        protocol.CONFIG_RECORD: cfg}),
                                    dst_node_id=u, message_type=MessageType.TRAIN))
        return messages

    # ------------------------------------------------------------------ stage 4
    def aggregate_update(self, server_round: int, replies: Iterable[Message]
                         ) -> "dict[str, np.ndarray] | None":
        """The plain mean of the unmasked sum (without user-level DP)."""
        total, count = self.aggregate_sum(server_round, replies)
        return self.core.mean_update(total, count, server_round + self.core.round_offset)

    def aggregate_sum(self, server_round: int, replies: Iterable[Message],
                      max_norm: float | None = None
                      ) -> "tuple[dict[str, np.ndarray] | None, int]":
        """The survivors' unmasked sum and their number; (None, 0) if it cannot be unmasked.
        ``max_norm`` cannot be checked on masked inputs (clients clip before masking)."""
        core = self.core
        server_round += core.round_offset
        st = self._round_state
        length = sum(v.size for v in core.global_arrays.values())
        masked = core.collect(server_round, replies,
                              lambda msg: self._parse_masked(msg, length, st["dtype"]))
        if len(masked) < max(st.get("threshold", 1), core.min_clients):
            log.warning("round %d: %d masked inputs: too few to unmask; global adapter unchanged",
                        server_round, len(masked))
            return None, 0
        survivors = sorted(masked)
        try:
            sa.check_connected(st["graph"], survivors)
        except sa.SecAggError as exc:
            return self._discard(server_round, exc)
        dropped = [u for u in st["participants"] if u not in masked]
        revealed = self._exchange(self._grid, server_round, "unmask", {
            u: {"survivors": survivors, "dropped": dropped} for u in survivors})
        b_shares, s_shares = {}, {}
        for holder, reply in revealed.items():
            x = sa.share_point(holder, st["participants"])
            for key, share in reply.content[protocol.CONFIG_RECORD].items():
                kind, sender = key.split(":")
                target = b_shares if kind == "b" else s_shares
                target.setdefault(int(sender), {})[x] = share
        try:
            total = sa.unmask_sum(masked, st["graph"], st["s_pk"], b_shares, s_shares,
                                  st["threshold"], core.run_id, server_round)
            sa.check_sum_range(total, len(survivors), self.bits)
        except sa.SecAggError as exc:
            return self._discard(server_round, exc)
        flat = sa.dequantize_sum(total, len(survivors), self.clip_range, self.bits)
        total_dict, offset = {}, 0
        for k in sorted(core.global_arrays):
            ref = core.global_arrays[k]
            total_dict[k] = flat[offset:offset + ref.size].reshape(ref.shape)
            offset += ref.size
        return total_dict, len(survivors)

    def _discard(self, server_round: int, exc: Exception) -> tuple[None, int]:
        log.warning("round %d: cannot unmask (%s); global adapter unchanged", server_round, exc)
        self.core.rounds[-1].discarded = f"cannot unmask: {exc}"
        return None, 0

    def _parse_masked(self, msg: Message, length: int, dtype: np.dtype):
        client_id, metrics = self.core.parse_common(msg)
        arrays = msg.content[protocol.ARRAYS_RECORD]
        if list(arrays.keys()) != [protocol.MASKED_KEY]:
            raise UpdateRejected(f"expected one masked vector, got {list(arrays.keys())[:3]}")
        y = arrays[protocol.MASKED_KEY].numpy()
        if y.dtype != dtype or y.shape != (length,):
            raise UpdateRejected(f"masked vector {y.dtype}{y.shape} != {dtype}({length},)")
        return client_id, y, metrics, y.nbytes

    def summary(self) -> None:
        log.info("SecAgg+: %s shares, threshold %s, %d-bit quantization on [-%.3g, %.3g]",
                 self.num_shares, self.threshold, self.bits, self.clip_range, self.clip_range)
        super().summary()
