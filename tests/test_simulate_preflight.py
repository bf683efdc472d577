"""`fedllm simulate` rejects impossible runs before any training (data- and privacy-aware)."""

import subprocess
import sys

import pytest


def simulate(*overrides, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "fedllm.cli", "simulate", "model=tiny",
         f"run.dir={tmp_path / 'run'}", *overrides],
        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("overrides,key", [
    (["train.batch_size=100000"], "train.batch_size"),
    (["federation.num_clients=100000"], "federation.num_clients"),
    (["privacy.example.target_epsilon=1e-9"], "privacy.example.target_epsilon"),
    (["federation.rounds=-1"], "federation.rounds"),
    (["model.path=/missing"], "model.path /missing does not exist"),
    (["faults.nan_clients=['hamlet/NOBODY']"], "faults.nan_clients: ['hamlet/NOBODY'] not among"),
])
def test_preflight_errors(overrides, key, tmp_path):
    proc = simulate(*overrides, tmp_path=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert key in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
