"""SecAgg+ vs plain aggregation: 10 clients x 0.5M floats (about a SmolLM2 LoRA r=8 adapter).

Run: python experiments/bench_secagg.py
Measures, in one process and one run, (1) the server's aggregation stage: plain sum of float32
updates vs unmasking the masked uint32 inputs (self masks from Shamir shares, dropped clients'
pairwise masks) and dequantizing; (2) each client's extra work (quantize + mask); (3) the whole
protocol's cryptography (keys, encrypted shares, masks, unmasking) for the cohort.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from benchmarks_md import write_section  # noqa: E402
from test_secagg import run_protocol  # noqa: E402

from fedllm.secagg import primitives as sa  # noqa: E402

CLIENTS, LENGTH, BITS, R = 10, 500_000, 24, 0.5


def median_time(fn, repeats=5):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(drop: int = 0) -> dict:
    rng = np.random.default_rng(0)
    inputs = {10 + i: rng.uniform(-R, R, LENGTH).astype(np.float32) for i in range(CLIENTS)}
    ids = sorted(inputs)
    dtype = sa.modulus_dtype(BITS, CLIENTS)
    graph = sa.neighbours(ids, 5)
    sec = {u: sa.ClientSecrets.generate() for u in ids}
    masked = {u: sa.masked_input(u, sec[u], sa.quantize(inputs[u], R, BITS, dtype, rng),
                                 {v: sec[v].s_pk for v in graph[u]}, "run", 1) for u in ids}
    dropped = set(ids[:drop])
    survivors = [u for u in ids if u not in dropped]
    shares = {u: sa.shamir_split(sec[u].b, [sa.share_point(v, ids) for v in graph[u] + [u]], 3)
              for u in ids}
    s_shares = {u: sa.shamir_split(sec[u].s_sk, [sa.share_point(v, ids) for v in graph[u] + [u]],
                                   3) for u in dropped}
    live = {u: masked[u] for u in survivors}

    def plain():
        total = np.zeros(LENGTH, np.float64)
        for u in survivors:
            total += inputs[u]
        return (total / CLIENTS).astype(np.float32)

    def secure():
        total = sa.unmask_sum(live, graph, {u: sec[u].s_pk for u in ids}, shares, s_shares, 3,
                              "run", 1)
        return (sa.dequantize_sum(total, len(survivors), R, BITS) / CLIENTS).astype(np.float32)

    err = float(np.abs(plain() - secure()).max())
    t_plain, t_secure = median_time(plain), median_time(secure)
    t_client = median_time(lambda: sa.masked_input(
        ids[0], sec[ids[0]], sa.quantize(inputs[ids[0]], R, BITS, dtype, rng),
        {v: sec[v].s_pk for v in graph[ids[0]]}, "run", 1))
    small = {u: x[:LENGTH] for u, x in inputs.items()}
    t_protocol = median_time(lambda: run_protocol(small, drop_after_shares=dropped, threshold=3,
                                                  num_shares=5, bits=BITS, R=R), repeats=3)
    return dict(plain=t_plain, secure=t_secure, client=t_client, protocol=t_protocol, err=err,
                bytes_plain=LENGTH * 4, bytes_secure=LENGTH * dtype.itemsize, drop=drop)


if __name__ == "__main__":
    rows = []
    for drop in (0, 2):
        r = main(drop)
        rows.append(
            f"| {drop} | {r['plain'] * 1e3:.1f} | {r['secure'] * 1e3:.1f} | "
            f"{r['secure'] / r['plain']:.1f}x | {r['client'] * 1e3:.1f} | "
            f"{r['protocol']:.2f} | {r['err']:.1e} | {r['bytes_secure'] / r['bytes_plain']:.2f} |")
        print(rows[-1], flush=True)
    write_section("secagg", "\n".join([
        "## SecAgg+ vs plain aggregation (10 clients x 0.5M floats)",
        "",
        "Command: `python experiments/bench_secagg.py` (medians; 5 shares per client, "
        "threshold 3, 24-bit quantization, uint32 sums). *Server stage*: plain = sum + divide "
        "of float32 updates; SecAgg+ = sum of masked inputs, removal of self masks (Shamir "
        "reconstruction + AES-CTR expansion) and of dropped clients' pairwise masks, "
        "dequantization. *Client extra*: quantize + mask one update. *Whole protocol*: all "
        "clients' keys, encrypted shares, masking and the server's unmasking, in one process.",
        "",
        "| dropped | plain server ms | SecAgg+ server ms | ratio | client extra ms | "
        "whole protocol s | max abs error | bytes up vs float32 |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Goal: SecAgg+ aggregation <= 1.5x plain (Flower's stock SecAgg+ measured 4-5x here). "
        "Summing uint32 vectors is cheaper than the float64 accumulation of the plain path, and "
        "the masks are AES-CTR keystreams (hardware AES), so removing them costs milliseconds; "
        "each dropped client adds the expansion of its pairwise masks with its live neighbours. "
        "Uploads stay at 4 bytes per coordinate (uint32) for cohorts up to 255 clients at 24 "
        "bits. Not measured here: the two extra message exchanges per round (setup, shares) in "
        "a deployment, which cost network round trips, not compute.",
    ]))
