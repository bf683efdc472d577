"""Flower ClientApp: one local round of (DP-)training per train message.

The same app runs in simulation (a virtual SuperNode per client, ``partition-id`` in the node
config) and in deployment (a real SuperNode per site). The run's resolved fedllm config
arrives with every train message, so nothing depends on files shared with the server.

Every field of every reply, and why sending it is safe, is listed in ``fedllm.protocol``:
the noised adapter update, values derived only from public or already released values, and
DP statistics with their own ledger entries. What to release is ``release_policy``'s call.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import secrets
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm import models, protocol
from fedllm.config import (DataConfig, FedLLMConfig, ModelConfig, from_yaml,
                           min_client_sequences, to_yaml)
from fedllm.config import ledger_dir as config_ledger_dir
from fedllm.data.federated import ClientData, build_local_client
from fedllm.data.per_client import ClientIndex, build_client_index, cache_dir, load_client
from fedllm.evaluate import sequence_losses
from fedllm.io import append_jsonl
from fedllm.privacy import release_policy
from fedllm.privacy.accounting import PrivacyEvent, calibrate_noise
from fedllm.privacy.ledger import (Ledger, LedgerError, load_release, release_lock,
                                   save_release)
from fedllm.privacy.size_estimate import (data_fingerprint, eval_event, evaluations_event,
                                         noisy_size, size_event)
from fedllm.privacy.updates import add_noise, clip_update, distributed_noise_std
from fedllm.train import example_sample_rate, local_round

from fedllm.clients.secagg import secagg_stage

log = logging.getLogger(__name__)

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _config(text: str) -> FedLLMConfig:
    return from_yaml(text)


def node_config_overrides(cfg: FedLLMConfig, node_config) -> FedLLMConfig:
    """A deployed site's own settings win over the run's: model path, device, ledger dir, and
    its own privacy budget (the stricter of the site's and the run's applies)."""
    if not any(k in node_config for k in ("model-path", "device", "ledger-dir", "budget")):
        return cfg
    cfg = copy.deepcopy(cfg)
    if "model-path" in node_config:
        cfg.model.path = str(node_config["model-path"])
        if cfg.model.name == "smollm2":
            cfg.model.name = "hf"
    if "device" in node_config:
        cfg.model.device = str(node_config["device"])
    if "ledger-dir" in node_config:
        cfg.privacy.ledger_dir = str(node_config["ledger-dir"])
    if "budget" in node_config:
        site = float(node_config["budget"])
        run = cfg.privacy.budget
        cfg.privacy.budget = site if run is None else min(site, run)
    return cfg


def _section(cls, text: str):
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.create(text)))


# Loaded once per process (a simulated client's Ray actor, or a SuperNode's ClientApp process)
# and reused across rounds; keyed by the YAML of the config sections they depend on.
@functools.lru_cache(maxsize=1)
def _model(model_yaml: str, seed: int) -> models.LoadedModel:
    model_cfg = _section(ModelConfig, model_yaml)
    return models.build(model_cfg, seed=seed, device=model_cfg.device)


@functools.lru_cache(maxsize=1)
def _client_index(model_yaml: str, data_yaml: str, seq_len: int, seed: int, min_sequences: int,
                  num_clients: int | None, run_dir: str) -> ClientIndex:
    """The federation's client list and sizes: cached on disk by the CLI's preflight."""
    return build_client_index(_section(DataConfig, data_yaml), _model(model_yaml, seed).tokenizer,
                              seq_len=seq_len, min_sequences=min_sequences,
                              num_clients=num_clients, seed=seed, where=cache_dir(run_dir))


# Only this client's partition is read and tokenized, never the corpus. An actor that serves
# several virtual clients keeps the last few it served.
@functools.lru_cache(maxsize=4)
def _simulated_client(model_yaml: str, data_yaml: str, seq_len: int, seed: int,
                      min_sequences: int, num_clients: int | None, run_dir: str,
                      position: int) -> ClientData:
    index = _client_index(model_yaml, data_yaml, seq_len, seed, min_sequences, num_clients,
                          run_dir)
    return load_client(_section(DataConfig, data_yaml), _model(model_yaml, seed).tokenizer,
                       index, position, seq_len=seq_len, seed=seed, where=cache_dir(run_dir))


@functools.lru_cache(maxsize=2)
def _local_client(data_path: str, client_id: str, model_yaml: str, seq_len: int,
                  eval_fraction: float, min_sequences: int, seed: int,
                  unit: str = "sequence") -> ClientData:
    tokenizer = _model(model_yaml, seed).tokenizer
    return build_local_client(data_path, client_id, tokenizer, seq_len=seq_len,
                              eval_fraction=eval_fraction, min_sequences=min_sequences, seed=seed,
                              unit=unit)


def this_client(cfg: FedLLMConfig, node_config) -> ClientData:
    """Simulation: the partition-id-th client of the bundled/configured source. Deployment:
    the site's own files at node config ``data-path`` (client id: ``client-id``)."""
    if "partition-id" in node_config:
        return _simulated_client(to_yaml(cfg.model), to_yaml(cfg.data), cfg.train.seq_len,
                                 cfg.run.seed, min_client_sequences(cfg),
                                 cfg.federation.num_clients, cfg.run.dir,
                                 int(node_config["partition-id"]))
    if "data-path" not in node_config:
        raise ValueError("this SuperNode has no data: start it with --node-config "
                         "\"data-path=/path/to/data client-id=NAME\"")
    path = str(node_config["data-path"])
    client_id = str(node_config.get("client-id", Path(path).stem))
    return _local_client(path, client_id, to_yaml(cfg.model), cfg.train.seq_len,
                         cfg.data.eval_fraction, min_client_sequences(cfg), cfg.run.seed,
                         cfg.data.unit)


