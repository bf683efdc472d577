"""Budget-exact calibration: participation caps, the cap-aware sampler, client-side refusal."""

import math
import random

import pytest
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedllm.privacy.accounting import PrivacyEvent, calibrate_noise
from fedllm.privacy.participation import (CohortSampler, ParticipationError, binomial_quantile,
                                          resolve_cap)


@pytest.mark.parametrize("rounds, cohort, population, cap", [
    (3, 3, 179, 1),     # the demo: every client trains at most once
    (10, 5, 179, 1),
    (20, 10, 100, 2),   # 200 slots over 100 clients
    (20, 10, 30, 7),    # ceil(200 / 30)
    (3, 5, 5, 3),       # everyone every round
])
def test_auto_cap_without_user_level_dp_is_the_fewest_that_fill_every_cohort(
        rounds, cohort, population, cap):
    assert resolve_cap("auto", rounds=rounds, cohort=cohort, population=population,
                       user_level=False) == cap
    assert cap * population >= rounds * min(cohort, population)
    assert (cap - 1) * population < rounds * min(cohort, population)


def test_auto_cap_with_user_level_dp_is_a_binomial_tail_quantile():
    cap = resolve_cap("auto", rounds=20, cohort=10, population=100, user_level=True)
    # Pr[Bin(20, 0.1) <= k] computed independently, term by term.
    pmf = [math.comb(20, k) * 0.1 ** k * 0.9 ** (20 - k) for k in range(21)]
    assert sum(pmf[:cap + 1]) >= 0.99 > sum(pmf[:cap])
    assert cap == 6  # Pr[Bin(20, 0.1) <= 5] = 0.989
    assert binomial_quantile(3, 1.0, 0.99) == 3


def test_explicit_caps_and_errors():
    assert resolve_cap(2, rounds=5, cohort=1, population=10, user_level=False) == 2
    assert resolve_cap(9, rounds=5, cohort=1, population=10, user_level=True) == 5  # <= rounds
    for bad in (0, -1, "3", 1.5, True):
        with pytest.raises(ParticipationError):
            resolve_cap(bad, rounds=5, cohort=1, population=10, user_level=False)


def test_sampler_fills_every_cohort_and_never_exceeds_the_cap():
    clients = list(range(30))
    cap = resolve_cap("auto", rounds=20, cohort=10, population=30, user_level=False)
    sampler = CohortSampler(cohort=10, sampling="fixed", cap=cap, narrow=True,
                            rng=random.Random(1))
    counts = dict.fromkeys(clients, 0)
    for _ in range(20):
        chosen = sampler.sample(clients)
        assert len(chosen) == 10 and len(set(chosen)) == 10
        for c in chosen:
            counts[c] += 1
    assert max(counts.values()) <= cap


def test_sampler_drops_declined_clients_and_restores_its_state():
    sampler = CohortSampler(cohort=2, sampling="fixed", cap=5, narrow=True, rng=random.Random(0))
    chosen = sampler.sample([1, 2, 3])
    sampler.declined(chosen[0])
    assert chosen[0] not in sampler.eligible([1, 2, 3])
    assert sampler.participations[str(chosen[0])] == 0
    other = CohortSampler(cohort=2, sampling="fixed", cap=5, narrow=True, rng=random.Random(0))
    other.restore(sampler.state())
    assert other.eligible([1, 2, 3]) == sampler.eligible([1, 2, 3])


def test_poisson_sampler_rate_is_over_the_eligible_pool():
    sampler = CohortSampler(cohort=5, sampling="poisson", cap=1, narrow=True,
                            rng=random.Random(3))
    first = sampler.sample(range(10))
    assert sampler.eligible(range(10)) == [c for c in range(10) if c not in first]


def test_user_level_dp_keeps_every_client_in_the_pool():
    """q = cohort / population must hold in every round for the user-level accounting."""
    sampler = CohortSampler(cohort=2, sampling="fixed", cap=1, narrow=False,
                            rng=random.Random(0))
    chosen = sampler.sample([1, 2, 3, 4])
    sampler.declined(chosen[0])
    assert sampler.eligible([1, 2, 3, 4]) == [1, 2, 3, 4]


# ---------------------------------------------------------------- calibration vs dp_accounting

def _dp_accounting_epsilon(q, z, steps, delta, accountant):
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), steps)
    acc = (pld_privacy_accountant.PLDAccountant() if accountant == "pld"
           else rdp_privacy_accountant.RdpAccountant())
    return acc.compose(event).get_epsilon(delta)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
