"""Utility vs privacy: held-out perplexity of the base model, non-private federated LoRA and
DP federated LoRA at example-level epsilon 1, 4, 8 (same rounds, clients, data and seed).

Run: python experiments/bench_utility.py [--epsilons 1 4 8] [extra hydra overrides...]
Each point is a real `fedllm simulate` run of the demo configuration (plus the overrides);
the clients sampled each round are the same in every run (server sampling is seeded by
run.seed), DP noise and Poisson batches are fresh per run. Goal: at epsilon 8 keep >= 80% of
the non-private perplexity improvement. Writes BENCHMARKS.md and
docs/benchmarks/utility_vs_epsilon.png.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402
from sim_runner import command_line, simulate  # noqa: E402

PLOT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "utility_vs_epsilon.png"


def gain_kept(base: float, private: float, nonprivate: float) -> float:
    """Share of the non-private perplexity improvement the private run keeps."""
    return (base - private) / (base - nonprivate) if base != nonprivate else math.nan


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--section", default="utility")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    runs = {}
    with tempfile.TemporaryDirectory(prefix="fedllm-utility-") as tmp:
        plans = {"non-private": ["privacy=none"]}
        plans.update({f"DP, ε = {e:g}": [f"privacy.example.target_epsilon={e:g}"]
                      for e in args.epsilons})
        for i, (name, extra) in enumerate(plans.items()):
            overrides = [*args.overrides, *extra]
            run = simulate(overrides, Path(tmp) / f"run{i}")
            if run.returncode != 0:
                raise SystemExit(f"{name}: simulate failed, see {run.run_dir}.log")
            runs[name] = (overrides, run)
            print(name, run.summary["base_perplexity"], run.summary["final_perplexity"],
                  run.summary.get("epsilon_example_max"), flush=True)
    _, first = next(iter(runs.values()))
    base = first.summary["base_perplexity"]
    nonprivate = runs["non-private"][1].summary["final_perplexity"]
    rows = [f"| base model | — | {base:.2f} | {first.summary['base_eval_loss']:.4f} | — | — | — | — |"]
    points = []
    for name, (overrides, run) in runs.items():
        s = run.summary
        eps = s.get("epsilon_example_max")
        kept = gain_kept(base, s["final_perplexity"], nonprivate)
        rows.append(f"| {name} | {'∞' if eps is None else f'{eps:.2f}'} | "
                    f"{s['final_perplexity']:.2f} | {s['final_eval_loss']:.4f} | "
                    f"{s['base_eval_loss'] - s['final_eval_loss']:+.4f} | "
                    f"{'—' if name == 'non-private' else f'{100 * kept:.0f}%'} | "
                    f"{run.wall_s / 60:.1f} min | `{command_line(overrides)}` |")
        if eps is not None:
            points.append((eps, s["final_perplexity"]))
    _plot(points, base, nonprivate)
    extra = " ".join(args.overrides)
    write_section(args.section, "\n".join([
        "## Utility vs privacy (held-out perplexity, SmolLM2-135M)",
        "",
        f"Command: `python experiments/bench_utility.py{' ' + extra if extra else ''}` "
        "(real `fedllm simulate` runs of the demo configuration; same rounds, sampled clients, "
        "data and held-out set; per-client example-level ε at δ = 1e-5, the largest over "
        "clients). *Gain kept*: (base − private perplexity) / (base − non-private "
        "perplexity). Goal: >= 80% at ε = 8. Plot: `docs/benchmarks/utility_vs_epsilon.png`. "
        "The ε = 8 run is the default demo (`fedllm simulate`, warm model cache): its wall "
        "time is the demo's.",
        "",
        "| run | ε (max over clients) | held-out perplexity | held-out loss | Δ loss (nats) | "
        "gain kept | wall time | command |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]))


def _plot(points, base: float, nonprivate: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOT.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    points.sort()
    ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="DP federated LoRA")
    ax.axhline(base, color="grey", ls=":", label="base model")
    ax.axhline(nonprivate, color="green", ls="--", label="non-private federated LoRA")
    ax.set_xlabel("per-client example-level ε (δ = 1e-5)")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
