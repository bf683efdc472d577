"""End to end through Flower's simulation runtime (real Ray backend, real apps)."""

import json
import os
import subprocess
import sys

import pytest
import torch


def run_simulate(run_dir, *overrides, timeout=900):
    env = dict(os.environ, FLWR_HOME=str(run_dir.parent / "flwr-home"))
    return subprocess.run(
        [sys.executable, "-m", "fedllm.cli", "simulate", *overrides, f"run.dir={run_dir}"],
        capture_output=True, text=True, timeout=timeout, env=env)


def check_contract_files(run_dir, rounds):
    for name in ("config.yaml", "metrics.jsonl", "privacy_report.json", "adapter/README.md",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (run_dir / name).is_file(), name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    for key in ("round", "eval_loss", "perplexity", "num_clients", "bytes_up",
                "bytes_down", "seconds", "epsilon_example_max", "epsilon_user"):
        assert all(key in r for r in rows), key
    return rows


def exported_adapter_eval_loss(run_dir) -> float:
    """Held-out loss of the run's exported adapter, loaded with PEFT onto a fresh base model."""
    from peft import PeftModel

    from fedllm import models
    from fedllm.config import from_yaml, min_client_sequences
    from fedllm.data.federated import build_federated_data
    from fedllm.evaluate import evaluate

    cfg = from_yaml((run_dir / "config.yaml").read_text())
    tok = models.load_tokenizer(cfg.model)
    base = models.load_base_model(cfg.model, vocab_size=len(tok), seed=cfg.run.seed)
    model = PeftModel.from_pretrained(base, run_dir / "adapter")
    data = build_federated_data(cfg.data, tok, seq_len=cfg.train.seq_len,
                                min_sequences=min_client_sequences(cfg),
                                num_clients=cfg.federation.num_clients, seed=cfg.run.seed)
    return evaluate(model, data.eval_sequences(cfg.eval.max_sequences), cfg.eval.batch_size,
                    torch.device("cpu"))["eval_loss"]


def test_tiny_simulation_writes_contract_files_and_adapter_reproduces_eval(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_simulate(run_dir, "model=tiny", "federation.rounds=2", "federation.num_clients=4",
                        "federation.clients_per_round=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = check_contract_files(run_dir, 2)
    assert all(r["num_clients"] == 2 for r in rows)
    import stat  # the run directory holds the clients' text caches and privacy records
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((run_dir / "privacy_events.jsonl").stat().st_mode) == 0o600
    skipped = json.loads((run_dir / "skipped_clients.json").read_text())
    assert len(skipped) > 1000 and proc.stdout.count("Skipped ") == 1  # named once, not per process

    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["delta"] == 1e-5 and report["accountant"] == "pld"
    ex = report["example_level"]
    assert report["user_level"] is None
    # Budget-exact calibration: 2 rounds x 2 of 4 clients gives a cap of one participation,
    # so every client trains exactly once and spends its target (within 10% below, never above).
    assert sorted(ex["clients"]) == sorted(set(ex["clients"])) and len(ex["clients"]) == 4
    assert all(c["rounds"] == 1 for c in ex["clients"].values())
    assert all(0.9 * 8.0 <= c["epsilon"] <= 8.0 for c in ex["clients"].values())
    from fedllm.config import from_yaml
    run_cfg = from_yaml((run_dir / "config.yaml").read_text())
    assert run_cfg.privacy.example.max_participations == 1
    # The reported epsilon is recomputed from the reported mechanism, and meets the target.
    from fedllm.privacy.accounting import PrivacyEvent, epsilon
    from fedllm.privacy.size_estimate import size_event
    for client in ex["clients"].values():
        event = PrivacyEvent(noise_multiplier=client["noise_multiplier"], steps=client["steps"],
                             sample_rate=client["sample_rate"])
        # ... composed with the client's one DP size estimate, which its q comes from.
        size = size_event(run_cfg.privacy.example.size_noise)
        assert client["epsilon"] == pytest.approx(epsilon([size, event], 1e-5), rel=1e-6)
        assert client["epsilon"] <= 8.0
        assert client["steps"] == client["rounds"] * run_cfg.train.local_steps
    assert ex["max_epsilon"] == pytest.approx(max(c["epsilon"] for c in ex["clients"].values()))
    assert rows[-1]["epsilon_example_max"] == pytest.approx(ex["max_epsilon"])
    card = (run_dir / "adapter" / "README.md").read_text()
    assert "Unit of privacy" in card and f"{ex['max_epsilon']:.3g}" in card
    assert "## Threat model" in card and "at most 1 of 2 rounds" in card

    # The exported adapter loads with PEFT and reproduces the reported held-out loss.
    assert exported_adapter_eval_loss(run_dir) == pytest.approx(rows[-1]["eval_loss"], abs=1e-4)


def test_tiny_simulation_without_dp(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_simulate(run_dir, "model=tiny", "privacy=none", "strategy=fedadam",
                        "federation.rounds=1",
                        "federation.num_clients=3", "federation.clients_per_round=3",
                        "train.local_steps=2", "run.client_niceness=7")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = check_contract_files(run_dir, 1)
    # The clients ran at the priority the config set, relative to fedllm's own (Ray's default
    # would add 15).
    placements = [json.loads(x) for x in (run_dir / "placement.jsonl").read_text().splitlines()]
    expected = min(19, os.nice(0) + 7)
    assert len(placements) == 3 and {p["niceness"] for p in placements} == {expected}
    # ... and their OpenMP threads sleep at barriers rather than spin (server/simulation.py
    # local_worker_env: spinning threads slow a run next to any busy process).
    assert {p["omp_wait_policy"] for p in placements} == {"PASSIVE"}
    assert rows[0]["epsilon_example_max"] is None
    # Wire bytes count whole serialized messages: the adapter payload plus the resolved
    # config that travels with every instruction.
    config_bytes = len((run_dir / "config.yaml").read_bytes())
    assert rows[0]["wire_bytes_down"] >= rows[0]["bytes_down"] + 3 * config_bytes
    assert rows[0]["bytes_up"] > 0 and rows[0]["wire_bytes_up"] > rows[0]["bytes_up"]
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["example_level"] is None
    assert "without differential privacy" in (run_dir / "adapter" / "README.md").read_text()
    # The clients' ledgers still record these participations, as epsilon = inf: a later run
    # that shares the ledger (or a site budget) sees that this data was used without DP.
    from fedllm.privacy.accounting import epsilon
    from fedllm.privacy.ledger import read_ledger_dir
    ledgers = read_ledger_dir(run_dir / "ledger")
    assert len(ledgers) == 3
    assert all(len(e) == 1 and epsilon([x.event for x in e], 1e-5) == float("inf")
               for e in ledgers.values())


@pytest.mark.slow
def test_smollm2_simulation(tmp_path):
    """The real bundled model: a short DP run that must lower held-out loss."""
    run_dir = tmp_path / "run"
    proc = run_simulate(run_dir, "federation.rounds=1", "federation.num_clients=20",
                        "federation.clients_per_round=2", "train.local_steps=2",
                        "eval.max_sequences=16", timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = check_contract_files(run_dir, 1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["base_perplexity"] < 1000  # a real pretrained model, not random init
    assert summary["epsilon_example_max"] <= 8.0
    assert rows[0]["num_clients"] == 2


def test_clients_refuse_participations_beyond_their_cap(tmp_path):
    """User-level DP keeps every client in the sampling pool (q = k/N exactly), so the server
    asks capped clients again: their ledgers refuse, the report lists the refusals, and no
    client's epsilon exceeds the target."""
    run_dir = tmp_path / "run"
    proc = run_simulate(run_dir, "model=tiny", "federation.rounds=2", "federation.num_clients=2",
                        "federation.clients_per_round=2", "train.local_steps=1",
                        "privacy.example.max_participations=1", "privacy.user.enabled=true",
                        "privacy.user.noise_multiplier=1.0")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = check_contract_files(run_dir, 2)
    assert [r["num_clients"] for r in rows] == [2, 0]
    assert rows[1]["num_declined"] == 2
    events = [json.loads(x) for x in (run_dir / "privacy_events.jsonl").read_text().splitlines()]
    declined = [e for e in events if e["kind"] == "declined"]
    assert len(declined) == 2 and all("participation cap" in e["reason"] for e in declined)
    ex = json.loads((run_dir / "privacy_report.json").read_text())["example_level"]
    assert all(0.9 * 8.0 <= c["epsilon"] <= 8.0 and c["rounds"] == 1
               for c in ex["clients"].values())
