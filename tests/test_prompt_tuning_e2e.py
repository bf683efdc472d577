"""Prompt tuning end to end through Flower's simulation runtime (real Ray backend, real apps):
example-level DP-SGD, user-level DP with distributed noise and SecAgg+ in one tiny run; the
exported adapter loads with PEFT and reproduces the reported held-out loss."""

import json
import subprocess
import sys

import numpy as np
import pytest

from test_e2e_simulate import check_contract_files, exported_adapter_eval_loss, run_simulate


def test_tiny_prompt_tuning_with_all_protections(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_simulate(run_dir, "model=tiny", "adapter=prompt_tuning",
                        "model.prompt_tuning.num_virtual_tokens=4", "federation.rounds=2",
                        "federation.num_clients=4", "federation.clients_per_round=3",
                        "train.local_steps=2", "privacy.user.enabled=true",
                        "privacy.user.noise_multiplier=0.5", "privacy.user.noise=distributed",
                        "secagg=secaggplus", "federation.min_clients=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = check_contract_files(run_dir, 2)
    assert all(r["num_clients"] == 3 for r in rows)

    report = json.loads((run_dir / "privacy_report.json").read_text())
    ex, user = report["example_level"], report["user_level"]
    assert ex["max_epsilon"] <= 8.0 and len(ex["clients"]) >= 3
    assert all(c["steps"] == c["rounds"] * 2 for c in ex["clients"].values())
    assert user["secure_aggregation"] and user["rounds"] == 2 and user["epsilon"] > 0
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "prompt-tuning adapter (4 virtual tokens" in card and "SecAgg+" in card
    assert "prompt-tuning adapter" in (run_dir / "privacy_report.html").read_text()
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "PROMPT_TUNING" and adapter_cfg["num_virtual_tokens"] == 4

    from safetensors.numpy import load_file

    from fedllm import models
    from fedllm.config import from_yaml

    cfg = from_yaml((run_dir / "config.yaml").read_text())
    tok = models.load_tokenizer(cfg.model)
    base = models.load_base_model(cfg.model, vocab_size=len(tok), seed=cfg.run.seed)
    initial = models.attach_adapter(base, cfg.model, seed=cfg.run.seed)
    start = models.adapter_state(initial)["prompt_embeddings"]
    exported = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert list(exported) == ["prompt_embeddings"] and exported["prompt_embeddings"].shape == (4, 64)
    # Each round moves the prompt by the clipped average (<= S) plus the sum's noise / cohort
    # (norm ~ z*S*sqrt(d)/3; 2x slack): a masked or unclipped sum would land far outside.
    u, d = cfg.privacy.user, exported["prompt_embeddings"].size
    moved = float(np.linalg.norm(exported["prompt_embeddings"] - start))
    assert 0 < moved < 2 * (u.clip_norm + 2 * u.noise_multiplier * u.clip_norm * np.sqrt(d) / 3)

    assert exported_adapter_eval_loss(run_dir) == pytest.approx(rows[-1]["eval_loss"], abs=1e-4)

    # `fedllm audit run.dir=RUN` audits the run's own saved settings (prompt tuning here) and
    # adds its section to that run's privacy report (reusing this run saves a simulation).
    proc = subprocess.run([sys.executable, "-m", "fedllm.cli", "audit", f"run.dir={run_dir}",
                           "audit.canaries=16"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    audit = json.loads((run_dir / "audit.json").read_text())
    assert audit["adapter"] == "prompt_tuning" and audit["canaries"] == 16
    assert audit["claimed_mechanism"]["steps"] == 4 and not audit["flag"]
    page = (run_dir / "privacy_report.html").read_text()
    assert "Empirical privacy audit" in page and "Per-client privacy loss" in page
    from fedllm.cli import _audit_config
    from fedllm.config import ConfigError

    with pytest.raises(ConfigError, match="train.lr"):  # would change what is audited
        _audit_config([f"run.dir={run_dir}", "train.lr=1"])
