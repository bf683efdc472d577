"""The LoRA fast path: exact per-sample gradients, equal to Opacus' and to a naive loop."""

import copy

import numpy as np
import pytest
import torch

from fedllm import models
from fedllm.config import compose
from fedllm.privacy import dpsgd, lora_fast
from fedllm.train import local_round


def _lora(cfg, *, dropout=0.0, seed=0, targets=None):
    from fedllm.models import load_base_model, load_tokenizer

    cfg = copy.deepcopy(cfg)
    cfg.model.lora.dropout = dropout
    if targets:
        cfg.model.lora.target_modules = targets
    tok = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, vocab_size=len(tok), seed=seed)
    model = models.attach_adapter(base, cfg.model, seed=seed)
    with torch.no_grad():  # B starts at zero; make every gradient non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def _grad_samples(model, batch, engine, seed=0):
    model.train()
    with dpsgd.per_sample_gradients(model, engine) as wrapped:
        torch.manual_seed(seed)  # same dropout masks for both engines
        dpsgd.sequence_loss(wrapped, batch).backward()
        out = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()
               if p.requires_grad}
        model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("dropout,targets", [(0.0, None), (0.3, ["q_proj", "v_proj", "o_proj",
                                                                 "down_proj"])])
def test_fast_path_equals_opacus_per_sample_gradients(tiny_cfg, dropout, targets):
    model = _lora(tiny_cfg, dropout=dropout, targets=targets)
    assert lora_fast.applies(model) and dpsgd.resolve_engine(model) == "lora_fast"
    batch = torch.randint(0, 1000, (6, 24), generator=torch.Generator().manual_seed(1))
    fast = _grad_samples(model, batch, "lora_fast", seed=3)
    ref = _grad_samples(model, batch, "opacus", seed=3)
    assert fast.keys() == ref.keys() and len(fast) > 0
    for name in ref:
        assert fast[name].shape == ref[name].shape == (6, *dict(model.named_parameters())[name].shape)
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-4, atol=1e-7)
        assert fast[name].abs().sum() > 0, name
    # no leftovers: the model is a plain PEFT model again
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_fast_path_equals_naive_per_example_loop(tiny_cfg):
    model = _lora(tiny_cfg)
    batch = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(2))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    naive = {n: [] for n in trainable}
    for x in batch:
        model.zero_grad()
        dpsgd.sequence_loss(model, x[None]).backward()
        for n, p in trainable.items():
            naive[n].append(p.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    fast = _grad_samples(model, batch, "lora_fast")
    for n in trainable:
        # loss_reduction="mean": per-sample gradients of batch_size x mean loss = each loss
        torch.testing.assert_close(fast[n], torch.stack(naive[n]), rtol=1e-4, atol=1e-7)


def test_fast_path_leaves_no_summed_grad_and_forward_is_unchanged(tiny_cfg):
    model = _lora(tiny_cfg)
    batch = torch.randint(0, 1000, (3, 16))
    with torch.no_grad():
        plain = dpsgd.per_sequence_losses(model, batch)
    with dpsgd.per_sample_gradients(model, "lora_fast") as wrapped:
        losses = dpsgd.per_sequence_losses(wrapped, batch)
        torch.testing.assert_close(losses.detach(), plain)
        losses.mean().backward()
        # The optimizer writes the clipped, noised sum: autograd need not compute one.
        assert all(p.grad is None for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)


def test_dp_round_identical_with_either_engine(tiny_cfg, tiny_data):
    # Same data, same sampling seed, same noise seed: the whole DP round (Poisson batches,
    # clipping, noise, AdamW) must give the same update with either engine.
    data = tiny_data.clients[0].train
    results = {}
    for engine in ("lora_fast", "opacus"):
        cfg = copy.deepcopy(tiny_cfg)
        cfg.privacy.example.per_sample_grads = engine
        cfg.privacy.example.max_grad_norm = 0.05  # small: clipping is active
        model = _lora(cfg)
        loaded = models.LoadedModel(model=model, tokenizer=None, device=torch.device("cpu"))
        res = local_round(loaded, models.adapter_state(model), data, cfg, noise_multiplier=0.7,
                          seed=11)
        results[engine] = res.delta
    for k in results["opacus"]:
        np.testing.assert_allclose(results["lora_fast"][k], results["opacus"][k], rtol=1e-4,
                                   atol=1e-7)


def test_auto_falls_back_to_opacus_when_fast_path_does_not_cover_everything(tiny_cfg):
    model = _lora(tiny_cfg)
    # An extra trainable parameter outside LoRA (e.g. a bias someone unfroze)
    next(p for n, p in model.named_parameters() if "norm" in n).requires_grad_(True)
    assert not lora_fast.applies(model)
    assert dpsgd.resolve_engine(model, "auto") == "opacus"
    with pytest.raises(ValueError, match="fast path"):
        with dpsgd.per_sample_gradients(model, "lora_fast"):
            pass


def test_config_rejects_unknown_engine():
    from fedllm.config import ConfigError

    with pytest.raises(ConfigError, match="privacy.example.per_sample_grads"):
        compose(["model=tiny", "privacy.example.per_sample_grads=magic"])


def test_ffa_lora_trains_only_b_with_exact_per_sample_gradients(tiny_cfg, tiny_data):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.model.lora.freeze_a = True
    model = _lora(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_B" in n for n in trainable)
    assert dpsgd.resolve_engine(model) == "lora_fast"
    batch = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(4))
    fast, ref = _grad_samples(model, batch, "lora_fast"), _grad_samples(model, batch, "opacus")
    assert fast.keys() == ref.keys() == set(trainable)
    for n in trainable:
        torch.testing.assert_close(fast[n], ref[n], rtol=1e-4, atol=1e-7)
    loaded = models.LoadedModel(model=model, tokenizer=None, device=torch.device("cpu"))
    res = local_round(loaded, models.adapter_state(model), tiny_data.clients[0].train, cfg,
                      noise_multiplier=1.0, seed=0)
    assert all(not d.any() for k, d in res.delta.items() if "lora_A" in k)
    assert all(d.any() for k, d in res.delta.items() if "lora_B" in k)
