"""Audit math against exact reference values (closed forms, direct binomial sums)."""

import math

import numpy as np
import pytest

from fedllm.privacy import audit


def _binom_pmf(k, n, p):
    return math.comb(n, k) * p ** k * (1 - p) ** (n - k)


def test_module_is_pure():
    import subprocess
    import sys

    code = ("import sys, fedllm.privacy.audit; "
            "assert 'torch' not in sys.modules and 'flwr' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("r", [10, 64, 100])
def test_all_correct_pure_dp_matches_closed_form(r):
    # delta = 0, v = r: p-value = q^r, so the bound solves q^r = 1 - c: q = (1-c)^(1/r).
    q = 0.05 ** (1 / r)
    want = math.log(q / (1 - q))
    got = audit.one_run_epsilon_lower_bound(m=2 * r, r=r, v=r, delta=0.0, confidence=0.95)
    assert got == pytest.approx(want, abs=1e-6)
    assert got <= want  # bisection keeps the conservative end
    if r == 100:
        assert got == pytest.approx(3.4928, abs=1e-3)


def test_p_value_equals_direct_binomial_sums():
    m, r, v, eps, delta = 200, 40, 30, 1.0, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))
    tail = sum(_binom_pmf(k, r, q) for k in range(v, r + 1))
    alpha = max(sum(_binom_pmf(v - j, r, q) for j in range(1, i + 1)) / i
                for i in range(1, v + 1))
    assert audit.one_run_p_value(m, r, v, eps, 0.0) == pytest.approx(tail, rel=1e-10)
    assert audit.one_run_p_value(m, r, v, eps, delta) == pytest.approx(
        tail + 2 * m * delta * alpha, rel=1e-10)


def test_bound_is_the_p_value_crossing_and_monotone():
    m, r, v = 1000, 100, 90
    level = 0.05
    eps = audit.one_run_epsilon_lower_bound(m, r, v, 1e-5, 0.95)
    assert audit.one_run_p_value(m, r, v, eps, 1e-5) < level
    assert audit.one_run_p_value(m, r, v, eps + 1e-6, 1e-5) >= level
    # More delta, fewer correct guesses or more confidence can only lower the bound.
    assert audit.one_run_epsilon_lower_bound(m, r, v, 1e-3, 0.95) < eps
    assert audit.one_run_epsilon_lower_bound(m, r, v - 5, 1e-5, 0.95) < eps
    assert audit.one_run_epsilon_lower_bound(m, r, v, 1e-5, 0.99) < eps
    assert audit.one_run_epsilon_lower_bound(m, r, r // 2, 1e-5, 0.95) == 0.0  # chance level


def test_clopper_pearson_reference_values():
    lo, hi = audit.clopper_pearson(5, 10, 0.95)
    assert (lo, hi) == (pytest.approx(0.187086, abs=1e-6), pytest.approx(0.812914, abs=1e-6))
    n = 50
    assert audit.clopper_pearson(0, n, 0.95) == (0.0, pytest.approx(1 - 0.025 ** (1 / n)))
    assert audit.clopper_pearson(n, n, 0.95) == (pytest.approx(0.025 ** (1 / n)), 1.0)


def test_epsilon_from_rates():
    assert audit.epsilon_from_rates(0.5, 0.05, 0.0) == pytest.approx(math.log(10))
    # The other direction: TNR <= e^eps FNR + delta.
    assert audit.epsilon_from_rates(0.9, 0.5, 0.0) == pytest.approx(math.log(0.5 / 0.1))
    assert audit.epsilon_from_rates(0.3, 0.3, 0.0) == 0.0
    assert audit.epsilon_from_rates(0.5, 0.0, 0.0) == math.inf
    assert audit.epsilon_from_rates(0.5, 0.05, 0.5) == 0.0  # delta absorbs the whole gap


def test_rates_bound_perfect_separation_closed_form():
    n = 100
    lo = 0.025 ** (1 / n)  # Clopper-Pearson: lower end at k = n, upper end 1 - lo at k = 0
    want = math.log((lo - 1e-5) / (1 - lo))
    assert audit.rates_epsilon_lower_bound(n, 0, 0, n, 1e-5, 0.95) == pytest.approx(want)


def test_one_run_audit_counts_guesses_from_the_top_and_bottom():
    # 16 canaries, scores = index; the 8 highest are "in" except one swap at the boundary.
    included = np.array([False] * 8 + [True] * 8)
    included[7], included[8] = True, False
    scores = np.arange(16.0)
    res = audit.one_run_audit(included, scores, delta=0.0, confidence=0.95, guesses=[4, 16])
    assert res.guesses_tried == [4, 16]
    # r = 4: top 2 (15, 14) in, bottom 2 (0, 1) out: all correct. r = 16: 14 of 16 correct.
    per_test = 1 - 0.05 / 2
    want4 = audit.one_run_epsilon_lower_bound(16, 4, 4, 0.0, per_test)
    want16 = audit.one_run_epsilon_lower_bound(16, 16, 14, 0.0, per_test)
    assert res.bounds_tried == [pytest.approx(want4), pytest.approx(want16)]
    assert res.epsilon_lower_bound == max(want4, want16)
    assert res.correct == (4 if want4 >= want16 else 14)


def test_one_run_audit_is_valid_for_a_dp_mechanism():
    """Randomized response at eps=1 is exactly 1-DP: its bound may exceed 1 at most ~5% of the
    time (fixed seed: deterministic)."""
    rng = np.random.default_rng(0)
    eps, m, trials = 1.0, 200, 60
    p_keep = math.exp(eps) / (1 + math.exp(eps))
    above, bounds = 0, []
    for _ in range(trials):
        included = rng.random(m) < 0.5
        reported = np.where(rng.random(m) < p_keep, included, ~included)
        scores = reported + rng.random(m) * 0.1  # ties broken at random
        b = audit.one_run_audit(included, scores, delta=0.0, confidence=0.95).epsilon_lower_bound
        bounds.append(b)
        above += b > eps
    assert above <= 0.1 * trials
    assert np.median(bounds) > 0.2  # and it is not vacuous: the leak is detected


def test_threshold_audit_detects_separation_and_not_chance():
    rng = np.random.default_rng(1)
    included = rng.random(400) < 0.5
    separated = audit.threshold_audit(included, included + rng.random(400) * 0.5, 1e-5)
    assert separated.epsilon_lower_bound > 3 and separated.fp == 0 and separated.fn == 0
    chance = audit.threshold_audit(included, rng.random(400), 1e-5)
    assert chance.epsilon_lower_bound < 0.5


def test_roc_and_auc():
    fpr, tpr, _ = audit.roc_curve([True, True, False, False], [4.0, 3.0, 2.0, 1.0])
    assert audit.auc(fpr, tpr) == pytest.approx(1.0)
    fpr, tpr, _ = audit.roc_curve([False, False, True, True], [4.0, 3.0, 2.0, 1.0])
    assert audit.auc(fpr, tpr) == pytest.approx(0.0)
    fpr, tpr, _ = audit.roc_curve([True, False, True, False], [4.0, 3.0, 2.0, 1.0])
    assert audit.auc(fpr, tpr) == pytest.approx(0.75)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)


def test_bad_inputs_raise():
    with pytest.raises(audit.AuditError):
        audit.one_run_p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(audit.AuditError):
        audit.one_run_epsilon_lower_bound(10, 5, 3, 0.0, 1.0)
    with pytest.raises(audit.AuditError):
        audit.roc_curve([True, True], [1.0, 2.0])
