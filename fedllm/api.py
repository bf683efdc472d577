"""The typed Python API: compose a config, run a federated simulation, read its result.

    import fedllm
    cfg = fedllm.compose(["model=tiny", "federation.rounds=1"])   # validated, or ConfigError
    result = fedllm.simulate(cfg)                                  # -> RunResult
    result.final_perplexity, result.epsilon_max, result.rounds[-1], result.adapter_dir

``fedllm simulate`` is a thin layer over :func:`simulate` (printing and exit codes only).
Heavy modules (torch, Flower, Ray) are imported when a run starts, not with this module.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedllm import config as fcfg
from fedllm.config import ConfigError
from fedllm.config import FedLLMConfig as Config
from fedllm.run_dir import assign_identity, write_config

__all__ = ["Config", "ConfigError", "RunError", "RunIncomplete", "RunResult", "compose",
           "simulate"]

log = logging.getLogger("fedllm")

ConfigOrOverrides = Config | Sequence[str] | None


class RunError(RuntimeError):
    """A valid run that could not start or did not finish (e.g. its run.dir is busy)."""


class RunIncomplete(RunError):
    """The run stopped before its last round (interrupted, or its nodes gone): nothing was
    finalized, and ``fedllm resume RUN_DIR`` continues it from its last checkpoint.
    ``interrupted``: stopped by Ctrl-C or SIGTERM."""

    def __init__(self, message: str, interrupted: bool = False) -> None:
        super().__init__(message)
        self.interrupted = interrupted


# --------------------------------------------------------------------------- result

@dataclass
class RunResult:
    """What a finished run left in its run directory, read back from the files there."""

    run_dir: Path
    config: Config
    summary: dict[str, Any]                 # summary.json
    rounds: list[dict[str, Any]]            # metrics.jsonl, one dict per round
    privacy: dict[str, Any]                 # privacy_report.json
    wall_seconds: float | None = None       # measured by simulate(); None when only loaded
    files: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_run_dir(cls, run_dir: str | Path, wall_seconds: float | None = None) -> RunResult:
        """Load a finished run (one whose summary.json exists) from its directory."""
        from fedllm.io import read_jsonl

        run_dir = Path(run_dir).expanduser().resolve()
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            raise RunError(f"{run_dir} holds no finished run (no summary.json)")
        files = {"config": run_dir / "config.yaml", "summary": summary_path,
                 "metrics": run_dir / "metrics.jsonl", "adapter": run_dir / "adapter",
                 "report_json": run_dir / "privacy_report.json",
                 "report_html": run_dir / "privacy_report.html"}
        return cls(run_dir=run_dir, config=fcfg.load_run_config(files["config"]),
                   summary=json.loads(summary_path.read_text()),
                   rounds=read_jsonl(files["metrics"]),
                   privacy=json.loads(files["report_json"].read_text()),
                   wall_seconds=wall_seconds, files=files)

    @property
    def adapter_dir(self) -> Path:
        return self.files["adapter"]

    @property
    def config_path(self) -> Path:
        return self.files["config"]

    @property
    def report_json(self) -> Path:
        return self.files["report_json"]

    @property
    def report_html(self) -> Path:
        return self.files["report_html"]

    @property
    def final_perplexity(self) -> float | None:
        return self.summary.get("final_perplexity")

    @property
    def final_eval_loss(self) -> float | None:
        return self.summary.get("final_eval_loss")

    @property
    def base_perplexity(self) -> float | None:
        return self.summary.get("base_perplexity")

    @property
    def epsilon_max(self) -> float | None:
        """Largest per-client example-level ε (None without example-level DP)."""
        return self.summary.get("epsilon_example_max")


# --------------------------------------------------------------------------- compose

def compose(overrides: Sequence[str] | None = None) -> Config:
    """The validated config of ``conf/`` with Hydra ``overrides`` (e.g. ``"model=tiny"``)."""
    overrides = fcfg.override_list(overrides)
    try:
        return fcfg.compose(overrides)
    except ConfigError as exc:
        if str(exc).startswith("Ambiguous value for argument"):  # Hydra's text for key=a,b
            raise ConfigError(f"{exc}: to sweep over the values use `fedllm simulate -m` (or "
                              "fedllm.sweep); for a list write key=[a,b], for a string "
                              "quote it: key='a,b'") from None
        raise


def _as_config(config_or_overrides: ConfigOrOverrides) -> Config:
    """A fresh, validated config: composed from overrides, or a checked copy of a Config
    (so a run never mutates the caller's object, and edits made after compose are checked)."""
    if isinstance(config_or_overrides, Config):
        try:
            text = fcfg.to_yaml(config_or_overrides)
        except Exception as exc:  # a field set to a value of the wrong type
            raise ConfigError(fcfg._short_message(exc)) from None
        cfg = fcfg.from_yaml(text)
    else:
        cfg = compose(fcfg.override_list(
            config_or_overrides, "config_or_overrides (a fedllm.Config or a list of overrides)"))
    if not cfg.run.ray_address:  # on a Ray cluster the GPUs are the workers'
        fcfg.check_device_here(cfg.model.device, "model.device")
    return cfg


# --------------------------------------------------------------------------- preflight

def prepare(cfg: Config):
    """Fill in the run's identity (dir, id) and check data, model and privacy feasibility
    before any training. Returns (config, client index); raises ConfigError."""
    from fedllm import models

    if cfg.run.resume:
        cfg = resumed_config(cfg)
    assign_identity(cfg)
    if not cfg.run.resume:
        check_run_dir_free(cfg)
    if cfg.privacy.ledger_dir:
        cfg.privacy.ledger_dir = str(Path(cfg.privacy.ledger_dir).expanduser().resolve())
    models.offline_env()
    run_dir = Path(cfg.run.dir)
    created = not run_dir.exists()
    try:
        data = _index_and_check(cfg, run_dir)
    except ConfigError:
        if created:  # a refused run leaves nothing behind, not even its caches
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return cfg, data


def _index_and_check(cfg: Config, run_dir: Path):
    from fedllm import models
    from fedllm.data.per_client import run_index
    from fedllm.data.sources import DataError
    from fedllm.io import private_dir

    try:
        tokenizer = models.load_tokenizer(cfg.model)
        models.resolve_model_dir(cfg.model.name, cfg.model.path)  # convert once, up front
        resolve_adapter_targets(cfg)
        # Sizes only (cached for the server and the clients): no process holds the corpus.
        private_dir(run_dir)  # 0700 before any cache of the clients' text lands in it
        data = run_index(cfg, tokenizer)
    except (DataError, models.ModelError, OSError) as exc:
        raise ConfigError(str(exc)) from None
    _check_fault_clients(cfg, data.client_ids)
    if cfg.federation.clients_per_round > len(data.clients):
        raise ConfigError(
            f"federation.clients_per_round ({cfg.federation.clients_per_round}) exceeds the "
            f"{len(data.clients)} eligible clients")
    _check_privacy_feasible(cfg, data)
    return data


def resolve_adapter_targets(cfg: Config) -> None:
    """model.lora.target_modules as the list the run adapts (``auto`` resolved for this
    model), so that config.yaml says what was trained; ModelError when a name matches no
    layer. Prompt tuning adapts no layer: nothing to resolve."""
    from fedllm import models

    if cfg.model.adapter == "lora":
        cfg.model.lora.target_modules = models.resolve_target_modules(cfg.model)


def _check_privacy_feasible(cfg: Config, data) -> None:
    """Calibrate the smallest client's noise now, so an unreachable target ε fails here."""
    from fedllm.privacy.accounting import AccountingError, calibrate_noise
    from fedllm.privacy.size_estimate import side_releases
    from fedllm.train import example_sample_rate

    ex = cfg.privacy.example
    if not ex.enabled or ex.noise_multiplier is not None:
        return
    smallest = min(c.num_train for c in data.clients)
    q = example_sample_rate(cfg.train.batch_size, smallest)
    cap = fcfg.participation_cap(cfg, len(data.clients))
    steps = cap * cfg.train.local_steps
    try:  # after what every client also releases: its size estimate (deployed: evaluations)
        z = calibrate_noise(ex.target_epsilon, cfg.privacy.delta, steps=steps, sample_rate=q,
                            accountant=cfg.privacy.accountant,
                            prior=side_releases(cfg, cfg.federation.rounds + 1))
    except AccountingError as exc:
        raise ConfigError(f"privacy.example.target_epsilon: {exc}") from None
    log.info("Noise calibrated per client for ε ≤ %g over %d steps (at most %d of %d rounds per "
             "client; smallest client: q=%.3f, z=%.3f)", ex.target_epsilon, steps, cap,
             cfg.federation.rounds, q, z)


def _check_fault_clients(cfg: Config, client_ids: list[str]) -> None:
    """faults.* must name clients of this run: a typo would silently inject nothing."""
    known = set(client_ids)
    for key in ("raise_clients", "hang_clients", "nan_clients", "unmask_drop_clients"):
        unknown = [c for c in getattr(cfg.faults, key) if c not in known]
        if unknown:
            raise ConfigError(
                f"faults.{key}: {unknown[:3]} not among this run's {len(client_ids)} clients "
                f"(e.g. {', '.join(client_ids[:3])})")


RUN_FILES = ("config.yaml", "metrics.jsonl", "privacy_events.jsonl", "checkpoint.npz",
             "summary.json")


def holds_a_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_FILES)


