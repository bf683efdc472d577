"""Fast PLDs, fast composition and the calibration cache, against dp_accounting itself."""

import json
import math

import pytest
from dp_accounting import NeighboringRelation, dp_event
from dp_accounting.pld import pld_privacy_accountant, privacy_loss_distribution
from dp_accounting.rdp import rdp_privacy_accountant

from fedllm.privacy import accounting, calibration_cache, fast_pld
from fedllm.privacy.accounting import (
    COMPOSITION_DISCRETIZATION,
    EXACT_MAX_MECHANISMS,
    PrivacyEvent,
    calibrate_noise,
    epsilon,
    gaussian_epsilon,
)

DELTA = 1e-5


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Every test gets its own empty calibration cache."""
    monkeypatch.setenv("FEDLLM_CALIBRATION_CACHE", str(tmp_path / "calibration"))
    return tmp_path / "calibration"


def dp_accounting_epsilon(mechanisms, accountant="pld", delta=DELTA):
    """ε of [(z, q, steps), ...] straight from dp_accounting (PLD at its default 1e-4 grid)."""
    acc = (pld_privacy_accountant.PLDAccountant() if accountant == "pld" else
           rdp_privacy_accountant.RdpAccountant(
               neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE))
    for z, q, steps in mechanisms:
        gaussian = dp_event.GaussianDpEvent(z)
        acc.compose(gaussian if q == 1 else dp_event.PoissonSampledDpEvent(q, gaussian), steps)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("z,q,steps,discretization", [
    (0.8, 0.01, 100, 1e-4), (0.6, 0.16, 4, 1e-4), (0.5, 1.0, 3, 1e-4), (5.0, 0.001, 1, 1e-4),
    (1.0, 0.5, 10, 1e-3), (2.0, 0.01, 1000, 3e-3),
])
def test_fast_pld_equals_dp_accounting(z, q, steps, discretization):
    reference = privacy_loss_distribution.from_gaussian_mechanism(
        z, value_discretization_interval=discretization, sampling_prob=q).self_compose(steps)
    fast = fast_pld.compose([fast_pld.gaussian_pld(z, q, discretization)], [steps])
    expected = reference.get_epsilon_for_delta(DELTA)
    assert fast.get_epsilon_for_delta(DELTA) == pytest.approx(expected, rel=1e-8)
    assert fast_pld.epsilon_for_delta(fast, DELTA) == pytest.approx(expected, rel=1e-8)
    for eps in (0.1, 1.0, expected):
        assert fast.get_delta_for_epsilon(eps) == pytest.approx(
            reference.get_delta_for_epsilon(eps), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("delta", [1e-9, 1e-5, 0.5, 0.999])
def test_vectorized_epsilon_for_delta_equals_dp_accounting(delta):
    pld = fast_pld.compose([fast_pld.gaussian_pld(0.7, 0.2, 1e-3),
                            fast_pld.gaussian_pld(1.5, 1.0, 1e-3)], [6, 2])
    assert fast_pld.epsilon_for_delta(pld, delta) == pytest.approx(
        pld.get_epsilon_for_delta(delta), rel=1e-8, abs=1e-12)


def test_many_distinct_mechanisms_are_an_upper_bound_within_half_a_percent():
    mechanisms = [(0.7 + 0.1 * i, 0.01 * (i + 1), 50) for i in range(EXACT_MAX_MECHANISMS + 2)]
    events = [PrivacyEvent(noise_multiplier=z, sample_rate=q, steps=s) for z, q, s in mechanisms]
    exact = dp_accounting_epsilon(mechanisms)
    fast = epsilon(events, DELTA)
    # Coarser nested grid, pessimistic connect-the-dots: never below the exact value.
    assert exact <= fast <= exact * 1.005
    # At or under the limit the reporting grid is used: dp_accounting's own value.
    few = events[:EXACT_MAX_MECHANISMS]
    assert epsilon(few, DELTA) == pytest.approx(
        dp_accounting_epsilon(mechanisms[:EXACT_MAX_MECHANISMS]), rel=1e-7)


def test_coarse_grid_dominates_the_fine_one_for_one_mechanism():
    event = [PrivacyEvent(noise_multiplier=0.9, sample_rate=0.05, steps=200)]
    fine = epsilon(event, DELTA)
    coarse = epsilon(event, DELTA, discretization=COMPOSITION_DISCRETIZATION)
    search = epsilon(event, DELTA, discretization=accounting.SEARCH_DISCRETIZATION)
    assert fine <= coarse <= search <= fine * 1.01


@pytest.mark.parametrize("q,steps,target,accountant", [
    (0.16, 4, 8.0, "pld"), (0.05, 40, 2.0, "pld"), (0.01, 1000, 1.0, "pld"),
    (1.0, 12, 1.0, "pld"), (0.1, 12, 8.0, "rdp"), (0.02, 100, 3.0, "rdp"),
])
def test_calibrated_noise_is_never_optimistic(q, steps, target, accountant):
    z = calibrate_noise(target, DELTA, steps=steps, sample_rate=q, accountant=accountant)
    spent = dp_accounting_epsilon([(z, q, steps)], accountant)
    assert spent <= target  # exact, with the real q and steps
    assert spent >= 0.98 * target  # and not wastefully noisy


def test_unsampled_bracket_is_the_closed_form_gaussian():
    z = accounting._unsampled_noise_multiplier(3.0, DELTA, steps=9)
    assert gaussian_epsilon(z / 3, DELTA) == pytest.approx(3.0, rel=1e-6)
    assert gaussian_epsilon(z / 3, DELTA) <= 3.0


def cache_files(directory):
    return sorted(directory.glob("*.json")) if directory.exists() else []


def test_cache_is_written_once_and_read_back(private_cache):
    z = calibrate_noise(8.0, DELTA, steps=4, sample_rate=0.16)
    (entry,) = cache_files(private_cache)
    stored = json.loads(entry.read_text())
    assert stored["noise_multiplier"] == z and stored["epsilon"] <= 8.0
    assert stored["key"]["sample_rate"] == 0.16 and stored["key"]["steps"] == 4
    # A larger (safe) z in the entry is returned as is: the answer comes from the cache.
    entry.write_text(json.dumps({**stored, "noise_multiplier": z * 1.5}))
    assert calibrate_noise(8.0, DELTA, steps=4, sample_rate=0.16) == z * 1.5
    # A different key is a different entry.
    calibrate_noise(4.0, DELTA, steps=4, sample_rate=0.16)
    assert len(cache_files(private_cache)) == 2


def test_an_optimistic_or_corrupt_entry_is_never_used(private_cache):
    z = calibrate_noise(8.0, DELTA, steps=4, sample_rate=0.16)
    (entry,) = cache_files(private_cache)
    stored = json.loads(entry.read_text())
    entry.write_text(json.dumps({**stored, "noise_multiplier": z * 0.8}))  # would overspend
    assert calibrate_noise(8.0, DELTA, steps=4, sample_rate=0.16) == z
    for garbage in ("{not json", "[1, 2]", json.dumps({**stored, "noise_multiplier": True})):
        entry.write_text(garbage)
        assert calibrate_noise(8.0, DELTA, steps=4, sample_rate=0.16) == z
    assert json.loads(entry.read_text())["noise_multiplier"] == z  # repaired


def test_prior_spend_is_part_of_the_key_and_cache_off_writes_nothing(private_cache,
                                                                    monkeypatch):
    """A calibration after prior spend (every client's size estimate) is cached under a key
    that holds the prior events: the same target without them, or with other ones, misses."""
    prior = [PrivacyEvent(noise_multiplier=1.0, sample_rate=0.1, steps=10)]
    z = calibrate_noise(8.0, DELTA, steps=4, sample_rate=0.16, prior=prior)
    assert epsilon(prior + [PrivacyEvent(noise_multiplier=z, sample_rate=0.16, steps=4)],
                   DELTA) <= 8.0
    assert len(cache_files(private_cache)) == 1
    assert calibrate_noise(8.0, DELTA, steps=4, sample_rate=0.16, prior=prior) == z
    alone = calibrate_noise(8.0, DELTA, steps=4, sample_rate=0.16)
    assert alone < z and len(cache_files(private_cache)) == 2
    monkeypatch.setenv("FEDLLM_CALIBRATION_CACHE", "off")
    assert calibration_cache.cache_dir() is None
    calibrate_noise(7.0, DELTA, steps=4, sample_rate=0.16)
    assert len(cache_files(private_cache)) == 2


def test_unwritable_cache_is_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("FEDLLM_CALIBRATION_CACHE", str(blocker / "calibration"))
    z = calibrate_noise(8.0, DELTA, steps=4, sample_rate=0.16)
    assert math.isfinite(z) and z > 0


def test_a_target_below_the_accountants_resolution_is_refused():
    # dp_accounting's PLD reports epsilon 0 for huge noise, so without this guard a target
    # of 1e-9 would be "met" by rounding. It must fail instead.
    from fedllm.privacy.accounting import AccountingError, calibrate_noise

    with pytest.raises(AccountingError, match="cannot tell it from 0"):
        calibrate_noise(1e-9, 1e-5, steps=2, sample_rate=0.5)
    assert calibrate_noise(0.05, 1e-5, steps=2, sample_rate=0.5) > 10
