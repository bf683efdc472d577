"""Ledgers across runs, stop-at-budget, and the JSON/HTML/PNG reports, through real simulations."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fedllm.privacy.accounting import PrivacyEvent, epsilon
from fedllm.privacy.ledger import read_ledger_dir

TINY = ["model=tiny", "adapter=lora", "train.batch_size=8", "train.lr=2e-3",
        "train.physical_batch_size=null",
        "federation.num_clients=2", "federation.clients_per_round=2",
        "train.local_steps=2"]


def simulate(run_dir, *overrides):
    env = dict(os.environ, FLWR_HOME=str(run_dir.parent / "flwr-home"))
    proc = subprocess.run(
        [sys.executable, "-m", "fedllm.cli", "simulate", *TINY, *overrides, f"run.dir={run_dir}"],
        capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stdout + proc.stderr)
    return json.loads((run_dir / "privacy_report.json").read_text())


def proc_log(run_dir):
    return (run_dir.parent / f"{run_dir.name}.log").read_text()


def releases(run_dir):
    lines = (run_dir / "privacy_events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["kind"] == "release"]


def event(r):
    return PrivacyEvent(noise_multiplier=r["noise_multiplier"], steps=r["steps"],
                        sample_rate=r["sample_rate"])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ledger")
    ledger = base / "ledger"
    first = simulate(base / "run1", "federation.rounds=1", f"privacy.ledger_dir={ledger}")
    first_ledgers = {k: list(v) for k, v in read_ledger_dir(ledger).items()}
    second = simulate(base / "run2", "federation.rounds=1", f"privacy.ledger_dir={ledger}")
    return base, ledger, first, first_ledgers, second


@pytest.mark.slow
def test_lifetime_epsilon_composes_both_runs(two_runs):
    base, ledger, first, first_ledgers, second = two_runs
    final = read_ledger_dir(ledger)
    assert set(final) == set(first_ledgers) and len(final) == 2
    all_releases = releases(base / "run1") + releases(base / "run2")
    for cid, entries in final.items():
        trains = [e for e in entries if e.purpose == "train"]
        sizes = [e for e in entries if e.purpose == "size"]
        assert len(trains) == 2 and len({e.run_id for e in trains}) == 2
        assert len(sizes) == 1  # one DP size estimate per dataset, reused by the second run
        mine = [event(r) for r in all_releases if r["client_id"] == cid]
        expected = epsilon([sizes[0].event, *mine], 1e-5)
        lifetime_1 = first["example_level"]["clients"][cid]["lifetime_epsilon"]
        lifetime_2 = second["example_level"]["clients"][cid]["lifetime_epsilon"]
        assert lifetime_2 > lifetime_1
        assert lifetime_2 == pytest.approx(expected, rel=1e-6)
        # The run-level epsilon of the second run covers that run only.
        assert second["example_level"]["clients"][cid]["epsilon"] < lifetime_2


@pytest.mark.slow
def test_report_is_rebuilt_from_run_files(two_runs):
    base = two_runs[0]
    run = base / "run2"
    original = json.loads((run / "privacy_report.json").read_text())
    for name in ("privacy_report.json", "privacy_report.html", "epsilon.png"):
        (run / name).unlink()
    proc = subprocess.run([sys.executable, "-m", "fedllm.cli", "report", str(run)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "privacy_report.json").read_text()) == original
    assert (run / "epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "fedllm.cli", "report", str(base / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_html_report_renders_in_headless_browser(two_runs):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (installed by .ci/run)")
        pytest.skip("chromium not installed")
    page = two_runs[0] / "run2" / "privacy_report.html"
    proc = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={two_runs[0] / 'chrome'}", "--dump-dom",
         page.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    assert '<table id="clients">' in dom
    report = json.loads((two_runs[0] / "run2" / "privacy_report.json").read_text())
    for cid in report["example_level"]["clients"]:
        assert f"<td>{cid}</td>" in dom
    assert "data:image/png;base64," in dom
    assert "Uncaught" not in proc.stderr


@pytest.mark.slow
def test_budget_stops_clients_in_round_two_and_run_completes(tmp_path):
    # Round 1 costs each client about 6.8-7 (target 8 over 2 rounds); round 2 would reach ~8.
    report = simulate(tmp_path / "run", "federation.rounds=2", "privacy.budget=7.5")
    ex = report["example_level"]
    assert ex["budget"] == 7.5
    exhausted = ex["exhausted_clients"]
    assert {d["round"] for d in exhausted} == {2} and len(exhausted) == 2
    assert all("privacy.budget" in d["reason"] for d in exhausted)
    for client in ex["clients"].values():
        assert client["rounds"] == 1 and client["lifetime_epsilon"] <= 7.5
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[1]["num_declined"] == 2 and rows[1]["num_clients"] == 0
    html = (tmp_path / "run" / "privacy_report.html").read_text()
    assert "Clients stopped by their budget" in html
    assert "Budget" in (tmp_path / "run" / "adapter" / "README.md").read_text()


@pytest.mark.slow
def test_corrupt_ledger_client_refuses_and_round_continues(tmp_path):
    from fedllm.privacy.ledger import ledger_filename

    ledger = tmp_path / "ledger"
    ledger.mkdir()
    (ledger / ledger_filename("hamlet/HAMLET")).write_text("{not json")
    report = simulate(tmp_path / "run", "federation.rounds=1", f"privacy.ledger_dir={ledger}")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["num_sampled"] == 2 and rows[0]["num_clients"] == 1
    # Refused, with the reason, not a generic rejection (no client traceback in the log).
    assert rows[0]["num_rejected"] == 0 and rows[0]["num_refused"] == 1
    [refusal] = report["refused_clients"]
    assert refusal["client_id"] == "hamlet/HAMLET" and refusal["round"] == 1
    assert refusal["reason"].startswith("ledger: privacy ledger")
    assert "unreadable" in refusal["reason"]
    assert "Clients that refused to train" in (tmp_path / "run" / "privacy_report.html").read_text()
    assert "Traceback" not in proc_log(tmp_path / "run")
    assert "hamlet/HAMLET" not in report["example_level"]["clients"]
    assert (ledger / ledger_filename("hamlet/HAMLET")).read_text() == "{not json"  # untouched
