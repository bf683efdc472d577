"""Privacy accounting: DP events -> epsilon(delta), and noise calibration.

Pure Python on purpose (no torch, no flwr): the privacy math must be readable, testable
against reference values, and usable to plan a run before anything is installed on a GPU.
Backed by Google's dp_accounting: PLD (default, tight) or RDP. Opacus' GDP accountant is
optimistic and is never used.

Sampling schemes, each accounted as what it is:
  * ``poisson``: every record (or client) is included independently with probability q.
    Add-or-remove-one adjacency; PLD or RDP.
  * ``fixed``: a fixed-size sample of ``sample_size`` drawn without replacement from
    ``population``. Replace-one adjacency; only RDP supports it, so it is always accounted
    with RDP (conservative), whatever accountant was asked for.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import logging
import math
from dataclasses import asdict, dataclass
from typing import Iterable, Literal

import dp_accounting
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedllm.choices import Sampling
from fedllm.privacy import calibration_cache, fast_pld

ACCOUNTANTS = ("pld", "rdp")
SAMPLINGS = tuple(s.value for s in Sampling)  # the config's federation.sampling choices

# PLD grid used for reported epsilons (dp_accounting's default; pessimistic rounding).
REPORT_DISCRETIZATION = 1e-4
# Coarser grid for the bisection search; still an upper bound on epsilon.
SEARCH_DISCRETIZATION = 3e-3
# Histories with more distinct mechanisms than this are composed on a grid no finer than
# COMPOSITION_DISCRETIZATION: building each mechanism's PLD on the 1e-4 grid dominates the cost
# (about 0.1 s each). The grids are nested (1e-3 = 10 x 1e-4) and connect-the-dots is
# pessimistic, so the coarse PLD dominates the fine one and its epsilon is an upper bound of
# the fine value (measured: +0.05% on 100 mechanisms x 100 steps; tested within 0.5%).
EXACT_MAX_MECHANISMS = 4
COMPOSITION_DISCRETIZATION = 1e-3
# Bump when the calibration search or its verification changes: old cache entries are ignored.
CALIBRATION_VERSION = 2
# The PLD grid resolves privacy losses to about REPORT_DISCRETIZATION; a target within a few
# grid steps of 0 would be "met" by rounding (the accountant reports 0 for very large noise),
# not by the mechanism. Refuse targets below this instead of calibrating to them.
MIN_TARGET_EPSILON = 100 * REPORT_DISCRETIZATION


class AccountingError(ValueError):
    """Invalid accounting input (rate, noise, steps, delta) or an unreachable target."""


@dataclass(frozen=True)
class PrivacyEvent:
    """``steps`` compositions of one subsampled Gaussian mechanism.

    For ``poisson`` sampling ``sample_rate`` is q. For ``fixed`` sampling ``sample_size`` and
    ``population`` describe the sample drawn without replacement.
    """

    noise_multiplier: float
    steps: int
    sampling: Sampling = "poisson"
    sample_rate: float | None = None
    sample_size: int | None = None
    population: int | None = None

    def __post_init__(self) -> None:
        _check_event(self)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict) -> "PrivacyEvent":
        allowed = {"noise_multiplier", "steps", "sampling", "sample_rate", "sample_size",
                   "population"}
        unknown = set(data) - allowed
        if unknown:
            raise AccountingError(f"unknown privacy event fields: {sorted(unknown)}")
        return cls(**data)


def _check_event(event: PrivacyEvent) -> None:
    if event.sampling not in SAMPLINGS:
        raise AccountingError(f"sampling must be one of {SAMPLINGS}, got {event.sampling!r}")
    if not _is_number(event.noise_multiplier) or event.noise_multiplier < 0:
        raise AccountingError(
            f"noise multiplier must be a number >= 0, got {event.noise_multiplier!r}")
    if isinstance(event.steps, bool) or not isinstance(event.steps, int) or event.steps < 0:
        raise AccountingError(f"steps must be an integer >= 0, got {event.steps!r}")
    if event.sampling == "poisson":
        q = event.sample_rate
        if not _is_number(q) or not 0 < q <= 1:
            raise AccountingError(f"sample rate q must be in (0, 1], got {q!r}")
    else:
        n, m = event.population, event.sample_size
        if not isinstance(n, int) or not isinstance(m, int) or not 0 < m <= n:
            raise AccountingError(
                "fixed-size sampling needs integers 0 < sample_size <= population, "
                f"got sample_size={m!r}, population={n!r}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_delta(delta) -> None:
    if not _is_number(delta) or not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")


def _dp_event(event: PrivacyEvent) -> dp_event.DpEvent:
    gaussian = dp_event.GaussianDpEvent(event.noise_multiplier)
    if event.sampling == "poisson":
        single = gaussian if event.sample_rate == 1 else dp_event.PoissonSampledDpEvent(
            event.sample_rate, gaussian)
    else:
        single = dp_event.SampledWithoutReplacementDpEvent(
            event.population, event.sample_size, gaussian)
    return dp_event.SelfComposedDpEvent(single, event.steps)


def effective_accountant(events: Iterable[PrivacyEvent], accountant: str) -> str:
    """The accountant actually used: fixed-size sampling is only supported by RDP."""
    if accountant not in ACCOUNTANTS:
        raise AccountingError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if any(e.sampling == "fixed" for e in events):
        return "rdp"
    if accountant == "pld" and any(
            e.noise_multiplier > 0 and fast_pld.pmf_points(e.noise_multiplier,
                                                           REPORT_DISCRETIZATION)
            > fast_pld.MAX_PMF_POINTS for e in events):
        return "rdp"  # its PLD grid would not fit in bounded memory (see ``epsilon``)
    return accountant


def _make_accountant(events: list[PrivacyEvent], accountant: str, discretization: float):
    if effective_accountant(events, accountant) == "rdp":
        relation = (dp_accounting.NeighboringRelation.REPLACE_ONE
                    if any(e.sampling == "fixed" for e in events)
                    else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=discretization)


def merge_events(events: Iterable[PrivacyEvent]) -> list[PrivacyEvent]:
    """Merge events that differ only in their step count (same mechanism composed)."""
    merged: dict[tuple, int] = {}
    for e in events:
        key = (e.noise_multiplier, e.sampling, e.sample_rate, e.sample_size, e.population)
        merged[key] = merged.get(key, 0) + e.steps
    return [PrivacyEvent(noise_multiplier=k[0], sampling=k[1], sample_rate=k[2],
                         sample_size=k[3], population=k[4], steps=steps)
            for k, steps in merged.items() if steps > 0]


def epsilon(events: Iterable[PrivacyEvent], delta: float, accountant: str = "pld",
            *, discretization: float = REPORT_DISCRETIZATION) -> float:
    """Epsilon at ``delta`` of the composition of ``events`` (0 for no steps, inf for z=0).

    PLD histories with more than EXACT_MAX_MECHANISMS distinct mechanisms are evaluated on
    the COMPOSITION_DISCRETIZATION grid: a slightly larger (never smaller) epsilon, fast."""
    _check_delta(delta)
    events = merge_events(events)
    if not events:
        return 0.0
    if any(e.noise_multiplier == 0 for e in events):
        return math.inf
    if effective_accountant(events, accountant) == "pld":
        if len(events) > EXACT_MAX_MECHANISMS:
            discretization = max(discretization, COMPOSITION_DISCRETIZATION)
        try:
            return _pld_epsilon(tuple(events), delta, discretization)
        except fast_pld.GridTooLarge:
            # Tiny noise or very many steps: the PLD grid would not fit in bounded memory.
            # RDP is an upper bound on the same mechanism, computed in constant memory.
            accountant = "rdp"
    acc = _make_accountant(events, accountant, discretization)
    with _quiet_absl():
        for e in events:
            acc.compose(_dp_event(e))
        return float(acc.get_epsilon(delta))


# Ledgers and reports ask for the same history's epsilon again and again (every round, every
# report): remember the answer (a float per history).
@functools.lru_cache(maxsize=1024)
def _pld_epsilon(events: tuple[PrivacyEvent, ...], delta: float, discretization: float
                 ) -> float:
    plds, counts = [], []
    for e in events:
        if e.sample_rate == 1:  # no subsampling: T Gaussians compose exactly into one
            plds.append(_single_step_pld(e.noise_multiplier / math.sqrt(e.steps), 1.0,
                                         discretization))
            counts.append(1)
        else:
            plds.append(_single_step_pld(e.noise_multiplier, e.sample_rate, discretization))
            counts.append(e.steps)
    return fast_pld.epsilon_for_delta(fast_pld.compose(plds, counts), delta)


# Building a subsampled Gaussian's PLD dominates the cost of a composition, and ledgers
# re-evaluate the same mechanisms every round and every report: cache them per mechanism.
@functools.lru_cache(maxsize=512)
def _single_step_pld(noise_multiplier: float, sample_rate: float, discretization: float):
    return fast_pld.gaussian_pld(noise_multiplier, sample_rate, discretization)


@contextlib.contextmanager
def _quiet_absl():
    """dp_accounting's RDP logs a warning per skipped order; they are noise to our users."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def calibrate_noise(target_epsilon: float, delta: float, *, steps: int,
                    sample_rate: float | None = None, sampling: Sampling = "poisson",
                    sample_size: int | None = None, population: int | None = None,
                    accountant: str = "pld", prior: Iterable[PrivacyEvent] = (),
                    rel_tol: float = 0.01) -> float:
    """Smallest noise multiplier (within ``rel_tol``) whose epsilon is <= ``target_epsilon``.

    ``prior`` events (already spent budget) are composed in front of the planned ones.
    The returned z is verified with the reporting accountant: epsilon(z) <= target. The answer
    is cached on disk (``calibration_cache``, keyed by everything it depends on, the prior
    events included) and re-checked when read, with a pessimistic accountant, in
    milliseconds.
    """
    if not _is_number(target_epsilon) or target_epsilon <= 0:
        raise AccountingError(f"target epsilon must be > 0, got {target_epsilon!r}")
    if target_epsilon < MIN_TARGET_EPSILON:
        raise AccountingError(
            f"target epsilon {target_epsilon:g} is unreachable: below {MIN_TARGET_EPSILON:g}, "
            "the accountant's grid cannot tell it from 0")
    _check_delta(delta)
    prior = list(prior)

    def plan(z: float) -> list[PrivacyEvent]:
        return prior + [PrivacyEvent(noise_multiplier=z, steps=steps, sampling=sampling,
                                     sample_rate=sample_rate, sample_size=sample_size,
                                     population=population)]

    used = effective_accountant(plan(1.0), accountant)  # also validates the mechanism
    prior_eps = epsilon(prior, delta, accountant)
    if prior_eps >= target_epsilon:
        raise AccountingError(
            f"target epsilon {target_epsilon} is unreachable: the prior events already spend "
            f"epsilon={prior_eps:.4g}")
    if steps == 0:
        return 0.0

    # Upper bound of epsilon, cheap: the coarse PLD grid (pessimistic), or RDP itself.
    def cheap_epsilon(z: float) -> float:
        return (epsilon(plan(z), delta, used, discretization=SEARCH_DISCRETIZATION)
                if used == "pld" else epsilon(plan(z), delta, used))

    key = _calibration_key(plan(1.0)[-1], used, delta, target_epsilon, rel_tol, prior)
    cached = calibration_cache.load(key) if key else None
    if cached is not None and cheap_epsilon(cached) <= target_epsilon:
        return cached

    start = None
    if not prior and sampling == "poisson" and used == "pld":
        # Without subsampling the T steps are one Gaussian with multiplier z/sqrt(T), whose
        # epsilon has a closed form; subsampling only lowers epsilon, so this z is feasible.
        start = _unsampled_noise_multiplier(target_epsilon, delta, steps)
    z = _bisect(cheap_epsilon, target_epsilon, rel_tol, _bracket(cheap_epsilon, target_epsilon,
                                                                  start))
    # The cheap accountant is pessimistic, so z also satisfies the reporting one; check anyway.
    while (eps := epsilon(plan(z), delta, accountant)) > target_epsilon:
        z *= 1 + rel_tol / 4
    if key:
        calibration_cache.store(key, z, eps)
    return z


