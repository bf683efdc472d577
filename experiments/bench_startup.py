"""Scale: startup. Where the wall time of a tiny one-round run goes.

Runs ``fedllm simulate model=tiny federation.rounds=1`` in a subprocess, stamps every line it
prints with the seconds since start, and sums the CPU time of the whole process tree (the
CLI, Ray's processes and its workers) by polling it. Phases are cut at the log lines that
mark them. ``--client-phases`` also times, in one fresh process, what a simulated client does
before and during its first round (imports, model, data, calibration, training).

    python experiments/bench_startup.py [--label after] [--client-phases] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "experiments"))
COMMAND = ["-m", "fedllm.cli", "simulate", "model=tiny", "federation.rounds=1"]
# (phase name, the first output line that ends it)
MARKS = [("imports, tokenizer, data index, noise check (CLI preflight)", "fedllm simulate:"),
         ("Ray start, server model, held-out set", "server optimizer:"),
         ("base-model evaluation", "base model: held-out"),
         ("round 1: client imports, model, data, calibration, training", "round 1/1"),
         ("reports and plots", "fedllm run summary"),
         ("Ray shutdown, exit", None)]


class TreeCpu:
    """CPU seconds (user + system) of a process and all its descendants, polled."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.seen, self.stop = psutil.Process(pid), {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        import psutil

        while not self.stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    t = p.cpu_times()
                    self.seen[p.pid] = t.user + t.system
                except psutil.Error:
                    pass
            self.stop.wait(0.2)

    def total(self) -> float:
        self.stop.set()
        self.thread.join()
        return sum(self.seen.values())


def run_once(pythonpath: str) -> dict:
    run_dir = tempfile.mkdtemp(prefix="fedllm-startup-")
    env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1", COLUMNS="200",
               HF_HUB_OFFLINE="1")
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *COMMAND, f"run.dir={run_dir}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cpu = TreeCpu(proc.pid)
    stamps = []
    for line in proc.stdout:
        stamps.append((time.perf_counter() - start, line.rstrip()))
    proc.wait()
    wall = time.perf_counter() - start
    cpu_total = cpu.total()
    if proc.returncode != 0:
        raise SystemExit("\n".join(l for _, l in stamps[-30:]))
    phases, last = [], 0.0
    for name, mark in MARKS:
        end = wall if mark is None else next(t for t, l in stamps if mark in l)
        phases.append((name, end - last))
        last = end
    return {"wall_s": wall, "cpu_s": cpu_total, "phases": phases,
            "load": [load_before, os.getloadavg()], "run_dir": run_dir}


CLIENT_PHASES = r"""
import json, sys, tempfile, time
t0, c0, out = time.perf_counter(), time.process_time(), []
def mark(what):
    global t0, c0
    t, c = time.perf_counter(), time.process_time()
    out.append((what, t - t0, c - c0)); t0, c0 = t, c
import torch; mark("import torch")
import transformers, peft, opacus; mark("import transformers, peft, opacus")
import flwr.clientapp; mark("import flwr")
from fedllm.clients import app; mark("import fedllm.clients.app (rest)")
from fedllm import models
from fedllm.config import from_yaml, to_yaml
from fedllm.train import local_round
cfg = from_yaml(open(sys.argv[1]).read())
loaded = app._model(to_yaml(cfg.model), cfg.run.seed); mark("build tiny model + LoRA")
client = app.this_client(cfg, {"partition-id": 0}); mark("this client's data (cached index)")
z = app.noise_multiplier_for(cfg, min(1.0, cfg.train.batch_size / len(client.train))); mark("noise calibration (one client)")
local_round(loaded, models.adapter_state(loaded.model), client.train, cfg, noise_multiplier=z,
            seed=1); mark("local round (4 DP-SGD steps)")
print(json.dumps(out))
"""