@functools.lru_cache(maxsize=4096)
def planned_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                             planned_steps: int, accountant: str,
                             prior: tuple[PrivacyEvent, ...] = ()) -> float:
    """Noise so that this client's epsilon stays <= target over all the steps it may run,
    composed after ``prior``: the releases a run also spends (its size estimate, its planned
    DP evaluations)."""
    return calibrate_noise(target_epsilon, delta, steps=planned_steps, sample_rate=sample_rate,
                           accountant=accountant, prior=prior)


def noise_multiplier_for(cfg: FedLLMConfig, sample_rate: float,
                         prior: tuple[PrivacyEvent, ...] = ()) -> float:
    ex = cfg.privacy.example
    if not ex.enabled:
        return 0.0
    if ex.noise_multiplier is not None:
        return float(ex.noise_multiplier)
    steps = max_participations(cfg) * cfg.train.local_steps
    return planned_noise_multiplier(ex.target_epsilon, cfg.privacy.delta, sample_rate, steps,
                                    cfg.privacy.accountant, prior)


def planned_evaluations(cfg: FedLLMConfig) -> tuple[PrivacyEvent, ...]:
    """The DP evaluation releases a run plans for each node: base model + every round, in a
    deployment (eval.mode=clients); none in simulation (the server evaluates)."""
    event = evaluations_event(cfg, cfg.federation.rounds + 1)
    return (event,) if event is not None else ()


def max_participations(cfg: FedLLMConfig) -> int:
    """This client's participation cap in the run. The server resolves ``auto`` before the run;
    a config that still says ``auto`` is read as every round (conservative: more noise)."""
    cap = cfg.privacy.example.max_participations
    return cfg.federation.rounds if cap == "auto" else min(int(cap), cfg.federation.rounds)


def default_site_budget() -> float | None:
    """This installation's default lifetime budget (conf/privacy/example.yaml): what a
    deployed site enforces when its node config sets none, whatever the server sends."""
    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parent.parent / "conf" / "privacy" / "example.yaml"
    value = OmegaConf.load(conf).get("budget")
    return None if value is None else float(value)


def site_budget(cfg: FedLLMConfig, node_config) -> float | None:
    """The budget the site itself sets. Deployment: its node config ``budget``, else this
    installation's default. Simulation: the run's ``privacy.budget`` (the simulation is the
    site). Held in the ledger, which keeps the strictest it has seen."""
    if "partition-id" in node_config:
        return cfg.privacy.budget
    if "budget" in node_config:
        return float(node_config["budget"])
    return default_site_budget() if cfg.privacy.example.enabled else None


