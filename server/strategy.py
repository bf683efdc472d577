"""The server's strategy, composed like Flower's DP wrappers (``fedllm.server.strategy_wrapper``):

    ServerOptimization(UserLevelDP(SecAggPlus(AdapterFedAvg(...)), ...), optimizer)

  * ``AdapterFedAvg`` (the core): samples the cohort with a ``CohortSampler`` (``fixed``: k of
    N without replacement; ``poisson``: each client independently with probability k/N;
    without user-level DP only among clients still under their participation cap,
    ``fedllm.privacy.participation``), sends the global adapter plus the resolved config,
    rejects malformed updates (logged, the round goes on), records each client's DP event,
    and averages the accepted deltas *unweighted* (weights by client size would leak sizes
    and change the sensitivity).
  * ``UserLevelDP``: DP-FedAvg. Noise on the sum (central) or from the clients (distributed),
    divided by the expected cohort; every central round releases.
  * ``fedllm.server.secagg.SecAggPlus``: the sum comes from SecAgg+ masked inputs.
  * ``ServerOptimization``: FedAvg / FedAvgM / FedAdam / FedYogi step along the released
    update (``fedllm.server.server_opt``).
Any layer but the core is optional; ``make_strategy`` in ``fedllm.server.app`` builds the stack.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedllm import protocol
from fedllm.privacy.accounting import PrivacyEvent
from fedllm.privacy.participation import CohortSampler
from fedllm.privacy.updates import UpdateRejected, add_noise, check_update
from fedllm.run_status import RunStopped
from fedllm.server.server_opt import ServerOptimizer
from fedllm.server.strategy_wrapper import StrategyWrapper, find_layer, require

log = logging.getLogger(__name__)


@dataclass
class RoundInfo:
    round: int
    sampled: int = 0
    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, str] = field(default_factory=dict)
    declined: dict[str, str] = field(default_factory=dict)   # client id -> reason
    refused: dict[str, str] = field(default_factory=dict)    # client id -> reason (ledger...)
    releases: list[dict] = field(default_factory=list)       # DP releases seen this round
    bytes_up: int = 0
    bytes_down: int = 0
    discarded: str = ""    # why the round's aggregate was thrown away ("" if it was not)


def array_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


@dataclass(frozen=True)
class UserDP:
    """Server side of DP-FedAvg: noise on the sum, division by the expected cohort."""

    noise_multiplier: float
    clip_norm: float
    noise: str                 # central | distributed
    expected_cohort: int
    min_survivors: int

    def check_bound(self) -> float | None:
        # With distributed noise each update carries its noise share: no norm bound to check.
        return self.clip_norm if self.noise == "central" else None


class AdapterFedAvg(Strategy):
    """Plain FedAvg of adapter deltas: sampling, update checks, event records (the core)."""

    def __init__(self, *, cfg_text: str, sampler: CohortSampler, min_clients: int = 1,
                 run_id: str = "", grid: Grid | None = None,
                 reconnect_timeout: float = 0.0) -> None:
        self.cfg_text = cfg_text
        self.reconnect_timeout = reconnect_timeout
        self.sampler = sampler
        self.min_clients = min_clients
        self.run_id = run_id
        self.grid = grid  # federated evaluation (eval.mode=federated) only
        self.global_arrays: OrderedDict[str, np.ndarray] | None = None
        self.events: dict[str, list[PrivacyEvent]] = {}
        self.client_params: dict[str, dict] = {}
        self.rounds: list[RoundInfo] = []
        self.user_releases: list[int] = []  # rounds whose user-level DP aggregate was released
        # Flower's Strategy.start counts rounds from 1; after a resume, add the rounds done.
        self.round_offset = 0
        self.expected_nodes: set[int] = set()

    @property
    def core(self) -> "AdapterFedAvg":
        return self

    @property
    def rng(self) -> random.Random:
        return self.sampler.rng

    # ------------------------------------------------------------------ sampling
    def sample(self, node_ids: list[int]) -> list[int]:
        return self.sampler.sample(node_ids)

    def start_round(self, server_round: int, arrays: ArrayRecord, grid: Grid
                    ) -> tuple[int, list[int]]:
        """Open a round: remember the global adapter, sample the cohort, add its RoundInfo.
        Returns (the run's round number, the sampled node ids)."""
        server_round += self.round_offset
        self.global_arrays = OrderedDict((k, v.numpy()) for k, v in arrays.items())
        node_ids = self.sample(self.connected_nodes(grid, server_round))
        self.rounds.append(RoundInfo(round=server_round, sampled=len(node_ids)))
        self.expected_nodes = set()
        log.info("round %d: sampled %d clients", server_round, len(node_ids))
        return server_round, node_ids

    def connected_nodes(self, grid: Grid, server_round: int) -> list[int]:
        """The connected nodes, once at least federation.min_clients are: the server waits up
        to federation.reconnect_timeout for them (a partition, restarting SuperNodes), then
        stops resumably (RunStopped) instead of running a round without clients."""
        deadline = time.monotonic() + self.reconnect_timeout
        warned = False
        while True:
            stop = getattr(grid, "stop_requested", None)
            if stop is not None and stop():
                raise RunStopped("stop requested (interrupt or SIGTERM)")
            nodes = list(grid.get_node_ids())
            if len(nodes) >= self.min_clients:
                return nodes
            if time.monotonic() >= deadline:
                raise RunStopped(
                    f"round {server_round}: {len(nodes)} SuperNode(s) connected, "
                    f"federation.min_clients={self.min_clients}; waited "
                    f"{self.reconnect_timeout:g} s (federation.reconnect_timeout)")
            if not warned:
                log.warning("round %d: %d SuperNode(s) connected, waiting up to %.0f s for %d",
                            server_round, len(nodes), self.reconnect_timeout, self.min_clients)
                warned = True
            time.sleep(1.0)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round, node_ids = self.start_round(server_round, arrays, grid)
        self.rounds[-1].bytes_down = array_bytes(arrays) * len(node_ids)
        self.expected_nodes = set(node_ids)
        record = RecordDict({
            protocol.ARRAYS_RECORD: arrays,
            protocol.CONFIG_RECORD: self.round_config(server_round, config),
        })
        return [Message(content=record, dst_node_id=node, message_type=MessageType.TRAIN)
                for node in node_ids]

    def round_config(self, server_round: int, config: ConfigRecord | None = None
                     ) -> ConfigRecord:
        """The resolved fedllm config and round number, plus what wrappers passed in
        ``config`` (e.g. user-level DP's noise multiplier)."""
        return ConfigRecord({protocol.CONFIG_KEY: self.cfg_text, protocol.ROUND_KEY: server_round,
                             **dict(config or {})})

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return self.apply(self.aggregate_update(server_round, replies))

    def aggregate_update(self, server_round: int, replies: Iterable[Message]
                         ) -> "dict[str, np.ndarray] | None":
        """The plain mean of the accepted deltas (None below federation.min_clients)."""
        total, count = self.aggregate_sum(server_round, replies)
        return self.mean_update(total, count, server_round + self.round_offset)

    def aggregate_sum(self, server_round: int, replies: Iterable[Message],
                      max_norm: float | None = None) -> "tuple[dict[str, np.ndarray], int]":
        """Sum (float64) of the accepted deltas, and their number. ``max_norm``: reject
        updates above it (user-level DP with central noise: the clip bound)."""
        server_round += self.round_offset
        accepted = self.collect(server_round, replies,
                                lambda msg: self.parse_update(msg, max_norm))
        deltas = list(accepted.values())
        total = {k: np.sum([d[k] for d in deltas], axis=0, dtype=np.float64) if deltas
                 else np.zeros(v.shape, np.float64) for k, v in self.global_arrays.items()}
        return total, len(deltas)

    def mean_update(self, total: "dict[str, np.ndarray] | None", count: int, server_round: int
                    ) -> "dict[str, np.ndarray] | None":
        """Unweighted mean (weights by client size would leak sizes and change the
        sensitivity); None, leaving the adapter unchanged, below federation.min_clients."""
        if total is None:
            return None
        if count < self.min_clients:
            log.warning("round %d: %d valid updates < federation.min_clients=%d; global adapter "
                        "unchanged", server_round, count, self.min_clients)
            return None
        return {k: (v / count).astype(np.float32) for k, v in total.items()}

    def apply(self, update: "dict[str, np.ndarray] | None"
              ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """New global adapter: global + update (a ServerOptimization layer steps instead).
        None: leave it unchanged."""
        if update is None:
            return None, None
        return self.publish(OrderedDict(
            (k, (x + np.asarray(update[k], dtype=np.float64)).astype(np.float32))
            for k, x in self.global_arrays.items()))

    def publish(self, new: "dict[str, np.ndarray]") -> tuple[ArrayRecord, MetricRecord]:
        """The new global adapter and the round's train metrics, as Flower records."""
        arrays = ArrayRecord(array_dict=OrderedDict((k, Array(v)) for k, v in new.items()))
        info = self.rounds[-1]
        return arrays, MetricRecord({"num_clients": len(info.accepted)})

    def collect(self, server_round: int, replies: Iterable[Message], parse) -> dict:
        """Accepted payloads by node; errors, declines and rejected updates are logged.

        ``parse(msg) -> (client_id, payload, metrics, bytes)`` raises UpdateRejected.
        """
        info = self.rounds[-1]
        accepted = {}
        replies = list(replies)
        self.log_missing(info, replies)
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                info.rejected[f"node {node}"] = f"client error: {msg.error.reason}"
                log.warning("round %d: node %d failed: %s", server_round, node, msg.error.reason)
                continue
            if self._declined(msg, info):
                continue
            try:
                client_id, payload, metrics, nbytes = parse(msg)
            except UpdateRejected as exc:
                info.rejected[f"node {node}"] = str(exc)
                log.warning("round %d: rejected update from node %d: %s", server_round, node, exc)
                continue
            log.info("  client %s: q=%.4f, z=%.3f", client_id, metrics["sample_rate"],
                     metrics["noise_multiplier"])
            info.bytes_up += nbytes
            info.accepted.append(client_id)
            accepted[node] = payload
        return accepted

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []  # evaluation runs in the ServerApp's evaluate_fn (federated_evaluate)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        log.info("adapter FedAvg: cohort %d (%s sampling), min_clients %d",
                 self.sampler.cohort, self.sampler.sampling, self.min_clients)

    def federated_evaluate(self, arrays: ArrayRecord, server_round: int, timeout: float) -> dict:
        """Held-out loss on every connected node's own data (deployment: no data on the server).

        Each node releases a DP statistic (noised clipped loss sum and noised count, charged
        to its ledger); the server adds them up. A node that declines is left out."""
        nodes = sorted(self.grid.get_node_ids())
        config = ConfigRecord({protocol.CONFIG_KEY: self.cfg_text, protocol.ROUND_KEY: server_round})
        record = RecordDict({protocol.ARRAYS_RECORD: arrays, protocol.CONFIG_RECORD: config})
        messages = [Message(content=record, dst_node_id=node, message_type=MessageType.EVALUATE)
                    for node in nodes]
        replies = self.grid.send_and_receive(messages, timeout=timeout)
        total, count = 0.0, 0
        for msg in replies:
            if msg.has_error():
                log.warning("evaluation on node %d failed: %s", msg.metadata.src_node_id,
                            msg.error.reason)
                continue
            metrics = msg.content[protocol.METRICS_RECORD]
            if metrics.get("declined") or "eval_loss_sum" not in metrics:
                continue
            total += float(metrics["eval_loss_sum"])
            count += float(metrics["num_sequences"])
        # Noised sums: a count near or below 1 carries no usable estimate.
        loss = total / count if count >= 1 else math.nan
        return {"eval_loss": loss,
                "perplexity": math.exp(min(max(loss, 0.0), 50.0)) if count >= 1 else math.nan}

    def log_missing(self, info: RoundInfo, replies: list[Message]) -> None:
        """Sampled nodes that sent nothing back within federation.client_timeout."""
        answered = {m.metadata.src_node_id for m in replies}
        for node in sorted(self.expected_nodes - answered):
            info.rejected[f"node {node}"] = "no reply within federation.client_timeout"
            log.warning("round %d: node %d did not reply in time; dropped from the round",
                        info.round, node)

    def _declined(self, msg: Message, info: RoundInfo) -> bool:
        content = msg.content
        if protocol.METRICS_RECORD not in content or protocol.CLIENT_RECORD not in content:
            return False
        if not content[protocol.METRICS_RECORD].get("declined"):
            return False
        client = content[protocol.CLIENT_RECORD]
        reason = str(client.get("reason", "declined"))
        # Cap, budget or an unreadable ledger: it cannot train again in this run.
        self.sampler.declined(msg.metadata.src_node_id)
        refused = bool(content[protocol.METRICS_RECORD].get("refused"))
        (info.refused if refused else info.declined)[str(client["client_id"])] = reason
        log.warning("round %d: client %s %s: %s", info.round, client["client_id"],
                    "refused to train" if refused else "declined", reason)
        return True

    def parse_common(self, msg: Message) -> tuple[str, dict]:
        """Client id and metrics of a reply; its DP event is accounted before any other check
        (the client released a noised update whether or not we accept it)."""
        content = msg.content
        for name in (protocol.ARRAYS_RECORD, protocol.METRICS_RECORD, protocol.CLIENT_RECORD):
            if name not in content:
                raise UpdateRejected(f"reply lacks the {name!r} record")
        metrics = dict(content[protocol.METRICS_RECORD])
        for key in ("steps", "sample_rate", "noise_multiplier", "dp"):
            if key not in metrics:
                raise UpdateRejected(f"metrics lack {key!r}")
        client_id = str(content[protocol.CLIENT_RECORD]["client_id"])
        unlisted = protocol.unlisted_fields(
            RecordDict({protocol.METRICS_RECORD: content[protocol.METRICS_RECORD]}),
            protocol.TRAIN_REPLY)
        if unlisted:  # never used, logged or stored: only what the protocol lists is
            log.warning("client %s sent fields the protocol does not list (ignored): %s",
                        client_id, ", ".join(unlisted))
            metrics = {k: v for k, v in metrics.items()
                       if f"{protocol.METRICS_RECORD}.{k}" not in unlisted}
        self._record_event(client_id, metrics, self.rounds[-1])
        return client_id, metrics

    def parse_update(self, msg: Message, max_norm: float | None = None):
        client_id, metrics = self.parse_common(msg)
        record = msg.content[protocol.ARRAYS_RECORD]
        delta = {k: v.numpy() for k, v in record.items()}
        check_update(delta, self.global_arrays, max_norm=max_norm)
        return client_id, delta, metrics, array_bytes(record)

    def _record_event(self, client_id: str, metrics: dict, info: RoundInfo) -> None:
        params = self.client_params.setdefault(client_id, {"rounds": 0, "steps": 0})
        params["rounds"] += 1
        params["steps"] += int(metrics["steps"])
        if not metrics["dp"]:
            return
        event = PrivacyEvent(noise_multiplier=float(metrics["noise_multiplier"]),
                             steps=int(metrics["steps"]), sampling="poisson",
                             sample_rate=float(metrics["sample_rate"]))
        self.events.setdefault(client_id, []).append(event)
        info.releases.append({"round": info.round, "client_id": client_id, **event.to_dict(),
                              "max_grad_norm": float(metrics["max_grad_norm"]),
                              "lifetime_epsilon": metrics.get("lifetime_epsilon")})
        params.update(sample_rate=event.sample_rate, noise_multiplier=event.noise_multiplier,
                      max_grad_norm=float(metrics["max_grad_norm"]))


def cohort_sampler(clients_per_round: int, sampling: str, *, user_level: bool,
                   participation_cap: int | None = None, seed: int | None = None
                   ) -> CohortSampler:
    """The server's sampler. The cohort comes from OS entropy: run.seed travels to every
    client, and a cohort that anyone holding it can replay gives no amplification (a seed
    is for tests only). Example-level only: sample among clients that can still train (cap,
    budget); with user-level DP every client stays in the pool, so q = k/N is exact."""
    rng = random.SystemRandom() if seed is None else random.Random(seed)
    return CohortSampler(cohort=clients_per_round, sampling=sampling,
                         cap=participation_cap or 2 ** 31, narrow=not user_level, rng=rng)


class UserLevelDP(StrategyWrapper):
    """User-level DP (DP-FedAvg) around the strategy that sums the round's updates.

    Clients clip their whole update to S (and, with distributed noise, add their noise
    share); this layer tells them z, rejects updates above S (central noise), adds
    N(0, (zS)^2) to the sum (central), and divides by the expected cohort, not the count.
    ``on_release(round, survivors)`` is called with each release *before* the update is
    applied (write-ahead: the accountant's record)."""

    def __init__(self, strategy: Strategy, dp: UserDP,
                 on_release: Callable[[int, int], None] | None = None) -> None:
        require(strategy, "aggregate_sum", "UserLevelDP",
                "noise goes on the sum: wrap AdapterFedAvg or SecAggPlus")
        if strategy.core.sampler.narrow:
            raise ValueError("UserLevelDP needs a sampler over every client "
                             "(cohort_sampler(..., user_level=True)): q = k/N must hold")
        super().__init__(strategy)
        self.dp = dp
        self.on_release = on_release

    @property
    def user_releases(self) -> list[int]:
        return self.core.user_releases

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        config = ConfigRecord({**dict(config),
                               protocol.USER_NOISE_KEY: float(self.dp.noise_multiplier),
                               protocol.MIN_SURVIVORS_KEY: int(self.dp.min_survivors)})
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_update(self, server_round: int, replies: Iterable[Message]
                         ) -> "dict[str, np.ndarray] | None":
        total, count = self.strategy.aggregate_sum(server_round, replies,
                                                   max_norm=self.dp.check_bound())
        server_round += self.core.round_offset
        if total is None:
            return None
        min_clients = self.core.min_clients
        if count < min_clients and not self.always_releases():
            log.warning("round %d: %d valid updates < federation.min_clients=%d; global adapter "
                        "unchanged", server_round, count, min_clients)
            return None
        return self.finish_sum(total, count, server_round)

    def average(self, deltas: list[dict], server_round: int) -> "dict[str, np.ndarray] | None":
        """(sum of these deltas + noise) / expected cohort, as one round would release it."""
        total = {k: np.sum([d[k] for d in deltas], axis=0, dtype=np.float64) if deltas
                 else np.zeros(v.shape, np.float64) for k, v in self.core.global_arrays.items()}
        return self.finish_sum(total, len(deltas), server_round)

    def always_releases(self) -> bool:
        """Central noise: every round releases a noised sum, even of fewer than min_clients
        updates (or none). A skip would depend on who was sampled and would leak it; the
        accountant assumes every round releases."""
        return self.dp.noise == "central"

    def finish_sum(self, total: "dict[str, np.ndarray]", count: int, server_round: int
                   ) -> "dict[str, np.ndarray] | None":
        dp = self.dp
        if dp.noise == "distributed" and count < dp.min_survivors:
            log.warning("round %d: %d survivors < %d needed for the calibrated noise; no update",
                        server_round, count, dp.min_survivors)
            return None
        if self.on_release is not None:
            self.on_release(server_round, count)
        if dp.noise == "central":
            total = add_noise(total, dp.noise_multiplier * dp.clip_norm)
        self.core.user_releases.append(server_round)
        return {k: (v / dp.expected_cohort).astype(np.float32) for k, v in total.items()}

    def summary(self) -> None:
        log.info("user-level DP: z=%.4f, clip %g, %s noise, expected cohort %d",
                 self.dp.noise_multiplier, self.dp.clip_norm, self.dp.noise,
                 self.dp.expected_cohort)
        super().summary()


class ServerOptimization(StrategyWrapper):
    """The new global adapter is the server optimizer's step along the released update
    (FedAvg: global + server_lr * update). Post-processing: no privacy guarantee changes.

    Flower's own FedAdam/FedYogi/FedAvgM do not fit: they average full weights weighted by
    example counts (our clients send deltas, averaged unweighted or noised), bias-correct
    with the round number (which restarts at 1 after a resume) and keep moments that a
    checkpoint cannot restore."""

    def __init__(self, strategy: Strategy, optimizer: ServerOptimizer) -> None:
        require(strategy, "aggregate_update", "ServerOptimization",
                "it steps along the released update: make it the outermost layer")
        super().__init__(strategy)
        self.optimizer = optimizer

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        update = self.strategy.aggregate_update(server_round, replies)
        if update is None:
            return None, None
        return self.core.publish(self.optimizer.step(self.core.global_arrays, update))

    # The outermost layer: nothing can step along an optimizer's output.
    aggregate_update = None

    def summary(self) -> None:
        log.info("server optimizer: %s, lr %g", self.optimizer.name, self.optimizer.lr)
        super().summary()


def user_dp_layer(strategy: Strategy) -> UserLevelDP | None:
    return find_layer(strategy, UserLevelDP)


def server_optimizer(strategy: Strategy) -> ServerOptimizer | None:
    layer = find_layer(strategy, ServerOptimization)
    return layer.optimizer if layer is not None else None
