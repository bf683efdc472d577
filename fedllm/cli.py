"""The ``fedllm`` console script.

  fedllm simulate [hydra overrides...]   federated DP fine-tuning in Flower's simulation runtime
  fedllm simulate -m key=a,b [...]       a sweep: one run per combination, then a table
  fedllm tune key=a,b [...]              private selection: best of K random trials, accounted
  fedllm accountant --sample-rate Q --noise-multiplier Z --steps T --delta D [...]
  fedllm audit [hydra overrides...]      canary audit: empirical ε lower bound vs the claim
  fedllm generate RUN_DIR --prompt TEXT  base model vs trained adapter, side by side
  fedllm export RUN_DIR --merged DIR [--gguf FILE]   use the adapter outside fedllm

Bad input ends with one readable line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
EXIT_INCOMPLETE = 3    # the run stopped before its last round; `fedllm resume` finishes it
EXIT_INTERRUPTED = 130
EXIT_INTERNAL = 1      # a bug (not a user error): one line naming the log with its traceback


class CliError(Exception):
    """A user error to report in one line."""


def _console():
    """Rich console for tables and lines. markup=False: paths, prompts, generated text and
    error messages are printed as they are, never read as rich markup (``[/]``, ``[bold]``);
    styled text is built with ``rich.text.Text`` instead."""
    from rich.console import Console

    return Console(stderr=False, highlight=False, markup=False)


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, show_level=verbose, markup=False,
                          log_time_format="[%X]")
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[handler], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "absl", "datasets", "ray", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()


# --------------------------------------------------------------------------- simulate

def cmd_resume(args) -> int:
    args.overrides = [f"run.dir={args.run_dir}", "run.resume=true"]
    args.multirun = False
    return cmd_simulate(args)


def cmd_simulate(args) -> int:
    """One run through fedllm.api.simulate; this layer only prints (errors: see main)."""
    if args.multirun:
        return cmd_sweep(args)
    _setup_logging(args.verbose)
    result = _simulate(args.overrides, args.verbose)
    _print_summary(_console(), result.summary, result.wall_seconds)
    return 0


def _simulate(config_or_overrides, verbose: bool):
    from fedllm import api

    console = _console()
    return api.simulate(config_or_overrides, verbose=verbose,
                        announce=lambda line: console.print(_bold_command(line)))


def _bold_command(line: str):
    """'fedllm simulate: ...' with the command name in bold (the rest printed as it is)."""
    from rich.text import Text

    head, _, rest = line.partition(":")
    return Text.assemble((head, "bold"), f":{rest}")


def _print_summary(console, s: dict, seconds: float) -> None:
    from rich.table import Table

    table = Table(title="fedllm run summary", show_header=False)
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    table.add_row("held-out perplexity",
                  f"{fmt(s['base_perplexity'], '.2f')} (base) → {fmt(s['final_perplexity'], '.2f')}"
                  f" (after {s['rounds']} rounds)")
    table.add_row("held-out loss", f"{fmt(s['base_eval_loss'], '.4f')} → "
                  f"{fmt(s['final_eval_loss'], '.4f')}")
    if s["epsilon_example_max"] is not None:
        table.add_row(f"per-client ε (example level: {s.get('privacy_unit', 'n/a')})",
                      f"max {s['epsilon_example_max']:.3f}, median "
                      f"{s['epsilon_example_median']:.3f} at δ={s['delta']:g} "
                      f"({s['clients_trained']} clients trained)")
        if s.get("clients_declined"):
            table.add_row("declined for budget", f"{s['clients_declined']} participation(s)")
    else:
        table.add_row("privacy", "none (privacy.example.enabled=false)")
    if s.get("epsilon_user") is not None:
        table.add_row("user-level ε", f"{s['epsilon_user']:.3f} at δ={s['delta']:g} (one client's "
                      "whole data, against observers of the model)")
        if s.get("epsilon_user_vs_server") is not None:
            table.add_row("user-level ε vs the server",
                          f"{s['epsilon_user_vs_server']:.3f} (it knows the cohorts: no "
                          "amplification by sampling)")
    table.add_row("wall time", f"{seconds:.0f} s")
    table.add_row("run directory", s["run_dir"])
    table.add_row("privacy report", str(Path(s["run_dir"]) / "privacy_report.html"))
    console.print(table)


# --------------------------------------------------------------------------- sweep

def cmd_sweep(args) -> int:
    """`fedllm simulate -m key=a,b ...`: one run per point, then a comparison table.
    Exit status 1 when any point failed (its row says why), 0 when all finished."""
    from fedllm import multirun

    _setup_logging(args.verbose)
    points = multirun.plan_sweep(args.overrides)
    multirun.check_points(points)
    console = _console()
    console.print(_bold_command(f"fedllm sweep: {len(points)} runs, one after another → "
                                f"{multirun.sweep_dir_of(points)}"))

    rows = multirun.run_sweep(points, _run_and_summarize(console, args.verbose))
    _print_sweep_table(console, rows)
    md, js = multirun.write_tables(points, rows)
    console.print(f"sweep table: {md} and {js}")
    return 1 if any(row.error for row in rows) else 0


def _run_and_summarize(console, verbose: bool):
    """One run of a sweep or tune: simulate the point's config, print its summary."""
    def run(cfg):
        result = _simulate(cfg, verbose)
        _print_summary(console, result.summary, result.wall_seconds)
        return result
    return run