SITE_UNIT = "record"  # what a deployed site protects unless its node config says otherwise


def check_site_unit(cfg: FedLLMConfig, node_config) -> None:
    """A deployed site protects the unit it chose (node config ``unit``, default one record),
    whatever the server's run config says: a run asking for another unit is declined, so a
    server cannot weaken the guarantee to packed windows. Simulation: the run's data.unit."""
    if "partition-id" in node_config or not cfg.privacy.example.enabled:
        return
    unit = str(node_config.get("unit", SITE_UNIT))
    if cfg.data.unit != unit:
        raise Declined(f"this site protects one {unit} (node config unit); the run asks for "
                       f"data.unit={cfg.data.unit}")


def _strictest(*budgets: float | None) -> float | None:
    given = [b for b in budgets if b is not None]
    return min(given) if given else None


class Declined(Exception):
    """A request the client answers with no update (the reason goes back to the server)."""


def open_ledger(cfg: FedLLMConfig, node_config, client_id: str) -> tuple[Ledger, float | None]:
    """The client's ledger, holding the site's budget, and the budget that applies now (the
    strictest of the ledger's, the site's and the run's). Raises LedgerError."""
    ledger = Ledger.open(config_ledger_dir(cfg), client_id)
    ledger.lower_budget(site_budget(cfg, node_config))
    return ledger, _strictest(ledger.budget, cfg.privacy.budget)


def released_size(cfg: FedLLMConfig, ledger: Ledger, client: ClientData,
                  budget: float | None) -> tuple[int, PrivacyEvent]:
    """The DP estimate of this client's size that its sampling rate comes from, and its
    event: the one already in the ledger for this data, else a new release, recorded first.
    Raises Declined if the budget cannot pay for it."""
    fingerprint = data_fingerprint(client.train, cfg.data.unit)
    for entry in ledger.entries:
        if entry.purpose == "size" and (entry.note or {}).get("data") == fingerprint:
            return int(entry.note["estimate"]), entry.event
    event = size_event(cfg.privacy.example.size_noise)
    decision = release_policy.decide_size(ledger.entries, event, budget, cfg.privacy.delta,
                                          cfg.privacy.accountant)
    if decision.action == release_policy.DECLINE:
        raise Declined(decision.reason)
    estimate = noisy_size(len(client.train), cfg.privacy.example.size_noise)
    ledger.record(cfg.run.id, 0, event, purpose="size", again=True,
                  note={"data": fingerprint, "estimate": estimate})
    return estimate, event


def run_plan(cfg: FedLLMConfig, ledger: Ledger, client: ClientData, budget: float | None
             ) -> release_policy.RunPlan:
    """This client's plan for the run: the event one round releases, from released values
    only (q from the size estimate). Raises Declined."""
    ex = cfg.privacy.example
    if ex.enabled:
        estimate, size = released_size(cfg, ledger, client, budget)
        q = example_sample_rate(cfg.train.batch_size, estimate)
        z = noise_multiplier_for(cfg, q, (size,) + planned_evaluations(cfg))
    else:  # recorded as noise 0 (epsilon = inf); nothing of n is used or sent
        q, z = 1.0, 0.0
    event = PrivacyEvent(noise_multiplier=z, steps=cfg.train.local_steps, sampling="poisson",
                         sample_rate=q)
    return release_policy.RunPlan(
        run_id=cfg.run.id, rounds=cfg.federation.rounds, cap=max_participations(cfg),
        event=event, target_epsilon=ex.target_epsilon if ex.enabled and
        ex.noise_multiplier is None else None, budget=budget, delta=cfg.privacy.delta,
        accountant=cfg.privacy.accountant,
        pinned={"max_grad_norm": ex.max_grad_norm if ex.enabled else None,
                "unit": cfg.data.unit, "batch_size": cfg.train.batch_size,
                "eval_noise": cfg.eval.noise_multiplier if cfg.eval.mode == "clients" else None})


