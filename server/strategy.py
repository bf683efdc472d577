"""FedAvg over adapter deltas, with explicit client sampling and checks of every update.

Hooks on Flower's ``FedAvg`` (``flwr.serverapp.strategy``):
  * ``configure_train``: sample the cohort (``fixed``: k of N without replacement;
    ``poisson``: each client independently with probability k/N; without user-level DP only
    among clients still under their participation cap, ``fedllm.privacy.participation``) and
    send the global adapter plus the resolved config.
  * ``aggregate_train``: reject malformed updates (logged, the round goes on), average the
    accepted deltas *unweighted* (weights by client size would leak sizes and change the
    sensitivity), apply them to the global adapter, and record each client's DP event.
"""

from __future__ import annotations

import logging
import math
import random
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedllm import protocol
from fedllm.privacy.accounting import PrivacyEvent
from fedllm.privacy.participation import CohortSampler
from fedllm.privacy.updates import UpdateRejected, add_noise, check_update
from fedllm.server_opt import ServerOptimizer

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
    train_loss: float = math.nan
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


class AdapterFedAvg(FedAvg):
    def __init__(self, *, cfg_text: str, clients_per_round: int, sampling: str,
                 server_lr: float, seed: int | None = None, min_clients: int = 1,
                 user_dp: UserDP | None = None, run_id: str = "",
                 server_optimizer: str = "fedavg", participation_cap: int | None = None) -> None:
        super().__init__(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        self.cfg_text = cfg_text
        self.server_opt = ServerOptimizer(server_optimizer, server_lr)
        self.min_clients = min_clients
        # The cohort comes from OS entropy: run.seed travels to every client, and a cohort
        # that anyone holding it can replay gives no amplification. A seed is for tests only.
        self.rng = random.SystemRandom() if seed is None else random.Random(seed)
        # Example-level only: sample among clients that can still train (cap, budget). With
        # user-level DP every client stays in the pool, so q = k/N is exact every round.
        self.sampler = CohortSampler(cohort=clients_per_round, sampling=sampling,
                                     cap=participation_cap or 2 ** 31, narrow=user_dp is None,
                                     rng=self.rng)
        self.global_arrays: OrderedDict[str, np.ndarray] | None = None
        self.events: dict[str, list[PrivacyEvent]] = {}
        self.client_params: dict[str, dict] = {}
        self.rounds: list[RoundInfo] = []
        self.user_dp = user_dp
        self.user_releases: list[int] = []  # rounds whose noised aggregate was released
        self.run_id = run_id
        # Flower's Strategy.start counts rounds from 1; after a resume, add the rounds done.
        self.round_offset = 0
        # Called with each user-level release *before* the aggregate is applied (write-ahead).
        self.on_user_release = None
        self.expected_nodes: set[int] = set()
        self.grid: Grid | None = None  # set by the ServerApp (federated evaluation)

    # ------------------------------------------------------------------ sampling
    def sample(self, node_ids: list[int]) -> list[int]:
        return self.sampler.sample(node_ids)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self.global_arrays = OrderedDict((k, v.numpy()) for k, v in arrays.items())
        node_ids = self.sample(list(grid.get_node_ids()))
        info = RoundInfo(round=server_round, sampled=len(node_ids))
        info.bytes_down = array_bytes(arrays) * len(node_ids)
        self.rounds.append(info)
        self.expected_nodes = set(node_ids)
        log.info("round %d: sampled %d clients", server_round, len(node_ids))
        record = RecordDict({
            protocol.ARRAYS_RECORD: arrays,
            protocol.CONFIG_RECORD: self.round_config(server_round),
        })
        return self._construct_messages(record, node_ids, "train")

    def round_config(self, server_round: int) -> ConfigRecord:
        config = ConfigRecord({protocol.CONFIG_KEY: self.cfg_text, protocol.ROUND_KEY: server_round})
        if self.user_dp is not None:
            config[protocol.USER_NOISE_KEY] = float(self.user_dp.noise_multiplier)
            config[protocol.MIN_SURVIVORS_KEY] = int(self.user_dp.min_survivors)
        return config

    # ------------------------------------------------------------------ aggregation
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        accepted = self.collect(server_round, replies, self._parse_reply)
        if len(accepted) < self.min_clients and not self.always_releases():
            log.warning("round %d: %d valid updates < federation.min_clients=%d; global adapter "
                        "unchanged", server_round, len(accepted), self.min_clients)
            return None, None
        average = self.average(list(accepted.values()), server_round)
        return self.apply(average, len(accepted))

    def collect(self, server_round: int, replies: Iterable[Message], parse) -> dict:
        """Accepted payloads by node; errors, declines and rejected updates are logged.

        ``parse(msg) -> (client_id, payload, metrics, bytes)`` raises UpdateRejected.
        """
        info = self.rounds[-1]
        accepted, losses = {}, []
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
            log.info("  client %s: train loss %.4f, q=%.4f, z=%.3f", client_id,
                     metrics["train_loss"], metrics["sample_rate"], metrics["noise_multiplier"])
            info.bytes_up += nbytes
            info.accepted.append(client_id)
            accepted[node] = payload
            if math.isfinite(metrics["train_loss"]):
                losses.append(metrics["train_loss"])
        info.train_loss = float(np.mean(losses)) if losses else math.nan
        return accepted

    def apply(self, average: "dict[str, np.ndarray] | None", count: int
              ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """New global adapter: the server optimizer's step along the average (FedAvg:
        global + server_lr * average). None: leave it unchanged."""
        if average is None:
            return None, None
        new = self.server_opt.step(self.global_arrays, average)
        arrays = ArrayRecord(array_dict=OrderedDict((k, Array(v)) for k, v in new.items()))
        return arrays, MetricRecord({"train_loss": self.rounds[-1].train_loss,
                                     "num_clients": count})

    def average(self, deltas: list[dict], server_round: int) -> "dict[str, np.ndarray] | None":
        """Plain mean; or, with user-level DP, (sum + noise) / expected cohort size."""
        total = {k: np.sum([d[k] for d in deltas], axis=0, dtype=np.float64) if deltas
                 else np.zeros(v.shape, np.float64) for k, v in self.global_arrays.items()}
        return self.finish_sum(total, len(deltas), server_round)

    def always_releases(self) -> bool:
        """Central user-level noise: every round releases a noised sum, even of fewer than
        min_clients updates (or none). A skip would depend on who was sampled and would leak
        it; the accountant assumes every round releases."""
        return self.user_dp is not None and self.user_dp.noise == "central"

    def finish_sum(self, total: "dict[str, np.ndarray]", count: int, server_round: int
                   ) -> "dict[str, np.ndarray] | None":
        dp = self.user_dp
        if dp is None:
            return {k: (v / count).astype(np.float32) for k, v in total.items()}
        if dp.noise == "distributed" and count < dp.min_survivors:
            log.warning("round %d: %d survivors < %d needed for the calibrated noise; no update",
                        server_round, count, dp.min_survivors)
            return None
        if self.on_user_release is not None:
            self.on_user_release(server_round, count)
        if dp.noise == "central":
            total = add_noise(total, dp.noise_multiplier * dp.clip_norm)
        self.user_releases.append(server_round)
        return {k: (v / dp.expected_cohort).astype(np.float32) for k, v in total.items()}

    def federated_evaluate(self, arrays: ArrayRecord, server_round: int, timeout: float) -> dict:
        """Held-out loss on every connected node's own data (deployment: no data on the server).

        Only the loss sum and sequence count leave a node (not DP-protected: aggregate
        statistics of held-out data)."""
        nodes = sorted(self.grid.get_node_ids())
        config = ConfigRecord({protocol.CONFIG_KEY: self.cfg_text, protocol.ROUND_KEY: server_round})
        record = RecordDict({protocol.ARRAYS_RECORD: arrays, protocol.CONFIG_RECORD: config})
        replies = self.grid.send_and_receive(
            self._construct_messages(record, nodes, "evaluate"), timeout=timeout)
        total, count = 0.0, 0
        for msg in replies:
            if msg.has_error():
                log.warning("evaluation on node %d failed: %s", msg.metadata.src_node_id,
                            msg.error.reason)
                continue
            metrics = msg.content[protocol.METRICS_RECORD]
            total += float(metrics["eval_loss_sum"])
            count += int(metrics["num_sequences"])
        loss = total / count if count else math.nan
        return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)) if count else math.nan}

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
        for key in ("train_loss", "steps", "sample_rate", "noise_multiplier", "dp"):
            if key not in metrics:
                raise UpdateRejected(f"metrics lack {key!r}")
        client_id = str(content[protocol.CLIENT_RECORD]["client_id"])
        self._record_event(client_id, metrics, self.rounds[-1])
        return client_id, metrics

    def _parse_reply(self, msg: Message):
        client_id, metrics = self.parse_common(msg)
        record = msg.content[protocol.ARRAYS_RECORD]
        delta = {k: v.numpy() for k, v in record.items()}
        check_update(delta, self.global_arrays,
                     max_norm=self.user_dp.check_bound() if self.user_dp else None)
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
