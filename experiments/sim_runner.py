"""Run `fedllm simulate` as a subprocess for benchmarks: wall time, peak memory, run files.

Peak memory is sampled every 0.2 s over the whole process tree (the simulation driver, which
hosts the ServerApp, plus Ray's processes and the client actors): the largest sum of RSS seen,
and the largest RSS of the driver alone. (RSS sums count shared pages once per process.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass
class SimRun:
    run_dir: Path
    wall_s: float
    peak_tree_rss: int
    peak_driver_rss: int
    rows: list[dict]
    summary: dict
    returncode: int


def _tree_rss(proc: psutil.Process) -> tuple[int, int]:
    try:
        driver = proc.memory_info().rss
        total = driver
        for child in proc.children(recursive=True):
            try:
                total += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total, driver
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0


def simulate(overrides: list[str], run_dir: Path, log_path: Path | None = None) -> SimRun:
    run_dir = Path(run_dir)
    env = dict(os.environ, HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0",
               RAY_USAGE_STATS_ENABLED="0")
    cmd = [sys.executable, "-m", "fedllm.cli", "simulate", f"run.dir={run_dir}", *overrides]
    log = open(log_path or run_dir.with_suffix(".log"), "w")
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    ps = psutil.Process(proc.pid)
    peak_tree = peak_driver = 0
    while proc.poll() is None:
        total, driver = _tree_rss(ps)
        peak_tree, peak_driver = max(peak_tree, total), max(peak_driver, driver)
        time.sleep(0.2)
    wall = time.time() - started
    log.close()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if line.strip()] if (run_dir / "metrics.jsonl").exists() else []
    summary = json.loads((run_dir / "summary.json").read_text()) \
        if (run_dir / "summary.json").exists() else {}
    return SimRun(run_dir, wall, peak_tree, peak_driver, rows, summary, proc.returncode)


def command_line(overrides: list[str]) -> str:
    return "fedllm simulate " + " ".join(overrides)