def _calibration_key(event: PrivacyEvent, accountant: str, delta: float, target: float,
                     rel_tol: float, prior: list[PrivacyEvent] = ()) -> dict:
    """Everything the calibrated z depends on (the event's z itself is a placeholder); the
    prior events in order, when there are any (keys without prior are unchanged)."""
    key = {"version": CALIBRATION_VERSION, "dp_accounting": _dp_accounting_version(),
           "accountant": accountant, "delta": delta, "target_epsilon": target,
           "rel_tol": rel_tol,
           **{k: v for k, v in event.to_dict().items() if k != "noise_multiplier"}}
    if prior:
        key["prior"] = [e.to_dict() for e in prior]
    return key


@functools.lru_cache(maxsize=1)
def _dp_accounting_version() -> str:
    return importlib.metadata.version("dp-accounting")


def _bracket(eps, target: float, start: float | None) -> tuple[float, float]:
    """(lo, hi) with eps(hi) <= target and hi <= 2 lo (or lo tiny), eps decreasing in z."""
    hi = start or 1.0
    while eps(hi) > target:
        hi *= 2
        if hi > 1e4:
            raise AccountingError(
                f"target epsilon {target} is unreachable with noise multiplier <= 1e4")
    lo = hi / 2
    while lo > 1e-3 and eps(lo) <= target:
        hi, lo = lo, lo / 2
    return lo, hi


