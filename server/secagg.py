"""Server side of SecAgg+ as a strategy: the same FedAvg hooks, four exchanges per round.

``configure_train`` runs the setup and share-keys exchanges itself (it has the grid) and
returns the masked-input messages that Flower's ``Strategy.start`` sends; ``aggregate_train``
runs the unmask exchange and hands the unmasked *sum* to the usual DP finishing step (central
noise, division by the expected cohort). The server never sees an individual update.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedllm import protocol
from fedllm import secagg as sa
from fedllm.privacy.updates import UpdateRejected
from fedllm.server.strategy import AdapterFedAvg, RoundInfo, array_bytes

log = logging.getLogger(__name__)


class SecAggFedAvg(AdapterFedAvg):
    def __init__(self, *, num_shares: int, threshold: int, bits: int,
                 clip_range: float, timeout: float, **kwargs) -> None:
        super().__init__(**kwargs)
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
                                   "run-id": self.run_id, **extra})
            content = RecordDict({protocol.CONFIG_RECORD: config})
            if arrays is not None:
                content[protocol.ARRAYS_RECORD] = arrays
            messages.append(Message(content=content, dst_node_id=node, message_type="train"))
        replies = grid.send_and_receive(messages, timeout=self.timeout)
        ok = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d dropped at SecAgg+ %s: %s", server_round, node,
                            stage, reply.error.reason)
                self.rounds[-1].rejected[f"node {node}"] = f"{stage}: {reply.error.reason}"
            else:
                ok[node] = reply
        return ok

    # ------------------------------------------------------------------ stages 1-3
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._grid = grid
        self.global_arrays = OrderedDict((k, v.numpy()) for k, v in arrays.items())
        nodes = sorted(self.sample(list(grid.get_node_ids())))
        info = RoundInfo(round=server_round, sampled=len(nodes))
        self.rounds.append(info)
        self.expected_nodes = set()
        shares = sa.share_count(len(nodes), self.num_shares)
        threshold = sa.majority_threshold(shares, self.threshold)
        if len(nodes) < max(threshold, self.min_clients, 2):
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
        info.bytes_down = array_bytes(arrays) * len(participants)
        self.expected_nodes = set(participants)
        messages = []
        for u in participants:
            cfg = self.round_config(server_round)
            cfg.update({protocol.STAGE_KEY: "masked", "run-id": self.run_id,
                        "secagg-range": float(self.clip_range), "secagg-bits": int(self.bits),
                        "secagg-dtype": dtype.name, **inbox[u]})
            messages.append(Message(content=RecordDict({protocol.ARRAYS_RECORD: arrays,
                                                        protocol.CONFIG_RECORD: cfg}),
                                    dst_node_id=u, message_type="train"))
        return messages

    # ------------------------------------------------------------------ stage 4
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        st = self._round_state
        length = sum(v.size for v in self.global_arrays.values())
        masked = self.collect(server_round, replies,
                              lambda msg: self._parse_masked(msg, length, st["dtype"]))
        if len(masked) < max(st.get("threshold", 1), self.min_clients):
            log.warning("round %d: %d masked inputs: too few to unmask; global adapter unchanged",
                        server_round, len(masked))
            return None, None
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
                                  st["threshold"], self.run_id, server_round)
            sa.check_sum_range(total, len(survivors), self.bits)
        except sa.SecAggError as exc:
            return self._discard(server_round, exc)
        flat = sa.dequantize_sum(total, len(survivors), self.clip_range, self.bits)
        total_dict, offset = {}, 0
        for k in sorted(self.global_arrays):
            ref = self.global_arrays[k]
            total_dict[k] = flat[offset:offset + ref.size].reshape(ref.shape)
            offset += ref.size
        return self.apply(self.finish_sum(total_dict, len(survivors), server_round),
                          len(survivors))

    def _discard(self, server_round: int, exc: Exception) -> tuple[None, None]:
        log.warning("round %d: cannot unmask (%s); global adapter unchanged", server_round, exc)
        self.rounds[-1].discarded = f"cannot unmask: {exc}"
        return None, None

    def _parse_masked(self, msg: Message, length: int, dtype: np.dtype):
        client_id, metrics = self.parse_common(msg)
        arrays = msg.content[protocol.ARRAYS_RECORD]
        if list(arrays.keys()) != [protocol.MASKED_KEY]:
            raise UpdateRejected(f"expected one masked vector, got {list(arrays.keys())[:3]}")
        y = arrays[protocol.MASKED_KEY].numpy()
        if y.dtype != dtype or y.shape != (length,):
            raise UpdateRejected(f"masked vector {y.dtype}{y.shape} != {dtype}({length},)")
        return client_id, y, metrics, y.nbytes
