"""One local round on one client: (adapter, data, config) -> (delta, metrics, privacy event)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from fedllm import models
from fedllm.privacy import dpsgd, zeroth_order
from fedllm.privacy.accounting import PrivacyEvent
from fedllm.privacy.randomness import randomness

log = logging.getLogger(__name__)


@dataclass
class LocalResult:
    delta: "dict[str, np.ndarray]"
    train_loss: float
    steps: int
    num_sequences: int
    event: PrivacyEvent | None  # example-level DP release of this round (None without DP)
    sample_rate: float
    noise_multiplier: float
    max_grad_norm: float
    # train.method=zeroth_order: what each step released (seeds, noised scalars); else None
    zo_steps: "list[zeroth_order.ZoStep] | None" = None


def round_lr(train_cfg, server_round: int, rounds: int) -> float:
    """The learning rate of round ``server_round`` (1-based) of ``rounds``.

    ``constant``: train.lr. ``cosine`` / ``linear``: from train.lr in round 1 down to
    train.lr x lr_final_fraction in round ``rounds`` (held there after it, e.g. on resume with
    more rounds). The schedule depends on the round number only, so it costs no privacy.
    """
    if train_cfg.lr_schedule == "constant" or rounds <= 1:
        return train_cfg.lr
    progress = min(1.0, max(0.0, (server_round - 1) / (rounds - 1)))
    if train_cfg.lr_schedule == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    final = train_cfg.lr_final_fraction
    return train_cfg.lr * (final + (1.0 - final) * factor)


def make_optimizer(params, train_cfg, lr: float, noise_std: float = 0.0
                   ) -> torch.optim.Optimizer:
    """``lr``: this round's learning rate (``round_lr``). ``noise_std``: std of the DP noise on
    each coordinate of the averaged gradient the optimizer will see (z*C/B; 0 without DP),
    which ``adam_bc`` removes from Adam's v."""
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=train_cfg.momentum,
                               weight_decay=train_cfg.weight_decay)
    if train_cfg.optimizer == "adam_bc":
        from fedllm.privacy.adam_bc import AdamBC

        return AdamBC(params, lr=lr, noise_std=noise_std,
                      floor=train_cfg.adam_bc_floor, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=train_cfg.weight_decay)


def example_sample_rate(batch_size: int, num_sequences: float) -> float:
    """Poisson rate q = expected batch / client size (capped at 1). A client passes the DP
    estimate of its size it released (``fedllm.privacy.size``), never its exact size: q is
    sent and published, and B / q would give the size away."""
    return min(1.0, batch_size / max(num_sequences, 1))


def accumulated_step(model, optimizer, batch: torch.Tensor, physical_batch_size: int | None,
                     device: torch.device) -> float:
    """One non-private step on ``batch``, processed in chunks of ``physical_batch_size`` (as
    the DP path does, so memory is bounded the same way): the chunks' gradients, each weighted
    by its share of the batch, add up to the gradient of the whole batch's mean loss."""
    total = 0.0
    for part in torch.split(batch, physical_batch_size or len(batch)):
        loss = dpsgd.sequence_loss(model, part.to(device))
        (loss * (len(part) / len(batch))).backward()
        total += loss.item() * len(part)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total / len(batch)


