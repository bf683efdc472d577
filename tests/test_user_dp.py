"""User-level DP (DP-FedAvg) and update validation at the strategy, with real Flower messages."""

import copy
from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedllm import protocol
from fedllm.privacy.accounting import calibrate_user_noise, epsilon, user_level_event
from fedllm.privacy.updates import (UpdateRejected, add_noise, check_update, clip_update,
                                    distributed_noise_std, update_norm)
from fedllm.server.strategy import AdapterFedAvg, RoundInfo, UserDP, UserLevelDP, cohort_sampler

SHAPES = {"a.lora_A.weight": (4, 64), "a.lora_B.weight": (64, 4)}


@pytest.fixture(autouse=True)
def task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


def zeros(scale=0.0):
    return OrderedDict((k, np.full(s, scale, np.float32)) for k, s in SHAPES.items())


def strategy(user_dp=None, min_clients=1):
    """The adapter FedAvg as it stands after configure_train of round 1, wrapped by user-level
    DP when ``user_dp`` is given."""
    sampler = cohort_sampler(3, "fixed", user_level=user_dp is not None, seed=0)
    s = AdapterFedAvg(cfg_text="", sampler=sampler, min_clients=min_clients)
    s.global_arrays = zeros()
    s.rounds.append(RoundInfo(round=1, sampled=4))
    return s if user_dp is None else UserLevelDP(s, user_dp)


def reply(node, arrays, client_id=None):
    sent = Message(content=RecordDict({}), dst_node_id=node, message_type="train")
    content = RecordDict({
        protocol.ARRAYS_RECORD: ArrayRecord(
            array_dict=OrderedDict((k, Array(np.asarray(v))) for k, v in arrays.items())),
        protocol.METRICS_RECORD: MetricRecord({"train_loss": 1.0, "steps": 2, "sample_rate": 0.1,
                                               "noise_multiplier": 1.0, "dp": 1,
                                               "max_grad_norm": 1.0, "declined": 0}),
        protocol.CLIENT_RECORD: ConfigRecord({"client_id": client_id or f"c{node}"}),
    })
    return Message(content=content, reply_to=sent)


def new_global(result):
    arrays, _ = result
    return {k: v.numpy() for k, v in arrays.items()}


def test_bad_updates_are_rejected_and_round_completes():
    good = zeros(0.01)
    nan = zeros(0.01)
    nan["a.lora_A.weight"][0, 0] = np.nan
    wrong_shape = zeros(0.01)
    wrong_shape["a.lora_B.weight"] = np.zeros((3, 3), np.float32)
    extra = zeros(0.01)
    extra["b.lora_A.weight"] = np.zeros((2, 2), np.float32)
    s = strategy()
    result = s.aggregate_train(1, [reply(1, good), reply(2, nan), reply(3, wrong_shape),
                                   reply(4, extra)])
    out = new_global(result)
    np.testing.assert_allclose(out["a.lora_A.weight"], 0.01)
    info = s.core.rounds[-1]
    assert info.accepted == ["c1"] and len(info.rejected) == 3
    reasons = " ".join(info.rejected.values())
    assert "non-finite" in reasons and "shape" in reasons and "unexpected" in reasons
    assert set(s.events) == {"c1", "c2", "c3", "c4"}  # released anyway: all accounted


def test_below_min_clients_the_global_adapter_is_unchanged():
    s = strategy(min_clients=2)
    bad = zeros(0.01)
    bad["a.lora_A.weight"][0, 0] = np.inf
    assert s.aggregate_train(1, [reply(1, zeros(0.01)), reply(2, bad)]) == (None, None)


def test_clip_update_bounds_the_norm():
    big = {k: np.random.default_rng(0).normal(0, 10, s).astype(np.float32)
           for k, s in SHAPES.items()}
    assert update_norm(big) > 100
    clipped, norm = clip_update(big, 0.5)
    assert norm == pytest.approx(update_norm(big))
    assert update_norm(clipped) <= 0.5
    small = zeros(1e-4)
    assert update_norm(clip_update(small, 0.5)[0]) == pytest.approx(update_norm(small), rel=1e-5)