def _print_sweep_table(console, rows) -> None:
    from rich.table import Table

    from fedllm.multirun import table_records

    keys = list(rows[0].point.swept) if rows else []
    table = Table(title="fedllm sweep")
    for column in (*keys, "final perplexity", "final loss", "ε max", "run dir"):
        table.add_column(column)
    fmt = lambda v, f: "n/a" if v is None else format(v, f)  # noqa: E731
    for rec in table_records(rows):
        values = [rec["swept"][k] for k in keys]
        if rec["error"]:
            table.add_row(*values, "failed", "", "", rec["error"])
        else:
            table.add_row(*values, fmt(rec["final_perplexity"], ".2f"),
                          fmt(rec["final_eval_loss"], ".4f"), fmt(rec["epsilon_max"], ".3f"),
                          rec["run_dir"])
    console.print(table)


# --------------------------------------------------------------------------- tune

def cmd_tune(args) -> int:
    """`fedllm tune key=a,b ...`: K random trials of random grid points, the best released.
    Exit status 0 when a trial was released, 1 when nothing was (K = 0, a budget refusal,
    every trial failed)."""
    from fedllm import tune
    from fedllm.privacy.selection import distribution_name

    _setup_logging(args.verbose)
    plan = tune.plan_tune(args.overrides)
    console = _console()
    t = plan.cfg.tune
    console.print(_bold_command(
        f"fedllm tune: {len(plan.points)} grid points, K trials drawn from "
        f"{distribution_name(t.shape)} with mean {t.mean_trials:g}, scored on {t.metric} data "
        f"→ {plan.tune_dir}"))

    outcome = tune.run_tune(plan, _run_and_summarize(console, args.verbose))
    _print_tune(console, outcome)
    return 0 if outcome.chosen else 1


def _print_tune(console, outcome) -> None:
    from rich.table import Table

    from fedllm.tune import TUNE_JSON, TUNE_MD, tune_record

    doc = tune_record(outcome)
    keys = list(doc["grid"][0]["swept"]) if doc["grid"] else []
    table = Table(title=f"fedllm tune: K = {doc['K']} trials ({doc['metric']['kind']} metric: "
                        "held-out loss on public text)")
    for column in ("trial", *keys, "score", "run dir"):
        table.add_column(column)
    for trial in doc["trials"]:
        score = "failed" if trial["score"] is None else f"{trial['score']:.4f}"
        table.add_row(str(trial["trial"]), *(trial["swept"][k] for k in keys), score,
                      trial["error"] or trial["run_dir"])
    console.print(table)
    pr = doc["privacy"]
    if doc["chosen"]:
        console.print(f"released: trial {doc['chosen']['trial']} → {doc['release_dir']}; "
                      f"ε {_fmt_eps_or_inf(pr['epsilon_selection'])} at δ={pr['delta']:g} "
                      "including the selection (against observers of the release; against the "
                      f"server, every trial composed: {_fmt_eps_or_inf(pr['epsilon_all_trials'])})")
    else:
        console.print(f"nothing released: {doc['stopped'] or 'no trial was scored'}")
    console.print(f"tune record: {outcome.plan.tune_dir / TUNE_MD} and "
                  f"{outcome.plan.tune_dir / TUNE_JSON}")