def _unsampled_noise_multiplier(target: float, delta: float, steps: int) -> float:
    """Smallest z (to 1e-9 relative) with T Gaussian steps of multiplier z at (target, δ)."""
    lo, hi = 1e-6, 1.0
    while _gaussian_delta(hi / math.sqrt(steps), target) > delta:
        lo, hi = hi, hi * 2
    while hi - lo > 1e-9 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _gaussian_delta(mid / math.sqrt(steps), target) <= delta else (
            mid, hi)
    return hi


def _bisect(eps, target: float, rel_tol: float, bracket: tuple[float, float] | None = None,
            ) -> float:
    """Smallest z (approximately) with eps(z) <= target, eps decreasing in z."""
    if bracket is None:
        lo, hi = 0.0, 1.0
        while eps(hi) > target:
            lo, hi = hi, hi * 2
            if hi > 1e4:
                raise AccountingError(
                    f"target epsilon {target} is unreachable with noise multiplier <= 1e4")
    else:
        lo, hi = bracket
    eps_hi = eps(hi)
    # Bisect until epsilon(hi) is within rel_tol/2 of the target (from below).
    for _ in range(60):
        if eps_hi >= target * (1 - rel_tol / 2) or hi - lo < 1e-6:
            break
        mid = (lo + hi) / 2
        eps_mid = eps(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


# ----------------------------------------------------------------------------- user level

def user_level_event(noise_multiplier: float, rounds: int, *, sampling: Sampling,
                     cohort: int, population: int) -> PrivacyEvent:
    """DP-FedAvg rounds as a privacy event, with the unit of privacy = one client.

    ``noise_multiplier`` is z in noise std z*S on the sum of updates clipped to S.
    * ``poisson``: each client joins with q = cohort/population; add/remove-one adjacency,
      sensitivity S, so the event's multiplier is z.
    * ``fixed``: ``cohort`` clients without replacement; sampling without replacement is only
      analysed under replace-one adjacency, where swapping one client moves the sum by up to
      2S, so the event's multiplier is z/2 (conservative, as it must be).
    """
    # The pool a round really sampled from can be smaller than the cohort (nodes offline when
    # it started): then everyone in it was taken, q = 1, no amplification (conservative).
    population = max(int(population), 1)
    if sampling == "poisson":
        return PrivacyEvent(noise_multiplier=noise_multiplier, steps=rounds, sampling="poisson",
                            sample_rate=min(1.0, cohort / population))
    return PrivacyEvent(noise_multiplier=noise_multiplier / 2, steps=rounds, sampling="fixed",
                        sample_size=min(int(cohort), population), population=population)


def calibrate_user_noise(target_epsilon: float, delta: float, rounds: int, *, sampling: Sampling,
                         cohort: int, population: int, accountant: str = "pld") -> float:
    """Smallest z (noise std z*S on the sum) with user-level epsilon <= target."""
    probe = user_level_event(1.0, rounds, sampling=sampling, cohort=cohort, population=population)
    z = calibrate_noise(target_epsilon, delta, steps=rounds, sampling=probe.sampling,
                        sample_rate=probe.sample_rate, sample_size=probe.sample_size,
                        population=probe.population, accountant=accountant)
    return z * 2 if sampling == "fixed" else z


def user_level_epsilons(rounds: list[dict], delta: float, accountant: str = "pld") -> dict:
    """User-level ε of a run from its per-round records, against two adversaries.

    Each record describes one round *run* (released or skipped: a skipped round is counted as
    if released, since whether it was skipped can depend on who was sampled): its ``round``,
    ``noise_multiplier``, ``sampling``, ``cohort``, the ``population`` actually sampled from
    that round (its real q), the ids of the ``clients`` whose updates entered the sum, and
    ``max_participations``: the participation cap that every client enforces itself (its own
    ledger declines beyond it), or None if none is enforced. A record without the key (an
    older fedllm) is read as None.

    * ``observers``: parties that see only the models (not who was sampled). Their bound must
      hold *before* sampling: they do not know the cohorts, so the released models are a
      mixture over every cohort sequence the sampler could have drawn, and only quantities
      known a priori may bound it. It is the smaller of
        - ε amplified by client sampling, composed over every round with that round's own
          sampling rate, and
        - the unamplified bound under the enforced cap: an unsampled Gaussian composed over
          the ``cap`` rounds whose noise is smallest (every round when no cap is enforced, or
          a record lacks it; the records of a re-run round all count against one
          participation, as a client resends the same update). Sampling cannot make a client
          worse off than being in its worst ``cap`` rounds.
      It is *not* capped by the ``server`` value below: that one conditions on the cohorts
      that were drawn, which observers do not know (with N=4, k=3 and 4 rounds, the realised
      counts give a smaller number than the mechanism is worth a priori).
    * ``server``: the server, or anyone who knows the cohorts (it picks them): no
      amplification; each client's ε composes an unsampled Gaussian over the rounds its
      update was in (multiplier z, or z/2 under replace-one adjacency with fixed sampling,
      as in ``user_level_event``); the maximum over clients. Valid for the server because it
      knows the realised cohorts, not for observers.
    """
    if not rounds:
        return {"observers": 0.0, "server": 0.0, "max_rounds_per_client": 0}
    rounds = [{**r, "noise_multiplier": effective_multiplier(r)} for r in rounds]
    events = [user_level_event(r["noise_multiplier"], 1, sampling=r["sampling"],
                               cohort=r["cohort"], population=r["population"]) for r in rounds]
    per_client: dict[str, list[float]] = {}
    for r in rounds:
        for client in r.get("clients", []):
            per_client.setdefault(str(client), []).append(_event_multiplier(r))
    # Unsampled Gaussians compose into one Gaussian: 1/z_eff^2 = sum of 1/z_i^2 (exact).
    server = max((_composed_gaussian_epsilon(zs, delta) for zs in per_client.values()),
                 default=0.0)
    observers = min(epsilon(events, delta, accountant), capped_user_epsilon(rounds, delta))
    return {"observers": observers, "server": server,
            "max_rounds_per_client": max(map(len, per_client.values()), default=0)}


def capped_user_epsilon(rounds: list[dict], delta: float) -> float:
    """User-level ε without amplification, valid before sampling: a client takes part in at
    most ``cap`` rounds (the cap it enforces itself, see ``user_level_epsilons``), so it is
    at worst in the ``cap`` rounds whose noise is smallest. Records are grouped by ``round``
    (a re-run round's releases may all carry the client's one update for that round); the
    ``cap`` groups with the largest 1/z^2 totals are composed. Without a cap in every record,
    every round counts (conservative)."""
    if not rounds:
        return 0.0
    groups: dict = {}
    for i, r in enumerate(rounds):
        key = ("round", r["round"]) if r.get("round") is not None else ("record", i)
        groups.setdefault(key, []).append(_event_multiplier(r))
    caps = [r.get("max_participations") for r in rounds]
    if all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in caps):
        cap = min(max(caps), len(groups))  # caps differ only across a resume: the largest
    else:  # some round enforced no cap (or an older record does not say): every round
        cap = len(groups)
    worst = sorted(groups.values(), key=_gaussian_weight, reverse=True)[:cap]
    return _composed_gaussian_epsilon([z for zs in worst for z in zs], delta)