def check_run_dir_free(cfg: Config) -> None:
    """A directory that holds a run is never overwritten by a new one: resume it, choose
    another run.dir, or ask for run.overwrite=true (which removes that run's files and its
    default ledger, never a shared privacy.ledger_dir)."""
    import shutil

    run_dir = Path(cfg.run.dir)
    if not holds_a_run(run_dir):
        return
    if not cfg.run.overwrite:
        raise ConfigError(f"run.dir: {run_dir} already holds a run; continue it with "
                          f"`fedllm resume {run_dir}`, choose another run.dir, or pass "
                          "run.overwrite=true to replace it")
    log.warning("run.overwrite=true: replacing the run in %s", run_dir)
    for name in (*RUN_FILES, "stopped.json", "privacy_report.json", "privacy_report.html",
                 "placement.jsonl"):
        (run_dir / name).unlink(missing_ok=True)
    for name in ("adapter", "ledger"):
        if not (name == "ledger" and cfg.privacy.ledger_dir):
            shutil.rmtree(run_dir / name, ignore_errors=True)


def resumed_config(cfg: Config) -> Config:
    """Resume uses the run's own saved config (same run id, same plan), not the overrides,
    in the directory it is given (wherever the run was moved or copied to): its checkpoint,
    its records and its default ledger are that directory's."""
    if not cfg.run.dir:
        raise ConfigError("run.resume: needs run.dir, the run directory to continue")
    run_dir = Path(cfg.run.dir).expanduser().resolve()
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"run.resume: {saved} not found (nothing to resume)")
    try:
        resumed = fcfg.load_run_config(saved, resuming=True)
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"run.resume: cannot read {saved}: {exc}") from None
    if (run_dir / "summary.json").is_file():
        raise ConfigError(f"run.resume: the run in {run_dir} is complete (summary.json); "
                          "nothing to resume")
    moved = resumed.run.dir and Path(resumed.run.dir) != run_dir
    if moved:
        log.info("resuming the run saved for %s in %s (moved or copied)", resumed.run.dir, run_dir)
    resumed.run.dir = str(run_dir)
    resumed.run.resume = True
    _check_run_records(run_dir)
    return resumed


