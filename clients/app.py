"""Flower ClientApp: one local round of (DP-)training per train message.

The same app runs in simulation (a virtual SuperNode per client, ``partition-id`` in the node
config) and in deployment (a real SuperNode per site). The run's resolved fedllm config
arrives with every train message, so nothing depends on files shared with the server.

Reply: ``arrays`` = adapter delta (new - global); ``metrics`` = loss and the parameters of the
example-level DP mechanism that ran; ``client`` = the client's id.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections import OrderedDict

import numpy as np

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedllm import models, protocol
from fedllm.config import FedLLMConfig, from_yaml, min_client_sequences, to_yaml
from fedllm.config import ledger_dir as config_ledger_dir
from fedllm.data.federated import FederatedData, build_federated_data
from fedllm.privacy.accounting import PrivacyEvent, calibrate_noise
from fedllm.privacy.ledger import Ledger, load_release, save_release
from fedllm.privacy.updates import add_noise, clip_update, distributed_noise_std
from fedllm.train import example_sample_rate, local_round

from clients.secagg_stages import secagg_stage

log = logging.getLogger(__name__)

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _config(text: str) -> FedLLMConfig:
    return from_yaml(text)


def _runtime_key(cfg: FedLLMConfig) -> str:
    """What the loaded model and data depend on (not rounds, lr, privacy...)."""
    return to_yaml(cfg.model) + to_yaml(cfg.data) + f"{cfg.train.seq_len}|{cfg.run.seed}|" \
        f"{min_client_sequences(cfg)}|{cfg.federation.num_clients}"


@functools.lru_cache(maxsize=1)
def _runtime(key: str, cfg_text: str) -> tuple[models.LoadedModel, FederatedData]:
    cfg = _config(cfg_text)
    loaded = models.build(cfg.model, seed=cfg.run.seed, device=cfg.model.device)
    data = build_federated_data(
        cfg.data, loaded.tokenizer, seq_len=cfg.train.seq_len,
        min_sequences=min_client_sequences(cfg), num_clients=cfg.federation.num_clients,
        seed=cfg.run.seed)
    return loaded, data


@functools.lru_cache(maxsize=4096)
def planned_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float,
                             planned_steps: int, accountant: str) -> float:
    """Noise so that this client's epsilon stays <= target even if sampled every round."""
    return calibrate_noise(target_epsilon, delta, steps=planned_steps, sample_rate=sample_rate,
                           accountant=accountant)


def noise_multiplier_for(cfg: FedLLMConfig, num_sequences: int) -> float:
    ex = cfg.privacy.example
    if not ex.enabled:
        return 0.0
    if ex.noise_multiplier is not None:
        return float(ex.noise_multiplier)
    q = example_sample_rate(cfg.train.batch_size, num_sequences)
    steps = cfg.federation.rounds * cfg.train.local_steps
    return planned_noise_multiplier(ex.target_epsilon, cfg.privacy.delta, q, steps,
                                    cfg.privacy.accountant)


@app.train()
def train(msg: Message, context: Context) -> Message:
    stage = msg.content[protocol.CONFIG_RECORD].get(protocol.STAGE_KEY)
    if stage:  # one of the SecAgg+ stages of this round
        return secagg_stage(str(stage), msg, context, local_update)
    update, metrics, client = local_update(msg, context)
    content = RecordDict({
        protocol.ARRAYS_RECORD: _array_record(update) if update is not None else ArrayRecord(),
        protocol.METRICS_RECORD: metrics,
        protocol.CLIENT_RECORD: client,
    })
    return Message(content=content, reply_to=msg)


def local_update(msg: Message, context: Context
                 ) -> tuple[dict | None, MetricRecord, ConfigRecord]:
    """Ledger + budget check, one local DP round, user-level clip/noise.

    Returns (update or None if declined, metrics, client record).
    """
    cfg_text = str(msg.content[protocol.CONFIG_RECORD][protocol.CONFIG_KEY])
    server_round = int(msg.content[protocol.CONFIG_RECORD][protocol.ROUND_KEY])
    cfg = _config(cfg_text)
    loaded, data = _runtime(_runtime_key(cfg), cfg_text)
    index = int(context.node_config["partition-id"])
    if index >= len(data.clients):
        raise ValueError(f"partition-id {index} but only {len(data.clients)} clients exist")
    client = data.clients[index]
    inject_fault_before(cfg, client.client_id)
    z = noise_multiplier_for(cfg, len(client.train))
    planned = planned_event(cfg, z, len(client.train))

    lifetime = None
    ledger_dir = config_ledger_dir(cfg)
    if planned is not None:
        ledger = Ledger.open(ledger_dir, client.client_id)  # corrupt: raises
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
            lifetime = ledger.epsilon_with(planned, cfg.privacy.delta, cfg.privacy.accountant)
            if cfg.privacy.budget is not None and lifetime > cfg.privacy.budget:
                spent = ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant)
                return _decline(client.client_id, spent,
                                f"budget: lifetime epsilon would reach {lifetime:.3f} > "
                                f"privacy.budget={cfg.privacy.budget:g} (spent {spent:.3f})")
            # Write-ahead: the release is on disk before a noised update can leave this node.
            ledger.record(cfg.run.id, server_round, planned)

    global_adapter = OrderedDict(
        (k, v.numpy()) for k, v in msg.content[protocol.ARRAYS_RECORD].items())
    # Fresh OS entropy for sampling and noise: the server must not be able to replay them.
    result = local_round(loaded, global_adapter, client.train, cfg, noise_multiplier=z,
                         seed=secrets.randbits(62))
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
    if lifetime is not None:
        metrics["lifetime_epsilon"] = lifetime
    if planned is not None:
        save_release(ledger_dir, client.client_id, cfg.run.id, server_round, update, dict(metrics))
    return update, metrics, ConfigRecord({"client_id": client.client_id})


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


def _decline(client_id: str, spent: float, reason: str
             ) -> tuple[None, MetricRecord, ConfigRecord]:
    log.warning("client %s declines: %s", client_id, reason)
    return (None, MetricRecord({"declined": 1, "lifetime_epsilon": spent}),
            ConfigRecord({"client_id": client_id, "reason": reason}))


def _array_record(arrays: "dict") -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((k, Array(v)) for k, v in arrays.items()))
