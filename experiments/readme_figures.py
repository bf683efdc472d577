"""The README's figures, read from BENCHMARKS.md: one generated place, so they cannot drift.

  python experiments/readme_figures.py          # rewrite the README's figures block
  python experiments/readme_figures.py --check  # exit 1 if the README disagrees with BENCHMARKS.md

The block sits between ``<!-- figures:begin -->`` and ``<!-- figures:end -->`` in README.md;
``tests/test_docs.py`` fails when it is not what ``render`` makes of the current BENCHMARKS.md.
Each figure names the BENCHMARKS.md section it comes from.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


class MissingFigure(LookupError):
    """A figure the README quotes is not in BENCHMARKS.md (renamed section or row)."""


def section(benchmarks: str, name: str) -> str:
    match = re.search(rf"<!-- bench:{re.escape(name)} -->(.*?)<!-- /bench:{re.escape(name)} -->",
                      benchmarks, re.S)
    if not match:
        raise MissingFigure(f"BENCHMARKS.md has no section bench:{name}")
    return match.group(1)


def table_rows(text: str) -> list[list[str]]:
    """Every data row of every table in ``text``, as stripped cells."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"\|\s*-", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def row(text: str, *first_cells: str) -> list[str]:
    for cells in table_rows(text):
        if cells[:len(first_cells)] == list(first_cells):
            return cells
    raise MissingFigure(f"no table row starting {first_cells!r}")


def sweep_row(benchmarks: str, name: str, epsilon: str, sub: str = "utility_dp_pays") -> list:
    for cells in table_rows(section(benchmarks, sub)):
        if cells[0] == name and len(cells) > 3 and cells[3] == epsilon:
            return cells
    raise MissingFigure(f"no utility row {name!r} at ε = {epsilon}")


def bold(cell: str) -> str:
    return cell.strip("*")


def render(benchmarks: str) -> str:
    demo = section(benchmarks, "demo")
    idle = row(demo, "warm cache, idle machine")
    busy = row(demo, "warm cache, one core busy")
    default = {e: sweep_row(benchmarks, "default (prompt tuning)", e) for e in ("1", "2", "4", "8")}
    lora = sweep_row(benchmarks, "FFA-LoRA r=1, C=0.25, lr 2e-2", "8")
    step = row(section(benchmarks, "dp_step_prompt"), "DP, Opacus embedding grad sampler (default)")
    lines = [
        BEGIN,
        "| what (2 CPU cores; BENCHMARKS.md section) | measured |",
        "|---|---|",
        f"| demo wall time, idle / one core busy (\"Default demo wall time\") | {idle[1]} / "
        f"{busy[1]} |",
        f"| demo held-out perplexity, base → final (same) | {idle[2]} |",
        f"| every client's ε at the end, max / median (same) | {idle[3]} at δ = 1e-5 |",
        "| held-out gain kept under DP, default soft prompt, ε = 8 / 4 / 2 / 1 (\"DP that pays\", "
        "median of 3 DP runs vs 3 non-private twins, in nats) | "
        + " / ".join(bold(default[e][7]) for e in ("8", "4", "2", "1")) + " |",
        f"| the same at ε = 8, DP gain vs twin gain (nats) | {default['8'][5]} vs "
        f"{default['8'][6]} |",
        f"| best LoRA configuration so far (FFA-LoRA r=1, C = 0.25), ε = 8, measured on packed "
        f"64-token windows before the record unit (same) | "
        f"{bold(lora[7])} kept |",
        f"| DP-SGD step / non-DP step, default adapter (\"DP-SGD step overhead of the default "
        f"adapter\") | {step[2]} |",
        END,
    ]
    return "\n".join(lines)


def readme_block(readme: str) -> str:
    match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), readme, re.S)
    if not match:
        raise MissingFigure("README.md has no figures block")
    return match.group(0)


def main(argv: list[str]) -> int:
    readme_path, bench_path = ROOT / "README.md", ROOT / "BENCHMARKS.md"
    readme, block = readme_path.read_text(), render(bench_path.read_text())
    if "--check" in argv:
        ok = readme_block(readme) == block
        print("README figures match BENCHMARKS.md" if ok else
              "README figures differ from BENCHMARKS.md: run python experiments/readme_figures.py")
        return 0 if ok else 1
    readme_path.write_text(readme.replace(readme_block(readme), block))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