def _check_run_records(run_dir: Path) -> None:
    """A resume continues the run's metrics and privacy events: refuse damaged ones up front."""
    from fedllm.io import JsonlError, read_jsonl
    from fedllm.report import EVENTS_FILE

    for name in ("metrics.jsonl", EVENTS_FILE):
        try:
            read_jsonl(run_dir / name)
        except JsonlError as exc:
            raise ConfigError(f"run.resume: {exc}") from None


# --------------------------------------------------------------------------- simulate

def simulate(config_or_overrides: ConfigOrOverrides = None, *, verbose: bool = False,
             announce: Callable[[str], None] | None = None) -> RunResult:
    """Run one federated fine-tuning in Flower's simulation runtime; return its result.

    ``config_or_overrides``: a Config from :func:`compose`, or a list of Hydra overrides.
    ``announce`` receives one line describing the run before training starts (default: the
    ``fedllm`` logger). Raises ConfigError for invalid or infeasible input (before any
    training) and RunError when the run cannot start or ends without a result.
    """
    from fedllm.io import RunDirBusy, run_dir_lock

    cfg, data = prepare(_as_config(config_or_overrides))
    try:
        with run_dir_lock(Path(cfg.run.dir)):  # one run per run directory, for its whole life
            if not cfg.run.resume:  # checked again under the lock: a run may have started
                check_run_dir_free(cfg)
            return _run_simulation(cfg, data, verbose, announce or log.info)
    except RunDirBusy as exc:
        raise RunError(str(exc)) from None


