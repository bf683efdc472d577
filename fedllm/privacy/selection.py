"""Private selection: the ε of releasing only the best of a random number K of DP trials.

Papernot & Steinke, "Hyperparameter tuning with Renyi differential privacy" (ICLR 2022): run
a DP mechanism K times, K drawn from a distribution fixed in advance and kept secret, and
release only the best output (the output and its score). Its Rényi DP is bounded from the
RDP of one trial; dp_accounting implements the bound for ``RepeatAndSelectDpEvent``:

  * ``shape`` η = ∞ (here ``None``): K ~ Poisson(mean) (K = 0 is possible: nothing released);
  * η = 1: geometric, η = 0: logarithmic, 0 < η < ∞: truncated negative binomial (K ≥ 1).

One trial picks one of several grid points at random, independently of the data, and runs it.
Its output distribution is a mixture of the points' output distributions with data-independent
weights, so its Rényi divergence at every order is at most the largest of the points'
(quasi-convexity of Rényi divergence). The trial's RDP curve is therefore the pointwise
maximum of the points' curves, computed at the RDP accountant's orders, and fed to
dp_accounting's repeat-and-select formula. With one event for every point this is exactly
``RdpAccountant().compose(RepeatAndSelectDpEvent(event, mean, shape))``.

Pure: no files, no Flower; randomness only from the generator passed in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from fedllm.privacy.accounting import AccountingError, PrivacyEvent, _dp_event, _quiet_absl

ORDERS = tuple(rdp.DEFAULT_RDP_ORDERS)
POISSON = "Poisson"


def distribution_name(shape: float | None) -> str:
    if shape is None:
        return POISSON
    return {0: "logarithmic", 1: "geometric"}.get(shape, f"truncated negative binomial (η={shape:g})")


def check_trials(mean: float, shape: float | None) -> None:
    """``mean`` E[K] >= 1 (finite) and ``shape`` None (Poisson) or a finite η >= 0."""
    if not _finite(mean) or mean < 1:
        raise AccountingError(f"mean number of trials must be a finite number >= 1, got {mean!r}")
    if shape is not None and (not _finite(shape) or shape < 0):
        raise AccountingError(f"shape must be null (Poisson) or a finite number >= 0, "
                              f"got {shape!r}")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _dp_shape(shape: float | None) -> float:
    return math.inf if shape is None else float(shape)


def trial_event(events: Sequence[PrivacyEvent]) -> dp_event.DpEvent:
    """Everything one trial releases about a client, as one dp_accounting event."""
    return dp_event.ComposedDpEvent([_dp_event(e) for e in events])


def selection_event(events: Sequence[PrivacyEvent], mean: float, shape: float | None
                    ) -> dp_event.RepeatAndSelectDpEvent:
    check_trials(mean, shape)
    return dp_event.RepeatAndSelectDpEvent(trial_event(events), float(mean), _dp_shape(shape))


def rdp_curve(events: Sequence[PrivacyEvent]) -> np.ndarray:
    """RDP of the composition of ``events`` at ``ORDERS`` (add/remove-one adjacency)."""
    if any(e.sampling != "poisson" for e in events):
        raise AccountingError("private selection is accounted for Poisson-sampled events only")
    accountant = rdp.RdpAccountant(orders=ORDERS)
    with _quiet_absl():
        accountant.compose(trial_event(events))
    return np.array(accountant._rdp, dtype=np.float64)  # noqa: SLF001 (the composed curve)


def trial_rdp(points: Sequence[Sequence[PrivacyEvent]]) -> np.ndarray:
    """RDP of one trial that runs one of ``points`` (each: its list of events), picked
    independently of the data: the pointwise maximum of the points' curves."""
    if not points:
        raise AccountingError("private selection needs at least one grid point")
    return np.max([rdp_curve(events) for events in points], axis=0)


def selection_epsilon(points: Sequence[Sequence[PrivacyEvent]], delta: float, mean: float,
                      shape: float | None) -> float:
    """ε at ``delta`` of releasing the best of K trials, each running one of ``points``."""
    check_trials(mean, shape)
    curve = rdp._compute_rdp_repeat_and_select(  # noqa: SLF001 (dp_accounting's own formula)
        ORDERS, trial_rdp(points), float(mean), _dp_shape(shape))
    return float(rdp.compute_epsilon(ORDERS, curve, delta)[0])


def trial_epsilon(points: Sequence[Sequence[PrivacyEvent]], delta: float) -> float:
    """ε at ``delta`` of one trial (RDP, as the selection), for comparison."""
    return float(rdp.compute_epsilon(ORDERS, trial_rdp(points), delta)[0])


def composed_epsilon(points: Sequence[Sequence[PrivacyEvent]], delta: float, trials: int
                     ) -> float:
    """ε at ``delta`` of releasing all of ``trials`` trials (RDP composition), for comparison."""
    return float(rdp.compute_epsilon(ORDERS, trials * trial_rdp(points), delta)[0])


def draw_trials(rng: np.random.Generator, mean: float, shape: float | None) -> int:
    """K from the distribution ``RepeatAndSelectDpEvent(event, mean, shape)`` accounts for:
    Poisson(mean) for shape None; else the truncated negative binomial of that shape η and
    mean (0: logarithmic, 1: geometric), P(K = k) ∝ (1-γ)^k Γ(k+η) / (Γ(η) k!) on k >= 1,
    drawn by inverting its distribution function from one uniform draw."""
    check_trials(mean, shape)
    if shape is None:
        return int(rng.poisson(mean))
    gamma = _gamma(float(shape), float(mean))
    if gamma >= 1:  # mean 1: always one trial
        return 1
    u, k = rng.random(), 1
    p = _first_probability(gamma, float(shape))
    total = p
    while total < u and p > 0:
        p *= (1 - gamma) * (k + shape) / (k + 1)  # P(K = k+1) / P(K = k)
        k, total = k + 1, total + p
    return k


def _first_probability(gamma: float, shape: float) -> float:
    """P(K = 1) = (1-γ) η / (γ^-η - 1); its limit (1-γ) / log(1/γ) for η = 0."""
    if shape == 0:
        return (1 - gamma) / -math.log(gamma)
    return (1 - gamma) * shape / math.expm1(-shape * math.log(gamma))


@functools.lru_cache(maxsize=64)
def _gamma(shape: float, mean: float) -> float:
    """The truncated negative binomial's γ for this mean, as dp_accounting accounts it."""
    return rdp._gamma_truncated_negative_binomial(shape, mean)  # noqa: SLF001
