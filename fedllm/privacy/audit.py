"""Empirical privacy auditing: turn a membership game into a lower bound on ε (pure math).

PURE: no torch, no flwr (like ``accounting.py``); numpy and scipy only. The training side of
an audit (canaries, the client's real DP-SGD code path, scoring) is ``fedllm.audit_run``.

Two standard methods:

* **One run** (Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
  NeurIPS 2023, arXiv:2305.08846): m canaries, each included in the training data
  independently with probability 1/2; after training the auditor guesses "in" for the r/2
  highest-scoring and "out" for the r/2 lowest-scoring canaries and abstains on the rest. If
  the mechanism is (ε, δ)-DP, the number of correct guesses v is (up to a δ term) stochastically
  dominated by Binomial(r, e^ε / (1 + e^ε)) (their Theorem 5.2 / Corollary 5.4). The ε lower
  bound is the largest ε whose p-value for the observed v is below 1 − confidence.
  ``one_run_p_value`` is their Appendix D algorithm, including the δ term.

* **Multi run** (Jagielski, Ullman & Oprea, "Auditing Differentially Private Machine Learning:
  How Private is Private SGD?", NeurIPS 2020; Nasr et al., "Adversary Instantiation", IEEE S&P
  2021): independent training runs with and without a canary; a threshold test's true and false
  positive rates must satisfy TPR ≤ e^ε·FPR + δ and TNR ≤ e^ε·FNR + δ under (ε, δ)-DP, so
  ε ≥ ln((TPR − δ) / FPR) with Clopper-Pearson bounds in the conservative direction (lower
  bound of TPR, upper bound of FPR). ``threshold_audit`` applies it with a Bonferroni
  correction over every threshold tried. Its trials must be independent (one canary per run).

Both give a bound that holds with probability ≥ ``confidence`` over the audit's randomness: a
bound above the claimed ε means the claim is false (the mechanism is broken), up to that
confidence. A bound far below the claim proves nothing: audits of realistic models are loose.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

EPS_SEARCH_STEPS = 40


class AuditError(ValueError):
    """Inputs that no audit can use (e.g. counts out of range)."""


def _check_counts(m: int, r: int, v: int) -> None:
    if not (0 <= v <= r <= m):
        raise AuditError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")


def _check_level(name: str, value: float) -> None:
    if not (0 < value < 1):
        raise AuditError(f"{name} must be in (0, 1), got {value!r}")


# ------------------------------------------------------------------------------- one run

def one_run_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v correct out of r guesses] for m canaries under an (eps, delta)-DP mechanism.

    Steinke et al. 2023, Corollary 5.4 / Appendix D: β = P[Binomial(r, q) ≥ v] with
    q = e^ε/(1+e^ε), plus 2·m·δ·α where α = max_i (1/i)·P[v−i ≤ Binomial(r, q) < v].
    """
    _check_counts(m, r, v)
    if eps < 0 or not (0 <= delta <= 1):
        raise AuditError(f"need eps >= 0 and 0 <= delta <= 1, got {eps!r}, {delta!r}")
    q = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    alpha, below = 0.0, 0.0
    for i in range(1, v + 1):
        below += float(stats.binom.pmf(v - i, r, q))
        alpha = max(alpha, below / i)
    return min(tail + 2 * m * delta * alpha, 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float,
                                confidence: float = 0.95) -> float:
    """Largest ε rejected at level 1 − confidence (0 if even ε = 0 is not rejected).

    Bisection on ε; returns the low end of the final bracket, i.e. a conservative value.
    """
    _check_counts(m, r, v)
    _check_level("confidence", confidence)
    level = 1.0 - confidence
    if one_run_p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < level:
        lo, hi = hi, hi * 2
    for _ in range(EPS_SEARCH_STEPS):
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class OneRunResult:
    epsilon_lower_bound: float
    confidence: float
    canaries: int
    included: int
    guesses: int        # r: guesses made (the rest abstained)
    correct: int        # v
    guesses_tried: list[int]
    bounds_tried: list[float]  # per r tried, each at the Bonferroni-corrected confidence

    def to_dict(self) -> dict:
        return asdict(self)