@pytest.mark.parametrize("cap, local_steps, q", [(1, 4, 0.16), (2, 4, 0.05), (1, 2, 1.0)])
def test_noise_for_the_cap_spends_the_target_within_ten_percent(accountant, cap, local_steps, q):
    """A client that makes all its participations ends between 0.9 and 1.0 times the target,
    as dp_accounting computes it for the mechanism that ran (cap x local steps)."""
    target = 8.0
    z = calibrate_noise(target, 1e-5, steps=cap * local_steps, sample_rate=q,
                        accountant=accountant)
    spent = _dp_accounting_epsilon(q, z, cap * local_steps, 1e-5, accountant)
    assert 0.9 * target <= spent <= target


def test_calibrating_for_every_round_left_budget_unspent():
    """The old calibration (every planned round) for a client that trains once spends far
    less than the target: the gap this cap closes."""
    z_old = calibrate_noise(8.0, 1e-5, steps=3 * 4, sample_rate=0.16)
    spent_once = _dp_accounting_epsilon(0.16, z_old, 4, 1e-5, "pld")
    assert spent_once < 0.7 * 8.0


# ---------------------------------------------------------------- client-side enforcement

def _client_cfg(tiny_cfg, cap, target=8.0):
    import copy

    cfg = copy.deepcopy(tiny_cfg)
    cfg.run.id = "run-a"
    cfg.privacy.example.max_participations = cap
    cfg.privacy.example.target_epsilon = target
    return cfg


def _event(cfg, q=0.25):
    from fedllm.clients.app import planned_noise_multiplier

    z = planned_noise_multiplier(cfg.privacy.example.target_epsilon, cfg.privacy.delta, q,
                                 cfg.privacy.example.max_participations * cfg.train.local_steps,
                                 cfg.privacy.accountant)
    return PrivacyEvent(noise_multiplier=z, steps=cfg.train.local_steps, sample_rate=q)


def _plan(cfg, event):
    from fedllm.privacy.release_policy import RunPlan

    return RunPlan(run_id="run-a", rounds=cfg.federation.rounds,
                   cap=cfg.privacy.example.max_participations, event=event,
                   target_epsilon=cfg.privacy.example.target_epsilon, budget=None,
                   delta=cfg.privacy.delta)


def test_ledger_refuses_a_participation_beyond_the_cap(tiny_cfg, tmp_path):
    from fedllm.privacy.ledger import Ledger
    from fedllm.privacy.release_policy import DECLINE, TRAIN, decide

    cfg = _client_cfg(tiny_cfg, cap=2)
    cfg.federation.rounds = 4
    ledger = Ledger.open(tmp_path, "alice")
    event = _event(cfg)
    plan = _plan(cfg, event)
    ledger.record("other-run", 1, event)       # another run's release does not count
    assert decide(ledger.entries, plan, 1, copy_exists=False).action == TRAIN
    ledger.record("run-a", 1, event, plan=plan.fingerprint())
    assert decide(ledger.entries, plan, 2, copy_exists=False).action == TRAIN
    ledger.record("run-a", 2, event, plan=plan.fingerprint())
    refusal = decide(ledger.entries, plan, 3, copy_exists=False)
    assert refusal.action == DECLINE and "participation cap" in refusal.reason


def test_ledger_refuses_when_the_server_raises_the_cap_mid_run(tiny_cfg, tmp_path):
    """Noise calibrated for one participation, then a server claims the cap is 3: the run's
    epsilon would exceed the target (and the plan changed), so the client declines."""
    from fedllm.privacy.ledger import Ledger
    from fedllm.privacy.release_policy import DECLINE, decide

    cfg1 = _client_cfg(tiny_cfg, cap=1)
    ledger = Ledger.open(tmp_path, "bob")
    ledger.record("run-a", 1, _event(cfg1))   # recorded before plans were pinned
    cfg3 = _client_cfg(tiny_cfg, cap=3)
    refusal = decide(ledger.entries, _plan(cfg3, _event(cfg1)), 2, copy_exists=False)
    assert refusal.action == DECLINE and "run epsilon" in refusal.reason


def test_unresolved_auto_is_read_as_every_round(tiny_cfg):
    from fedllm.clients.app import max_participations

    cfg = _client_cfg(tiny_cfg, cap="auto")
    assert max_participations(cfg) == cfg.federation.rounds
