"""train.gradient_checkpointing: the decoder layers' activations are recomputed in backward,
and per-sample gradients (both engines) and a whole DP round are unchanged."""

import copy

import numpy as np
import pytest
import torch

from fedllm import models
from fedllm.config import compose
from fedllm.privacy import dpsgd
from fedllm.train import local_round


def model_for(adapter):
    cfg = compose(["model=tiny", f"adapter={adapter}", "train.batch_size=4",
                   "train.physical_batch_size=2", "train.local_steps=2"])
    loaded = models.build(cfg.model, seed=0, device="cpu")
    with torch.no_grad():  # LoRA B starts at zero: make every gradient non-trivial
        for name, p in loaded.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return cfg, loaded


def per_sample(model, batch, checkpointing):
    models.set_gradient_checkpointing(model, checkpointing)
    model.train()
    # Inside the checkpointed layer (transformers checkpoints a layer's forward, so hooks on
    # the layer itself run once): its attention runs again in backward when it is recomputed.
    inner = models.unwrap(model).get_base_model().model.layers[0].self_attn
    calls = []
    hook = inner.register_forward_hook(lambda *a: calls.append(1))
    try:
        with dpsgd.per_sample_gradients(model) as wrapped:
            dpsgd.sequence_loss(wrapped, batch).backward()
            grads = {n: p.grad_sample.clone() for n, p in model.named_parameters()
                     if p.requires_grad}
    finally:
        hook.remove()
        model.zero_grad()
    return grads, len(calls)


@pytest.mark.parametrize("adapter,engine", [("lora", "lora_fast"), ("prompt_tuning", "opacus")])
def test_per_sample_gradients_are_unchanged_by_checkpointing(adapter, engine):
    _, loaded = model_for(adapter)
    assert dpsgd.resolve_engine(loaded.model) == engine
    torch.manual_seed(0)
    batch = torch.randint(0, 500, (3, 16))
    plain, plain_calls = per_sample(loaded.model, batch, False)
    recomputed, calls = per_sample(loaded.model, batch, True)
    assert (plain_calls, calls) == (1, 2)  # the layer ran again in backward: it was recomputed
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-7)


def test_a_dp_round_is_unchanged_by_checkpointing(tiny_data):
    cfg, loaded = model_for("lora")
    start = models.adapter_state(loaded.model)
    data = tiny_data.clients[0].train
    deltas = []
    for flag in (False, True):
        c = copy.deepcopy(cfg)
        c.train.gradient_checkpointing = flag
        models.load_adapter_state(loaded.model, start)
        deltas.append(local_round(loaded, start, data, c, noise_multiplier=1.0, seed=3).delta)
    for key in deltas[0]:
        np.testing.assert_allclose(deltas[1][key], deltas[0][key], rtol=1e-4, atol=1e-7)
