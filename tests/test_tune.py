"""Private selection (`fedllm tune`): the repeat-and-select accounting, the draw of K, the
refusals, and a tune on the tiny model end to end."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import rdp_privacy_accountant as rdp

from fedllm.privacy import selection
from fedllm.privacy.accounting import AccountingError, PrivacyEvent
from fedllm.privacy.size_estimate import size_event

DELTA = 1e-5
# One trial of a point for one client: its size estimate and a run's training steps.
RUN = [size_event(10.0), PrivacyEvent(noise_multiplier=0.9, steps=6, sample_rate=0.2)]
LONGER = [size_event(10.0), PrivacyEvent(noise_multiplier=0.9, steps=12, sample_rate=0.2)]
DISTRIBUTIONS = [(3, None), (3, 1), (3, 0), (5, 0.5), (1, 1), (10, 2)]


@pytest.mark.parametrize("mean,shape", DISTRIBUTIONS)
def test_one_event_for_every_point_is_exactly_dp_accountings_repeat_and_select(mean, shape):
    accountant = rdp.RdpAccountant()
    inner = dp_event.ComposedDpEvent([
        dp_event.GaussianDpEvent(10.0),
        dp_event.SelfComposedDpEvent(
            dp_event.PoissonSampledDpEvent(0.2, dp_event.GaussianDpEvent(0.9)), 6)])
    dp_shape = math.inf if shape is None else shape
    expected = accountant.compose(dp_event.RepeatAndSelectDpEvent(inner, mean, dp_shape)
                                  ).get_epsilon(DELTA)
    assert selection.selection_epsilon([RUN], DELTA, mean, shape) == expected
    assert selection.selection_epsilon([RUN, RUN, RUN], DELTA, mean, shape) == expected
    event = selection.selection_event(RUN, mean, shape)
    assert rdp.RdpAccountant().compose(event).get_epsilon(DELTA) == expected


def test_dp_accountings_private_helper_is_what_the_accountant_uses():
    """Guard: the selection calls dp_accounting's private repeat-and-select formula; if it
    changes or goes away, this fails before a wrong ε could be reported."""
    curve = selection.rdp_curve(RUN)
    out = rdp._compute_rdp_repeat_and_select(selection.ORDERS, curve, 3.0, 1.0)
    accountant = rdp.RdpAccountant(orders=selection.ORDERS)
    accountant.compose(selection.selection_event(RUN, 3, 1))
    np.testing.assert_array_equal(out, accountant._rdp)


def test_a_mixture_of_points_costs_the_worst_point():
    alone = selection.selection_epsilon([LONGER], DELTA, 3, 1)
    assert selection.selection_epsilon([RUN, LONGER], DELTA, 3, 1) == alone  # LONGER dominates
    assert selection.selection_epsilon([RUN], DELTA, 3, 1) < alone
    # Curves that cross: the pointwise maximum is at least each of them.
    loud = [PrivacyEvent(noise_multiplier=3.0, steps=1, sample_rate=1.0)]
    both = selection.selection_epsilon([RUN, loud], DELTA, 3, 1)
    assert both >= max(selection.selection_epsilon([p], DELTA, 3, 1) for p in (RUN, loud))


@pytest.mark.parametrize("mean,shape", [(3, None), (3, 1), (3, 0), (5, 0.5)])
def test_selection_costs_more_than_one_trial_and_less_than_composing_many(mean, shape):
    one = selection.trial_epsilon([RUN], DELTA)
    chosen = selection.selection_epsilon([RUN], DELTA, mean, shape)
    k_max = 3 * mean  # P(K > 3 E[K]) is a few percent for these distributions
    assert one < chosen < selection.composed_epsilon([RUN], DELTA, k_max)


def test_selection_is_infinite_without_noise():
    off = [PrivacyEvent(noise_multiplier=0.0, steps=1, sample_rate=1.0)]
    assert selection.selection_epsilon([RUN, off], DELTA, 3, 1) == math.inf


@pytest.mark.parametrize("mean,shape,message", [
    (0.5, 1, "mean number of trials"), (math.inf, 1, "mean number of trials"),
    (3, -1, "shape"), (3, math.inf, "shape"),
])
def test_bad_distributions_are_refused(mean, shape, message):
    with pytest.raises(AccountingError, match=message):
        selection.selection_epsilon([RUN], DELTA, mean, shape)


@pytest.mark.parametrize("shape", [None, 0, 0.5, 1, 2])
def test_k_is_drawn_from_the_accounted_distribution(shape):
    rng = np.random.default_rng(0)
    draws = np.array([selection.draw_trials(rng, 3, shape) for _ in range(20000)])
    assert abs(draws.mean() - 3) < 0.1
    assert draws.min() == (0 if shape is None else 1)  # Poisson: K = 0 happens
    if shape == 1:  # geometric on k >= 1: P(K = 1) = 1 / mean
        assert abs((draws == 1).mean() - 1 / 3) < 0.015
    assert {selection.draw_trials(rng, 1, shape) for _ in range(50)} <= {0, 1, 2, 3, 4, 5}


def test_mean_one_without_poisson_is_exactly_one_trial():
    rng = np.random.default_rng(1)
    assert {selection.draw_trials(rng, 1, s) for s in (0, 1, 2) for _ in range(20)} == {1}


def test_distribution_names():
    assert selection.distribution_name(None) == "Poisson"
    assert selection.distribution_name(1.0) == "geometric"
    assert selection.distribution_name(0) == "logarithmic"
    assert "truncated negative binomial" in selection.distribution_name(0.5)


# --------------------------------------------------------------------------- the command

TINY = ["model=tiny", "federation.rounds=1", "federation.num_clients=2",
        "federation.clients_per_round=2", "data.plays=[hamlet,macbeth,othello]"]


def cli(*args, tmp_path, timeout=900):
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    return subprocess.run([sys.executable, "-m", "fedllm.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("overrides,message", [
    (["tune.mean_trials=0.5"], "tune.mean_trials: must be a finite number >= 1"),
    (["tune.shape=-1"], "tune.shape: must be null (Poisson) or a finite number >= 0"),
    (["tune.metric=private"], "tune.metric"),
    (["tune.public_plays=[hamlet]"], "tune.public_plays: ['hamlet'] also in the federation"),
    (["tune.public_plays=[nope]"], "tune.public_plays: unknown plays ['nope']"),
    (["train.seq_len=16,32"], "train.seq_len: cannot be tuned"),
    (["privacy.ledger_dir=a,b"], "privacy.ledger_dir: cannot be tuned"),
    (["tune.seed=1,2"], "tune.seed: cannot be tuned"),
    (["privacy.user.enabled=true", "privacy.user.noise_multiplier=1"],
     "privacy.user.enabled: fedllm tune accounts"),
])
def test_bad_tune_input_is_one_line_and_exit_2(tmp_path, overrides, message):
    proc = cli("tune", *TINY, "train.lr=0.1,0.2", *overrides, f"run.dir={tmp_path / 't'}",
               tmp_path=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()


def test_public_plays_must_not_be_the_federations_when_it_holds_every_play(tmp_path):
    proc = cli("tune", "model=tiny", "train.lr=0.1,0.2", f"run.dir={tmp_path / 't'}",
               tmp_path=tmp_path, timeout=300)
    assert proc.returncode == 2
    assert "data.plays is null: every play" in proc.stderr


@pytest.mark.slow  # two tiny DP simulations in a subprocess (about a minute on 2 cores)
def test_tune_runs_k_trials_and_releases_the_best_with_the_selections_epsilon(tmp_path):
    from fedllm.privacy.ledger import read_ledger_dir

    tune_dir = tmp_path / "tune"
    # tune.seed=0 draws K = 2 (geometric, mean 2): grid points 1 then 0; point 2 never runs.
    proc = cli("tune", *TINY, "train.lr=0.001,0.01,0.1", "privacy.example.target_epsilon=3",
               "tune.mean_trials=2", "tune.seed=0", f"run.dir={tune_dir}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tune_dir / "tune.json").read_text())
    assert doc["K"] == 2 and [t["point"] for t in doc["trials"]] == [1, 0]
    assert doc["metric"]["kind"] == "public" and doc["metric"]["plays"] == ["the-tempest",
                                                                            "pericles"]
    assert doc["trials_distribution"] == {"mean": 2.0, "shape": 1.0, "name": "geometric"}
    scores = [t["score"] for t in doc["trials"]]
    assert all(s is not None and s > 0 for s in scores)
    best = doc["trials"][scores.index(min(scores))]
    assert doc["chosen"]["trial"] == best["trial"] and doc["chosen"]["swept"] == best["swept"]

    # One shared ledger holds both trials' releases; no trial has a ledger of its own.
    ledgers = read_ledger_dir(tune_dir / "ledger")
    run_ids = {t["run_id"] for t in doc["trials"]}
    for entries in ledgers.values():
        assert {e.run_id for e in entries if e.purpose == "train"} == run_ids
    assert not any((tune_dir / t["run_dir"] / "ledger").exists() for t in doc["trials"])

    # The selection's ε is the accounting function's value on the recorded per-point events,
    # and those events are what the trials' clients really released.
    privacy = doc["privacy"]
    per_client = []
    for cid, client in privacy["clients"].items():
        points = [[PrivacyEvent.from_dict(e) for e in events] for events in client["point_events"]]
        assert len(points) == 3  # every grid point, run or not
        value = selection.selection_epsilon(points, 1e-5, 2.0, 1.0)
        assert client["epsilon_selection"] == value
        assert client["epsilon_one_trial"] < value
        per_client.append(value)
        planned = points[0][-1]
        for trial in doc["trials"]:
            records = [json.loads(line) for line in
                       open(os.path.join(trial["run_dir"], "privacy_events.jsonl"))]
            mine = [r for r in records if r["kind"] == "release" and r["client_id"] == cid]
            assert [(r["noise_multiplier"], r["sample_rate"]) for r in mine] == [
                (planned.noise_multiplier, planned.sample_rate)]
    assert privacy["epsilon_selection"] == max(per_client)
    assert "observers of the release" in privacy["holds_against"]

    # THE release: the chosen trial's adapter and hyperparameters, with that ε.
    release = json.loads((tune_dir / "release" / "release.json").read_text())
    assert release["hyperparameters"] == best["swept"] and release["score"] == best["score"]
    assert release["epsilon"] == privacy["epsilon_selection"]
    assert release["metric"]["kind"] == "public"
    assert (tune_dir / "release" / "adapter" / "adapter_config.json").is_file()
    assert "Selected by `fedllm tune`" in (tune_dir / "release" / "adapter" / "README.md"
                                           ).read_text()
    md = (tune_dir / "tune.md").read_text()
    assert "Selection metric: **public**" in md and "K = 2 trials" in md
    assert "released: trial" in proc.stdout and "Traceback" not in proc.stderr
