"""Run directory files: JSON lines tolerate only a torn last line; one run per directory."""

import json
import logging
import os
import subprocess
import sys

import pytest

from fedllm.io import JsonlError, append_jsonl, read_jsonl


def write_lines(path, lines, end=b"\n"):
    path.write_bytes(b"\n".join(lines) + end)


RECORDS = [json.dumps({"kind": "release", "round": r}).encode() for r in (1, 2, 3)]


def test_a_torn_last_line_is_skipped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "events.jsonl"
    write_lines(path, RECORDS + [b'{"kind": "rel'], end=b"")
    with caplog.at_level(logging.WARNING):
        assert [r["round"] for r in read_jsonl(path)] == [1, 2, 3]
    assert "torn last line" in caplog.text and "events.jsonl:4" in caplog.text


@pytest.mark.parametrize("damage", [b'{"kind": "rel', b"", b"12", b"\xff\xfe binary",
                                    b'{"kind": "release", "round": 2}{"x"'])
def test_a_damaged_middle_line_raises_naming_file_and_line(tmp_path, damage):
    path = tmp_path / "events.jsonl"
    write_lines(path, [RECORDS[0], damage, RECORDS[2]])
    with pytest.raises(JsonlError, match=r"events\.jsonl:2: damaged line"):
        read_jsonl(path)


def test_a_damaged_last_line_with_its_newline_is_not_a_torn_write(tmp_path):
    path = tmp_path / "events.jsonl"
    write_lines(path, RECORDS[:2] + [b'{"kind": "rel'])
    with pytest.raises(JsonlError, match=r":3:"):
        read_jsonl(path)


def test_append_after_a_torn_line_cuts_it_off(tmp_path):
    path = tmp_path / "events.jsonl"
    write_lines(path, RECORDS + [b'{"kind": "rel'], end=b"")
    append_jsonl(path, {"kind": "release", "round": 4})
    assert [r["round"] for r in read_jsonl(path)] == [1, 2, 3, 4]
    assert path.read_bytes().endswith(b"\n")


def test_append_keeps_a_complete_last_record_without_newline(tmp_path):
    path = tmp_path / "events.jsonl"
    write_lines(path, RECORDS, end=b"")
    append_jsonl(path, {"kind": "release", "round": 4})
    assert [r["round"] for r in read_jsonl(path)] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- fedllm report

def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "fedllm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def hand_made_run(run_dir, rounds=4):
    """A run directory as `fedllm simulate` leaves it: one client released in every round."""
    from fedllm.config import compose, to_yaml

    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(compose(["model=tiny"])))
    for rnd in range(1, rounds + 1):
        append_jsonl(run_dir / "metrics.jsonl", {"round": rnd, "num_clients": 1, "train_loss": 1.0,
                                                 "eval_loss": 1.0, "perplexity": 2.7})
        append_jsonl(run_dir / "privacy_events.jsonl", {
            "kind": "release", "round": rnd, "client_id": "hamlet/HAMLET",
            "noise_multiplier": 1.0, "steps": 3, "sampling": "poisson", "sample_rate": 0.1,
            "max_grad_norm": 1.0, "lifetime_epsilon": None})
    return run_dir


def test_report_refuses_a_damaged_events_file(tmp_path):
    run_dir = hand_made_run(tmp_path / "run")
    assert cli("report", str(run_dir)).returncode == 0
    events = run_dir / "privacy_events.jsonl"
    lines = events.read_bytes().split(b"\n")
    lines[1] = lines[1][:20]  # damage round 2's release: dropping it would lower epsilon
    events.write_bytes(b"\n".join(lines))
    proc = cli("report", str(run_dir))
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert f"{events}:2: damaged line" in err


def test_report_accepts_a_torn_last_line(tmp_path):
    run_dir = hand_made_run(tmp_path / "run")
    events = run_dir / "privacy_events.jsonl"
    events.write_bytes(events.read_bytes() + b'{"kind": "release", "rou')
    proc = cli("report", str(run_dir))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["example_level"]["clients"]["hamlet/HAMLET"]["steps"] == 12


def test_resume_refuses_a_damaged_events_file(tmp_path):
    run_dir = hand_made_run(tmp_path / "run")
    events = run_dir / "privacy_events.jsonl"
    lines = events.read_bytes().split(b"\n")
    lines[2] = b"garbage"
    events.write_bytes(b"\n".join(lines))
    proc = cli("resume", str(run_dir))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"run.resume: {events}:3: damaged line" in proc.stderr


# ----------------------------------------------------------------------------- run directory lock

HOLD = ("import sys, time; from fedllm.io import run_dir_lock\n"
        "with run_dir_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(900)")  # killed by the test


def test_a_second_run_on_a_busy_run_dir_is_refused_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = cli("simulate", "model=tiny", "federation.rounds=1", f"run.dir={run_dir}")
        assert proc.returncode == 2, proc.stderr[-2000:]
        err = proc.stderr.strip()
        assert "\n" not in err and "Traceback" not in err
        assert f"run.dir {run_dir} is in use by another fedllm run (pid {holder.pid})" in err
        assert not (run_dir / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    from fedllm.io import RunDirBusy, run_dir_lock

    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirBusy):
        with run_dir_lock(run_dir):
            pass
    holder.kill()  # SIGKILL: no cleanup; the kernel drops the lock
    holder.wait()
    with run_dir_lock(run_dir):
        assert (run_dir / ".fedllm.lock").read_text().strip() == str(os.getpid())


# ----------------------------------------------------------------------------- ledger cross-check

def test_report_flags_a_ledger_that_lost_entries(tmp_path):
    """A client's reported lifetime ε below the run's ε (from the server's events) means its
    ledger was deleted or replaced during the run: flagged, not silently trusted."""
    run_dir = hand_made_run(tmp_path / "run")
    events = run_dir / "privacy_events.jsonl"
    records = read_jsonl(events)
    for r in records:
        r["lifetime_epsilon"] = 100.0
    records[-1]["lifetime_epsilon"] = 0.5  # the ledger restarted from scratch in round 4
    events.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli("report", str(run_dir)).returncode == 0
    report = json.loads((run_dir / "privacy_report.json").read_text())
    ex = report["example_level"]
    assert ex["clients"]["hamlet/HAMLET"]["ledger_consistent"] is False
    assert ex["ledger_mismatches"] == ["hamlet/HAMLET"]
    assert "hold less than this run released" in (run_dir / "privacy_report.html").read_text()

    records[-1]["lifetime_epsilon"] = 100.0
    events.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli("report", str(run_dir)).returncode == 0
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["example_level"]["ledger_mismatches"] == []