@app.train()
def train(msg: Message, context: Context) -> Message:
    stage = msg.content[protocol.CONFIG_RECORD].get(protocol.STAGE_KEY)
    if stage:  # one of the SecAgg+ stages of this round
        return secagg_stage(str(stage), msg, context, local_update)
    update, metrics, client = local_update(msg, context)
    record_ray_placement(msg, str(client["client_id"]))
    content = RecordDict({
        protocol.ARRAYS_RECORD: _array_record(update) if update is not None else ArrayRecord(),
        protocol.METRICS_RECORD: metrics,
        protocol.CLIENT_RECORD: client,
    })
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """A DP statistic of the global adapter's held-out loss on this node's own held-out share:
    the clipped loss sum and the count, each with Gaussian noise, charged to the ledger."""
    cfg_text = str(msg.content[protocol.CONFIG_RECORD][protocol.CONFIG_KEY])
    cfg = node_config_overrides(_config(cfg_text), context.node_config)
    server_round = int(msg.content[protocol.CONFIG_RECORD].get(protocol.ROUND_KEY, 1))
    loaded = _model(to_yaml(cfg.model), cfg.run.seed)
    client = this_client(cfg, context.node_config)
    arrays = {k: v.numpy() for k, v in msg.content[protocol.ARRAYS_RECORD].items()}
    return _reply(msg, answer_evaluate(cfg, loaded, client, context.node_config, server_round,
                                       arrays))


def answer_evaluate(cfg: FedLLMConfig, loaded: models.LoadedModel, client: ClientData,
                    node_config, server_round: int, arrays: dict) -> dict:
    """The metrics of an evaluation reply: the recorded statistic again, a new one (recorded
    first), or a decline."""
    ledger_dir = config_ledger_dir(cfg)
    try:
        ledger, budget = open_ledger(cfg, node_config, client.client_id)
        check_site_unit(cfg, node_config)
        plan = run_plan(cfg, ledger, client, budget)
    except (LedgerError, Declined) as exc:
        log.warning("client %s releases no evaluation: %s", client.client_id, exc)
        return protocol.declined_eval_metrics()
    event = eval_event(cfg.eval.noise_multiplier)
    with release_lock(ledger_dir, client.client_id, cfg.run.id, server_round, "eval",
                      wait=cfg.federation.client_timeout) as mine:
        if not mine:
            return protocol.declined_eval_metrics()
        ledger = Ledger.open(ledger_dir, client.client_id)
        copy = load_release(ledger_dir, client.client_id, cfg.run.id, server_round, "eval")
        decision = release_policy.decide_eval(ledger.entries, plan, server_round, event,
                                              copy_exists=copy is not None)
        if decision.action == release_policy.RESEND:
            return copy[1]
        if decision.action == release_policy.DECLINE:
            log.warning("client %s releases no evaluation: %s", client.client_id,
                        decision.reason)
            return protocol.declined_eval_metrics()
        if not decision.recorded:
            ledger.record(cfg.run.id, server_round, event, purpose="eval",
                          plan=plan.fingerprint())  # write-ahead
        models.load_adapter_state(loaded.model, arrays)
        losses = sequence_losses(loaded.model, client.eval, cfg.eval.batch_size, loaded.device,
                                 base_model=server_round == 0).numpy()  # round 0: base model
        metrics = protocol.eval_metrics(*noised_eval_statistic(losses, cfg.eval.loss_bound,
                                                               cfg.eval.noise_multiplier))
        save_release(ledger_dir, client.client_id, cfg.run.id, server_round, {}, metrics,
                     "eval")
        return metrics


def noised_eval_statistic(losses: np.ndarray, bound: float, noise: float
                          ) -> tuple[float, float]:
    """(sum of losses clipped to [0, bound] + N(0, (noise*bound)^2), count + N(0, noise^2)):
    adding or removing one sequence moves (sum/bound, count) by at most (1, 1)."""
    rng = np.random.default_rng(secrets.randbits(128))
    total = float(np.clip(losses, 0.0, bound).sum()) + rng.normal(0.0, noise * bound)
    return total, float(len(losses)) + rng.normal(0.0, noise)


def _reply(msg: Message, metrics: dict) -> Message:
    return Message(content=RecordDict({protocol.METRICS_RECORD: MetricRecord(metrics)}),
                   reply_to=msg)


