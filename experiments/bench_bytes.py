"""Bytes on the wire per client per round vs the raw adapter (SmolLM2-135M, LoRA r=8 q,v).

Run: python experiments/bench_bytes.py [--rounds 2]
Runs real `fedllm simulate` federations and reads `wire_bytes_up` / `wire_bytes_down` from
metrics.jsonl: the protobuf-serialized size of every Flower message of the round (adapter
tensors, the run config that travels with each instruction, metrics, metadata, and under
SecAgg+ the key-exchange, share and unmasking messages). Raw adapter bytes: the float32
tensors of the exported adapter. Goal: <= 1.05x.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from safetensors.numpy import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402
from sim_runner import command_line, simulate  # noqa: E402

COMMON = ["federation.num_clients=6", "federation.clients_per_round=3", "train.local_steps=1",
          "eval.max_sequences=16"]
SETUPS = {
    "example-level DP (demo pipeline)": [],
    "+ user-level DP, distributed noise, SecAgg+": [
        "privacy.user.enabled=true", "privacy.user.noise_multiplier=1.0",
        "privacy.user.noise=distributed", "secagg=secaggplus", "federation.min_clients=2"],
}


def raw_adapter_bytes(run_dir: Path) -> int:
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return sum(t.size * 4 for t in tensors.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedllm-bytes-") as tmp:
        for i, (name, extra) in enumerate(SETUPS.items()):
            overrides = [f"federation.rounds={args.rounds}", *COMMON, *extra]
            run = simulate(overrides, Path(tmp) / f"run{i}")
            if run.returncode != 0:
                raise SystemExit(f"{name}: simulate failed, see {run.run_dir}.log")
            raw = raw_adapter_bytes(run.run_dir)
            sampled = sum(r["num_sampled"] for r in run.rows)
            up = sum(r["wire_bytes_up"] for r in run.rows) / sampled
            down = sum(r["wire_bytes_down"] for r in run.rows) / sampled
            rows.append(f"| {name} | {raw:,} | {down:,.0f} | {down / raw:.4f}x | {up:,.0f} | "
                        f"{up / raw:.4f}x | `{command_line(overrides)}` |")
            print(rows[-1], flush=True)
    write_section("bytes", "\n".join([
        "## Bytes on the wire per client per round (SmolLM2-135M, LoRA r=8 on q,v)",
        "",
        "Command: `python experiments/bench_bytes.py` (real `fedllm simulate` runs, "
        f"{args.rounds} rounds x 3 of 6 clients). Every Flower message of a round is "
        "counted at its protobuf-serialized size (`server/wire.py`, recorded per round as "
        "`wire_bytes_up` / `wire_bytes_down` in metrics.jsonl): adapter tensors, the run "
        "config sent with each instruction, metrics, metadata, and under SecAgg+ the key "
        "exchange, encrypted shares and unmasking messages. Raw adapter: its float32 tensors. "
        "TLS/HTTP2 framing in a deployment adds a little on top. Goal: <= 1.05x.",
        "",
        "| setup | raw adapter bytes | down per client | vs raw | up per client | vs raw | "
        "run |",
        "|---|---|---|---|---|---|---|",
        *rows,
    ]))


if __name__ == "__main__":
    main()