def client_phases(pythonpath: str, run_dir: str) -> list:
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-c", CLIENT_PHASES, f"{run_dir}/config.yaml"],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pythonpath", default=str(ROOT), help="the fedllm checkout to measure")
    ap.add_argument("--label", default="after")
    ap.add_argument("--client-phases", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    result = run_once(args.pythonpath)
    if args.client_phases:
        result["client_phases"] = client_phases(args.pythonpath, result["run_dir"])
    print(json.dumps(result, indent=1))
    if not args.no_write:
        record(args.label, result)


def record(label: str, result: dict) -> None:
    """Keep each label's latest result in experiments/results/startup.json; rewrite the section."""
    from benchmarks_md import write_section

    store = ROOT / "experiments" / "results" / "startup.json"
    store.parent.mkdir(exist_ok=True)
    runs = json.loads(store.read_text()) if store.exists() else {}
    runs[label] = result
    store.write_text(json.dumps(runs, indent=1) + "\n")
    write_section("startup", render(runs))


READING = (
    "Reading: \"before\" is the code before per-client loading, \"after\" that branch; runs "
    "1 and 2 were measured back to back at two different loads. Then, about 66 s of the run's "
    "90 s of CPU was the three clients' local rounds: DP-SGD through the tiny model, whose "
    "49,152 x 64 tied embedding and output layer was 97% of its 3.2M parameters, so each step "
    "was mostly the vocabulary projection and its backward pass. Per-client loading removed "
    "the server's and each client process's tokenization of the whole corpus, and the server "
    "no longer counts the skipped clients (named once); the calibration cache made a client's "
    "noise calibration milliseconds (\"main after merge\": 43 s wall, 60 s CPU, round 1 26 s). "
    "The last two columns give the tiny model the first 4,096 tokens of SmolLM2's tokenizer "
    "(`model.tiny.vocab_size`, the same byte-level BPE without its later merges): its output "
    "layer is 12x smaller (0.34M parameters in all), a client's local round takes 0.8 s of "
    "CPU instead of about 22 s, and the run takes 24-25 s of wall time and 27-30 s of CPU on an "
    "idle machine (goal 30 s: met). What remains is fixed cost: about 5 s of imports per "
    "process (the CLI and each Ray worker), Ray's start (with its minimal dashboard and "
    "prestarted workers) and shutdown, the preflight's index build for a fresh run directory, "
    "reports and plots (2 s).")


def render(runs: dict) -> str:
    labels = list(runs)
    lines = ["## Scale: startup (tiny model, one round, 3 clients)", "",
             "Wall time of `fedllm simulate model=tiny federation.rounds=1` by phase (cut at the "
             "log line that ends each), and the CPU time of the whole process tree (CLI, Ray, "
             "its workers). The machine was shared: the load average (2 cores) is given "
             "with each run, and wall time is CPU time stretched by that load.", "",
             "| phase | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for i, (name, _) in enumerate(MARKS):
        lines.append(f"| {name} | " + " | ".join(f"{runs[l]['phases'][i][1]:.1f} s"
                                                for l in labels) + " |")
    lines.append("| **total wall** | " + " | ".join(f"**{runs[l]['wall_s']:.0f} s**"
                                                    for l in labels) + " |")
    lines.append("| CPU, all processes | " + " | ".join(f"{runs[l]['cpu_s']:.0f} s"
                                                        for l in labels) + " |")
    lines.append("| load average (1 min) at start → end | " + " | ".join(
        f"{runs[l]['load'][0][0]:.1f} → {runs[l]['load'][1][0]:.1f}" for l in labels) + " |")
    with_phases = [l for l in labels if "client_phases" in runs[l]]
    if with_phases:
        l = with_phases[-1]
        lines += ["", f"What one simulated client does before its first reply ({l}; one fresh "
                  "process; these happen inside the round-1 phase above):", "",
                  "| step | wall | CPU |", "|---|---:|---:|"]
        lines += [f"| {what} | {w:.1f} s | {c:.1f} s |" for what, w, c in runs[l]["client_phases"]]
    lines += ["", READING]
    lines += ["", "Command: `python experiments/bench_startup.py --label LABEL "
              "[--client-phases] [--pythonpath CHECKOUT]`."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