def _fmt_eps_or_inf(value) -> str:
    return "inf" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------- report

def cmd_report(args) -> int:
    from fedllm.privacy.accounting import AccountingError
    from fedllm.report import write_reports

    run_dir = Path(args.run_dir)
    try:
        report = write_reports(run_dir)
    except (FileNotFoundError, KeyError, ValueError, AccountingError) as exc:
        raise CliError(f"cannot build a report from {run_dir}: {exc}") from None
    except OSError as exc:  # e.g. a read-only run directory
        raise CliError(f"cannot write the report into {run_dir}: {_os_reason(exc)}") from None
    ex = report["example_level"]
    where = run_dir / "privacy_report.html"
    if ex is None:
        print(f"no differential privacy in this run; report written to {where}")
    else:
        print(f"max per-client epsilon {_fmt_eps(ex['max_epsilon'])} (median "
              f"{_fmt_eps(ex['median_epsilon'])}) at delta {report['delta']:g} over "
              f"{report['rounds']} rounds; report written to {where}")
    return 0


# --------------------------------------------------------------------------- audit

def cmd_audit(args) -> int:
    """Canary audit of the example-level mechanism: audit.json, audit_roc.png, HTML section."""
    from fedllm import audit_run, models
    from fedllm import config as fcfg
    from fedllm.data.sources import DataError
    from fedllm.privacy.accounting import AccountingError
    from fedllm.privacy.audit import AuditError
    from fedllm.report import write_audit_files

    _setup_logging(args.verbose)
    cfg = _audit_config(args.overrides)
    fcfg.check_device_here(cfg.model.device, "model.device")  # the audit trains here
    models.offline_env()
    if cfg.audit.mode == "wire":
        return _wire_audit(cfg)
    try:
        doc = audit_run.run_audit(cfg)
    except (DataError, models.ModelError, OSError, AccountingError, AuditError) as exc:
        raise fcfg.ConfigError(str(exc)) from None
    written = write_audit_files(Path(cfg.run.dir), doc)
    print(f"fedllm audit: {audit_run.summary_line(doc)}")
    print("wrote " + ", ".join(str(p) for p in written))
    return 1 if doc["flag"] else 0


def _wire_audit(cfg) -> int:
    """``audit.mode=wire``: every reply field against its claim (clients/wire_audit.py)."""
    import importlib
    import json

    from fedllm import config as fcfg
    from fedllm.data.sources import DataError
    from fedllm.io import atomic_write_text
    from fedllm.models import ModelError
    from fedllm.privacy.accounting import AccountingError
    from fedllm.privacy.audit import AuditError

    # The wire audit drives the ClientApp's own reply code; the library reaches it only here.
    wire = importlib.import_module("fedllm.clients.wire_audit")
    try:
        doc = wire.run_wire_audit(cfg)
    except (DataError, ModelError, OSError, AccountingError, AuditError) as exc:
        raise fcfg.ConfigError(str(exc)) from None
    path = Path(cfg.run.dir) / wire.WIRE_FILE
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")
    print("\n".join(f"fedllm audit: {line}" if i == 0 else line
                    for i, line in enumerate(wire.summary_lines(doc))))
    print(f"wrote {path}")
    return 1 if doc["flag"] else 0


