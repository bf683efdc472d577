"""Default demo wall time on this machine: `fedllm simulate` with no overrides.

Run: python experiments/bench_demo.py [--fresh-cache]
--fresh-cache points FEDLLM_CACHE at an empty directory, so the one-time GGUF conversion of
SmolLM2 is included (what a new user sees). Goal: at most 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402
from sim_runner import simulate  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fresh-cache", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedllm-demo-") as tmp:
        if args.fresh_cache:
            os.environ["FEDLLM_CACHE"] = str(Path(tmp) / "cache")
        run = simulate([], Path(tmp) / "run")
        if run.returncode != 0:
            raise SystemExit(f"the demo failed: see {run.run_dir}.log")
        s = run.summary
    minutes, seconds = divmod(round(run.wall_s), 60)
    row = (f"| {'fresh' if args.fresh_cache else 'warm'} cache | {minutes} min {seconds:02d} s | "
           f"{s['base_perplexity']:.2f} → {s['final_perplexity']:.2f} "
           f"({s['base_eval_loss'] - s['final_eval_loss']:+.4f} nats) | "
           f"{s['epsilon_example_max']:.2f} / {s['epsilon_example_median']:.2f} | "
           f"{run.peak_tree_rss / 2**30:.1f} GiB |")
    print(row)
    write_section("demo", "\n".join([
        "## Default demo wall time (2 cores)",
        "",
        f"Command: `python experiments/bench_demo.py{' --fresh-cache' if args.fresh_cache else ''}`"
        " (runs `fedllm simulate` with no overrides; `--fresh-cache` includes the one-time GGUF "
        "conversion). Goal: at most 10 minutes.",
        "",
        "| cache | wall time | held-out perplexity (base → final) | per-client ε max / median | "
        "peak memory |",
        "|---|---|---|---|---|",
        row,
    ]))


if __name__ == "__main__":
    main()
