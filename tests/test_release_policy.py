"""The release policy as a malicious server meets it: pure decisions over ledger entries."""

import time

import pytest

from fedllm.privacy.accounting import PrivacyEvent, epsilon
from fedllm.privacy.ledger import LedgerEntry
from fedllm.privacy.release_policy import (DECLINE, RESEND, TRAIN, RunPlan, decide, decide_eval,
                                           decide_size)

EVENT = PrivacyEvent(noise_multiplier=1.0, steps=2, sample_rate=0.2)
SIZE = PrivacyEvent(noise_multiplier=10.0, steps=1, sample_rate=1.0)


def plan(run_id="r", cap=2, target=None, budget=None, event=EVENT, rounds=4):
    return RunPlan(run_id=run_id, rounds=rounds, cap=cap, event=event, target_epsilon=target,
                   budget=budget, delta=1e-5)


def entry(run_id, round_, p=None, purpose="train", event=EVENT):
    return LedgerEntry(run_id=run_id, round=round_, event=event, time=time.time(),
                       purpose=purpose, plan=p.fingerprint() if p else None)


def serve(requests, p, copies=True):
    """Play a server's request sequence; return the decisions and the ledger it leaves."""
    entries, kept, decisions = [], set(), []
    for run_id, round_ in requests:
        this = plan(run_id=run_id, cap=p.cap, target=p.target_epsilon, budget=p.budget)
        d = decide(entries, this, round_, copy_exists=(run_id, round_) in kept)
        decisions.append(d.action)
        if d.action == TRAIN:
            entries.append(entry(run_id, round_, this))
            if copies:
                kept.add((run_id, round_))
    return decisions, entries


def test_replayed_and_out_of_order_rounds_resend_or_decline():
    decisions, entries = serve([("r", 3), ("r", 1), ("r", 3), ("r", 1), ("r", 2), ("r", 3)],
                               plan(cap=2))
    assert decisions == [TRAIN, TRAIN, RESEND, RESEND, DECLINE, RESEND]
    assert len(entries) == 2


def test_duplicated_message_is_one_release():
    decisions, entries = serve([("r", 1), ("r", 1)], plan())
    assert decisions == [TRAIN, RESEND] and len(entries) == 1


def test_a_recorded_round_without_a_copy_never_left_and_trains_under_its_entry():
    """Written ahead, then the process died before the copy (and so before any reply):
    the retry trains under that entry; the cap, already counting it, does not refuse it."""
    p = plan(cap=1)
    entries = [entry("r", 1, p)]
    d = decide(entries, p, 1, copy_exists=False)
    assert d.action == TRAIN and d.recorded
    assert decide(entries, p, 2, copy_exists=False).action == DECLINE  # the cap still holds
    bent = plan(cap=2)
    assert decide(entries, bent, 1, copy_exists=False).action == DECLINE  # plan pinned


def test_renamed_runs_meet_the_lifetime_budget():
    p = plan(cap=1, budget=6.0)
    requests = [(f"run-{i}", 1) for i in range(20)]
    decisions, entries = serve(requests, p)
    assert decisions.count(TRAIN) < 20 and DECLINE in decisions
    assert epsilon([e.event for e in entries], 1e-5) <= 6.0


def test_cap_or_target_changed_mid_run_is_declined():
    first = plan(cap=1, target=3.0)
    entries = [entry("r", 1, first)]
    for bent in (plan(cap=3, target=3.0), plan(cap=1, target=30.0),
                 plan(cap=1, target=3.0, event=PrivacyEvent(noise_multiplier=0.5, steps=2,
                                                            sample_rate=0.2))):
        d = decide(entries, bent, 2, copy_exists=False)
        assert d.action == DECLINE and "plan changed" in d.reason


def test_rounds_outside_the_plan_are_declined():
    for bad in (0, -3, 5, 10 ** 9):
        assert decide([], plan(rounds=4), bad, copy_exists=False).action == DECLINE
    assert decide_eval([], plan(rounds=4), 0, SIZE, copy_exists=False).action == TRAIN
    assert decide_eval([], plan(rounds=4), 5, SIZE, copy_exists=False).action == DECLINE


def test_two_servers_share_one_lifetime_budget():
    p = plan(cap=4, budget=5.0)
    requests = [(run, r) for r in (1, 2, 3, 4) for run in ("server-a", "server-b")]
    decisions, entries = serve(requests, p)
    assert epsilon([e.event for e in entries], 1e-5) <= 5.0
    assert DECLINE in decisions


def test_the_run_target_counts_the_size_estimate_and_evaluations():
    target = epsilon([EVENT], 1e-5) * 1.001
    p = plan(cap=2, target=target)
    assert decide([], p, 1, copy_exists=False).action == TRAIN
    with_size = [entry("other-run", 0, purpose="size", event=SIZE)]
    d = decide(with_size, p, 1, copy_exists=False)
    assert d.action == DECLINE and "run epsilon" in d.reason


def test_size_release_needs_budget():
    assert decide_size([], SIZE, None, 1e-5, "pld").action == TRAIN
    spent = [entry("r", 1)] * 3
    assert decide_size(spent, SIZE, epsilon([EVENT] * 3, 1e-5), 1e-5, "pld").action == DECLINE


@pytest.mark.parametrize("field", ["cap", "target", "budget"])
def test_the_fingerprint_pins_what_the_noise_was_calibrated_for(field):
    base = dict(cap=2, target=4.0, budget=None)
    changed = {**base, field: {"cap": 3, "target": 5.0, "budget": 9.0}[field]}
    same_budget = field == "budget"  # a budget is not part of the plan: it only ever tightens
    assert (plan(**base).fingerprint() == plan(**changed).fingerprint()) == same_budget
