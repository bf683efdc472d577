"""The default demo on a GPU: speed, peak GPU memory and held-out loss against the CPU run.

Run (on a machine with an NVIDIA GPU and the demo packages installed):
    python experiments/gpu_check.py [--clients-per-gpu 3] [--with-cpu] [--large-steps 10]
    python experiments/gpu_check.py --dry-run-cpu     (the 1B part's code path, tiny, on CPU)

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

Then a 1B-class model without weights: TinyLlama-1.1B's shape (Llama, 22 layers, hidden 2048,
grouped-query attention 32/4 heads) built from a random-init config with SmolLM2's tokenizer,
saved as a local Hugging Face directory and loaded as a run loads `model=hf model.path=DIR
adapter=lora` (target_modules=auto). It trains `--large-steps` DP-SGD steps on the demo
federation's records (batch 8 x 512 tokens, LoRA fast path, C = 1, z = 1) once with fp32
forward passes and once with bf16 autocast, from the same initialisation and batches, and
records tokens per second (median step), peak GPU memory (torch.cuda.max_memory_allocated)
and the held-out loss before and after training (each under its own precision).
Writes the "GPU check" sections of BENCHMARKS.md. Refuses to run without CUDA.
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


# TinyLlama-1.1B's shape; TINY_SHAPE runs the same code on a CPU in seconds (--dry-run-cpu).
LARGE_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def random_init_dir(shape: dict, out: Path) -> tuple[Path, int]:
    """A local HF directory: a Llama of ``shape`` with random weights and SmolLM2's tokenizer
    (what a user's ``model.path`` holds). Returns it and the model's parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from fedllm import models
    from fedllm.config import compose

    tok = models.load_tokenizer(compose(["model=smollm2"]).model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, **shape))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, params


def demo_records(tokenizer, seq_len: int, held_out: int):
    """The demo federation's training records pooled over clients, and held-out records."""
    from fedllm.config import compose
    from fedllm.data.federated import build_federated_data

    cfg = compose([])
    data = build_federated_data(cfg.data, tokenizer, seq_len=seq_len, min_sequences=1,
                                num_clients=None, seed=0)
    import torch

    return torch.cat([c.train for c in data.clients]), data.eval_sequences(held_out)


def held_out_loss(model, sequences, device, precision: str, batch: int) -> float:
    import torch

    from fedllm.privacy.dpsgd import per_sequence_losses

    model.eval()
    with torch.no_grad():
        losses = torch.cat([per_sequence_losses(model, part.to(device), precision).float().cpu()
                            for part in torch.split(sequences, batch)])
    model.train()
    return losses.mean().item()


def large_model_run(model_dir: Path, device: str, precision: str, *, steps: int, batch: int,
                    seq_len: int, held_out: int = 32, lr: float = 1e-3) -> dict:
    """``steps`` DP-SGD steps (after one untimed warm-up) at ``precision``; same seed, same
    batches for every precision."""
    import resource
    import statistics

    import torch

    from fedllm import models
    from fedllm.api import resolve_adapter_targets
    from fedllm.config import compose
    from fedllm.privacy import dpsgd
    from fedllm.privacy.randomness import SeededRandomness

    cfg = compose(["model=hf", f"model.path={model_dir}", "adapter=lora"])
    resolve_adapter_targets(cfg)
    loaded = models.build(cfg.model, seed=0, device=device)
    model, dev = loaded.model, loaded.device
    train, evals = demo_records(loaded.tokenizer, seq_len, held_out)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    before = held_out_loss(model, evals, dev, precision, batch)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = torch.Generator().manual_seed(0)
    times = []
    with dpsgd.per_sample_gradients(model) as gsm:
        opt = dpsgd.make_dp_optimizer(
            torch.optim.AdamW(params, lr=lr), noise_multiplier=1.0, max_grad_norm=1.0,
            expected_batch_size=batch, noise=SeededRandomness(1, dev))
        for _ in range(steps + 1):
            part = train[torch.randint(len(train), (batch,), generator=rows)]
            if cuda:
                torch.cuda.synchronize(dev)
            started = time.perf_counter()
            dpsgd.dp_step(gsm, opt, part, None, dev, precision)
            if cuda:
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - started)
    after = held_out_loss(model, evals, dev, precision, batch)
    peak = (torch.cuda.max_memory_allocated(dev) if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    step_s = statistics.median(times[1:])
    return {"precision": precision, "tokens_per_s": batch * seq_len / step_s, "step_s": step_s,
            "peak_mib": peak / 2**20, "loss_before": before, "loss_after": after,
            "targets": list(cfg.model.lora.target_modules)}


def large_model_check(shape: dict, device: str, *, steps: int, batch: int = 8,
                      seq_len: int = 512) -> tuple[int, list[dict]]:
    """fp32 then bf16 on one random-init model directory: (parameter count, one row each)."""
    with tempfile.TemporaryDirectory(prefix="fedllm-gpu-large-") as tmp:
        model_dir, params = random_init_dir(shape, Path(tmp))
        return params, [large_model_run(model_dir, device, p, steps=steps, batch=batch,
                                        seq_len=seq_len) for p in ("fp32", "bf16")]


def large_row(r: dict) -> str:
    return (f"| {r['precision']} | {r['tokens_per_s']:,.0f} | {r['step_s']:.2f} s | "
            f"{r['peak_mib']:,.0f} MiB | {r['loss_before']:.4f} | {r['loss_after']:.4f} |")


def write_large(gpu_name: str, params: int, rows: list[dict], steps: int) -> None:
    from benchmarks_md import write_section

    write_section("gpu_large", "\n".join([
        f"## GPU check: a 1B-class model ({params / 1e9:.2f} B parameters) on {gpu_name}, "
        "bf16 against fp32",
        "",
        f"Command: `python experiments/gpu_check.py --large-steps {steps}` (TinyLlama-1.1B's "
        "shape with random weights and SmolLM2's tokenizer, loaded as `model=hf "
        f"model.path=DIR adapter=lora`, targets {rows[0]['targets']}; DP-SGD on the demo "
        "federation's records, batch 8 x 512 tokens, C = 1, z = 1, AdamW lr 1e-3; the same "
        "initialisation and batches under both precisions). *Tokens/s*: batch tokens over the "
        "median step; *peak memory*: torch.cuda.max_memory_allocated; *held-out loss*: 32 "
        "held-out records, each under its own precision (random weights: the figures compare "
        "precisions, not models).",
        "",
        "| forward precision | tokens/s | step | peak GPU memory | held-out loss before | "
        "after |",
        "|---|---|---|---|---|---|",
        *[large_row(r) for r in rows],
    ]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients-per-gpu", type=int, default=3)
    parser.add_argument("--with-cpu", action="store_true",
                        help="also run the demo on this machine's CPUs (model.device=cpu)")
    parser.add_argument("--large-steps", type=int, default=10,
                        help="DP steps of the 1B-class model per precision (0: skip it)")
    parser.add_argument("--dry-run-cpu", action="store_true",
                        help="run the 1B part's code with a tiny shape on the CPU; write nothing")
    args = parser.parse_args()
    if args.dry_run_cpu:
        params, rows = large_model_check(TINY_SHAPE, "cpu", steps=2, batch=2, seq_len=64)
        print(f"{params:,} parameters")
        print("\n".join(large_row(r) for r in rows))
        return
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
    if args.large_steps > 0:
        params, rows = large_model_check(LARGE_SHAPE, "cuda", steps=args.large_steps)
        print("\n".join(large_row(r) for r in rows), flush=True)
        write_large(gpu_name, params, rows, args.large_steps)


if __name__ == "__main__":
    main()
