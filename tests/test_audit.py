"""`fedllm audit` on a tiny model: DP on and correct stays below the claim; a deliberately
broken mechanism (no noise, or no clipping) is flagged. Each audit takes ~15-25 s on 2 cores."""

import json
import os
import subprocess
import sys

import pytest

from fedllm.config import ConfigError, compose

# Tuned for power at tiny cost: 128 random 8-token canaries, the client holds only canaries,
# q = 1 (full batch), 8 steps, a small claimed epsilon (0.5) and a clip bound far below the
# raw per-sample gradient norms (so that disabling clipping matters).
AUDIT = ["model=tiny", "adapter=lora", "train.seq_len=8", "audit.client_data=false",
         "audit.canaries=128",
         "train.batch_size=1000", "train.physical_batch_size=64", "federation.rounds=2",
         "train.local_steps=4", "privacy.example.target_epsilon=0.5", "train.lr=0.05",
         "privacy.example.max_grad_norm=0.001", "model.device=cpu"]


@pytest.fixture(scope="module")
def loaded():
    from fedllm import models

    return models.build(compose(AUDIT).model, seed=0, device="cpu")


def _audit(loaded, *overrides):
    from fedllm.audit_run import run_audit

    return run_audit(compose([*AUDIT, *overrides]), loaded)


def test_correct_dp_stays_below_the_claimed_epsilon(loaded):
    doc = _audit(loaded)
    assert doc["claimed_epsilon"] == pytest.approx(0.5, abs=0.01)
    assert doc["claimed_mechanism"]["sample_rate"] == 1.0
    assert doc["claimed_mechanism"]["steps"] == 8
    assert doc["ran_mechanism"]["noise_multiplier"] == doc["claimed_mechanism"]["noise_multiplier"]
    assert doc["epsilon_lower_bound"] < doc["claimed_epsilon"]
    assert doc["status"] == "consistent" and not doc["flag"]
    assert doc["canaries"] == 128 and 0 < doc["canaries_included"] < 128
    assert doc["client_sequences"] == doc["canaries_included"]


def test_disabled_clipping_is_flagged(loaded):
    doc = _audit(loaded, "audit.break_mechanism=clipping")
    ran, claimed = doc["ran_mechanism"], doc["claimed_mechanism"]
    # Same noise std z*C as claimed, but no clipping.
    assert ran["noise_multiplier"] * ran["max_grad_norm"] == pytest.approx(
        claimed["noise_multiplier"] * claimed["max_grad_norm"])
    assert doc["epsilon_lower_bound"] > doc["claimed_epsilon"] and doc["flag"]
    assert doc["auc"] > 0.75


def test_disabled_noise_is_flagged_through_the_cli(tmp_path):
    out = tmp_path / "audit"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
         os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "fedllm.cli", "audit", *AUDIT,
                           "audit.break_mechanism=noise", f"run.dir={out}"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]  # 1: flagged
    assert "VIOLATION" in proc.stdout
    doc = json.loads((out / "audit.json").read_text())
    assert doc["flag"] and doc["epsilon_lower_bound"] > doc["claimed_epsilon"] > 0
    assert doc["ran_mechanism"]["noise_multiplier"] == 0.0
    assert doc["method"] == "one_run" and "Steinke" in doc["citation"]
    assert doc["roc"]["fpr"][0] == 0.0 and doc["roc"]["tpr"][-1] == 1.0
    assert (out / "audit_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "audit.html").read_text()
    assert "Empirical privacy audit" in page and "VIOLATION" in page
    assert "audit.break_mechanism=noise" in page and "data:image/png;base64" in page


@pytest.mark.parametrize("overrides,key", [
    (["audit.break_mechanism=sometimes"], "audit.break_mechanism"),
    (["audit.canaries=4"], "audit.canaries"),
    (["audit.runs=3"], "audit.runs"),
    (["audit.confidence=1.0"], "audit.confidence"),
])
def test_bad_audit_keys_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        compose(["model=tiny", *overrides])


def test_audit_needs_example_level_dp(loaded):
    from fedllm.audit_run import run_audit

    with pytest.raises(ConfigError, match="privacy.example.enabled"):
        run_audit(compose(["model=tiny", "privacy=none"]), loaded)


@pytest.mark.slow
def test_multi_run_audit_runs_and_reports(loaded):
    """Multi-run variant (one canary per independent run, Clopper-Pearson threshold test):
    ~1-3 s per run, so only the procedure is checked here, not its (weak, at 40 runs) power."""
    doc = _audit(loaded, "audit.runs=40", "audit.client_data=true", "federation.num_clients=4",
                 "audit.break_mechanism=noise", "train.batch_size=4", "federation.rounds=1",
                 "train.local_steps=2", "train.physical_batch_size=null")
    assert doc["method"] == "multi_run" and doc["canaries"] == 40
    t = doc["test"]
    assert t["tp"] + t["fn"] == doc["canaries_included"] and t["tp"] + t["fn"] + t["fp"] + t["tn"] == 40
    assert 0 <= doc["epsilon_lower_bound"] and doc["flag"] == (
        doc["epsilon_lower_bound"] > doc["claimed_epsilon"])