def _event_multiplier(record: dict) -> float:
    """The multiplier of one round's unsampled Gaussian for one client: z with add/remove
    adjacency (poisson), z/2 with replace-one (fixed), as in ``user_level_event``. The record's
    ``noise_multiplier`` must already be the effective one (``effective_multiplier``)."""
    z = record["noise_multiplier"]
    return z if record["sampling"] == "poisson" else z / 2


def _gaussian_weight(zs: list[float]) -> float:
    """Sum of 1/z^2 (inf if some z = 0): these unsampled Gaussians compose into one Gaussian
    of multiplier (sum of 1/z^2)^-1/2, so a larger sum is a larger ε."""
    return math.inf if not all(zs) else sum(z ** -2 for z in zs)


def _composed_gaussian_epsilon(zs: list[float], delta: float) -> float:
    weight = _gaussian_weight(zs)
    if weight == 0:
        return 0.0
    return gaussian_epsilon(weight ** -0.5 if math.isfinite(weight) else 0.0, delta)


def quantized_sensitivity(clip_norm: float, dim: int, clip_range: float, bits: int) -> float:
    """L2 sensitivity of one client's SecAgg+ input: its update is clipped to ``clip_norm``,
    then stochastic rounding to 2^bits levels on [-R, R] moves each of its ``dim`` coordinates
    by less than one step 2R / (2^bits - 1)."""
    return clip_norm + math.sqrt(dim) * 2 * clip_range / (2 ** bits - 1)


