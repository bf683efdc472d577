"""Time to compute epsilon for long privacy histories (what a lifetime ledger holds).

Run: python experiments/bench_accountant.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402

from fedllm.privacy import accounting  # noqa: E402
from fedllm.privacy.accounting import PrivacyEvent, epsilon  # noqa: E402

DELTA = 1e-5


def timed(events, accountant, repeats=3):
    """(cold seconds: caches cleared, warm seconds: PLDs cached as in a live run, epsilon)."""
    cold, warm, eps = [], [], None
    for _ in range(repeats):
        accounting._single_step_pld.cache_clear()
        accounting._composed_pld.cache_clear()
        t = time.perf_counter()
        eps = epsilon(events, DELTA, accountant)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        epsilon(events, DELTA, accountant)
        warm.append(time.perf_counter() - t)
    return statistics.median(cold), statistics.median(warm), eps


def histories():
    one = [PrivacyEvent(noise_multiplier=1.0, steps=4, sample_rate=0.01) for _ in range(2500)]
    runs = [PrivacyEvent(noise_multiplier=0.8 + 0.1 * (i % 5), steps=4, sample_rate=0.01)
            for i in range(2500)]
    distinct = [PrivacyEvent(noise_multiplier=0.8 + 0.004 * i, steps=100, sample_rate=0.01)
                for i in range(100)]
    return [
        ("one mechanism, 2,500 rounds x 4 steps", one),
        ("5 runs with different noise, 2,500 rounds x 4 steps", runs),
        ("100 distinct mechanisms x 100 steps (worst case)", distinct),
    ]


def main() -> None:
    rows = []
    for name, events in histories():
        steps = sum(e.steps for e in events)
        for accountant in ("pld", "rdp"):
            cold, warm, eps = timed(events, accountant)
            rows.append(f"| {name} | {steps:,} | {accountant.upper()} | {eps:.4f} | "
                        f"{cold:.3f} | {warm:.3f} |")
            print(rows[-1], flush=True)
    body = "\n".join([
        "## Accountant: epsilon of a 10,000-step history",
        "",
        "Command: `python experiments/bench_accountant.py` (median of 3; δ = 1e-5, Poisson "
        "q = 0.01). Identical mechanisms are merged into one self-composition before the "
        "accountant runs, so time grows with the number of *distinct* mechanisms, not steps. "
        "A fedllm ledger holds one distinct mechanism per (client, run): q is fixed per client, "
        "z per run. *Cold*: caches cleared; *warm*: the per-mechanism PLDs are cached, as they "
        "are when a server or client re-evaluates a ledger every round. Goal: under 1 s.",
        "",
        "| history | steps | accountant | ε | cold s | warm s |",
        "|---|---|---|---|---|---|",
        *rows,
    ])
    write_section("accountant", body)


if __name__ == "__main__":
    main()