def test_server_rejects_updates_above_the_clip_bound():
    dp = UserDP(noise_multiplier=0.0, clip_norm=0.5, noise="central", expected_cohort=3,
                min_survivors=1)
    s = strategy(user_dp=dp)
    result = s.aggregate_train(1, [reply(1, zeros(0.001)), reply(2, zeros(1.0))])
    assert "clip bound" in " ".join(s.core.rounds[-1].rejected.values())
    # Divided by the expected cohort (3), not the 1 accepted update.
    np.testing.assert_allclose(new_global(result)["a.lora_A.weight"], 0.001 / 3, rtol=1e-5)


@pytest.mark.parametrize("mode", ["central", "distributed"])
def test_noise_std_of_the_aggregate(mode):
    z, S, k = 1.3, 0.5, 4
    big = {"w": (1000, 500)}  # 500k coordinates: the sample std is within ~0.3%
    dp = UserDP(noise_multiplier=z, clip_norm=S, noise=mode, expected_cohort=k, min_survivors=k)
    s = strategy(user_dp=dp)
    s.core.global_arrays = {"w": np.zeros(big["w"], np.float32)}
    updates = [{"w": np.zeros(big["w"], np.float32)} for _ in range(k)]
    if mode == "distributed":
        updates = [add_noise(u, distributed_noise_std(z, S, k)) for u in updates]
    average = s.average(updates, 1)
    assert average["w"].std() == pytest.approx(z * S / k, rel=0.01)
    assert abs(average["w"].mean()) < 0.01 * z * S / k
    assert s.user_releases == [1]


def test_distributed_noise_needs_min_survivors():
    dp = UserDP(noise_multiplier=1.0, clip_norm=0.5, noise="distributed", expected_cohort=4,
                min_survivors=3)
    s = strategy(user_dp=dp)
    assert s.average([zeros(), zeros()], 1) is None and s.user_releases == []


def test_user_level_accounting():
    poisson = user_level_event(1.0, 100, sampling="poisson", cohort=10, population=100)
    assert poisson.sample_rate == 0.1 and poisson.noise_multiplier == 1.0
    fixed = user_level_event(2.0, 100, sampling="fixed", cohort=100, population=1000)
    # Replace-one: sensitivity 2S, so z=2 is accounted as multiplier 1.
    assert fixed.noise_multiplier == 1.0
    assert epsilon([fixed], 1e-6, "pld") == pytest.approx(15.2, abs=0.05)
    z = calibrate_user_noise(5.0, 1e-5, 50, sampling="fixed", cohort=10, population=100)
    eps = epsilon([user_level_event(z, 50, sampling="fixed", cohort=10, population=100)], 1e-5)
    assert 0.99 * 5.0 <= eps <= 5.0


def test_client_side_user_update_clips_and_adds_its_share(tiny_cfg):
    from fedllm.clients.app import user_level_update

    cfg = copy.deepcopy(tiny_cfg)
    cfg.privacy.user.enabled, cfg.privacy.user.clip_norm = True, 0.5
    big = {k: np.full(s, 3.0, np.float32) for k, s in SHAPES.items()}
    out = user_level_update(cfg, big, ConfigRecord({}))
    assert update_norm(out) <= 0.5
    cfg.privacy.user.noise = "distributed"
    cfg.secagg.enabled = True
    round_cfg = ConfigRecord({protocol.USER_NOISE_KEY: 1.0, protocol.MIN_SURVIVORS_KEY: 2})
    noisy = user_level_update(cfg, {"w": np.zeros(200_000, np.float32)}, round_cfg)
    assert noisy["w"].std() == pytest.approx(1.0 * 0.5 / np.sqrt(2), rel=0.02)


def test_check_update_directly():
    with pytest.raises(UpdateRejected, match="dtype"):
        check_update({k: v.astype(np.float64) for k, v in zeros().items()}, zeros())


