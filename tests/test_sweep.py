"""Sweeps: `fedllm simulate -m key=a,b` runs the cartesian product, then a comparison table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedllm.config import ConfigError
from fedllm.multirun import budget_refusal, check_points, plan_sweep, point_config

TINY_RUN = ["model=tiny", "federation.rounds=1", "federation.num_clients=2",
            "federation.clients_per_round=2"]


def cli(*args, tmp_path, timeout=900):
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr-home"))
    return subprocess.run([sys.executable, "-m", "fedllm.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_plan_is_the_cartesian_product_with_one_run_dir_per_point(tmp_path):
    points = plan_sweep(["model=tiny", "adapter=lora,prompt_tuning", "train.lr=range(1,4)",
                         f"run.dir={tmp_path / 'sw'}"])
    assert len(points) == 6
    assert [p.swept for p in points[:4]] == [
        {"adapter": "lora", "train.lr": "1"}, {"adapter": "lora", "train.lr": "2"},
        {"adapter": "lora", "train.lr": "3"}, {"adapter": "prompt_tuning", "train.lr": "1"}]
    assert points[0].overrides == ["model=tiny", "adapter=lora", "train.lr=1"]
    assert len({p.run_dir for p in points}) == 6
    assert all(p.run_dir.parent == (tmp_path / "sw").resolve() for p in points)
    assert points[5].run_dir.name == "5_adapter-prompt_tuning_lr-3"
    # A list or a quoted string with a comma is one value, not a sweep (Hydra's grammar).
    single = plan_sweep(["faults.nan_clients=['a/b','c/d']", "data.path='x,y'"])
    assert len(single) == 1 and single[0].swept == {}


@pytest.mark.parametrize("overrides,message", [
    (["run.dir=a,b"], "run.dir: cannot be swept"),
    (["run.id=x"], "run.id: cannot be set in a sweep"),
    (["run.resume=true"], "run.resume: cannot be set in a sweep"),
    (["train.lr=1,"], "train.lr=1,: not a valid override"),
])
def test_plan_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        plan_sweep(overrides)
    assert message in str(info.value)


def test_every_point_is_composed_before_any_runs(tmp_path):
    points = plan_sweep(["model=tiny", "train.lr=0.1,-1", f"run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match="sweep point 1_lr--1: train.lr"):
        check_points(points)


def test_points_share_the_sweeps_ledger_unless_ledger_dir_is_set(tmp_path):
    points = plan_sweep(["model=tiny", "train.lr=0.1,0.2", f"run.dir={tmp_path / 'sw'}"])
    ledgers = {point_config(p).privacy.ledger_dir for p in points}
    assert ledgers == {str((tmp_path / "sw" / "ledger").resolve())}
    own = plan_sweep(["model=tiny", "train.lr=0.1,0.2", f"privacy.ledger_dir={tmp_path / 'l'}",
                      f"run.dir={tmp_path / 'sw'}"])
    assert {point_config(p).privacy.ledger_dir for p in own} == {str(tmp_path / "l")}


def test_a_budget_decline_is_the_points_one_line_error():
    class Result:
        privacy = {"example_level": {"exhausted_clients": [
            {"client_id": "hamlet/HAMLET", "round": 1,
             "reason": "budget: lifetime epsilon would reach 8.1 > privacy.budget=5 (spent 1.6)"}]}}

    line = budget_refusal(Result())
    assert line.startswith("refused by the lifetime budget: 1 participation(s) declined")
    assert "privacy.budget=5" in line and "\n" not in line
    Result.privacy = {"example_level": {"exhausted_clients": []}}
    assert budget_refusal(Result()) is None
    Result.privacy = {"example_level": None}  # no example-level DP
    assert budget_refusal(Result()) is None


def test_sweep_refuses_a_typo_before_any_run(tmp_path):
    proc = cli("simulate", "-m", *TINY_RUN, "train.lr=0.1,-1", f"run.dir={tmp_path / 'sw'}",
               tmp_path=tmp_path, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "fedllm: error: sweep point 1_lr--1: train.lr" in proc.stderr
    assert not (tmp_path / "sw").exists()


def test_failed_points_are_rows_of_the_table_and_exit_1(tmp_path):
    """Infeasible points fail in the preflight (no training); the sweep records each."""
    sweep_dir = tmp_path / "sw"
    proc = cli("simulate", "--multirun", *TINY_RUN, "privacy.example.target_epsilon=1e-9,1e-8",
               f"run.dir={sweep_dir}", tmp_path=tmp_path, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    key = "privacy.example.target_epsilon"
    assert [float(r["swept"][key]) for r in doc["runs"]] == [1e-9, 1e-8]
    assert all("privacy.example.target_epsilon" in r["error"] for r in doc["runs"])
    assert all(r["final_perplexity"] is None for r in doc["runs"])
    table = (sweep_dir / "sweep.md").read_text()
    assert table.count("| failed |") == 2


def test_python_sweep_returns_one_row_per_point(tmp_path, monkeypatch):
    import fedllm

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    rows = fedllm.sweep([*TINY_RUN, "privacy.example.target_epsilon=1e-9,1e-8"],
                        sweep_dir=tmp_path / "sw")
    assert [row.point.swept for row in rows] == [{"privacy.example.target_epsilon": "1e-09"},
                                                 {"privacy.example.target_epsilon": "1e-08"}]
    assert all(row.result is None and "target_epsilon" in row.error for row in rows)
    doc = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["run_dir"] for r in doc["runs"]] == [str(row.point.run_dir) for row in rows]


@pytest.mark.slow  # two tiny simulations in a subprocess
def test_two_point_sweep_writes_two_runs_and_a_comparison_table(tmp_path):
    sweep_dir = tmp_path / "sw"
    proc = cli("simulate", "-m", *TINY_RUN, "privacy.example.target_epsilon=4,8",
               f"run.dir={sweep_dir}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dirs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit())
    assert [p.name for p in run_dirs] == ["0_target_epsilon-4", "1_target_epsilon-8"]
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert doc["swept_keys"] == ["privacy.example.target_epsilon"] and doc["points"] == 2
    assert doc["fixed_overrides"] == TINY_RUN
    for row, run_dir, target in zip(doc["runs"], run_dirs, (4.0, 8.0), strict=True):
        summary = json.loads((run_dir / "summary.json").read_text())
        assert row["error"] is None and row["run_dir"] == str(run_dir)
        assert row["final_perplexity"] == summary["final_perplexity"]
        assert row["epsilon_max"] == summary["epsilon_example_max"]
        assert 0.9 * target <= row["epsilon_max"] <= target  # each run spent its own target
        assert (run_dir / "adapter" / "adapter_config.json").is_file()
    table = (sweep_dir / "sweep.md").read_text().splitlines()
    assert table[2].startswith("| privacy.example.target_epsilon | final perplexity")
    body = [line for line in table[4:] if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in body] == ["| 4", "| 8"]
    assert all(str(d) in line for line, d in zip(body, run_dirs, strict=True))
    assert "fedllm sweep" in proc.stdout and proc.stdout.count("fedllm run summary") == 2


@pytest.mark.slow  # three tiny simulations in a subprocess
def test_points_compose_in_one_ledger_and_the_budget_refuses_a_point(tmp_path):
    """Every point's releases go to <sweep dir>/ledger; privacy.budget covers the sweep: the
    third point (target 8 after 1 and 1.5) would take the clients past 5, so it is refused."""
    from fedllm.privacy.accounting import epsilon
    from fedllm.privacy.ledger import read_ledger_dir

    sweep_dir = tmp_path / "sw"
    proc = cli("simulate", "-m", *TINY_RUN, "privacy.example.target_epsilon=1,1.5,8",
               "privacy.budget=5", f"run.dir={sweep_dir}", tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    doc = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["error"] is None for r in doc["runs"]] == [True, True, False]
    assert doc["runs"][2]["error"].startswith("refused by the lifetime budget")
    assert "privacy.budget=5" in doc["runs"][2]["error"]
    assert "\n" not in doc["runs"][2]["error"]
    assert "| failed |" in (sweep_dir / "sweep.md").read_text()

    ledgers = read_ledger_dir(sweep_dir / "ledger")
    assert len(ledgers) == 2
    assert not any((Path(r["run_dir"]) / "ledger").exists() for r in doc["runs"])
    for cid, entries in ledgers.items():
        trained = [e for e in entries if e.purpose == "train"]
        assert len({e.run_id for e in trained}) == 2  # the first two points, composed
        assert len([e for e in entries if e.purpose == "size"]) == 1
        lifetime = epsilon([e.event for e in entries], 1e-5)
        assert 1.5 < lifetime <= 5
        for row in doc["runs"][:2]:
            report = json.loads((Path(row["run_dir"]) / "privacy_report.json").read_text())
            assert report["example_level"]["clients"][cid]["epsilon"] < lifetime
