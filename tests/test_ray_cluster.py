"""Simulation on Ray: run.ray_address / client_cpus / client_gpus, and a real two-node cluster.

The unit tests need no Ray instance. The slow test starts a real two-node Ray cluster on this
machine (`ray start --head` + `ray start --address`), runs a tiny `fedllm simulate` joined to
it, checks from the run's placement.jsonl that clients trained on both nodes, and stops both
nodes whatever happens.
"""

import json
import os
import dataclasses
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.config import ConfigError, compose
from fedllm.server.simulation import (backend_config, clients_that_fit, plan_resources)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))


def run_config(**overrides):
    """The demo's run section (conf/ holds the defaults) with some fields replaced."""
    return dataclasses.replace(compose([]).run, **overrides)


@pytest.mark.parametrize("overrides,message", [
    (["run.ray_address=ray://10.0.0.5:10001"], "run.ray_address: must be null"),
    (["run.ray_address=head-node"], "run.ray_address: must be null"),
    (["run.client_cpus=0"], "run.client_cpus: must be a finite number > 0"),
    (["run.client_gpus=1.5"], "run.client_gpus: must be a fraction of one GPU"),
    (["run.client_gpus=-0.5"], "run.client_gpus: must be a finite number >= 0"),
    (["run.parallel_clients=2", "run.client_cpus=0.5"],
     "run.parallel_clients: (2) splits this machine's cores and GPU evenly; it cannot be "
     "combined with run.client_cpus"),
    (["run.parallel_clients=2", "run.ray_address=auto"], "combined with run.ray_address"),
    (["run.client_gpus=0.5", "model.device=cpu"], "model.device=cpu"),
    (["run.client_gpus=0", "model.device=cuda"], "Ray hides every GPU"),
    (["run.client_niceness=20"], "run.client_niceness: must be a whole number from 0"),
])

