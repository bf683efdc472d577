"""User-level DP on adapter updates: clipping, Gaussian noise, and checks of incoming updates.

DP-FedAvg (McMahan et al., 2018): each client clips its whole update (L2 over all adapter
tensors) to S; the sum of the cohort's updates gets Gaussian noise of std z*S, either added by
the server after aggregation (``central``) or in shares by the clients (``distributed``: each
adds N(0, (z*S)^2 / m), so any m or more surviving clients carry the full noise); the noised
sum is divided by the *expected* cohort size, never the actual count (which would depend on
one client's presence and change the sensitivity).
"""

from __future__ import annotations

import math
import secrets

import numpy as np


class UpdateRejected(ValueError):
    """An incoming update fails a check; the message says which and why."""


def update_norm(update: "dict[str, np.ndarray]") -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in update.values()))


def clip_update(update: "dict[str, np.ndarray]", clip_norm: float
                ) -> "tuple[dict[str, np.ndarray], float]":
    """Scale the update so its global L2 norm is at most ``clip_norm``. Returns (clipped, norm)."""
    norm = update_norm(update)
    # Strictly below the bound after float32 rounding: the server checks <= S.
    factor = min(1.0, clip_norm / (norm + 1e-12)) * (1 - 1e-6)
    return {k: (v * factor).astype(np.float32) for k, v in update.items()}, norm


def gaussian_noise_like(update: "dict[str, np.ndarray]", std: float,
                        rng: np.random.Generator | None = None) -> "dict[str, np.ndarray]":
    """Independent N(0, std^2) per coordinate, from fresh OS entropy unless ``rng`` is given."""
    rng = rng or np.random.default_rng(secrets.randbits(128))
    return {k: rng.normal(0.0, std, size=v.shape).astype(np.float32) for k, v in update.items()}


def add_noise(update: "dict[str, np.ndarray]", std: float,
              rng: np.random.Generator | None = None) -> "dict[str, np.ndarray]":
    if std == 0:
        return dict(update)
    noise = gaussian_noise_like(update, std, rng)
    return {k: (v + noise[k]).astype(np.float32) for k, v in update.items()}


def distributed_noise_std(noise_multiplier: float, clip_norm: float, min_survivors: int) -> float:
    """Each client's share: m shares of variance (zS)^2/m sum to the calibrated (zS)^2."""
    return noise_multiplier * clip_norm / math.sqrt(min_survivors)


def check_update(update: "dict[str, np.ndarray]", reference: "dict[str, np.ndarray]",
                 max_norm: float | None = None) -> None:
    """Names, shapes, dtypes, finiteness (and the clip bound, when given) of a client update."""
    missing = [k for k in reference if k not in update]
    extra = [k for k in update if k not in reference]
    if missing or extra:
        raise UpdateRejected(f"tensor names differ (missing {missing[:2]}, unexpected {extra[:2]})")
    for name, ref in reference.items():
        arr = update[name]
        if arr.shape != ref.shape:
            raise UpdateRejected(f"{name}: shape {arr.shape} != {ref.shape}")
        if arr.dtype != ref.dtype:
            raise UpdateRejected(f"{name}: dtype {arr.dtype} != {ref.dtype}")
        if not np.isfinite(arr).all():
            raise UpdateRejected(f"{name}: non-finite values")
    if max_norm is not None:
        norm = update_norm(update)
        if norm > max_norm * (1 + 1e-5):
            raise UpdateRejected(f"L2 norm {norm:.4g} exceeds the clip bound {max_norm:g}")
