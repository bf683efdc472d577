"""DP zeroth-order training (``train.method=zeroth_order``): forward passes only.

One step on a Poisson batch (rate q), with K random directions z_1..z_K over the adapter's
trainable parameters, each drawn from its own seed:
  1. each example i gets K scalars, the central differences of its own loss,
     g_ik = (L_i(θ + μ z_k) - L_i(θ - μ z_k)) / 2μ, a directional derivative;
  2. each example's vector g_i = (g_i1 .. g_iK) is clipped to L2 norm C;
  3. the clipped vectors are summed, Gaussian noise N(0, (zC)^2) is added to each of the K
     sums, and the result is divided by the expected batch size B: the K *noised scalars*;
  4. the step is θ <- optimizer step with gradient (1/K) Σ_k scalar_k z_k.

Privacy: adding or removing one example changes the sum of clipped vectors by at most C in
L2, so the K noised scalars are one Poisson-subsampled Gaussian mechanism with noise
multiplier z, exactly the event DP-SGD accounts (``PrivacyEvent``): the same (q, z, steps)
give the same ε. The directions' seeds are fresh random numbers (the OS CSPRNG on a client)
that depend on no data and on no other secret: publishing them reveals nothing of the
sampling or the noise. Everything after step 3 is post-processing of (seeds, noised scalars):
the client's update is what ``replay`` rebuilds from them alone.

Unlike DP-SGD, the noise does not grow with the adapter's size (it is K-dimensional), and a
step needs 2K forward passes and no backward pass or per-sample gradients. (Tang et al., "DP-ZO"
2024; Zhang et al., "DPZero" 2024.)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedllm.privacy.dpsgd import per_sequence_losses


@dataclass(frozen=True)
class ZoStep:
    """What one step released: its directions' seeds and the K noised scalars."""
    seeds: tuple[int, ...]
    scalars: tuple[float, ...]


def direction(shapes: list[torch.Size], seed: int) -> list[torch.Tensor]:
    """A standard normal direction over parameters of ``shapes`` (fp32, on the CPU: the same
    numbers on every machine that replays it)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


@torch.no_grad()
def directional_derivatives(model, params: list[torch.nn.Parameter], batch: torch.Tensor,
                            seeds: list[int], *, smoothing: float, chunk: int,
                            device: torch.device, precision: str = "auto"
                            ) -> tuple[torch.Tensor, float | None]:
    """[len(batch), K]: each example's central difference along each direction; and the
    batch's mean loss at the two perturbed points (a local statistic, never sent). The
    parameters are restored exactly (from a copy) afterwards. Run the model in eval mode:
    dropout would make the two sides of a difference see different networks."""
    out = torch.zeros(len(batch), len(seeds))
    if len(batch) == 0:
        return out, None
    originals = [p.detach().clone() for p in params]
    mean_losses: list[float] = []
    try:
        for k, seed in enumerate(seeds):
            z = [d.to(p.device, p.dtype) for d, p in
                 zip(direction([p.shape for p in params], seed), params)]
            losses = []
            for sign in (1.0, -1.0):
                for p, p0, d in zip(params, originals, z):
                    p.copy_(p0 + sign * smoothing * d)
                losses.append(torch.cat([
                    per_sequence_losses(model, part.to(device), precision).float().cpu()
                    for part in torch.split(batch, chunk)]))
            out[:, k] = (losses[0] - losses[1]) / (2 * smoothing)
            mean_losses.append(float((losses[0] + losses[1]).mean() / 2))
    finally:
        for p, p0 in zip(params, originals):
            p.copy_(p0)
    return out, (mean_losses[0] if mean_losses else None)


def clip_rows(values: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Each row scaled to L2 norm at most ``max_norm`` (a row of zeros stays zero)."""
    norms = values.norm(dim=1, keepdim=True)
    return values * (max_norm / norms.clamp(min=max_norm))


def noised_scalars(derivatives: torch.Tensor, *, max_norm: float, noise_multiplier: float,
                   expected_batch_size: int, noise) -> torch.Tensor:
    """The K released scalars: (Σ_i clip(g_i) + N(0, (zC)^2 I_K)) / B. ``derivatives`` may
    have no rows (an empty Poisson batch still releases noise: skipping would change the
    mechanism). ``noise``: a ``fedllm.privacy.randomness`` source (the OS CSPRNG on a
    client). Rows that are not finite count as zero (a NaN would poison the whole step)."""
    k = derivatives.shape[1]
    finite = torch.where(torch.isfinite(derivatives).all(dim=1, keepdim=True), derivatives,
                         torch.zeros_like(derivatives))
    total = clip_rows(finite, max_norm).sum(dim=0)
    return (total + noise.normal((k,), noise_multiplier * max_norm)) / expected_batch_size


def apply_step(params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               step: ZoStep) -> None:
    """The optimizer step with gradient (1/K) Σ_k scalar_k z_k."""
    shapes = [p.shape for p in params]
    grads = [torch.zeros(s) for s in shapes]
    for seed, scalar in zip(step.seeds, step.scalars):
        for g, d in zip(grads, direction(shapes, seed)):
            g.add_(d, alpha=scalar / len(step.seeds))
    for p, g in zip(params, grads):
        p.grad = g.to(p.device, p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def replay(start: list[np.ndarray], steps: list[ZoStep], make_optimizer) -> list[np.ndarray]:
    """The trainable tensors after a round's released steps, from ``start`` (the round's
    starting tensors, in the model's parameter order), computed from the seeds and noised
    scalars alone; ``make_optimizer(params)`` builds the round's fresh optimizer. The client's
    own training applies the same steps (``apply_step``) and ends at these tensors (tested):
    its update is post-processing of what it released."""
    params = [torch.nn.Parameter(torch.from_numpy(np.array(a, dtype=np.float32))) for a in start]
    optimizer = make_optimizer(params)
    for step in steps:
        apply_step(params, optimizer, step)
    return [p.detach().numpy() for p in params]