def local_round(loaded: models.LoadedModel, global_adapter: "dict[str, np.ndarray]",
                train_data: torch.Tensor, cfg, *, noise_multiplier: float, seed: int | None,
                server_round: int = 1, sample_rate: float | None = None) -> LocalResult:
    """Train the adapter for ``train.local_steps`` steps from ``global_adapter``, at the
    learning rate ``train.lr_schedule`` gives round ``server_round`` of ``federation.rounds``.

    With example-level DP: DP-SGD with Poisson sampling at ``sample_rate`` (default B/n: local
    tools only; a client passes B over its released size estimate), per-sample clipping to
    ``max_grad_norm`` and Gaussian noise ``noise_multiplier * max_grad_norm``. Returns the
    adapter delta (new - global) and the privacy event describing exactly what ran.

    ``seed=None``: sampling and noise come from the OS CSPRNG, as every client release must
    (a seeded torch generator keeps 32 bits of its seed: a server could search them all).
    An int reproduces the round (tests and in-process experiments only).
    """
    model, device = loaded.model, loaded.device
    models.load_adapter_state(model, global_adapter)
    models.set_gradient_checkpointing(model, cfg.train.gradient_checkpointing)
    model.train()
    t = cfg.train
    dp = cfg.privacy.example
    rng = randomness(seed, device)
    params = [p for p in model.parameters() if p.requires_grad]
    q = sample_rate if sample_rate is not None else example_sample_rate(t.batch_size,
                                                                         len(train_data))
    lr = round_lr(t, server_round, cfg.federation.rounds)
    losses: list[float] = []
    zo_steps = None

    if t.method == "zeroth_order":
        zo_steps, losses = zeroth_order_round(model, params, train_data, cfg, lr=lr, q=q,
                                              noise_multiplier=noise_multiplier, rng=rng,
                                              device=device)
        event = PrivacyEvent(noise_multiplier=noise_multiplier, steps=t.local_steps,
                             sampling="poisson", sample_rate=q) if dp.enabled else None
    elif dp.enabled:
        with dpsgd.per_sample_gradients(model, dp.per_sample_grads) as gsm:
            # Opacus adds N(0, (z*C)^2) to the sum of clipped gradients and divides by B.
            noise_std = noise_multiplier * dp.max_grad_norm / t.batch_size
            optimizer = dpsgd.make_dp_optimizer(
                make_optimizer(params, t, lr, noise_std), noise_multiplier=noise_multiplier,
                max_grad_norm=dp.max_grad_norm, expected_batch_size=t.batch_size,
                noise=rng)
            for _ in range(t.local_steps):
                batch = dpsgd.poisson_batch(train_data, q, rng)
                loss = dpsgd.dp_step(gsm, optimizer, batch, t.physical_batch_size, device)
                if loss is not None:
                    losses.append(loss)
        event = PrivacyEvent(noise_multiplier=noise_multiplier, steps=t.local_steps,
                             sampling="poisson", sample_rate=q)
    else:
        optimizer = make_optimizer(params, t, lr)
        for _ in range(t.local_steps):
            idx = torch.from_numpy(np.argsort(rng.uniform(len(train_data)).numpy())[: t.batch_size])
            losses.append(accumulated_step(model, optimizer, train_data[idx],
                                           t.physical_batch_size, device))
        event = None

    model.eval()
    new = models.adapter_state(model)
    delta = {k: new[k] - np.asarray(global_adapter[k], dtype=np.float32) for k in new}
    return LocalResult(
        delta=delta, train_loss=float(np.mean(losses)) if losses else math.nan,
        steps=t.local_steps, num_sequences=len(train_data), event=event, sample_rate=q,
        noise_multiplier=noise_multiplier if dp.enabled else 0.0,
        max_grad_norm=dp.max_grad_norm if dp.enabled else math.inf, zo_steps=zo_steps)


def zeroth_order_round(model, params, train_data: torch.Tensor, cfg, *, lr: float, q: float,
                       noise_multiplier: float, rng, device: torch.device
                       ) -> "tuple[list[zeroth_order.ZoStep], list[float]]":
    """``train.local_steps`` zeroth-order steps (``fedllm.privacy.zeroth_order``): with DP,
    on Poisson batches at rate ``q`` with per-example clipping to C and noise zC on each of
    the K sums, the mechanism DP-SGD's event describes; without, on uniform batches of B.
    Returns the released steps and the local batch losses."""
    t, dp = cfg.train, cfg.privacy.example
    # The K noised scalars spread over the adapter through unit-variance directions: each
    # coordinate of the step's gradient carries noise of std zC / (B sqrt(K)) (adam_bc).
    noise_std = (noise_multiplier * dp.max_grad_norm / (t.batch_size * math.sqrt(t.zo_directions))
                 if dp.enabled else 0.0)
    optimizer = make_optimizer(params, t, lr, noise_std)
    model.eval()  # no dropout: both sides of a central difference must see one network
    steps, losses = [], []
    for step in range(t.local_steps):
        if dp.enabled:
            batch = dpsgd.poisson_batch(train_data, q, rng)
        else:
            batch = train_data[torch.from_numpy(
                np.argsort(rng.uniform(len(train_data)).numpy())[: t.batch_size])]
        # Public directions: fresh seeds that depend on no data and reveal no other secret.
        seeds = [rng.seed() for _ in range(t.zo_directions)]
        derivatives, loss = zeroth_order.directional_derivatives(
            model, params, batch, seeds, smoothing=t.zo_smoothing,
            chunk=t.physical_batch_size or max(len(batch), 1), device=device,
            # fp32 even on CUDA: a central difference divides by 2μ, and bf16 rounding of the
            # two losses would swamp it
            precision="fp32")
        if dp.enabled:
            scalars = zeroth_order.noised_scalars(
                derivatives, max_norm=dp.max_grad_norm, noise_multiplier=noise_multiplier,
                expected_batch_size=t.batch_size, noise=rng)
        else:
            scalars = derivatives.mean(dim=0)
        released = zeroth_order.ZoStep(tuple(seeds), tuple(float(v) for v in scalars))
        zeroth_order.apply_step(params, optimizer, released)
        steps.append(released)
        if loss is not None:
            losses.append(loss)
    return steps, losses
