"""A real two-node Ray cluster on this one machine, for tests and benchmarks of
``run.ray_address`` (docs/scale-out.md).

``ray start --head`` plus a second ``ray start --address HEAD`` with its own resources
(``{"node2": 1}``), each with ``num_cpus`` CPUs, in a private temp dir and on free ports, so that
it never meets another Ray instance on the machine. Stopping does not use ``ray stop``, which
stops *every* Ray process of the machine: it ends exactly the processes of this cluster (those
whose command line names its temp dir or its head address, and their descendants), by pid.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from process_tree import process_trees, stop  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalRayCluster:
    """Context manager: ``with LocalRayCluster() as cluster: ... cluster.address ...``."""

    def __init__(self, num_cpus: int = 1, timeout: float = 300.0):
        self.num_cpus = num_cpus
        self.timeout = timeout
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        # Short path: Ray's unix sockets live under it (limit ~107 characters).
        self.temp_dir = tempfile.mkdtemp(prefix="fedllm-ray-", dir="/tmp")
        self.log = Path(self.temp_dir) / "ray-start.log"

    def __enter__(self) -> "LocalRayCluster":
        try:
            self._ray_start("--head", f"--port={self.port}", "--include-dashboard=false",
                            f"--ray-client-server-port={free_port()}")
            self._ray_start(f"--address={self.address}", '--resources={"node2": 1}')
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _ray_start(self, *args: str) -> None:
        cmd = ["ray", "start", *args, f"--num-cpus={self.num_cpus}", "--num-gpus=0",
               f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
               "--dashboard-agent-listen-port=0", "--object-store-memory=200000000"]
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        with open(self.log, "a") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                  timeout=self.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                               f"{self.log.read_text()[-3000:]}")

    def node_ids(self) -> dict[str, str]:
        """{"head": node id, "node2": node id} of the two alive nodes (asked from a separate
        driver process, so the caller's process never holds a Ray connection)."""
        script = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                  "print(json.dumps({('node2' if 'node2' in n['Resources'] else 'head'): "
                  "n['NodeID'] for n in ray.nodes() if n['Alive']}))" % self.address)
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              env=env, timeout=self.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"could not list the cluster's nodes: {proc.stderr[-2000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        """End this cluster's processes (SIGTERM, then SIGKILL after 15 s); remove its dir."""
        stop(self._own_pids())
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _own_pids(self) -> list[int]:
        """This cluster's processes: command line names its temp dir or its head's port (the
        GCS, raylets, the Ray client server), plus all their descendants (workers, agents)."""
        return process_trees(re.escape(self.temp_dir) + "|:" + str(self.port) + r"\b")