def _run_simulation(cfg: Config, data, verbose: bool, announce: Callable[[str], None]):
    import importlib

    from fedllm.run_status import RunStopped, clear_stopped, read_stopped, stopped_message

    run_dir = Path(cfg.run.dir)
    cfg_text = fcfg.to_yaml(cfg)
    write_config(run_dir, cfg_text)  # resume: its run.dir is this one
    clear_stopped(run_dir)
    _report_skipped(data, run_dir)
    announce(f"fedllm simulate: {len(data.clients)} clients ({len(data.skipped)} too small, "
             f"skipped), {cfg.federation.rounds} rounds × {cfg.federation.clients_per_round} "
             f"clients, model {cfg.model.name}, example-level DP "
             f"{'on' if cfg.privacy.example.enabled else 'OFF'} → {run_dir}")
    # fedllm.server is the ServerApp side; the library reaches it only here, lazily.
    simulation = importlib.import_module("fedllm.server.simulation")
    simulation.set_offline_env(str(run_dir / ".flwr"))
    started = time.time()
    try:
        simulation.simulate(cfg_text, len(data.clients), use_gpu=_use_gpu(cfg), verbose=verbose)
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C; SIGTERM (Ray's handler: SystemExit)
        if not (run_dir / "summary.json").exists():  # else it completed before the stop
            raise RunIncomplete(stopped_message(run_dir, read_stopped(run_dir)),
                                interrupted=True) from None
    except RunStopped:
        pass  # stopped.json says why
    if not (run_dir / "summary.json").exists():
        raise RunIncomplete(stopped_message(run_dir, read_stopped(run_dir)))
    return RunResult.from_run_dir(run_dir, wall_seconds=time.time() - started)


def _report_skipped(data, run_dir: Path) -> None:
    """Name every skipped client once: in the log and in the run directory."""
    from fedllm.data.federated import SKIPPED_FILE, skipped_clients_message
    from fedllm.io import atomic_write_text

    path = run_dir / SKIPPED_FILE
    atomic_write_text(path, json.dumps(data.skipped, indent=1, ensure_ascii=False) + "\n")
    message = skipped_clients_message(data, str(path))
    if message:
        log.info(message)


def _use_gpu(cfg: Config) -> bool:
    import torch

    return cfg.model.device != "cpu" and torch.cuda.is_available()
