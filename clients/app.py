"""Flower ClientApp: one local round of (DP-)training per train message.

The same app runs in simulation (a virtual SuperNode per client, ``partition-id`` in the node
config) and in deployment (a real SuperNode per site). The run's resolved fedllm config
arrives with every train message, so nothing depends on files shared with the server.

Reply: ``arrays`` = adapter delta (new - global); ``metrics`` = loss and the parameters of the
example-level DP mechanism that ran; ``client`` = the client's id.
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
from fedllm.evaluate import evaluate
from fedllm.io import append_jsonl
from fedllm.privacy.accounting import PrivacyEvent, calibrate_noise, epsilon
from fedllm.privacy.ledger import Ledger, LedgerError, load_release, save_release
from fedllm.privacy.updates import add_noise, clip_update, distributed_noise_std
from fedllm.train import example_sample_rate, local_round

from fedllm.secagg.client import secagg_stage

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
                             planned_steps: int, accountant: str) -> float:
    """Noise so that this client's epsilon stays <= target over all the steps it may run."""
    return calibrate_noise(target_epsilon, delta, steps=planned_steps, sample_rate=sample_rate,
                           accountant=accountant)


def noise_multiplier_for(cfg: FedLLMConfig, num_sequences: int) -> float:
    ex = cfg.privacy.example
    if not ex.enabled:
        return 0.0
    if ex.noise_multiplier is not None:
        return float(ex.noise_multiplier)
    q = example_sample_rate(cfg.train.batch_size, num_sequences)
    steps = max_participations(cfg) * cfg.train.local_steps
    return planned_noise_multiplier(ex.target_epsilon, cfg.privacy.delta, q, steps,
                                    cfg.privacy.accountant)


def max_participations(cfg: FedLLMConfig) -> int:
    """This client's participation cap in the run. The server resolves ``auto`` before the run;
    a config that still says ``auto`` is read as every round (conservative: more noise)."""
    cap = cfg.privacy.example.max_participations
    return cfg.federation.rounds if cap == "auto" else min(int(cap), cfg.federation.rounds)


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
    """Held-out loss of the global adapter on this node's own held-out share."""
    cfg_text = str(msg.content[protocol.CONFIG_RECORD][protocol.CONFIG_KEY])
    cfg = node_config_overrides(_config(cfg_text), context.node_config)
    loaded = _model(to_yaml(cfg.model), cfg.run.seed)
    client = this_client(cfg, context.node_config)
    models.load_adapter_state(loaded.model, {k: v.numpy() for k, v in
                                             msg.content[protocol.ARRAYS_RECORD].items()})
    server_round = int(msg.content[protocol.CONFIG_RECORD].get(protocol.ROUND_KEY, 1))
    result = evaluate(loaded.model, client.eval, cfg.eval.batch_size, loaded.device,
                      base_model=server_round == 0)  # round 0: the bare base model
    n = len(client.eval)
    metrics = MetricRecord({"eval_loss_sum": result["eval_loss"] * n if n else 0.0,
                            "num_sequences": n})
    return Message(content=RecordDict({protocol.METRICS_RECORD: metrics}), reply_to=msg)