def _audit_config(overrides: list[str]):
    """The overrides' config; or, when run.dir holds a run, that run's saved config (the
    settings it ran with) plus any audit.* overrides."""
    from omegaconf import OmegaConf

    from fedllm import config as fcfg

    cfg = fcfg.compose(overrides)
    saved = Path(cfg.run.dir).expanduser() / "config.yaml" if cfg.run.dir else None
    if saved is not None and saved.is_file():
        others = [o for o in overrides if not o.lstrip("+~").startswith(("audit.", "run.dir="))]
        if others:
            raise fcfg.ConfigError(f"{others[0].split('=')[0]}: run.dir holds a run whose saved "
                                   "config is audited; only audit.* overrides apply")
        text = OmegaConf.to_yaml(OmegaConf.merge(
            OmegaConf.create(saved.read_text()),
            OmegaConf.from_dotlist([o for o in overrides if o.startswith("audit.")])))
        cfg = fcfg.from_yaml(text, fill_missing=True, refuse_missing=("privacy.", "secagg."))
    if not cfg.run.dir:
        cfg.run.dir = str(Path("runs") / time.strftime("audit-%Y%m%d-%H%M%S"))
    cfg.run.dir = str(Path(cfg.run.dir).expanduser().resolve())
    return cfg


# --------------------------------------------------------------------------- deployment

def project_dir() -> Path:
    """The Flower app directory (pyproject.toml with [tool.flwr.app]): fedllm's checkout."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "pyproject.toml").is_file():
        raise CliError(f"no pyproject.toml at {root}: install fedllm from its checkout with "
                       "`pip install -e .` to launch deployments")
    return root


def cmd_launch(args) -> int:
    """Compose + validate the config here, then hand the run to Flower's `flwr run`."""
    import subprocess

    from fedllm import config as fcfg
    from fedllm import protocol
    from fedllm.api import check_run_dir_free, resolve_adapter_targets, resumed_config
    from fedllm.models import ModelError
    from fedllm.run_dir import assign_identity, write_config
    from fedllm.run_status import clear_stopped

    cfg = fcfg.compose(["eval.mode=clients", *args.overrides])
    if cfg.run.resume:
        cfg = resumed_config(cfg)
    if cfg.eval.mode != "clients":
        raise fcfg.ConfigError("eval.mode: a deployment keeps data on the nodes; use clients")
    check_connection(args.connection)  # before anything is written
    try:
        resolve_adapter_targets(cfg)  # what config.yaml records; a wrong name stops here
    except ModelError as exc:
        raise fcfg.ConfigError(str(exc)) from None
    assign_identity(cfg)
    if not cfg.run.resume:
        check_run_dir_free(cfg)
    text = fcfg.to_yaml(cfg)
    run_dir = Path(cfg.run.dir)
    write_config(run_dir, text)
    clear_stopped(run_dir)
    command = ["flwr", "run", str(args.app_dir or project_dir()), args.connection, "--stream",
               "--run-config", f'{protocol.CONFIG_KEY}="{protocol.encode_config(text)}"']
    print(f"fedllm launch: run {cfg.run.id} on '{args.connection}' → {cfg.run.dir} "
          "(on the SuperLink's machine)", flush=True)
    status = subprocess.call(command)
    return launch_status(run_dir, status)


VERDICT_WAIT_S = 30.0  # how long `fedllm launch` waits for a stopping ServerApp's verdict