def effective_multiplier(record: dict) -> float:
    """The noise multiplier relative to the round's real sensitivity: noise std z*S over a
    sensitivity above S (SecAgg+ quantization) is a smaller multiplier (conservative)."""
    z = record["noise_multiplier"]
    sensitivity, clip = record.get("sensitivity"), record.get("clip_norm")
    if sensitivity is None or clip is None or sensitivity <= clip:
        return z
    return z * clip / sensitivity


def gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Exact ε(δ) of one Gaussian mechanism with sensitivity 1 and std ``noise_multiplier``
    (analytic Gaussian mechanism, Balle & Wang 2018): the smallest ε with
    Φ(1/(2z) − εz) − e^ε Φ(−1/(2z) − εz) <= δ. Closed form and cheap at any z, where a PLD
    grid for a tiny z would not fit in memory. If the second term underflows it is dropped,
    which only overstates δ(ε) and so ε (conservative)."""
    _check_delta(delta)
    if noise_multiplier <= 0:
        return math.inf
    z = noise_multiplier
    if _gaussian_delta(z, 0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while _gaussian_delta(z, hi) > delta:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            return math.inf
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _gaussian_delta(z, mid) <= delta else (mid, hi)
    return hi


def _gaussian_delta(z: float, eps: float) -> float:
    """δ(ε) of one Gaussian mechanism, sensitivity 1, std z (Balle & Wang 2018, Thm. 8)."""
    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    second = phi(-1 / (2 * z) - eps * z)
    return phi(1 / (2 * z) - eps * z) - (math.exp(eps + math.log(second)) if second > 0
                                          else 0.0)
