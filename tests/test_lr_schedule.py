"""train.lr_schedule: the local learning rate across rounds (fedllm.train.round_lr)."""

import copy
import math

import numpy as np
import pytest

from fedllm import models
from fedllm.config import ConfigError, compose
from fedllm.train import local_round, round_lr


def _train(schedule: str, final: float = 0.1, lr: float = 0.2):
    cfg = compose([f"train.lr_schedule={schedule}", f"train.lr_final_fraction={final}",
                   f"train.lr={lr}"])
    return cfg.train


def test_constant_is_train_lr_in_every_round():
    t = _train("constant")
    assert [round_lr(t, r, 5) for r in range(1, 8)] == [0.2] * 7


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_decay_runs_from_lr_in_round_one_to_the_final_fraction_in_the_last(schedule):
    t = _train(schedule, final=0.1)
    lrs = [round_lr(t, r, 5) for r in range(1, 6)]
    assert lrs[0] == pytest.approx(0.2) and lrs[-1] == pytest.approx(0.02)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))  # strictly decreasing
    # After the plan (a resumed run with more rounds) it stays at the final rate.
    assert round_lr(t, 9, 5) == pytest.approx(0.02)


def test_exact_values_of_cosine_and_linear_at_mid_plan():
    # Round 3 of 5 is halfway: cosine and linear both give the midpoint of lr and lr x final.
    for schedule in ("cosine", "linear"):
        assert round_lr(_train(schedule, final=0.0), 3, 5) == pytest.approx(0.1)
    # Round 2 of 5 is a quarter: cosine (1 + cos(pi/4)) / 2, linear 3/4.
    assert round_lr(_train("cosine", final=0.0), 2, 5) == pytest.approx(
        0.2 * (1 + math.cos(math.pi / 4)) / 2)
    assert round_lr(_train("linear", final=0.0), 2, 5) == pytest.approx(0.15)


def test_a_single_round_plan_trains_at_train_lr():
    assert round_lr(_train("cosine"), 1, 1) == pytest.approx(0.2)


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_final_fraction_outside_zero_one_is_refused(value):
    with pytest.raises(ConfigError, match="train.lr_final_fraction"):
        compose([f"train.lr_final_fraction={value}"])


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ConfigError, match="lr_schedule"):
        compose(["train.lr_schedule=step"])


def test_local_round_steps_at_the_rounds_rate(tiny_cfg, tiny_loaded, tiny_data):
    # One plain SGD step without momentum: the delta is -lr x gradient, so with the same batch
    # (same seed) the last round of a linear schedule to 1/2 moves exactly half as far.
    cfg = copy.deepcopy(tiny_cfg)
    cfg.privacy.example.enabled = False
    cfg.train.optimizer, cfg.train.momentum, cfg.train.lr = "sgd", 0.0, 0.05
    cfg.train.local_steps, cfg.federation.rounds = 1, 3
    cfg.train.lr_schedule, cfg.train.lr_final_fraction = "linear", 0.5
    start = models.adapter_state(tiny_loaded.model)
    data = tiny_data.clients[0].train
    deltas = [local_round(tiny_loaded, start, data, cfg, noise_multiplier=0.0, seed=7,
                          server_round=r).delta for r in (1, 3)]
    models.load_adapter_state(tiny_loaded.model, start)
    # (LoRA's B starts at zero, so one step moves only B: A's gradient is B^T times something.)
    assert any(np.abs(d).max() > 0 for d in deltas[0].values())
    for key in deltas[0]:
        np.testing.assert_allclose(deltas[1][key], 0.5 * deltas[0][key], rtol=1e-4, atol=1e-8)


def test_non_private_steps_honour_the_physical_batch_size(tiny_cfg, tiny_loaded, tiny_data):
    """Without DP a logical batch is processed in physical chunks too (bounded memory), and
    the step equals one step on the whole batch (gradient accumulation is exact)."""
    import copy

    import numpy as np

    from fedllm import models
    from fedllm.train import local_round

    cfg = copy.deepcopy(tiny_cfg)
    cfg.privacy.example.enabled = False
    cfg.train.local_steps, cfg.train.batch_size, cfg.train.optimizer = 1, 8, "sgd"
    cfg.train.momentum = 0.0
    data = tiny_data.clients[0].train[:8]
    start = models.adapter_state(tiny_loaded.model)
    seen = []
    handle = tiny_loaded.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(len(kwargs.get("input_ids", args[0] if args
                                                                else []))), with_kwargs=True)
    try:
        results = {}
        for chunk in (None, 3):
            cfg.train.physical_batch_size = chunk
            seen.clear()
            results[chunk] = local_round(tiny_loaded, start, data, cfg, noise_multiplier=0.0,
                                         seed=1).delta
            assert max(seen) == (8 if chunk is None else 3)
    finally:
        handle.remove()
    for k in results[None]:
        np.testing.assert_allclose(results[3][k], results[None][k], rtol=1e-4, atol=1e-7)