def one_run_audit(included, scores, delta: float, confidence: float = 0.95,
                  guesses: "list[int] | None" = None) -> OneRunResult:
    """Guess "in" for the top r/2 scores and "out" for the bottom r/2, for each r in
    ``guesses`` (default m/8, m/4, m/2); report the best bound, each computed at confidence
    1 − (1 − confidence)/len(guesses) so that the maximum holds at ``confidence`` (Bonferroni).
    Higher score = more likely included.
    """
    labels = np.asarray(included, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    m = len(labels)
    if m != len(s) or m < 2:
        raise AuditError(f"need >= 2 canaries with one score each, got {m} and {len(s)}")
    if not np.isfinite(s).all():
        raise AuditError("canary scores must be finite")
    if guesses is None:
        guesses = sorted({max(2, m // 8), max(2, m // 4), max(2, m // 2)})
    guesses = [2 * (g // 2) for g in guesses]
    if any(g < 2 or g > m for g in guesses):
        raise AuditError(f"guess counts must be in [2, {m}], got {guesses}")
    _check_level("confidence", confidence)
    per_test = 1.0 - (1.0 - confidence) / len(guesses)
    # Stable order with ties broken by index (fixed in advance, independent of the labels).
    order = np.argsort(-s, kind="stable")
    bounds, corrects = [], []
    for r in guesses:
        top, bottom = order[: r // 2], order[m - r // 2:]
        v = int(labels[top].sum() + (~labels[bottom]).sum())
        corrects.append(v)
        bounds.append(one_run_epsilon_lower_bound(m, r, v, delta, per_test))
    best = int(np.argmax(bounds))
    return OneRunResult(epsilon_lower_bound=bounds[best], confidence=confidence, canaries=m,
                        included=int(labels.sum()), guesses=guesses[best],
                        correct=corrects[best], guesses_tried=guesses, bounds_tried=bounds)


# ----------------------------------------------------------------------------- multi run

def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact two-sided binomial interval for k successes out of n (each side (1−c)/2)."""
    if not (0 <= k <= n) or n < 1:
        raise AuditError(f"need 0 <= k ({k}) <= n ({n}) and n >= 1")
    _check_level("confidence", confidence)
    a = 1.0 - confidence
    lo = 0.0 if k == 0 else float(stats.beta.ppf(a / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(stats.beta.ppf(1 - a / 2, k + 1, n - k))
    return lo, hi


def epsilon_from_rates(tpr: float, fpr: float, delta: float) -> float:
    """ε implied by one test's rates under (ε, δ)-DP: both TPR ≤ e^ε·FPR + δ and
    1 − FPR ≤ e^ε·(1 − TPR) + δ must hold. 0 when neither is violated at ε = 0; inf when a
    rate bound is 0 and the other side exceeds δ."""
    def one(num: float, den: float) -> float:
        if num <= 0:
            return 0.0
        if den <= 0:
            return math.inf
        return max(0.0, math.log(num / den))
    return max(one(tpr - delta, fpr), one(1 - fpr - delta, 1 - tpr))


def rates_epsilon_lower_bound(tp: int, fn: int, fp: int, tn: int, delta: float,
                              confidence: float = 0.95) -> float:
    """ε lower bound from one threshold's confusion counts over independent trials, with
    Clopper-Pearson intervals in the conservative direction (confidence covers both)."""
    tpr_lo, tpr_hi = clopper_pearson(tp, tp + fn, confidence)
    fpr_lo, fpr_hi = clopper_pearson(fp, fp + tn, confidence)
    # Each direction uses one side of each interval: TPR_lo with FPR_hi, and
    # TNR_lo = 1 − FPR_hi with FNR_hi = 1 − TPR_lo.
    return epsilon_from_rates(tpr_lo, fpr_hi, delta)


def roc_curve(included, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(FPR, TPR, thresholds) of the test "score ≥ t ⇒ in", from (0, 0) to (1, 1)."""
    labels = np.asarray(included, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        raise AuditError("a ROC curve needs both included and held-out canaries")
    thresholds = np.unique(s)[::-1]
    tpr = np.array([0.0] + [float((s[labels] >= t).sum()) / pos for t in thresholds])
    fpr = np.array([0.0] + [float((s[~labels] >= t).sum()) / neg for t in thresholds])
    return fpr, tpr, np.concatenate([[np.inf], thresholds])


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


@dataclass
class ThresholdResult:
    epsilon_lower_bound: float
    confidence: float
    threshold: float
    tp: int
    fn: int
    fp: int
    tn: int
    thresholds_tried: int

    def to_dict(self) -> dict:
        return asdict(self)


def threshold_audit(included, scores, delta: float, confidence: float = 0.95
                    ) -> ThresholdResult:
    """Multi-run audit: every distinct score is a threshold; the best bound is reported, each
    computed at confidence 1 − (1 − confidence)/#thresholds (Bonferroni). ``included[i]`` and
    ``scores[i]`` must come from independent trials (one canary per training run)."""
    labels = np.asarray(included, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    _check_level("confidence", confidence)
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        raise AuditError("a threshold audit needs both included and held-out trials")
    thresholds = np.unique(s)
    per_test = 1.0 - (1.0 - confidence) / len(thresholds)
    best = None
    for t in thresholds:
        tp = int((s[labels] >= t).sum())
        fp = int((s[~labels] >= t).sum())
        eps = rates_epsilon_lower_bound(tp, pos - tp, fp, neg - fp, delta, per_test)
        if best is None or eps > best.epsilon_lower_bound:
            best = ThresholdResult(eps, confidence, float(t), tp, pos - tp, fp, neg - fp,
                                   len(thresholds))
    return best
