"""Sweeps: Hydra-style multirun over comma-separated override values (``key=a,b``).

The points are the cartesian product of every swept override (Hydra's own override grammar:
``a,b``, ``range(1,4)``, ``choice(...)``); they run one after another (one machine), each in
its own run directory under the sweep directory, which then holds a comparison table:
``sweep.md`` and ``sweep.json``.

Privacy: every point trains on the same clients' data, so unless ``privacy.ledger_dir`` is set,
all points share one ledger, ``<sweep dir>/ledger``: each client's lifetime ledger then holds
every point's releases, and ``privacy.budget`` applies to the sweep as a whole. A point whose
clients decline for that budget is a failed row (its reason in one line), not a result.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedllm.config import ConfigError

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
LEDGER = "ledger"  # <sweep dir>/ledger: the points' shared ledger, unless privacy.ledger_dir
# Keys that name or continue one run: they cannot vary across, or be fixed for, a sweep.
_PER_RUN_KEYS = ("run.dir", "run.id", "run.resume")


@dataclass
class SweepPoint:
    index: int
    swept: dict[str, str]          # key -> value of this point, for every swept key
    overrides: list[str]           # the full override list of this point's run (no run.dir)
    run_dir: Path


@dataclass
class SweepRow:
    point: SweepPoint
    result: object | None = None   # fedllm.api.RunResult when the run finished
    error: str | None = None       # one line when it did not


def plan_sweep(overrides: Sequence[str], sweep_dir: str | Path | None = None, *,
               kind: str = "sweep") -> list[SweepPoint]:
    """Expand ``overrides`` into sweep points, each with its run directory. ``run.dir`` (in
    the overrides or ``sweep_dir``) names the sweep directory; default runs/<kind>-<time>."""
    from fedllm.config import override_list

    overrides = override_list(overrides)
    template: list[str | int] = []  # the overrides in the user's order; int: a swept axis
    axes: list[list[tuple[str, str]]] = []
    for override in _parse(overrides):
        key = override.get_key_element().lstrip("+~")
        if key == "run.dir":
            if override.is_sweep_override():
                raise ConfigError("run.dir: cannot be swept; it names the sweep directory, "
                                  "which holds one run directory per point")
            sweep_dir = sweep_dir or override.value()
        elif key in _PER_RUN_KEYS:
            raise ConfigError(f"{key}: cannot be set in a sweep (each point is a new run)")
        elif override.is_sweep_override():
            template.append(len(axes))
            axes.append([(override.get_key_element(), value)
                         for value in override.sweep_string_iterator()])
        else:
            template.append(override.input_line)
    root = Path(sweep_dir or Path("runs") / time.strftime(f"{kind}-%Y%m%d-%H%M%S"))
    root = root.expanduser().resolve()
    points = []
    for index, combo in enumerate(itertools.product(*axes)):
        swept = dict(combo)
        overrides = [t if isinstance(t, str) else "=".join(combo[t]) for t in template]
        points.append(SweepPoint(index=index, swept=swept, overrides=overrides,
                                 run_dir=root / _run_name(index, swept)))
    return points


def _parse(overrides: Sequence[str]) -> list:
    """Hydra's own override grammar; a bad override is named in the one-line error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for line in overrides:
        try:
            parsed += parser.parse_overrides([line])
        except HydraException as exc:
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"{line}: not a valid override ({reason})") from None
    return parsed


def _run_name(index: int, swept: dict[str, str]) -> str:
    """``3_adapter-lora_lr-0.01``: readable, one path component, and valid unquoted in a
    ``run.dir=`` override later (no '=', ',' or spaces)."""
    parts = [str(index)] + [f"{k.rsplit('.', 1)[-1]}-{v}" for k, v in swept.items()]
    return re.sub(r"[^A-Za-z0-9._-]", "-", "_".join(parts))[:120]


def point_config(point: SweepPoint):
    """The validated config of one point, with its run directory (set on the config, so any
    path works: no override quoting) and, unless ``privacy.ledger_dir`` is set, the sweep's
    shared ledger."""
    from fedllm.api import compose

    try:
        cfg = compose(point.overrides)
    except ConfigError as exc:
        raise ConfigError(f"sweep point {point.run_dir.name}: {exc}") from None
    cfg.run.dir = str(point.run_dir)
    if not cfg.privacy.ledger_dir:
        cfg.privacy.ledger_dir = str(shared_ledger_dir(point))
    return cfg


def shared_ledger_dir(point: SweepPoint) -> Path:
    """The ledger every point of a sweep shares by default: ``<sweep dir>/ledger``."""
    return point.run_dir.parent / LEDGER


