"""Default demo wall time on this machine: `fedllm simulate` with no overrides.

Run: python experiments/bench_demo.py [--fresh-cache] [--busy-core]
--fresh-cache points FEDLLM_CACHE at an empty directory, so the one-time GGUF conversion of
SmolLM2 is included (what a new user sees). --busy-core also times the demo while another
process keeps one core busy (a spinning Python loop at normal priority), after the idle run:
the simulated clients run at fedllm's own priority (run.client_niceness=0), where Ray's default
would start them 15 nicer and let any other job take their cores. Goal: at most 10 minutes on
2 cores.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402
from sim_runner import simulate  # noqa: E402


def timed_demo(label: str, tmp: Path) -> str:
    # A Hydra override value must not hold a comma (it would read as a sweep).
    run = simulate([], tmp / re.sub(r"[^A-Za-z0-9]+", "-", label))
    if run.returncode != 0:
        raise SystemExit(f"the demo failed: see {run.run_dir}.log")
    s = run.summary
    minutes, seconds = divmod(round(run.wall_s), 60)
    row = (f"| {label} | {minutes} min {seconds:02d} s | "
           f"{s['base_perplexity']:.2f} → {s['final_perplexity']:.2f} "
           f"({s['base_eval_loss'] - s['final_eval_loss']:+.4f} nats) | "
           f"{s['epsilon_example_max']:.2f} / {s['epsilon_example_median']:.2f} | "
           f"{run.peak_tree_rss / 2**30:.1f} GiB |")
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fresh-cache", action="store_true")
    parser.add_argument("--busy-core", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedllm-demo-") as tmp:
        if args.fresh_cache:
            os.environ["FEDLLM_CACHE"] = str(Path(tmp) / "cache")
        cache = "fresh cache" if args.fresh_cache else "warm cache"
        rows.append(timed_demo(f"{cache}, idle machine", Path(tmp)))
        if args.busy_core:
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                rows.append(timed_demo("warm cache, one core busy", Path(tmp)))
            finally:
                spinner.kill()
                spinner.wait()
    flags = "".join(f" --{f}" for f, on in (("fresh-cache", args.fresh_cache),
                                            ("busy-core", args.busy_core)) if on)
    write_section("demo", "\n".join([
        "## Default demo wall time (2 cores)",
        "",
        f"Command: `python experiments/bench_demo.py{flags}` (runs `fedllm simulate` with no "
        "overrides; `--fresh-cache` includes the one-time GGUF conversion; `--busy-core` "
        "times it again next to a process spinning on one core at normal priority). Goal: at "
        "most 10 minutes.",
        "",
        "| run | wall time | held-out perplexity (base → final) | per-client ε max / median | "
        "peak memory |",
        "|---|---|---|---|---|",
        *rows,
    ]))


if __name__ == "__main__":
    main()