def launch_status(run_dir: Path, flwr_status: int, wait_s: float = VERDICT_WAIT_S) -> int:
    """The ServerApp's own verdict when its run directory is on this machine (`flwr run`
    exits 0 whatever the ServerApp did): complete (summary.json) → 0; stopped → one line
    and EXIT_INCOMPLETE; neither → 1. Elsewhere, `flwr run`'s status.

    `flwr run --stream` returns as soon as the SuperLink marks the run finished, which can
    be before the ServerApp, stopped by that very mark, has written ``stopped.json``: wait
    up to ``wait_s`` for one verdict file (not when `flwr run` itself failed: then no run
    started and none will come)."""
    from fedllm.run_status import STOPPED_FILE, read_stopped, stopped_message

    if flwr_status == 0 and (run_dir / "config.yaml").is_file():
        deadline = time.monotonic() + wait_s
        while not any((run_dir / f).is_file() for f in ("summary.json", STOPPED_FILE)) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
    if (run_dir / "summary.json").is_file():
        return flwr_status
    info = read_stopped(run_dir)
    if info is not None:
        print(f"fedllm: incomplete: {stopped_message(run_dir, info)}", file=sys.stderr)
        return EXIT_INCOMPLETE
    if (run_dir / "config.yaml").is_file():
        print(f"fedllm: error: the run ended without a result (no summary.json in {run_dir}); "
              "see the ServerApp's log above", file=sys.stderr)
        return flwr_status or 1
    return flwr_status


def check_connection(name: str) -> None:
    """The named SuperLink connection must exist in $FLWR_HOME/config.toml: `flwr run` would
    fail on it only after fedllm had written the run's files."""
    path, data = _flwr_config()
    links = data.get("superlink", {}) if isinstance(data, dict) else {}
    if not isinstance(links, dict) or name not in links:
        known = ", ".join(sorted(links)) if isinstance(links, dict) and links else "none"
        raise CliError(f"connection '{name}' is not defined in {path} (defined: {known}); "
                       f"add it with `fedllm connection {name} --address HOST:PORT ...`")


def _flwr_config() -> tuple[Path, dict]:
    """($FLWR_HOME/config.toml, its contents: {} when absent); one line when unreadable."""
    import tomllib

    path = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr")) / "config.toml"
    try:
        return path, (tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {})
    except UnicodeDecodeError as exc:
        raise CliError(f"connection: cannot read {path}: not UTF-8 text (invalid byte at "
                       f"offset {exc.start}); fix or move that file") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"connection: cannot read {path}: not valid TOML ({exc}); fix or move "
                       "that file") from None
    except OSError as exc:
        raise CliError(f"connection: cannot read {path}: {_os_reason(exc)}") from None


def cmd_connection(args) -> int:
    """Write a SuperLink connection into $FLWR_HOME/config.toml (what `flwr run` reads)."""
    import tomli_w

    path, data = _flwr_config()
    home = path.parent
    links = data.setdefault("superlink", {})
    if not isinstance(links, dict):
        raise CliError(f"connection: {path} has a 'superlink' entry that is not a table; fix or "
                       "move that file")
    if args.name in links and not args.replace:
        raise CliError(f"connection '{args.name}' already exists in {path} (use --replace)")
    entry = {"address": args.address}
    if args.insecure:
        print("fedllm: WARNING: insecure connection: traffic is not encrypted and the "
              "SuperLink is not authenticated. Use only for local experiments.", file=sys.stderr)
        entry["insecure"] = True
    else:
        if not args.root_certificates:
            raise CliError("give --root-certificates CA.crt (or --insecure, for experiments)")
        entry["root-certificates"] = str(Path(args.root_certificates).expanduser().resolve())
    links[args.name] = entry
    try:
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(tomli_w.dumps(data), encoding="utf-8")
    except OSError as exc:
        raise CliError(f"connection: cannot write {path}: {_os_reason(exc)}") from None
    print(f"wrote connection '{args.name}' → {args.address} to {path}")
    return 0


# --------------------------------------------------------------------------- certs

def cmd_certs(args) -> int:
    from fedllm.certs import CertError, make_deployment_credentials

    hosts = [h for group in args.server_host for h in group.split(",") if h]
    try:
        report = make_deployment_credentials(args.out_dir, hosts, args.nodes, days=args.days)
    except (CertError, OSError) as exc:
        raise CliError(str(exc)) from None
    for path in report.created:
        print(f"created {path}")
    for path in report.kept:
        print(f"kept    {path} (exists; never overwritten)")
    print("Give each site: ca.crt and its own node-N.key. Keep ca.key offline. Register each "
          "node-N.pub with the SuperLink (see docs/deployment.md).")
    return 0