def test_central_noise_releases_even_below_min_clients():
    """A skipped round would depend on who was sampled; with central noise every round
    releases (noise alone if need be), as the accountant assumes."""
    dp = UserDP(noise_multiplier=1.0, clip_norm=0.5, noise="central", expected_cohort=3,
                min_survivors=3)
    s = strategy(user_dp=dp, min_clients=3)
    result = s.aggregate_train(1, [reply(1, zeros(0.001))])
    assert result[0] is not None and s.user_releases == [1]
    s = strategy(user_dp=dp, min_clients=3)
    assert s.aggregate_train(1, [])[0] is not None  # nobody: a noise-only release
    assert strategy(min_clients=3).aggregate_train(1, [reply(1, zeros(0.001))]) == (None, None)


def test_cohorts_come_from_os_entropy_not_the_run_seed(tiny_cfg):
    """run.seed travels to every client: cohorts drawn from it could be replayed by anyone."""
    from fedllm.server.app import make_strategy

    cfg = copy.deepcopy(tiny_cfg)
    cfg.federation.clients_per_round = 10
    cfg.privacy.user.enabled, cfg.privacy.user.noise_multiplier = True, 1.0

    def cohorts():
        s = make_strategy(cfg, "", population=1000)
        return [tuple(sorted(s.core.sample(list(range(1000))))) for _ in range(3)]

    assert cohorts() != cohorts()  # same config, same run.seed: different cohorts


def test_user_level_epsilons_for_both_adversaries_match_dp_accounting():
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant

    from fedllm.privacy.accounting import user_level_epsilons

    # Round 3 sampled from a smaller population (nodes left): its own, larger q.
    pops = [100, 100, 50, 100]
    rounds = [{"noise_multiplier": 1.2, "sampling": "poisson", "cohort": 10, "population": p,
               "clients": ["a", "b"] if i < 3 else ["b"]} for i, p in enumerate(pops)]
    got = user_level_epsilons(rounds, 1e-5)
    observers = pld_privacy_accountant.PLDAccountant().compose(dp_event.ComposedDpEvent([
        dp_event.PoissonSampledDpEvent(10 / p, dp_event.GaussianDpEvent(1.2)) for p in pops]))
    assert got["observers"] == pytest.approx(observers.get_epsilon(1e-5), rel=1e-3)
    # The server knows "b" was in all 4 sums: 4 unsampled Gaussians.
    server = pld_privacy_accountant.PLDAccountant().compose(
        dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(1.2), 4))
    assert got["server"] == pytest.approx(server.get_epsilon(1e-5), rel=1e-3)
    assert got["max_rounds_per_client"] == 4 and got["server"] > got["observers"]


def test_secagg_quantization_is_covered_by_the_accounting(tiny_cfg):
    """Rounding to 2^bits levels lifts a client's sensitivity above S; the accountant uses the
    lifted value, and the server scales a calibrated z so the target still holds."""
    from fedllm.privacy.accounting import quantized_sensitivity, user_level_epsilons
    from fedllm.server.app import make_user_dp, secagg_range

    cfg = copy.deepcopy(tiny_cfg)
    cfg.federation.clients_per_round, cfg.federation.min_clients = 3, 2
    cfg.privacy.user.enabled, cfg.privacy.user.target_epsilon = True, 8.0
    cfg.privacy.user.noise, cfg.secagg.enabled, cfg.secagg.quantization_bits = "distributed", True, 16
    dim = 460_800
    plain = make_user_dp(cfg, population=100)
    covered = make_user_dp(cfg, population=100, adapter_size=dim)
    sensitivity = quantized_sensitivity(0.5, dim, secagg_range(cfg, covered), 16)
    assert sensitivity > 0.5 * 1.01 and covered.noise_multiplier > plain.noise_multiplier

    def eps(z):
        rec = {"noise_multiplier": z, "clip_norm": 0.5, "sensitivity": sensitivity,
               "sampling": "fixed", "cohort": 3, "population": 100, "clients": ["a"]}
        return user_level_epsilons([rec] * cfg.federation.rounds, 1e-5)["observers"]

    assert eps(plain.noise_multiplier) > 8.0 >= eps(covered.noise_multiplier) > 0.98 * 8.0


