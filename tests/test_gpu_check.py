"""experiments/gpu_check.py's 1B-class part runs on a CPU with a tiny shape (its code path is
tested here; the GPU figures come from running it on a GPU), and the forward precision it
compares is the one the loss actually runs at."""

import math
import sys
from pathlib import Path

import pytest
import torch

from fedllm.privacy.dpsgd import autocast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))


@pytest.mark.parametrize("precision,device,dtype", [
    ("fp32", "cpu", torch.float32), ("auto", "cpu", torch.float32),
    ("bf16", "cpu", torch.bfloat16)])
def test_the_forward_runs_at_the_precision_asked(precision, device, dtype):
    layer = torch.nn.Linear(4, 4)
    with autocast(torch.device(device), precision):
        assert layer(torch.ones(2, 4)).dtype == dtype
    assert layer.weight.dtype == torch.float32  # weights stay fp32


def test_an_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        autocast(torch.device("cpu"), "fp16")


def test_large_model_check_trains_a_random_init_llama_under_both_precisions():
    import gpu_check

    params, rows = gpu_check.large_model_check(gpu_check.TINY_SHAPE, "cpu", steps=2, batch=2,
                                               seq_len=32)
    assert params > 1e6
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    for r in rows:
        assert r["targets"] == ["q_proj", "v_proj"]  # target_modules=auto on a Llama
        assert r["tokens_per_s"] > 0 and r["peak_mib"] > 0
        assert math.isfinite(r["loss_before"]) and math.isfinite(r["loss_after"])
    fp32, bf16 = rows
    # Same weights, same held-out records: bf16 only rounds the forward pass.
    assert abs(fp32["loss_before"] - bf16["loss_before"]) < 0.05
    assert fp32["loss_before"] != bf16["loss_before"]  # ... and it did run in bf16