# --------------------------------------------------------------------------- accountant

def cmd_accountant(args) -> int:
    from fedllm.privacy.accounting import AccountingError, PrivacyEvent, calibrate_noise, epsilon

    try:
        if args.sampling == "fixed":
            if args.population is None:
                raise CliError("--sampling fixed needs --population N (and --sample-rate = k/N)")
            size = round(args.sample_rate * args.population)
            common = dict(sampling="fixed", sample_size=size, population=args.population)
        else:
            common = dict(sampling="poisson", sample_rate=args.sample_rate)
        if (args.noise_multiplier is None) == (args.target_epsilon is None):
            raise CliError("give exactly one of --noise-multiplier and --target-epsilon")
        if args.target_epsilon is not None:
            z = calibrate_noise(args.target_epsilon, args.delta, steps=args.steps,
                                accountant=args.accountant, **common)
            eps = epsilon([PrivacyEvent(noise_multiplier=z, steps=args.steps, **common)],
                          args.delta, args.accountant)
            out = {"noise_multiplier": z, "epsilon": eps}
        else:
            eps = epsilon([PrivacyEvent(noise_multiplier=args.noise_multiplier, steps=args.steps,
                                        **common)], args.delta, args.accountant)
            out = {"epsilon": eps, "noise_multiplier": args.noise_multiplier}
    except AccountingError as exc:
        raise CliError(str(exc)) from None
    out.update(delta=args.delta, steps=args.steps, sampling=args.sampling,
               accountant="rdp" if args.sampling == "fixed" else args.accountant,
               sample_rate=args.sample_rate)
    if args.json:  # valid JSON: an infinite ε (no finite bound) is written as null
        print(json.dumps({k: _finite_or_none(v) for k, v in out.items()}, allow_nan=False))
    elif args.target_epsilon is not None:
        print(f"noise multiplier {out['noise_multiplier']:.4f} (epsilon {out['epsilon']:.4f} "
              f"at delta {args.delta:g})")
    else:
        print(f"epsilon {_fmt_eps(out['epsilon'])} at delta {args.delta:g} "
              f"({out['accountant']}, {args.sampling} sampling)")
    return 0


def _fmt_eps(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:.4f}"


