"""DP-AdamBC: Adam's second moment minus the DP noise variance (fedllm.privacy.adam_bc)."""

import copy

import numpy as np
import pytest
import torch

from fedllm import models
from fedllm.config import ConfigError, compose
from fedllm.privacy import adam_bc
from fedllm.privacy.adam_bc import AdamBC
from fedllm.train import local_round


def _run(opt_factory, grads, shape=(50,)):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    opt = opt_factory([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def test_without_noise_it_is_adamw():
    grads = [torch.randn(50) for _ in range(6)]
    ours = _run(lambda ps: AdamBC(ps, lr=1e-2, noise_std=0.0, floor=0.01, weight_decay=0.1), grads)
    ref = _run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), grads)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_update_matches_the_formula_with_the_correction_and_its_floor():
    s, floor, lr, b1, b2, eps = 0.5, 0.04, 1e-2, 0.9, 0.999, 1e-8
    rng = np.random.default_rng(1)
    grads = [rng.normal(0, 1, 50).astype(np.float32) for _ in range(4)]
    got = _run(lambda ps: AdamBC(ps, lr=lr, noise_std=s, floor=floor),
               [torch.from_numpy(g) for g in grads]).numpy()
    torch.manual_seed(0)
    p = torch.randn(50).numpy().astype(np.float64)
    m = np.zeros(50)
    v = np.zeros(50)
    clamped = 0
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        corrected = v / (1 - b2 ** t) - s * s
        clamped += int((corrected < floor * s * s).sum())
        p = p - lr * (m / (1 - b1 ** t)) / (eps + np.sqrt(np.maximum(corrected, floor * s * s)))
    assert clamped > 0  # the floor was exercised
    np.testing.assert_allclose(got, p, rtol=1e-4, atol=1e-6)


def test_the_step_is_at_most_one_over_root_floor_times_dp_adams():
    # Pure noise: DP-Adam's step is about lr per coordinate; the corrected one at most 10x that.
    shape = (10_000,)
    g = [torch.randn(shape) * 0.3 for _ in range(4)]
    start = _run(lambda ps: AdamBC(ps, lr=1e-3, noise_std=0.3, floor=0.01), [], shape)
    bc = _run(lambda ps: AdamBC(ps, lr=1e-3, noise_std=0.3, floor=0.01), g, shape) - start
    adam = _run(lambda ps: torch.optim.Adam(ps, lr=1e-3), g, shape) - start
    assert bc.abs().max() <= 10 * 4 * 1e-3 * 1.01
    assert bc.abs().mean() > 2 * adam.abs().mean()  # the correction does enlarge noisy steps


def test_local_round_passes_the_noise_std_it_adds_and_accounts_the_same(tiny_cfg, tiny_loaded,
                                                                         tiny_data, monkeypatch):
    seen = []
    original = AdamBC.__init__

    def spy(self, params, **kwargs):
        seen.append(kwargs["noise_std"])
        original(self, params, **kwargs)

    monkeypatch.setattr(adam_bc.AdamBC, "__init__", spy)
    cfg = copy.deepcopy(tiny_cfg)
    cfg.train.optimizer = "adam_bc"
    loaded = models.LoadedModel(model=tiny_loaded.model, tokenizer=tiny_loaded.tokenizer,
                                device=torch.device("cpu"))
    start = models.adapter_state(loaded.model)
    data = tiny_data.clients[0].train
    res = local_round(loaded, start, data, cfg, noise_multiplier=1.3, seed=0)
    models.load_adapter_state(loaded.model, start)
    dp = cfg.privacy.example
    assert seen == [pytest.approx(1.3 * dp.max_grad_norm / cfg.train.batch_size)]
    assert res.event.noise_multiplier == 1.3 and res.event.steps == cfg.train.local_steps
    assert all(np.isfinite(d).all() for d in res.delta.values())
    assert any(np.abs(d).max() > 0 for d in res.delta.values())


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_a_floor_outside_zero_one_is_refused(value):
    with pytest.raises(ConfigError, match="train.adam_bc_floor"):
        compose(["train.optimizer=adam_bc", f"train.adam_bc_floor={value}"])