def local_update(msg: Message, context: Context
                 ) -> tuple[dict | None, MetricRecord, ConfigRecord]:
    """The release policy's answer to this request, then (if it says train) one local DP
    round and the user-level clip/noise. Returns (update or None, metrics, client record)."""
    cfg_text = str(msg.content[protocol.CONFIG_RECORD][protocol.CONFIG_KEY])
    server_round = int(msg.content[protocol.CONFIG_RECORD][protocol.ROUND_KEY])
    cfg = node_config_overrides(_config(cfg_text), context.node_config)
    loaded = _model(to_yaml(cfg.model), cfg.run.seed)
    client = this_client(cfg, context.node_config)
    inject_fault_before(cfg, client.client_id)
    global_adapter = OrderedDict(
        (k, v.numpy()) for k, v in msg.content[protocol.ARRAYS_RECORD].items())
    return answer_train(cfg, loaded, client, context.node_config, server_round, global_adapter,
                        msg.content[protocol.CONFIG_RECORD])


def answer_train(cfg: FedLLMConfig, loaded: models.LoadedModel, client: ClientData,
                 node_config, server_round: int, global_adapter: dict, round_config
                 ) -> tuple[dict | None, MetricRecord, ConfigRecord]:
    """The reply to "train round ``server_round``": a resend, a decline, or one local DP round
    (recorded in the ledger first) with the user-level clip/noise."""
    ledger_dir = config_ledger_dir(cfg)
    try:
        ledger, budget = open_ledger(cfg, node_config, client.client_id)
    except LedgerError as exc:  # corrupt: refuse to train and say why; never reset it
        return _refuse(client.client_id, f"ledger: {exc}")
    try:
        check_site_unit(cfg, node_config)
        plan = run_plan(cfg, ledger, client, budget)
    except Declined as exc:
        return _decline(client.client_id, ledger.epsilon(cfg.privacy.delta,
                                                         cfg.privacy.accountant), str(exc))
    # Asked again while the first request still trains (its reply looked lost): wait for
    # that release and resend it, as long as the server waits for a reply at all.
    with release_lock(ledger_dir, client.client_id, cfg.run.id, server_round,
                      wait=cfg.federation.client_timeout) as mine:
        if not mine:
            return _decline(client.client_id, ledger.epsilon(cfg.privacy.delta,
                                                             cfg.privacy.accountant),
                            f"round {server_round} is being released by another request")
        ledger = Ledger.open(ledger_dir, client.client_id)  # as of now, under the lock
        return _release_round(cfg, loaded, client, ledger, plan, server_round, global_adapter,
                              round_config)


def _release_round(cfg: FedLLMConfig, loaded: models.LoadedModel, client: ClientData,
                   ledger: Ledger, plan: release_policy.RunPlan, server_round: int,
                   global_adapter: dict, round_config
                   ) -> tuple[dict | None, MetricRecord, ConfigRecord]:
    """Under the round's release lock: resend, decline, or record, train and keep a copy."""
    ledger_dir = config_ledger_dir(cfg)
    copy = load_release(ledger_dir, client.client_id, cfg.run.id, server_round)
    decision = release_policy.decide(ledger.entries, plan, server_round,
                                     copy_exists=copy is not None)
    if decision.action == release_policy.RESEND:
        log.info("client %s: resending its round-%d release", client.client_id, server_round)
        update, metrics = copy
        return update, MetricRecord(metrics), ConfigRecord({"client_id": client.client_id})
    if decision.action == release_policy.DECLINE:
        return _decline(client.client_id, decision.spent, decision.reason)
    if not decision.recorded:
        # Write-ahead: the release is on disk before a noised update can leave this node.
        ledger.record(cfg.run.id, server_round, plan.event, plan=plan.fingerprint())

    # seed=None: sampling and noise from the OS CSPRNG, so the server cannot replay them.
    result = local_round(loaded, global_adapter, client.train, cfg,
                         noise_multiplier=plan.event.noise_multiplier,
                         seed=None, server_round=server_round,
                         sample_rate=plan.event.sample_rate)
    if cfg.privacy.example.enabled and result.event != plan.event:
        raise RuntimeError(f"mechanism mismatch: ran {result.event}, recorded {plan.event}")
    # The training loss is a statistic of private data: it stays in this node's own log.
    log.info("client %s: round %d, local train loss %.4f", client.client_id, server_round,
             result.train_loss)
    update = user_level_update(cfg, result.delta, round_config)
    if client.client_id in cfg.faults.nan_clients:
        update = {k: np.full_like(v, np.nan) for k, v in update.items()}
    metrics = protocol.train_metrics(plan.event, dp=cfg.privacy.example.enabled,
                                     max_grad_norm=cfg.privacy.example.max_grad_norm,
                                     lifetime_epsilon=decision.lifetime_epsilon)
    if client.client_id in cfg.faults.leak_loss_clients:  # drills only: a broken client
        metrics["train_loss"] = result.train_loss
    save_release(ledger_dir, client.client_id, cfg.run.id, server_round, update, dict(metrics))
    return update, MetricRecord(metrics), ConfigRecord({"client_id": client.client_id})


