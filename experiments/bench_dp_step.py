"""DP-SGD step time / non-DP step time on SmolLM2-135M LoRA (r=8, q_proj+v_proj).

Run: python experiments/bench_dp_step.py [--batch 8 --seq-len 128 --repeats 5]
     python experiments/bench_dp_step.py --adapter prompt_tuning [...]   (the default adapter)
Both variants run in one process, interleaved (non-DP, DP, non-DP, DP, ...) after a warm-up,
so machine noise hits them alike; the ratio of medians is reported. The DP step is fedllm's
(per-sequence loss, per-sample gradients, DPOptimizer clipping + noise): for LoRA once with
Opacus' GradSampleModule hooks and once with fedllm's LoRA fast path; for the soft prompt with
Opacus' embedding grad sampler on the per-example prompt lookup (the only engine that covers it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import write_section  # noqa: E402

from fedllm import models  # noqa: E402
from fedllm.config import compose  # noqa: E402
from fedllm.privacy import dpsgd  # noqa: E402


def setup(overrides: list[str], seq_len: int, batch_size: int):
    """SmolLM2 with the adapter ``overrides`` choose, in training mode, and a random batch."""
    cfg = compose(["model=smollm2", *overrides])
    loaded = models.build(cfg.model, seed=0, device="cpu")
    model = loaded.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    batch = torch.randint(0, len(loaded.tokenizer), (batch_size, seq_len))
    return cfg, model, params, batch


def plain_step_timer(model, params, batch):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def timed() -> float:
        t = time.perf_counter()
        dpsgd.sequence_loss(model, batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t
    return timed


def dp_step_timer(model, params, batch, engine: str):
    def timed() -> float:
        # Only the step is timed: the engine and optimizer are set up once per round.
        with dpsgd.per_sample_gradients(model, engine) as wrapped:
            dp_opt = dpsgd.make_dp_optimizer(torch.optim.AdamW(params, lr=1e-4),
                                             noise_multiplier=1.0, max_grad_norm=1.0,
                                             expected_batch_size=len(batch), noise=None)
            t = time.perf_counter()
            dpsgd.dp_step(wrapped, dp_opt, batch, None, torch.device("cpu"))
            return time.perf_counter() - t
    return timed


def interleaved(variants: dict, repeats: int) -> list[str]:
    """Table rows: each variant's median time and its ratio to the first variant's."""
    times = {name: [] for name in variants}
    for fn in variants.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    base = statistics.median(next(iter(times.values())))
    rows = [f"| {name} | {statistics.median(v):.3f} | {statistics.median(v) / base:.3f}x |"
            for name, v in times.items()]
    print("\n".join(rows))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--adapter", choices=["lora", "prompt_tuning"], default="lora")
    args = parser.parse_args()
    if args.adapter == "prompt_tuning":
        return prompt_tuning(args)
    _, model, params, batch = setup(["adapter=lora"], args.seq_len, args.batch)
    assert dpsgd.resolve_engine(model, "auto") == "lora_fast"
    rows = interleaved({
        "non-DP": plain_step_timer(model, params, batch),
        "DP, Opacus hooks": dp_step_timer(model, params, batch, "opacus"),
        "DP, fedllm LoRA fast path (default)": dp_step_timer(model, params, batch, "lora_fast"),
    }, args.repeats)
    write_section("dp_step", "\n".join([
        f"## DP-SGD step overhead (SmolLM2-135M, LoRA r=8 on q,v, batch {args.batch} x "
        f"{args.seq_len} tokens)",
        "",
        f"Command: `python experiments/bench_dp_step.py --batch {args.batch} --seq-len "
        f"{args.seq_len} --repeats {args.repeats}` (interleaved, medians, fp32 on the CPU). "
        "Each step: forward, backward, AdamW update of the LoRA weights. The DP steps add "
        "per-sample gradients, clipping to C=1 and Gaussian noise (Opacus' DPOptimizer); "
        "*Opacus hooks* computes per-sample gradients with GradSampleModule hooks on the "
        "lora_A/lora_B linears, the *fast path* (`fedllm/privacy/lora_fast.py`) with one "
        "autograd function per LoRA layer that also skips the summed weight gradients. "
        "Goal: <= 1.05x.",
        "",
        "| step | median s | vs non-DP |",
        "|---|---|---|",
        *rows,
    ]))


def prompt_tuning(args) -> None:
    """The default adapter: a soft prompt (compose's defaults), DP through Opacus' hooks."""
    cfg, model, params, batch = setup([], args.seq_len, args.batch)
    assert cfg.model.adapter == "prompt_tuning"
    assert dpsgd.resolve_engine(model, "auto") == "opacus"
    rows = interleaved({
        "non-DP": plain_step_timer(model, params, batch),
        "DP, Opacus embedding grad sampler (default)": dp_step_timer(model, params, batch,
                                                                     "auto"),
    }, args.repeats)
    pt = cfg.model.prompt_tuning
    write_section("dp_step_prompt", "\n".join([
        f"## DP-SGD step overhead of the default adapter (SmolLM2-135M, soft prompt of "
        f"{pt.num_virtual_tokens} virtual tokens, batch {args.batch} x {args.seq_len} tokens)",
        "",
        f"Command: `python experiments/bench_dp_step.py --adapter prompt_tuning --batch "
        f"{args.batch} --seq-len {args.seq_len} --repeats {args.repeats}` (interleaved, "
        "medians, fp32 on the CPU). Each step: forward, backward through the whole frozen "
        "model to the prompt, AdamW update of the prompt. The DP step adds per-sample "
        "gradients (Opacus' embedding grad sampler on fedllm's per-example prompt lookup, "
        "`fedllm/models.py`), clipping to C=1 and Gaussian noise. Goal: <= 1.05x.",
        "",
        "| step | median s | vs non-DP |",
        "|---|---|---|",
        *rows,
    ]))


if __name__ == "__main__":
    main()
