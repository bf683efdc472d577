"""Example-level DP + user-level DP + SecAgg+ together, through Flower's simulation runtime."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

BASE = ["model=tiny", "adapter=lora", "train.batch_size=8", "train.lr=2e-3",
        "train.physical_batch_size=null",
        "federation.num_clients=4", "federation.clients_per_round=3",
        "train.local_steps=2", "privacy.example.enabled=true", "privacy.user.enabled=true",
        "secagg.enabled=true", "federation.min_clients=2"]


def simulate(run_dir, *overrides):
    env = dict(os.environ, FLWR_HOME=str(run_dir.parent / "flwr-home"))
    proc = subprocess.run([sys.executable, "-m", "fedllm.cli", "simulate", *BASE, *overrides,
                           f"run.dir={run_dir}"], capture_output=True, text=True, timeout=900,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return json.loads((run_dir / "privacy_report.json").read_text()), rows


def adapter(run_dir):
    from safetensors.numpy import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_all_three_protections_in_one_run(tmp_path):
    report, rows = simulate(tmp_path / "run", "federation.rounds=2",
                            "privacy.user.noise=distributed", "privacy.user.target_epsilon=30")
    assert all(r["num_clients"] == 3 for r in rows)
    ex, user = report["example_level"], report["user_level"]
    assert ex["max_epsilon"] <= 8.0 and len(ex["clients"]) >= 3
    assert user["secure_aggregation"] and user["noise"] == "distributed"
    # 3 of 4 clients per round barely amplifies: the exact unamplified bound (here below the
    # RDP-amplified one) caps the observers' value too.
    assert user["rounds"] == 2 and 0.9 * 30 <= user["epsilon"] <= 30.0
    assert user["tolerated_dropouts"] == 1
    assert rows[-1]["epsilon_user"] == pytest.approx(user["epsilon"], rel=1e-6)
    # Against the server, which knows the cohorts, sampling amplifies nothing.
    assert user["epsilon_vs_server"] >= user["epsilon"] and user["max_rounds_per_client"] in (1, 2)
    assert rows[-1]["epsilon_user_vs_server"] == pytest.approx(user["epsilon_vs_server"], rel=1e-6)
    # Masked uploads are integers: bytes up are the uint32 vectors, not float updates.
    assert rows[0]["bytes_up"] > 0
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    assert "User level" in card and "SecAgg+" in card
    assert f"against it the user-level ε is {user['epsilon_vs_server']:.3g}" in card
    assert "does not hold against a malicious server" in card
    assert all(np.isfinite(v).all() for v in adapter(tmp_path / "run").values())


@pytest.mark.slow
def test_a_client_dropping_mid_round_is_unmasked_around(tmp_path):
    from fedllm.privacy.ledger import ledger_filename

    ledger = tmp_path / "ledger"
    ledger.mkdir()
    # A corrupt ledger makes this client refuse *after* the key exchange: a real dropout.
    (ledger / ledger_filename("hamlet/HAMLET")).write_text("corrupt")
    report, rows = simulate(tmp_path / "run", "federation.rounds=1",
                            "federation.num_clients=3", f"privacy.ledger_dir={ledger}",
                            "privacy.user.noise_multiplier=0.0", "privacy.user.target_epsilon=null")
    assert rows[0]["num_sampled"] == 3 and rows[0]["num_clients"] == 2
    assert rows[0]["num_rejected"] == 0 and rows[0]["num_refused"] == 1
    assert [r["client_id"] for r in report["refused_clients"]] == ["hamlet/HAMLET"]
    assert report["user_level"]["rounds"] == 1  # the survivors' sum was unmasked and applied
    assert "hamlet/HAMLET" not in report["example_level"]["clients"]
    # A wrong unmasking leaves masks in the sum: values ~2^32 quantization steps, far above
    # the clip bound. B started at zero and moved by at most S per round.
    lora_b = [v for k, v in adapter(tmp_path / "run").items() if "lora_B" in k]
    assert max(float(np.abs(v).max()) for v in lora_b) <= 0.5


@pytest.mark.slow
def test_a_nan_update_is_refused_by_its_client_and_the_round_goes_on(tmp_path):
    report, rows = simulate(tmp_path / "run", "federation.rounds=1",
                            "federation.clients_per_round=4", "privacy.example.enabled=false",
                            "privacy.user.noise_multiplier=0.0", "privacy.user.target_epsilon=null",
                            "faults.nan_clients=['antony-and-cleopatra/MARK ANTONY']")
    assert rows[0]["num_sampled"] == 4 and rows[0]["num_clients"] == 3
    assert rows[0]["num_rejected"] == 1 and rows[0]["aggregate_discarded"] is None
    assert report["user_level"]["rounds"] == 1  # the other three were unmasked and applied
    lora_b = [v for k, v in adapter(tmp_path / "run").items() if "lora_B" in k]
    assert max(float(np.abs(v).max()) for v in lora_b) <= 0.5


@pytest.mark.slow
def test_a_client_vanishing_after_its_masked_input_is_unmasked_without_it(tmp_path):
    """Drill: a client sends its masked input, then drops before revealing any share. Its
    neighbours' shares still remove its self mask, so its input stays in the sum."""
    report, rows = simulate(tmp_path / "run", "federation.rounds=1", "federation.num_clients=3",
                            "privacy.user.noise_multiplier=0.0", "privacy.user.target_epsilon=null",
                            "faults.unmask_drop_clients=['hamlet/HAMLET']")
    assert rows[0]["num_sampled"] == 3 and rows[0]["num_clients"] == 3
    assert rows[0]["num_rejected"] == 1 and rows[0]["aggregate_discarded"] is None
    assert report["user_level"]["rounds"] == 1
    lora_b = [v for k, v in adapter(tmp_path / "run").items() if "lora_B" in k]
    assert max(float(np.abs(v).max()) for v in lora_b) <= 0.5
