"""Opacus DP-SGD on a PEFT LoRA model: exact per-sample gradients, clipping, noise."""

import copy

import numpy as np
import pytest
import torch

from fedllm import models
from fedllm.privacy import dpsgd
from fedllm.privacy.randomness import SecretRandomness
from fedllm.train import local_round


@pytest.fixture()
def lora_model(tiny_cfg):
    from fedllm.models import load_base_model, load_tokenizer

    tok = load_tokenizer(tiny_cfg.model)
    base = load_base_model(tiny_cfg.model, vocab_size=len(tok), seed=0)
    model = models.attach_adapter(base, tiny_cfg.model, seed=0)
    # LoRA B starts at zero; randomize it so every per-sample gradient is non-trivial.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def test_per_sample_gradients_equal_naive_loop(lora_model):
    torch.manual_seed(0)
    batch = torch.randint(0, 1000, (5, 16))
    trainable = {n: p for n, p in lora_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    naive = {n: [] for n in trainable}
    for x in batch:
        lora_model.zero_grad()
        dpsgd.sequence_loss(lora_model, x[None]).backward()
        for n, p in trainable.items():
            naive[n].append(p.grad.detach().clone())
    lora_model.zero_grad()
    with dpsgd.grad_sample_module(lora_model) as gsm:
        dpsgd.sequence_loss(gsm, batch).backward()
        for n, p in trainable.items():
            assert p.grad_sample.shape == (5, *p.shape)
            torch.testing.assert_close(p.grad_sample, torch.stack(naive[n]), rtol=1e-4, atol=1e-6)
    assert not any(hasattr(p, "grad_sample") for p in trainable.values())  # unwrapped cleanly


def _round(cfg, model, tok, data, z, seed, **overrides):
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    loaded = models.LoadedModel(model=model, tokenizer=tok, device=torch.device("cpu"))
    start = models.adapter_state(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = local_round(loaded, start, data, cfg, noise_multiplier=z, seed=seed)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    models.load_adapter_state(model, start)  # restore for the next call
    return result, changed


def test_dp_step_changes_only_adapter_and_noise_matters(tiny_cfg, tiny_loaded, tiny_data):
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    data = tiny_data.clients[0].train
    res_noise, changed = _round(tiny_cfg, model, tok, data, 1.0, seed=7, **{"train.local_steps": 1})
    assert changed and all("lora_" in n for n in changed)
    res_noise2, _ = _round(tiny_cfg, model, tok, data, 1.0, seed=7, **{"train.local_steps": 1})
    res_clean, _ = _round(tiny_cfg, model, tok, data, 0.0, seed=7, **{"train.local_steps": 1})
    same = all(np.allclose(res_noise.delta[k], res_noise2.delta[k]) for k in res_noise.delta)
    differ = any(not np.allclose(res_noise.delta[k], res_clean.delta[k]) for k in res_noise.delta)
    assert same, "same seed must reproduce the same noisy update"
    assert differ, "noise > 0 must change the update"
    assert res_noise.event.noise_multiplier == 1.0 and res_noise.event.steps == 1
    assert res_noise.event.sample_rate == pytest.approx(tiny_cfg.train.batch_size / len(data))


def test_clipping_bound_is_respected_per_sample(tiny_cfg, lora_model, tiny_loaded, tiny_data):
    # One example, no noise, plain SGD with lr=1: the update is -clip(g)/B, so |update|*B <= C,
    # with equality when the raw gradient is far above the (tiny) bound.
    data = tiny_data.clients[0].train[:1]
    clip = 1e-4
    cfg = copy.deepcopy(tiny_cfg)
    cfg.privacy.example.max_grad_norm = clip
    cfg.train.optimizer, cfg.train.lr, cfg.train.momentum = "sgd", 1.0, 0.0
    cfg.train.local_steps, cfg.train.batch_size = 1, 1
    loaded = models.LoadedModel(model=lora_model, tokenizer=tiny_loaded.tokenizer,
                                device=torch.device("cpu"))
    start = models.adapter_state(lora_model)
    res = local_round(loaded, start, data, cfg, noise_multiplier=0.0, seed=0)
    norm = np.sqrt(sum(float((d.astype(np.float64) ** 2).sum()) for d in res.delta.values()))
    assert norm == pytest.approx(clip, rel=1e-3)


def test_empty_poisson_batch_takes_a_noise_only_step(tiny_cfg, tiny_loaded, tiny_data):
    data = tiny_data.clients[0].train[:0]  # an empty Poisson batch
    loaded = tiny_loaded
    start = models.adapter_state(loaded.model)
    with dpsgd.grad_sample_module(loaded.model) as gsm:
        params = [p for p in loaded.model.parameters() if p.requires_grad]
        opt = dpsgd.make_dp_optimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0,
                                      max_grad_norm=1.0, expected_batch_size=4,
                                      noise=SecretRandomness())
        assert dpsgd.dp_step(gsm, opt, data, None, torch.device("cpu")) is None
    after = models.adapter_state(loaded.model)
    assert any(not np.allclose(after[k], start[k]) for k in start), "noise must still be added"
    models.load_adapter_state(loaded.model, start)


def test_physical_batches_give_the_same_clipped_sum(tiny_cfg, lora_model, tiny_loaded, tiny_data):
    data = tiny_data.clients[0].train[:6]
    results = []
    for physical in (None, 2):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.train.optimizer, cfg.train.lr, cfg.train.momentum = "sgd", 1.0, 0.0
        cfg.train.local_steps, cfg.train.batch_size = 1, 6
        cfg.train.physical_batch_size = physical
        loaded = models.LoadedModel(model=lora_model, tokenizer=tiny_loaded.tokenizer,
                                    device=torch.device("cpu"))
        start = models.adapter_state(lora_model)
        # q = 6/6 = 1: the whole batch is always sampled, so both runs see the same examples.
        results.append(local_round(loaded, start, data, cfg, noise_multiplier=0.0, seed=0))
        models.load_adapter_state(lora_model, start)
    for k in results[0].delta:
        np.testing.assert_allclose(results[0].delta[k], results[1].delta[k], rtol=1e-4, atol=1e-8)