def test_unamplified_bound_caps_the_observers_epsilon_when_sampling_barely_amplifies():
    """k close to N barely amplifies and RDP is loose: the exact unamplified bound, composed
    over every round (no participation cap enforced), then caps the observers' value. A
    skipped round counts in it as if released (whether it was skipped can reveal who took
    part), so it is not the server's value then."""
    from fedllm.privacy.accounting import gaussian_epsilon, user_level_epsilons

    rec = {"noise_multiplier": 1.0, "sampling": "fixed", "cohort": 3, "population": 4,
           "clients": ["a", "b", "c"]}
    every_round = gaussian_epsilon((2 * 0.5 ** -2) ** -0.5, 1e-5)  # 2 rounds at z/2 = 0.5
    got = user_level_epsilons([rec, rec], 1e-5)
    assert got["observers"] == pytest.approx(every_round) and got["server"] == got["observers"]
    skipped = {**rec, "clients": [], "applied": False}
    with_skip = user_level_epsilons([rec, skipped], 1e-5)
    assert with_skip["observers"] == pytest.approx(every_round)
    assert with_skip["observers"] > with_skip["server"]


def _user_records(multipliers, cohorts, *, sampling="poisson", cohort=3, population=4, **extra):
    return [{"round": i + 1, "noise_multiplier": z, "sampling": sampling, "cohort": cohort,
             "population": population, "clients": c, **extra}
            for i, (z, c) in enumerate(zip(multipliers, cohorts))]


def test_observers_epsilon_holds_before_sampling_not_given_the_cohorts_drawn():
    """N=4 clients, q=3/4, 4 rounds, z calibrated for a user-level ε of 8. The cohorts drawn
    put no client in more than 2 rounds, so against the server (which knows them) ε = 6.18.
    Observers do not know them: what they see is a mixture over every cohort sequence the
    sampler could have drawn, and that mechanism is worth 7.98. Reporting 6.18 to them (the
    min with the server's realised value, as fedllm once did) was a false claim."""
    from dp_accounting.pld import privacy_loss_distribution

    from fedllm.privacy.accounting import user_level_epsilons

    z = calibrate_user_noise(8.0, 1e-5, 4, sampling="poisson", cohort=3, population=4)
    records = _user_records([z] * 4, [["a", "b"], ["c", "d"], ["a", "c"], ["b", "d"]])
    got = user_level_epsilons(records, 1e-5)
    assert got["max_rounds_per_client"] == 2 and got["server"] == pytest.approx(6.18, abs=5e-3)
    # What the mechanism is worth a priori, from below: the optimistic PLD of 4 compositions
    # of the Poisson-subsampled Gaussian (add/remove one client).
    worth = privacy_loss_distribution.from_gaussian_mechanism(
        z, sampling_prob=0.75, pessimistic_estimate=False, use_connect_dots=False
    ).self_compose(4).get_epsilon_for_delta(1e-5)
    assert worth == pytest.approx(7.98, abs=5e-3)
    old_report = min(got["observers"], got["server"])  # the realised-count minimum
    assert old_report < worth <= got["observers"] <= 8.0


