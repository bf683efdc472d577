"""Prompt tuning (PEFT soft prompts) under DP-SGD: exact per-sample gradients, real-token loss,
adapter state round trip, clipping; the same checks as the LoRA ones in test_dpsgd.py."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedllm import models
from fedllm.config import compose
from fedllm.privacy import dpsgd
from fedllm.train import local_round

VIRTUAL = 3


@pytest.fixture(scope="module")
def pt_cfg():
    return compose(["model=tiny", "adapter=prompt_tuning", "federation.num_clients=4",
                    "federation.clients_per_round=2", "federation.rounds=2",
                    "train.local_steps=2", f"model.prompt_tuning.num_virtual_tokens={VIRTUAL}"])


@pytest.fixture()
def pt_model(pt_cfg):
    tok = models.load_tokenizer(pt_cfg.model)
    base = models.load_base_model(pt_cfg.model, vocab_size=len(tok), seed=0)
    return models.attach_adapter(base, pt_cfg.model, seed=0), tok


def test_only_the_soft_prompt_trains_and_round_trips(pt_model):
    model, _ = pt_model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert list(trainable) == ["prompt_encoder.default.embedding.weight"]
    assert trainable["prompt_encoder.default.embedding.weight"].shape == (VIRTUAL, 64)
    assert models.num_virtual_tokens(model) == VIRTUAL
    state = models.adapter_state(model)
    assert list(state) == ["prompt_embeddings"] and state["prompt_embeddings"].shape == (VIRTUAL, 64)
    new = {"prompt_embeddings": state["prompt_embeddings"] + 1.0}
    models.load_adapter_state(model, new)
    np.testing.assert_allclose(models.adapter_state(model)["prompt_embeddings"],
                               new["prompt_embeddings"])


def test_loss_scores_only_the_real_tokens(pt_model):
    model, _ = pt_model
    x = torch.randint(0, 1000, (2, 12))
    with torch.no_grad():
        logits = model(input_ids=x).logits
        assert logits.shape[1] == 12 + VIRTUAL  # PEFT prepends the virtual tokens
        # Independent reference: the base model on [soft prompt; token embeddings].
        base = model.get_base_model()
        prompt = model.prompt_encoder["default"].embedding.weight
        embeds = torch.cat([prompt.expand(2, -1, -1), base.get_input_embeddings()(x)], dim=1)
        ref_logits = base(inputs_embeds=embeds).logits[:, VIRTUAL:]
        ref = F.cross_entropy(ref_logits[:, :-1].transpose(1, 2), x[:, 1:],
                              reduction="none").mean(dim=1)
        torch.testing.assert_close(dpsgd.per_sequence_losses(model, x), ref)


def test_per_sample_gradients_equal_naive_loop(pt_model):
    model, _ = pt_model
    torch.manual_seed(0)
    batch = torch.randint(0, 1000, (5, 16))
    (name, param), = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    naive = []
    for x in batch:
        model.zero_grad()
        dpsgd.sequence_loss(model, x[None]).backward()
        naive.append(param.grad.detach().clone())
    model.zero_grad()
    with dpsgd.grad_sample_module(model) as gsm:
        dpsgd.sequence_loss(gsm, batch).backward()
        assert param.grad_sample.shape == (5, VIRTUAL, 64)
        torch.testing.assert_close(param.grad_sample, torch.stack(naive), rtol=1e-4, atol=1e-6)
        dpsgd.check_per_sample([param], 5)
    assert not hasattr(param, "grad_sample")


def test_peft_batch_of_one_prompt_lookup_is_refused(pt_model):
    """PEFT's own get_prompt embeds one copy and repeats it: Opacus would then clip the batch's
    summed gradient as one example's. The DP step must refuse that, not train on it."""
    model, _ = pt_model
    del model.get_prompt  # back to PEFT's class method (our per-example lookup is removed)
    params = [p for p in model.parameters() if p.requires_grad]
    with dpsgd.grad_sample_module(model) as gsm:
        opt = dpsgd.make_dp_optimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=1.0,
                                      max_grad_norm=1.0, expected_batch_size=4, noise=None)
        with pytest.raises(RuntimeError, match="rows for 4 examples"):
            dpsgd.dp_step(gsm, opt, torch.randint(0, 1000, (4, 16)), None, torch.device("cpu"))


def _client_data(cfg, tok):
    from fedllm.config import min_client_sequences
    from fedllm.data.federated import build_federated_data

    data = build_federated_data(cfg.data, tok, seq_len=cfg.train.seq_len,
                                min_sequences=min_client_sequences(cfg),
                                num_clients=cfg.federation.num_clients, seed=0)
    return data.clients[0].train


def test_dp_round_moves_only_the_prompt_and_clips_per_sample(pt_cfg, pt_model):
    model, tok = pt_model
    data = _client_data(pt_cfg, tok)
    loaded = models.LoadedModel(model=model, tokenizer=tok, device=torch.device("cpu"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = models.adapter_state(model)
    res = local_round(loaded, start, data, pt_cfg, noise_multiplier=1.0, seed=3)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"prompt_encoder.default.embedding.weight"}
    assert res.event.noise_multiplier == 1.0 and res.event.steps == pt_cfg.train.local_steps
    assert np.abs(res.delta["prompt_embeddings"]).max() > 0

    # One example, no noise, SGD lr=1: |update| * B = C exactly when the gradient exceeds C.
    models.load_adapter_state(model, start)
    cfg = copy.deepcopy(pt_cfg)
    clip = 1e-4
    cfg.privacy.example.max_grad_norm = clip
    cfg.train.optimizer, cfg.train.lr, cfg.train.momentum = "sgd", 1.0, 0.0
    cfg.train.local_steps, cfg.train.batch_size = 1, 1
    res = local_round(loaded, start, data[:1], cfg, noise_multiplier=0.0, seed=0)
    norm = float(np.linalg.norm(res.delta["prompt_embeddings"].astype(np.float64)))
    assert norm == pytest.approx(clip, rel=1e-3)


def test_physical_batches_give_the_same_clipped_sum(pt_cfg, pt_model):
    model, tok = pt_model
    data = _client_data(pt_cfg, tok)[:6]
    loaded = models.LoadedModel(model=model, tokenizer=tok, device=torch.device("cpu"))
    start = models.adapter_state(model)
    deltas = []
    for physical in (None, 2):
        cfg = copy.deepcopy(pt_cfg)
        cfg.train.optimizer, cfg.train.lr, cfg.train.momentum = "sgd", 1.0, 0.0
        cfg.train.local_steps, cfg.train.batch_size = 1, 6
        cfg.train.physical_batch_size = physical
        deltas.append(local_round(loaded, start, data, cfg, noise_multiplier=0.0, seed=0).delta)
        models.load_adapter_state(model, start)
    np.testing.assert_allclose(deltas[0]["prompt_embeddings"], deltas[1]["prompt_embeddings"],
                               rtol=1e-4, atol=1e-8)


def test_text_init_uses_the_local_tokenizer(pt_cfg):
    cfg = copy.deepcopy(pt_cfg)
    cfg.model.prompt_tuning.init, cfg.model.prompt_tuning.init_text = "text", "To be or not"
    tok = models.load_tokenizer(cfg.model)
    base = models.load_base_model(cfg.model, vocab_size=len(tok), seed=0)
    model = models.attach_adapter(base, cfg.model, seed=0)
    ids = tok("To be or not")["input_ids"]
    want = base.get_input_embeddings().weight[torch.tensor((ids * VIRTUAL)[:VIRTUAL])]
    torch.testing.assert_close(model.prompt_encoder["default"].embedding.weight, want)
