"""What a client does when a server asks it for a release: train, resend, or decline.

Pure: no Flower, no files, no randomness. The ClientApp reads the ledger, builds the run's
plan and asks ``decide`` (a training round) or ``decide_eval`` (a DP evaluation statistic);
it records a new release in the ledger *before* it computes or sends anything.

The adversary is the server (or anyone who can send a client messages in its name): it may
replay rounds, ask for them out of order, rename the run, change the cap or the target mid-run,
duplicate messages, or share a client with another server. The rules that hold against it:

  * one (run, round, purpose) is one release: asked again, the client resends the recorded
    release byte for byte (``resend``). An entry without a copy is a release that never left
    (the copy is written before the reply, under a per-round lock that the ClientApp holds
    while it trains): the client trains it under that same entry;
  * a round outside the run's plan (``1..federation.rounds``; evaluation ``0..rounds``) is
    declined: a server cannot mint extra rounds;
  * the plan a run started with is pinned (its fingerprint is in every training entry):
    a request under another cap, target, noise or sampling rate for the same run is declined;
  * the participation cap counts this run's training entries, the run's ε target counts every
    release of the run (and the size estimate its sampling rate comes from);
  * the lifetime budget counts every release in the ledger, whatever run it was for: renaming
    runs does not reset it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterable, Literal

from fedllm.privacy.accounting import PrivacyEvent, epsilon

TRAIN, RESEND, DECLINE = "train", "resend", "decline"


@dataclass(frozen=True)
class RunPlan:
    """A client's plan for one run, from the run's config and its own released values.

    ``event``: one training round's release as planned (noise 0: no example-level DP, ε = ∞).
    ``target_epsilon``: the run's target (None: a fixed noise multiplier, no per-run check).
    ``budget``: the strictest lifetime cap that applies (None: none). ``pinned``: other
    settings the noise was calibrated for (clip norm, unit, ...), part of the fingerprint."""

    run_id: str
    rounds: int
    cap: int
    event: PrivacyEvent
    target_epsilon: float | None
    budget: float | None
    delta: float
    accountant: str = "pld"
    pinned: dict = field(default_factory=dict)

    def fingerprint(self) -> str:
        """What may not change within a run (the round count may: a resume can extend it)."""
        fixed = {"cap": self.cap, "event": self.event.to_dict(), "target": self.target_epsilon,
                 "delta": self.delta, "accountant": self.accountant, **self.pinned}
        return hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Decision:
    action: Literal["train", "resend", "decline"]
    reason: str = ""
    spent: float = 0.0                  # lifetime ε before this request
    lifetime_epsilon: float | None = None  # lifetime ε after this release (train)
    recorded: bool = False              # train: its entry exists already (it never left)


def run_entries(entries: Iterable, run_id: str) -> list:
    """The releases a run's ε covers: the run's own, and the size estimate(s) its sampling
    rate was derived from (recorded once per client and dataset, counted in every run)."""
    return [e for e in entries if e.run_id == run_id or e.purpose == "size"]


def decide(entries: list, plan: RunPlan, round_: int, *, copy_exists: bool) -> Decision:
    """The answer to "train round ``round_`` of ``plan.run_id``" given the ledger's entries
    and whether a copy of that round's recorded release exists."""
    return _decide(entries, plan, round_, "train", plan.event, copy_exists)


def decide_eval(entries: list, plan: RunPlan, round_: int, event: PrivacyEvent, *,
                copy_exists: bool) -> Decision:
    """The answer to "release your held-out loss statistic for round ``round_``" (round 0:
    the base model)."""
    return _decide(entries, plan, round_, "eval", event, copy_exists)


def _decide(entries: list, plan: RunPlan, round_: int, purpose: str, event: PrivacyEvent,
            copy_exists: bool) -> Decision:
    spent = epsilon([e.event for e in entries], plan.delta, plan.accountant)
    first = 1 if purpose == "train" else 0
    if not first <= round_ <= plan.rounds:
        return Decision(DECLINE, f"{purpose} round {round_} is outside the run's plan of "
                                 f"rounds {first}..{plan.rounds}", spent)
    changed = _plan_change(entries, plan)
    if changed:
        return Decision(DECLINE, changed, spent)
    recorded = any(e.run_id == plan.run_id and e.round == round_ and e.purpose == purpose
                   for e in entries)
    if recorded and copy_exists:
        return Decision(RESEND, f"{purpose} round {round_} was released already: the same "
                                "bytes again", spent)
    if recorded:  # written ahead, never sent (no copy): its entry already counts it
        return Decision(TRAIN, f"{purpose} round {round_} was recorded but never sent", spent,
                        spent, recorded=True)
    if purpose == "train":
        this_run = [e for e in entries if e.run_id == plan.run_id and e.purpose == "train"]
        if len(this_run) >= plan.cap:
            return Decision(DECLINE, f"participation cap: already took part in "
                                     f"{len(this_run)} round(s) of this run "
                                     f"(privacy.example.max_participations={plan.cap})", spent)
    refusal = _over_limits(entries, plan, event, spent)
    if refusal:
        return Decision(DECLINE, refusal, spent)
    lifetime = epsilon([e.event for e in entries] + [event], plan.delta, plan.accountant)
    return Decision(TRAIN, "", spent, lifetime)


def decide_size(entries: list, event: PrivacyEvent, budget: float | None, delta: float,
                accountant: str) -> Decision:
    """May the client release a DP estimate of its size (``event``) under its budget?"""
    spent = epsilon([e.event for e in entries], delta, accountant)
    lifetime = epsilon([e.event for e in entries] + [event], delta, accountant)
    if budget is not None and lifetime > budget:
        return Decision(DECLINE, f"budget: lifetime epsilon would reach {lifetime:.3f} > "
                                 f"privacy.budget={budget:g} (spent {spent:.3f})", spent)
    return Decision(TRAIN, "", spent, lifetime)


def _plan_change(entries: list, plan: RunPlan) -> str:
    fingerprint = plan.fingerprint()
    for e in entries:
        if e.run_id == plan.run_id and e.purpose == "train" and e.plan not in (None, fingerprint):
            return ("run plan changed mid-run: this run's earlier rounds were released under "
                    "another cap, target ε, noise or sampling rate; not releasing under a new one")
    return ""


def _over_limits(entries: list, plan: RunPlan, event: PrivacyEvent, spent: float) -> str:
    """Why one more release ``event`` would break the run's target or the lifetime budget."""
    if plan.target_epsilon is not None:
        run_eps = epsilon([e.event for e in run_entries(entries, plan.run_id)] + [event],
                          plan.delta, plan.accountant)
        if run_eps > plan.target_epsilon:
            return (f"run epsilon would reach {run_eps:.3f} > privacy.example.target_epsilon="
                    f"{plan.target_epsilon:g}")
    if plan.budget is not None:
        lifetime = epsilon([e.event for e in entries] + [event], plan.delta, plan.accountant)
        if lifetime > plan.budget:
            return (f"budget: lifetime epsilon would reach {lifetime:.3f} > privacy.budget="
                    f"{plan.budget:g} (spent {spent:.3f})")
    return ""
