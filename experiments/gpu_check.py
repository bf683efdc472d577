"""The default demo on a GPU: speed, peak GPU memory and held-out loss against the CPU run.

Run (on a machine with an NVIDIA GPU and the demo packages installed):
    python experiments/gpu_check.py [--clients-per-gpu 3] [--with-cpu]

Two `fedllm simulate` runs of the default demo (SmolLM2-135M, 3 rounds x 3 clients, DP at
ε = 8), both with `model.device=cuda` (bf16 autocast in the forward pass, fp32 weights):
  * one client at a time on the GPU (`run.client_gpus=1`);
  * `--clients-per-gpu` clients sharing it (`run.client_gpus=1/k`, cores split k ways).
`--with-cpu` adds the same demo on this machine's CPUs (`model.device=cpu`) for a same-machine
speed ratio; without it the CPU figures are the recorded ones (2-core machine, BENCHMARKS.md
"Default demo" and "DP that pays"). Per round: median of metrics.jsonl `seconds`. Peak GPU
memory: the largest `nvidia-smi` memory.used during the run, minus its value before. Held-out
loss: the run's summary (DP noise differs between runs, so compare the final loss with the
recorded CPU range; the base model's loss should agree to about 0.01 nats under bf16).
Writes the "GPU check" section of BENCHMARKS.md. Refuses to run without CUDA.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# The CPU run, as recorded on the project's 2-core machine (BENCHMARKS.md): base model's
# held-out loss, the default demo's DP gain median [min, max] at ε = 8 (3 runs), its wall time.
CPU_BASE_LOSS = 4.7950
CPU_DP_GAIN = (0.308, 0.307, 0.350)
CPU_WALL_S = 5.6 * 60


def require_cuda() -> str:
    """The GPU's name, or exit with a clear reason (before any run starts)."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(
            "gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False; torch "
            f"{torch.__version__}). This script measures the demo on a GPU: run it on a "
            "machine with an NVIDIA GPU and a CUDA build of torch. Nothing was run.")
    if shutil.which("nvidia-smi") is None:
        raise SystemExit("gpu_check: nvidia-smi not found; it is needed to measure peak GPU "
                         "memory across the client processes. Nothing was run.")
    return torch.cuda.get_device_name(0)


def gpu_memory_used_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,"
                          "nounits", "--id=0"], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


class GpuMemorySampler:
    """Samples the GPU's memory.used (all processes: the clients live in Ray actors) every
    0.5 s with `nvidia-smi -lms` while the run lasts."""

    def __enter__(self) -> "GpuMemorySampler":
        self.baseline = gpu_memory_used_mib()
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".csv", delete=False)
        self.proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
             "--id=0", "-lms", "500"], stdout=self.log, stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.log.seek(0)
        samples = [int(x) for x in self.log.read().split() if x.isdigit()]
        self.peak_mib = max(samples, default=self.baseline) - self.baseline
        os.unlink(self.log.name)


def run_demo(label: str, overrides: list[str], tmp: Path, on_gpu: bool) -> dict:
    from sim_runner import simulate

    run_dir = tmp / label
    started = time.time()
    if on_gpu:
        with GpuMemorySampler() as sampler:
            run = simulate(overrides, run_dir)
        peak = sampler.peak_mib
    else:
        run, peak = simulate(overrides, run_dir), None
    if run.returncode != 0:
        log = run_dir.with_suffix(".log").read_text()[-3000:]
        raise SystemExit(f"gpu_check: the {label} run failed:\n{log}")
    seconds = sorted(r["seconds"] for r in run.rows)
    s = run.summary
    return {"label": label, "overrides": overrides, "wall_s": time.time() - started,
            "per_round_s": seconds[len(seconds) // 2], "peak_gpu_mib": peak,
            "base_loss": s["base_eval_loss"], "final_loss": s["final_eval_loss"],
            "final_ppl": s["final_perplexity"], "eps_max": s["epsilon_example_max"]}


def gpu_runs(clients_per_gpu: int) -> list[tuple[str, list[str]]]:
    cores = os.cpu_count() or 1
    shared = [f"run.client_gpus={1 / clients_per_gpu:.6g}",
              f"run.client_cpus={max(cores // clients_per_gpu, 1)}"]
    return [("GPU, 1 client at a time", ["model.device=cuda", "run.client_gpus=1"]),
            (f"GPU, {clients_per_gpu} clients share it", ["model.device=cuda", *shared])]


def row(r: dict) -> str:
    peak = "n/a" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:,} MiB"
    return (f"| {r['label']} | {r['per_round_s']:.1f} s | {r['wall_s']:.0f} s | {peak} | "
            f"{r['base_loss']:.4f} ({r['base_loss'] - CPU_BASE_LOSS:+.4f}) | "
            f"{r['final_loss']:.4f} ({r['base_loss'] - r['final_loss']:+.3f}) | "
            f"{r['eps_max']:.2f} | `fedllm simulate {' '.join(r['overrides'])}` |")


def write_benchmarks(gpu_name: str, results: list[dict], clients_per_gpu: int) -> None:
    from benchmarks_md import write_section

    med, low, high = CPU_DP_GAIN
    recorded = (f"| CPU, recorded (2 cores) | n/a | {CPU_WALL_S:.0f} s | n/a | {CPU_BASE_LOSS:.4f} "
                f"| {CPU_BASE_LOSS - med:.4f} (+{med:.3f} [+{low:.3f}, +{high:.3f}]) | 8.00 | "
                "`fedllm simulate` |")
    write_section("gpu", "\n".join([
        f"## GPU check: the default demo on {gpu_name}",
        "",
        f"Command: `python experiments/gpu_check.py --clients-per-gpu {clients_per_gpu}"
        f"{' --with-cpu' if any(r['label'].startswith('CPU, this') for r in results) else ''}` "
        "(default demo: SmolLM2-135M, 3 rounds x 3 clients, DP at ε = 8; bf16 autocast on CUDA). "
        "*Per round*: median of metrics.jsonl `seconds`; *wall*: the whole `fedllm simulate` "
        "(Ray start, data, base evaluation); *peak GPU memory*: nvidia-smi memory.used above "
        "its value before the run, over all processes; *base loss*: held-out loss of the "
        "base model (difference to the CPU's fp32 figure); *final loss*: after the run (DP "
        "gain in nats; DP noise differs between runs).",
        "",
        "| run | per round | wall | peak GPU memory | base loss (vs CPU) | final loss (gain) | "
        "ε max | command |",
        "|---|---|---|---|---|---|---|---|",
        recorded,
        *[row(r) for r in results],
    ]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients-per-gpu", type=int, default=3)
    parser.add_argument("--with-cpu", action="store_true",
                        help="also run the demo on this machine's CPUs (model.device=cpu)")
    args = parser.parse_args()
    if args.clients_per_gpu < 1:
        raise SystemExit("gpu_check: --clients-per-gpu must be at least 1")
    gpu_name = require_cuda()
    results = []
    with tempfile.TemporaryDirectory(prefix="fedllm-gpu-check-") as tmp:
        for label, overrides in gpu_runs(args.clients_per_gpu):
            results.append(run_demo(label, overrides, Path(tmp), on_gpu=True))
            print(row(results[-1]), flush=True)
        if args.with_cpu:
            results.append(run_demo("CPU, this machine", ["model.device=cpu"], Path(tmp),
                                    on_gpu=False))
            print(row(results[-1]), flush=True)
    write_benchmarks(gpu_name, results, args.clients_per_gpu)


if __name__ == "__main__":
    main()