def local_update(msg: Message, context: Context
                 ) -> tuple[dict | None, MetricRecord, ConfigRecord]:
    """Ledger + budget check, one local DP round, user-level clip/noise.

    Returns (update or None if declined, metrics, client record).
    """
    cfg_text = str(msg.content[protocol.CONFIG_RECORD][protocol.CONFIG_KEY])
    server_round = int(msg.content[protocol.CONFIG_RECORD][protocol.ROUND_KEY])
    cfg = node_config_overrides(_config(cfg_text), context.node_config)
    loaded = _model(to_yaml(cfg.model), cfg.run.seed)
    client = this_client(cfg, context.node_config)
    inject_fault_before(cfg, client.client_id)
    z = noise_multiplier_for(cfg, len(client.train))
    planned = planned_event(cfg, z, len(client.train))
    # Without example-level DP the ledger still records the participation, as epsilon = inf.
    recorded = planned or unprotected_event(cfg, len(client.train))

    lifetime = None
    ledger_dir = config_ledger_dir(cfg)
    if recorded is not None:
        try:
            ledger = Ledger.open(ledger_dir, client.client_id)
        except LedgerError as exc:  # corrupt: refuse to train and say why; never reset it
            return _refuse(client.client_id, f"ledger: {exc}")
        if ledger.has(cfg.run.id, server_round):
            # A resumed server asks again for a round we already released: resend that same
            # update (one ledger entry covers it). No copy means it never left: train now.
            cached = load_release(ledger_dir, client.client_id, cfg.run.id, server_round)
            if cached is not None:
                update, metrics = cached
                log.info("client %s: resending its round-%d release", client.client_id,
                         server_round)
                return update, MetricRecord(metrics), ConfigRecord({"client_id": client.client_id})
            lifetime = ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant)
        else:
            refusal = cap_refusal(cfg, ledger, planned) if planned is not None else None
            if refusal is not None:
                return _decline(client.client_id,
                                ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant), refusal)
            lifetime = ledger.epsilon_with(recorded, cfg.privacy.delta, cfg.privacy.accountant)
            if cfg.privacy.budget is not None and lifetime > cfg.privacy.budget:
                spent = ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant)
                return _decline(client.client_id, spent,
                                f"budget: lifetime epsilon would reach {lifetime:.3f} > "
                                f"privacy.budget={cfg.privacy.budget:g} (spent {spent:.3f})")
            # Write-ahead: the release is on disk before a noised update can leave this node.
            ledger.record(cfg.run.id, server_round, recorded)

    global_adapter = OrderedDict(
        (k, v.numpy()) for k, v in msg.content[protocol.ARRAYS_RECORD].items())
    # Fresh OS entropy for sampling and noise: the server must not be able to replay them.
    result = local_round(loaded, global_adapter, client.train, cfg, noise_multiplier=z,
                         seed=secrets.randbits(62), server_round=server_round)
    if result.event != planned:  # the ledger must describe exactly what ran
        raise RuntimeError(f"mechanism mismatch: ran {result.event}, recorded {planned}")
    update = user_level_update(cfg, result.delta, msg.content[protocol.CONFIG_RECORD])
    if client.client_id in cfg.faults.nan_clients:
        update = {k: np.full_like(v, np.nan) for k, v in update.items()}
    metrics = MetricRecord({
        "train_loss": result.train_loss,
        "steps": result.steps,
        "num-examples": 1,  # unweighted FedAvg: client sizes are neither sent nor used
        "sample_rate": result.sample_rate,
        "noise_multiplier": result.noise_multiplier,
        "max_grad_norm": result.max_grad_norm if cfg.privacy.example.enabled else 0.0,
        "dp": int(result.event is not None),
        "declined": 0,
    })
    if lifetime is not None and planned is not None:
        metrics["lifetime_epsilon"] = lifetime
    if recorded is not None:
        save_release(ledger_dir, client.client_id, cfg.run.id, server_round, update, dict(metrics))
    return update, metrics, ConfigRecord({"client_id": client.client_id})


def cap_refusal(cfg: FedLLMConfig, ledger: Ledger, planned: PrivacyEvent) -> str | None:
    """Why this client must not take part in another round of this run, or None.

    Its noise was calibrated for ``max_participations`` rounds: one more would exceed the
    target ε. The ledger, not the server, is the judge: a server that resends, changes the cap
    or samples too often meets a refusal. With a target ε the run's ε is checked too."""
    this_run = [e.event for e in ledger.entries if e.run_id == cfg.run.id]
    cap = max_participations(cfg)
    if len(this_run) >= cap:
        return (f"participation cap: already took part in {len(this_run)} round(s) of this run "
                f"(privacy.example.max_participations={cap})")
    ex = cfg.privacy.example
    if ex.noise_multiplier is None and ex.target_epsilon is not None:
        run_eps = epsilon(this_run + [planned], cfg.privacy.delta, cfg.privacy.accountant)
        if run_eps > ex.target_epsilon:
            return (f"run epsilon would reach {run_eps:.3f} > privacy.example.target_epsilon="
                    f"{ex.target_epsilon:g}")
    return None


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


def planned_event(cfg: FedLLMConfig, z: float, num_sequences: int) -> PrivacyEvent | None:
    if not cfg.privacy.example.enabled:
        return None
    return PrivacyEvent(noise_multiplier=z, steps=cfg.train.local_steps, sampling="poisson",
                        sample_rate=example_sample_rate(cfg.train.batch_size, num_sequences))


def unprotected_event(cfg: FedLLMConfig, num_sequences: int) -> PrivacyEvent | None:
    """A participation without example-level DP, as the ledger records it: noise 0, so its
    epsilon (and the client's lifetime epsilon from then on) is infinite. A site's budget then
    refuses it. None with example-level DP on (the planned DP event is recorded instead)."""
    if cfg.privacy.example.enabled:
        return None
    return PrivacyEvent(noise_multiplier=0.0, steps=cfg.train.local_steps, sampling="poisson",
                        sample_rate=example_sample_rate(cfg.train.batch_size, num_sequences))


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
              "host": socket.gethostname(), "pid": os.getpid()}
    try:
        append_jsonl(Path(cfg.run.dir) / PLACEMENT_FILE, record)
    except OSError as exc:  # e.g. run.dir not shared with this node: a note lost, not a round
        log.warning("could not record the placement of client %s: %s", client_id, exc)


def _array_record(arrays: "dict") -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((k, Array(v)) for k, v in arrays.items()))