def check_points(points: list[SweepPoint]) -> None:
    """Compose every point before running any: a typo fails the sweep at once, by name."""
    for point in points:
        point_config(point)


def run_sweep(points: list[SweepPoint], run: Callable[[object], object]) -> list[SweepRow]:
    """Run the points in order with ``run(config)`` (e.g. ``fedllm.api.simulate``). A point
    that fails is recorded with its error and the sweep goes on; the table is rewritten after
    every point, so an interrupted sweep still leaves the rows it finished."""
    import os

    from fedllm.api import RunError

    # One Flower home for the whole sweep, in the sweep directory (not in its first run's).
    os.environ.setdefault("FLWR_HOME", str(sweep_dir_of(points) / ".flwr"))
    rows: list[SweepRow] = []
    for point in points:
        try:
            result = run(point_config(point))
            rows.append(SweepRow(point, result=result, error=budget_refusal(result)))
        except (ConfigError, RunError) as exc:
            rows.append(SweepRow(point, error=str(exc)))
        if rows[-1].error:
            logging.getLogger("fedllm").error("sweep point %s failed: %s", point.run_dir.name,
                                              rows[-1].error)
        write_tables(points, rows)
    return rows


def budget_refusal(result) -> str | None:
    """One line when clients declined rounds of this run for their lifetime budget
    (``privacy.budget``, over every run their ledger holds): the run did not train as planned."""
    example = (getattr(result, "privacy", None) or {}).get("example_level") or {}
    declined = [d for d in example.get("exhausted_clients", [])
                if "privacy.budget" in d.get("reason", "")]
    if not declined:
        return None
    first = declined[0]
    return (f"refused by the lifetime budget: {len(declined)} participation(s) declined "
            f"(client {first['client_id']}, round {first['round']}: {first['reason']})")


def sweep(overrides: Sequence[str], sweep_dir: str | Path | None = None, *,
          verbose: bool = False) -> list[SweepRow]:
    """Python entry point: plan, check and run a sweep with ``fedllm.api.simulate``."""
    from fedllm.api import simulate

    points = plan_sweep(overrides, sweep_dir)
    check_points(points)
    return run_sweep(points, lambda o: simulate(o, verbose=verbose))


# --------------------------------------------------------------------------- tables

def sweep_dir_of(points: list[SweepPoint]) -> Path:
    return points[0].run_dir.parent


def table_records(rows: list[SweepRow]) -> list[dict]:
    """One JSON-ready record per finished (or failed) point."""
    records = []
    for row in rows:
        r = row.result
        records.append({
            "swept": row.point.swept, "run_dir": str(row.point.run_dir),
            "final_perplexity": r.final_perplexity if r else None,
            "final_eval_loss": r.final_eval_loss if r else None,
            "base_perplexity": r.base_perplexity if r else None,
            "epsilon_max": r.epsilon_max if r else None,
            "error": row.error,
        })
    return records


def markdown_table(rows: list[SweepRow]) -> str:
    keys = list(rows[0].point.swept) if rows else []
    header = [*keys, "final perplexity", "final loss", "ε max", "run dir"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rec in table_records(rows):
        cells = [rec["swept"][k] for k in keys]
        if rec["error"]:
            cells += ["failed", "", "", f"{Path(rec['run_dir']).name}: {rec['error']}"]
        else:
            cells += [_fmt(rec["final_perplexity"], ".2f"), _fmt(rec["final_eval_loss"], ".4f"),
                      _fmt(rec["epsilon_max"], ".3f"), rec["run_dir"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def write_tables(points: list[SweepPoint], rows: list[SweepRow]) -> tuple[Path, Path]:
    """sweep.json (every point, finished or not) and sweep.md (the rows so far)."""
    from fedllm.io import atomic_write_text

    root = sweep_dir_of(points)
    root.mkdir(parents=True, exist_ok=True)
    doc = {"sweep_dir": str(root), "points": len(points),
           "swept_keys": list(points[0].swept), "fixed_overrides": _fixed(points[0]),
           "runs": table_records(rows)}
    atomic_write_text(root / SWEEP_JSON, json.dumps(doc, indent=2) + "\n")
    atomic_write_text(root / SWEEP_MD, f"# fedllm sweep: {root}\n\n" + markdown_table(rows))
    return root / SWEEP_MD, root / SWEEP_JSON


def _fixed(point: SweepPoint) -> list[str]:
    swept = {f"{k}={v}" for k, v in point.swept.items()}
    return [o for o in point.overrides if o not in swept]