def _finite_or_none(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --------------------------------------------------------------------------- using the adapter

def cmd_generate(args) -> int:
    """Base model and trained adapter, side by side, on the same prompts."""
    from rich.table import Table

    from fedllm import config as fcfg
    from fedllm import export

    if args.max_new_tokens < 1:
        raise CliError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if not 0 <= args.seed <= fcfg.MAX_SEED:
        raise CliError(f"--seed must be from 0 to {fcfg.MAX_SEED}, got {args.seed}")
    for number, prompt in enumerate(args.prompt, 1):
        if not prompt:
            raise CliError(f"--prompt: prompt {number} is empty; give the text to continue")
        if not _is_utf8(prompt):
            raise CliError(f"--prompt: prompt {number} is not valid UTF-8 text")
    fcfg.check_device_here(args.device, "--device")  # before the model is loaded
    _setup_logging(verbose=False)
    import torch

    from fedllm.models import pick_device

    try:
        _, model, tokenizer = export.load_run_model(args.run_dir,
                                                    device=str(pick_device(args.device)))
    except export.ExportError as exc:
        raise CliError(str(exc)) from None
    for number, prompt in enumerate(args.prompt, 1):
        if not tokenizer(prompt)["input_ids"]:
            raise CliError(f"--prompt: prompt {number} ({prompt!r}) is no tokens at all")
    table = Table(title=f"fedllm generate: {args.run_dir} "
                        f"({'sampled, seed %d' % args.seed if args.sample else 'greedy'}, "
                        f"{args.max_new_tokens} new tokens at most)", show_lines=True)
    for column in ("prompt", "base model", "with adapter"):
        table.add_column(column, overflow="fold")
    for prompt in args.prompt:
        outputs = []
        for adapter in (False, True):
            torch.manual_seed(args.seed)  # sampling: both sides draw from the same seed
            outputs.append(export.generate(model, tokenizer, prompt, args.max_new_tokens,
                                           adapter=adapter, do_sample=args.sample))
        table.add_row(prompt, *outputs)  # plain text: _console() reads no markup
    _console().print(table)
    return 0


def _is_utf8(text: str) -> bool:
    """False for text with lone surrogates (bytes of the command line that were not UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def cmd_export(args) -> int:
    """Merged Hugging Face checkpoint (--merged) and/or llama.cpp GGUF file (--gguf)."""
    from fedllm import export

    if not (args.merged or args.gguf):
        raise CliError("give --merged DIR and/or --gguf FILE")
    _setup_logging(verbose=False)
    try:
        export.run_config(args.run_dir)  # a bad run directory fails before any export
        for option, target in (("--gguf", args.gguf), ("--merged", args.merged)):
            if target:  # both destinations, before either export starts
                export.check_destination(Path(target), option)
        results = []
        if args.gguf:  # checked first: its refusals are cheap and a refusal writes nothing
            results.append(export.export_gguf(args.run_dir, Path(args.gguf)))
        if args.merged:
            results.append(export.export_merged(args.run_dir, Path(args.merged)))
    except export.ExportError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:  # a read-only or impossible destination
        raise CliError(f"export: cannot write: {_os_reason(exc)}") from None
    for result in results:
        print(f"wrote {result.path}: {result.description}")
    return 0


# --------------------------------------------------------------------------- main

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedllm", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="federated DP fine-tuning in Flower's simulation runtime")
    sim.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=tiny federation.rounds=2")
    sim.add_argument("-v", "--verbose", action="store_true", help="show Flower/Ray logs")
    sim.add_argument("-m", "--multirun", action="store_true",
                     help="sweep: one run per combination of comma-separated values "
                          "(key=a,b), then a comparison table (sweep.md, sweep.json)")
    sim.set_defaults(func=cmd_simulate)

    tun = sub.add_parser("tune", help="private selection: the best of K random DP trials over "
                                      "a grid (key=a,b), released with ε including the selection")
    tun.add_argument("overrides", nargs="*",
                     help="Hydra overrides as for simulate -m, plus tune.* keys, e.g. "
                          "train.lr=0.05,0.1,0.2 tune.mean_trials=3")
    tun.add_argument("-v", "--verbose", action="store_true", help="show Flower/Ray logs")
    tun.set_defaults(func=cmd_tune)

    crt = sub.add_parser("certs", help="CA, SuperLink TLS certificate and node keys")
    crt.add_argument("out_dir")
    crt.add_argument("--server-host", action="append", required=True,
                     help="name or IP the sites use to reach the SuperLink (repeatable)")
    crt.add_argument("--nodes", type=int, default=0, help="number of site key pairs")
    crt.add_argument("--days", type=int, default=365, help="certificate validity")
    crt.set_defaults(func=cmd_certs)

    lau = sub.add_parser("launch", help="start a run on a deployed federation (flwr run)")
    lau.add_argument("connection", help="SuperLink connection name (see `fedllm connection`)")
    lau.add_argument("overrides", nargs="*", help="Hydra overrides, as for simulate")
    lau.add_argument("--app-dir", help="Flower app directory (default: fedllm's checkout)")
    lau.set_defaults(func=cmd_launch)

    con = sub.add_parser("connection", help="add a SuperLink connection for `flwr`/`launch`")
    con.add_argument("name")
    con.add_argument("--address", required=True, help="HOST:PORT of the SuperLink")
    con.add_argument("--root-certificates", help="the federation's ca.crt")
    con.add_argument("--insecure", action="store_true", help="no TLS (experiments only)")
    con.add_argument("--replace", action="store_true")
    con.set_defaults(func=cmd_connection)

    res = sub.add_parser("resume", help="continue a run directory from its last checkpoint")
    res.add_argument("run_dir")
    res.add_argument("-v", "--verbose", action="store_true")
    res.set_defaults(func=cmd_resume)

    aud = sub.add_parser("audit", help="canary audit: empirical lower bound on ε vs the claim")
    aud.add_argument("overrides", nargs="*",
                     help="Hydra overrides, as for simulate (audit.* keys: the audit itself)")
    aud.add_argument("-v", "--verbose", action="store_true")
    aud.set_defaults(func=cmd_audit)

    rep = sub.add_parser("report", help="rebuild the privacy report of a run directory")
    rep.add_argument("run_dir")
    rep.set_defaults(func=cmd_report)

    acc = sub.add_parser("accountant", help="epsilon of a DP-SGD plan, or the noise for a target")
    acc.add_argument("--sample-rate", type=float, required=True, help="q (poisson) or k/N (fixed)")
    acc.add_argument("--noise-multiplier", type=float)
    acc.add_argument("--target-epsilon", type=float)
    acc.add_argument("--steps", type=int, required=True)
    acc.add_argument("--delta", type=float, required=True)
    acc.add_argument("--accountant", choices=("pld", "rdp"), default="pld")
    acc.add_argument("--sampling", choices=("poisson", "fixed"), default="poisson")
    acc.add_argument("--population", type=int)
    acc.add_argument("--json", action="store_true",
                     help="one JSON object; an infinite epsilon (no finite bound) is null")
    acc.set_defaults(func=cmd_accountant)

    gen = sub.add_parser("generate", help="base model vs trained adapter on a prompt")
    gen.add_argument("run_dir")
    gen.add_argument("--prompt", action="append", required=True, help="text (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--seed", type=int, default=0, help="seed for --sample")
    gen.add_argument("--device", default="cpu", help="cpu (default), auto, cuda or cuda:N")
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="merged HF checkpoint and/or GGUF file of a run")
    exp.add_argument("run_dir")
    exp.add_argument("--merged", metavar="DIR", help="write a Hugging Face checkpoint here")
    exp.add_argument("--gguf", metavar="FILE", help="write a llama.cpp GGUF file (LoRA runs)")
    exp.set_defaults(func=cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    from fedllm.api import RunError, RunIncomplete
    from fedllm.config import ConfigError

    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except RunIncomplete as exc:
        print(f"fedllm: {'interrupted' if exc.interrupted else 'incomplete'}: {exc}",
              file=sys.stderr)
        return EXIT_INTERRUPTED if exc.interrupted else EXIT_INCOMPLETE
    except (ConfigError, CliError, RunError) as exc:
        print(f"fedllm: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedllm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug, not a user error: one line, the traceback in a file
        print(f"fedllm: internal error: {_one_line(exc)}; {_crash_log(exc)}", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _crash_log(exc: BaseException) -> str:
    """Write the traceback to $TMPDIR/fedllm-crash-<time>-<pid>.log; where it went, in words."""
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(exc))
    name = f"fedllm-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path = Path(tempfile.gettempdir()) / name
    try:
        path.write_text(f"fedllm {' '.join(sys.argv[1:])}\n\n{text}", encoding="utf-8",
                        errors="backslashreplace")
    except OSError:
        sys.stderr.write(text)  # nowhere to keep it: better on the screen than lost
        return "traceback above"
    return f"full traceback in {path} (please include it in a bug report)"


def _os_reason(exc: OSError) -> str:
    """'<path>: <what the OS said>' of an OSError, e.g. a read-only directory."""
    reason = exc.strerror or str(exc)
    where = exc.filename2 or exc.filename  # os.replace(tmp, dst): dst is the one to name
    return f"{where}: {reason}" if where else reason


def entry() -> None:
    """The console script. After an interrupt the run directory is already consistent (the
    ServerApp has stopped and Ray is shut down); exit at once, skipping interpreter teardown,
    where Ray's native signal handlers can abort the process and mask the exit status."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    if code == EXIT_INTERRUPTED:
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