def inject_fault_before(cfg: FedLLMConfig, client_id: str) -> None:
    """Test-only misbehaviour (``faults.*``): nothing happens unless a test asks for it."""
    if client_id in cfg.faults.raise_clients:
        raise RuntimeError(f"injected fault: client {client_id} raises")
    if client_id in cfg.faults.hang_clients:
        log.warning("injected fault: client %s hangs for %.0f s", client_id,
                    cfg.faults.hang_seconds)
        time.sleep(cfg.faults.hang_seconds)


def user_level_update(cfg: FedLLMConfig, delta: dict, round_config) -> dict:
    """DP-FedAvg client side: clip the whole delta to S; add a noise share if distributed."""
    user = cfg.privacy.user
    if not user.enabled:
        return delta
    clipped, _ = clip_update(delta, user.clip_norm)
    if user.noise == "distributed":
        z = float(round_config[protocol.USER_NOISE_KEY])
        m = int(round_config[protocol.MIN_SURVIVORS_KEY])
        clipped = add_noise(clipped, distributed_noise_std(z, user.clip_norm, m))
    return clipped


def _decline(client_id: str, spent: float, reason: str
             ) -> tuple[None, MetricRecord, ConfigRecord]:
    log.warning("client %s declines: %s", client_id, reason)
    return (None, MetricRecord({"declined": 1, "lifetime_epsilon": spent}),
            ConfigRecord({"client_id": client_id, "reason": reason}))


def _refuse(client_id: str, reason: str) -> tuple[None, MetricRecord, ConfigRecord]:
    """No update this round for a reason other than budget (an unreadable ledger)."""
    log.error("client %s refuses to train: %s", client_id, reason)
    return (None, MetricRecord({"declined": 1, "refused": 1}),
            ConfigRecord({"client_id": client_id, "reason": reason}))


PLACEMENT_FILE = "placement.jsonl"


def record_ray_placement(msg: Message, client_id: str) -> None:
    """Simulation on Ray only: note which Ray node ran this client this round, one line of
    ``<run.dir>/placement.jsonl`` (docs/scale-out.md). Elsewhere (a SuperNode) nothing."""
    ray = sys.modules.get("ray")  # never imported here for this: deployment has no Ray
    if ray is None or not ray.is_initialized():
        return
    cfg = _config(str(msg.content[protocol.CONFIG_RECORD][protocol.CONFIG_KEY]))
    if not cfg.run.dir:
        return
    record = {"round": int(msg.content[protocol.CONFIG_RECORD][protocol.ROUND_KEY]),
              "client_id": client_id, "node_id": ray.get_runtime_context().get_node_id(),
              "host": socket.gethostname(), "pid": os.getpid(), "niceness": os.nice(0),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    try:
        append_jsonl(Path(cfg.run.dir) / PLACEMENT_FILE, record)
    except OSError as exc:  # e.g. run.dir not shared with this node: a note lost, not a round
        log.warning("could not record the placement of client %s: %s", client_id, exc)


def _array_record(arrays: "dict") -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((k, Array(v)) for k, v in arrays.items()))
