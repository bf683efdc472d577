"""Accountant against dp_accounting and reference values computed with it."""

import math

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedllm.privacy.accounting import (AccountingError, PrivacyEvent, calibrate_noise, epsilon,
                                       merge_events)


def poisson(q, z, steps):
    return PrivacyEvent(noise_multiplier=z, steps=steps, sampling="poisson", sample_rate=q)


@pytest.mark.parametrize("q,z,steps,delta,accountant,expected", [
    (0.01, 1.0, 1000, 1e-5, "pld", 1.8282),
    (0.1, 1.0, 100, 1e-6, "pld", 8.0586),
    (0.01, 1.0, 1000, 1e-5, "rdp", 2.1014),
    (0.1, 1.0, 100, 1e-6, "rdp", 8.921),
])
def test_reference_values(q, z, steps, delta, accountant, expected):
    eps = epsilon([poisson(q, z, steps)], delta, accountant)
    assert eps == pytest.approx(expected, rel=5e-4)


def test_fixed_size_sampling_is_accounted_without_replacement_with_rdp():
    event = PrivacyEvent(noise_multiplier=1.0, steps=100, sampling="fixed", sample_size=100,
                         population=1000)
    # Asked for PLD, but only RDP supports sampling without replacement: RDP is used.
    assert epsilon([event], 1e-6, "pld") == pytest.approx(15.2, abs=0.05)


def test_equals_direct_dp_accounting_for_heterogeneous_composition():
    events = [poisson(0.05, 1.1, 40), poisson(0.02, 0.8, 25), poisson(0.05, 1.1, 10)]
    direct = pld_privacy_accountant.PLDAccountant()
    for q, z, n in [(0.05, 1.1, 40), (0.02, 0.8, 25), (0.05, 1.1, 10)]:
        direct.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), n)
    assert epsilon(events, 1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-4)
    rdp = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE)
    for q, z, n in [(0.05, 1.1, 40), (0.02, 0.8, 25), (0.05, 1.1, 10)]:
        rdp.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), n)
    assert epsilon(events, 1e-5, "rdp") == pytest.approx(rdp.get_epsilon(1e-5), rel=1e-6)


def test_merge_events_adds_steps_of_identical_mechanisms():
    merged = merge_events([poisson(0.1, 1.0, 3), poisson(0.1, 1.0, 4), poisson(0.2, 1.0, 1)])
    assert sorted(e.steps for e in merged) == [1, 7]


def test_more_steps_cost_more_and_zero_noise_is_infinite():
    assert epsilon([poisson(0.1, 1.0, 20)], 1e-5) < epsilon([poisson(0.1, 1.0, 40)], 1e-5)
    assert math.isinf(epsilon([poisson(0.1, 0.0, 1)], 1e-5))
    assert epsilon([], 1e-5) == 0.0


@pytest.mark.parametrize("target,q,steps", [(8.0, 0.1, 12), (2.0, 0.01, 1000), (1.0, 1.0, 12)])
def test_calibration_meets_target_within_one_percent(target, q, steps):
    z = calibrate_noise(target, 1e-5, steps=steps, sample_rate=q)
    eps = epsilon([poisson(q, z, steps)], 1e-5)
    assert eps <= target
    assert eps >= 0.99 * target


def test_calibration_accounts_for_prior_spend():
    prior = [poisson(0.1, 1.0, 50)]
    z_fresh = calibrate_noise(8.0, 1e-5, steps=20, sample_rate=0.1)
    z_after = calibrate_noise(8.0, 1e-5, steps=20, sample_rate=0.1, prior=prior)
    assert z_after > z_fresh
    assert epsilon(prior + [poisson(0.1, z_after, 20)], 1e-5) <= 8.0


@pytest.mark.parametrize("kwargs", [
    dict(noise_multiplier=-1.0, steps=1, sample_rate=0.1),
    dict(noise_multiplier=1.0, steps=-1, sample_rate=0.1),
    dict(noise_multiplier=1.0, steps=1, sample_rate=0.0),
    dict(noise_multiplier=1.0, steps=1, sample_rate=1.5),
    dict(noise_multiplier=1.0, steps=1, sampling="fixed", sample_size=5, population=2),
])
def test_invalid_events_are_rejected(kwargs):
    with pytest.raises(AccountingError):
        PrivacyEvent(**kwargs)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
def test_invalid_delta(delta):
    with pytest.raises(AccountingError, match="delta"):
        epsilon([poisson(0.1, 1.0, 1)], delta)


def test_unreachable_target():
    with pytest.raises(AccountingError, match="unreachable"):
        calibrate_noise(1e-7, 1e-5, steps=1000, sample_rate=1.0)


@pytest.mark.parametrize("z", [0.3, 0.6, 1.0, 3.0])
def test_analytic_gaussian_epsilon_equals_dp_accounting(z):
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    from fedllm.privacy.accounting import gaussian_epsilon

    ref = pld_privacy_accountant.PLDAccountant().compose(
        dp_event.GaussianDpEvent(z)).get_epsilon(1e-5)
    assert gaussian_epsilon(z, 1e-5) == pytest.approx(ref, rel=1e-6)


def test_analytic_gaussian_epsilon_at_extremes_is_finite_and_cheap():
    from fedllm.privacy.accounting import gaussian_epsilon

    assert 1e5 < gaussian_epsilon(1e-3, 1e-5) < math.inf   # a PLD grid here would not fit in RAM
    assert gaussian_epsilon(0.0, 1e-5) == math.inf
    assert gaussian_epsilon(1e3, 1e-5) < 1e-2


@pytest.mark.parametrize("z, steps", [(0.02, 2), (1e-6, 2), (1.0, 10 ** 11), (0.01, 2)])
def test_the_accountant_answers_in_bounded_memory(z, steps):
    """Parameters whose PLD grid would take GBs (tiny noise, 1e11 steps) are answered with
    RDP, an upper bound, instead of a MemoryError."""
    import resource

    from fedllm.privacy.accounting import PrivacyEvent, effective_accountant, epsilon

    event = PrivacyEvent(noise_multiplier=z, steps=steps, sample_rate=0.129)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    eps = epsilon([event], 1e-5)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert math.isfinite(eps) and eps > 10 and grown_mb < 500
    if z < 0.05:
        assert effective_accountant([event], "pld") == "rdp"
