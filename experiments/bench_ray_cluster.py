"""Simulation on a real two-node Ray cluster (on this machine): where did the clients run?

Run: python experiments/bench_ray_cluster.py [--rounds 2] [--clients 8] [--per-round 4]
Starts `ray start --head` plus a second `ray start --address HEAD` (1 CPU each; see
ray_local_cluster.py), runs `fedllm simulate model=tiny run.ray_address=HEAD run.client_cpus=1`
joined to it, counts each node's client trainings from the run's placement.jsonl, stops both
nodes, and writes the "Scale: two-node Ray" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402
from ray_local_cluster import LocalRayCluster  # noqa: E402
from sim_runner import simulate  # noqa: E402


def overrides(address: str, rounds: int, clients: int, per_round: int) -> list[str]:
    return ["model=tiny", f"run.ray_address={address}", "run.client_cpus=1",
            f"federation.rounds={rounds}", f"federation.num_clients={clients}",
            f"federation.clients_per_round={per_round}"]


def per_node_counts(run_dir: Path, nodes: dict[str, str]) -> dict[str, int]:
    """Client trainings per node name (head / node2) from placement.jsonl."""
    names = {node_id: name for name, node_id in nodes.items()}
    rows = [json.loads(line) for line in (run_dir / "placement.jsonl").read_text().splitlines()]
    counts = collections.Counter(names.get(r["node_id"], "unknown") for r in rows)
    return {name: counts[name] for name in nodes} | (
        {"unknown": counts["unknown"]} if counts["unknown"] else {})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-round", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedllm-ray-bench-") as tmp, \
            LocalRayCluster(num_cpus=1) as cluster:
        nodes = cluster.node_ids()
        run = simulate(overrides(cluster.address, args.rounds, args.clients, args.per_round),
                       Path(tmp) / "run")
        if run.returncode != 0:
            raise SystemExit(f"the run failed: {(Path(tmp) / 'run.log').read_text()[-3000:]}")
        counts = per_node_counts(run.run_dir, nodes)
        per_round = [r["seconds"] for r in run.rows]
    cmd = " ".join(overrides("HEAD", args.rounds, args.clients, args.per_round))
    row = (f"| 2 x 1 CPU (`ray start --head` + `ray start --address`) | {args.clients} clients, "
           f"{args.rounds} rounds x {args.per_round} | "
           + " / ".join(f"{name}: {n}" for name, n in counts.items())
           + f" | {sorted(per_round)[len(per_round) // 2]:.1f} s | {run.wall_s:.0f} s |")
    print(row)
    write_section("scale_ray", "\n".join([
        "## Scale: two-node Ray",
        "",
        "Command: `python experiments/bench_ray_cluster.py` (a real two-node Ray cluster on "
        "this machine, 1 CPU per node; the run is `fedllm simulate " + cmd + "` joined to it; "
        "per-node counts: client trainings per Ray node, from the run's `placement.jsonl`). "
        "Wall time includes the driver's data preparation and joining the cluster, not "
        "starting it. Both nodes and the driver share this one machine's cores (with any other "
        "load on it), so the seconds say nothing about a real cluster's speed: the counts "
        "show that clients were placed on both nodes.",
        "",
        "| cluster | federation | client trainings per node | per round (median) | wall |",
        "|---|---|---|---|---|",
        row,
    ]))


if __name__ == "__main__":
    main()