def test_bad_resource_combinations_are_one_readable_config_error(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(["model=tiny", *overrides])
    assert message in str(err.value)


def test_good_resource_settings_compose():
    cfg = compose(["model=tiny", "run.ray_address=10.0.0.5:6379", "run.client_cpus=2",
                   "run.client_gpus=0.25"])
    assert (cfg.run.ray_address, cfg.run.client_cpus, cfg.run.client_gpus) == \
        ("10.0.0.5:6379", 2.0, 0.25)
    assert compose(["model=tiny", "run.ray_address=auto"]).run.ray_address == "auto"


def test_local_default_is_one_client_with_every_core_and_a_private_instance():
    res = plan_resources(run_config(), cpu_count=8, gpu_count=0)
    assert (res.address, res.client_cpus, res.client_gpus) == ("local", 8, 0.0)
    cfg = backend_config(res, verbose=False)
    # "local": never joins RAY_ADDRESS or a cluster started on this machine by accident
    assert cfg["init_args"]["address"] == "local"
    assert (cfg["init_args"]["num_cpus"], cfg["init_args"]["num_gpus"]) == (8, 0)
    assert cfg["client_resources"] == {"num_cpus": 8, "num_gpus": 0.0}
    # Normal priority: Ray would start the client workers at nice 15.
    assert cfg["init_args"]["_system_config"] == {"worker_niceness": 0}


def test_parallel_clients_split_cores_and_the_gpu():
    res = plan_resources(run_config(parallel_clients=4), cpu_count=8, gpu_count=1)
    assert (res.client_cpus, res.client_gpus) == (2.0, 0.25)
    assert clients_that_fit([{"CPU": 8, "GPU": 1}], res.client_cpus, res.client_gpus) == 4


def test_a_gpu_share_alone_splits_the_cores_among_the_clients_it_fits():
    res = plan_resources(run_config(client_gpus=0.25), cpu_count=16, gpu_count=1)
    assert (res.client_cpus, res.client_gpus) == (4.0, 0.25)
    assert clients_that_fit([{"CPU": 16, "GPU": 1}], res.client_cpus, res.client_gpus) == 4
    odd = plan_resources(run_config(parallel_clients=3), cpu_count=16, gpu_count=0)
    assert odd.client_cpus == 5.3333  # rounded down to Ray's unit: three fit in 16 cores
    assert clients_that_fit([{"CPU": 16}], odd.client_cpus, 0) == 3


def test_explicit_shares_bound_how_many_clients_run_at_once():
    res = plan_resources(run_config(client_cpus=1, client_gpus=0.5), cpu_count=8, gpu_count=1)
    assert (res.client_cpus, res.client_gpus) == (1, 0.5)
    assert clients_that_fit([{"CPU": 8, "GPU": 1}], 1, 0.5) == 2   # the GPU bounds it
    assert clients_that_fit([{"CPU": 8}], 1, 0.0) == 8


@pytest.mark.parametrize("run,message", [
    (run_config(client_cpus=16), "run.client_cpus: 16 CPUs per client, but this machine has 8"),
    (run_config(client_gpus=0.5), "run.client_gpus: 0.5 GPUs per client, but 0 usable GPU(s)"),
])
def test_shares_this_machine_cannot_hold_are_refused(run, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_resources(run, cpu_count=8, gpu_count=0)


def test_joining_a_cluster_passes_only_the_address_to_ray_init():
    res = plan_resources(run_config(ray_address="10.0.0.5:6379", client_cpus=4, client_gpus=1),
                         cpu_count=2, gpu_count=0)  # this machine's size does not matter
    cfg = backend_config(res, verbose=True)
    assert cfg["init_args"] == {"address": "10.0.0.5:6379", "logging_level": "ERROR",
                                "log_to_driver": True}  # ray.init refuses sizes when joining
    assert cfg["client_resources"] == {"num_cpus": 4, "num_gpus": 1}
    default = plan_resources(run_config(ray_address="auto"), cpu_count=2, gpu_count=1)
    assert (default.client_cpus, default.client_gpus) == (1.0, 0.0)


def test_clients_fit_node_by_node_not_in_the_pooled_total():
    # 3 CPUs per client: a 2-CPU and a 4-CPU node pool 6 CPUs but hold only one client
    assert clients_that_fit([{"CPU": 2}, {"CPU": 4}], 3, 0) == 1
    assert clients_that_fit([{"CPU": 4}, {"CPU": 4, "GPU": 2}], 1, 0.5) == 4
    assert clients_that_fit([{"CPU": 1}], 0.1, 0) == 10   # no float round-off loss


def test_an_address_where_nothing_listens_is_one_readable_error_not_a_long_retry():
    from fedllm.server.simulation import SimulationResources, join_cluster

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConfigError, match=f"run.ray_address: nothing answers at 127.0.0.1:{port}"):
        join_cluster(SimulationResources(f"127.0.0.1:{port}", 1.0, 0.0), verbose=False)


def test_a_listening_address_passes_the_reachability_check():
    from fedllm.server.simulation import check_reachable

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_reachable(f"127.0.0.1:{server.getsockname()[1]}")  # no error


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("ray") is None, reason="the `ray` CLI is not installed")
def test_simulation_joins_a_two_node_ray_cluster_and_clients_train_on_both(tmp_path):
    from ray_local_cluster import LocalRayCluster

    run_dir = tmp_path / "run"
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    env.pop("RAY_ADDRESS", None)
    with LocalRayCluster(num_cpus=1, timeout=300) as cluster:
        nodes = cluster.node_ids()
        assert set(nodes) == {"head", "node2"}
        # 2 rounds x 4 clients on 2 actors (1 CPU each, one per node): Flower's actor pool
        # hands messages to idle actors in turn, so both nodes train clients.
        proc = subprocess.run(
            [sys.executable, "-m", "fedllm.cli", "simulate", "model=tiny",
             f"run.ray_address={cluster.address}", "run.client_cpus=1",
             "federation.rounds=2", "federation.num_clients=6",
             "federation.clients_per_round=4", f"run.dir={run_dir}"],
            capture_output=True, text=True, timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Joined the Ray cluster" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2] and all(r["num_clients"] == 4 for r in rows)
    placements = [json.loads(line)
                  for line in (run_dir / "placement.jsonl").read_text().splitlines()]
    assert len(placements) == 8
    per_node = {name: sum(p["node_id"] == node for p in placements)
                for name, node in nodes.items()}
    assert per_node["head"] > 0 and per_node["node2"] > 0, per_node
    assert sum(per_node.values()) == 8  # every client ran on this cluster, none elsewhere


def test_local_workers_wait_passively_unless_the_user_chose(monkeypatch):
    from fedllm.server.simulation import local_worker_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert local_worker_env()["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert local_worker_env()["OMP_WAIT_POLICY"] == "ACTIVE"