def test_an_enforced_participation_cap_bounds_the_observers_epsilon():
    """Clients decline rounds beyond privacy.example.max_participations, whoever is sampled,
    so a cap holds a priori: with a cap of 1 of 4 rounds a client is at worst in the round
    with the least noise (unsampled), whatever the cohorts were."""
    from fedllm.privacy.accounting import (capped_user_epsilon, gaussian_epsilon,
                                           user_level_epsilons)

    zs, delta = [2.0, 1.5, 2.5, 3.0], 1e-5
    cohorts = [["a", "b", "c"]] * 4
    amplified = epsilon([user_level_event(z, 1, sampling="poisson", cohort=3, population=4)
                         for z in zs], delta)
    capped = user_level_epsilons(_user_records(zs, cohorts, max_participations=1), delta)
    assert capped["observers"] == pytest.approx(gaussian_epsilon(1.5, delta))
    assert capped["observers"] < amplified
    assert capped["server"] > capped["observers"]  # realised: a, b, c were in all 4 rounds
    # Cap 2: the two smallest multipliers compose (1/z^2 adds up); here sampling amplifies
    # more than that, and the observers get the smaller of the two.
    two = _user_records(zs, cohorts, max_participations=2)
    two_rounds = gaussian_epsilon((1.5 ** -2 + 2 ** -2) ** -0.5, delta)
    assert capped_user_epsilon(two, delta) == pytest.approx(two_rounds)
    assert user_level_epsilons(two, delta)["observers"] == pytest.approx(min(amplified,
                                                                             two_rounds))
    # No cap enforced (None), or a record of an older fedllm (no key): every round counts.
    every_round = min(amplified, gaussian_epsilon(sum(z ** -2 for z in zs) ** -0.5, delta))
    for records in (_user_records(zs, cohorts, max_participations=None),
                    _user_records(zs, cohorts),
                    _user_records(zs, cohorts, max_participations=1)[:3]
                    + _user_records(zs, cohorts)[3:]):
        assert user_level_epsilons(records, delta)["observers"] == pytest.approx(every_round)
    # A round re-run after a resume may carry a client's one update for it twice.
    rerun = _user_records(zs, cohorts, max_participations=1)
    assert user_level_epsilons(rerun + [rerun[1]], delta)["observers"] == pytest.approx(
        gaussian_epsilon((2 * 1.5 ** -2) ** -0.5, delta))
    # Fixed sampling (replace one client): each round's Gaussian has multiplier z/2.
    fixed = _user_records(zs, cohorts, sampling="fixed", max_participations=1)
    assert user_level_epsilons(fixed, delta)["observers"] == pytest.approx(
        gaussian_epsilon(0.75, delta))


def test_user_release_records_carry_the_cap_clients_enforce(tiny_cfg):
    """The accountant's record says which cap the clients enforce themselves: the example-level
    one (their ledgers decline beyond it), or None without example-level DP."""
    from fedllm.server.app import make_strategy, user_release_record

    cfg = copy.deepcopy(tiny_cfg)
    cfg.federation.rounds, cfg.federation.clients_per_round = 4, 3
    cfg.privacy.user.enabled, cfg.privacy.user.noise_multiplier = True, 1.0
    cfg.privacy.example.max_participations = 2
    for enabled, cap in ((True, 2), (False, None)):
        cfg.privacy.example.enabled = enabled
        s = make_strategy(cfg, "", population=4)
        rec = user_release_record(cfg, s, 1, survivors=0, applied=False)
        assert rec["max_participations"] == cap


def test_a_round_whose_pool_was_smaller_than_the_cohort_is_accounted_without_amplification():
    """SecAgg+ with user-level DP, one SuperNode offline when a round starts: the server sampled
    all 2 connected nodes for a cohort of 3. The accountant records that round as q = 1 (no
    amplification) instead of failing on sample_size > population."""
    from fedllm.privacy.accounting import gaussian_epsilon, user_level_epsilons

    for sampling in ("fixed", "poisson"):
        record = {"kind": "user_release", "round": 1, "noise_multiplier": 2.0, "clip_norm": 1.0,
                  "sensitivity": 1.0, "noise": "central", "sampling": sampling, "cohort": 3,
                  "population": 2, "min_survivors": 1, "survivors": 2, "applied": True,
                  "clients": ["a", "b"]}
        eps = user_level_epsilons([record], 1e-5)
        z = 2.0 if sampling == "poisson" else 1.0  # replace-one: sensitivity 2S
        assert eps["observers"] >= gaussian_epsilon(z, 1e-5) * 0.999
