"""The architecture matrix: tiny random-init models of ten families, each saved as a local
Hugging Face directory (what a user points ``model=hf model.path=DIR`` at), crossed with LoRA,
FFA-LoRA and prompt tuning under DP.

Each cell loads the model the way a run does (``model.lora.target_modules=auto``), checks that
the per-sample gradients of the engine the run would use (the LoRA fast path or Opacus' hooks)
equal a per-example loop, trains one DP round, exports the adapter (a merged checkpoint for
LoRA, the base with its soft prompt for prompt tuning) and generates text from the export.
``ENGINES`` records which family uses which path; the README's table says the same.
"""

import copy
import shutil

import numpy as np
import pytest
import torch

from fedllm import export, models
from fedllm.config import compose, to_yaml
from fedllm.privacy import dpsgd
from fedllm.train import local_round

HIDDEN = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              num_key_value_heads=2, max_position_embeddings=256)
# family -> (transformers config class, its kwargs beyond HIDDEN, or a full set when None)
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),
    "phi": ("PhiConfig", {}),
    "opt": ("OPTConfig", {"ffn_dim": 64, "word_embed_proj_dim": 32}),
    "gpt2": ("GPT2Config", None),
    "gpt_neox": ("GPTNeoXConfig", {}),
}
ADAPTERS = {"lora": ["adapter=lora"], "ffa-lora": ["adapter=lora", "model.lora.freeze_a=true"],
            "prompt": ["adapter=prompt_tuning", "model.prompt_tuning.init=random"]}
# The per-sample gradient engine each adapter uses, on every family: PEFT wraps GPT-2's Conv1D
# in the same LoRA Linear as a plain Linear (A and B are Linear layers), so the fast path
# covers it; the soft prompt goes through Opacus' embedding grad sampler.
ENGINES = {"lora": "lora_fast", "ffa-lora": "lora_fast", "prompt": "opacus"}


def family_config(family, vocab_size, pad_token_id):
    import transformers

    cls_name, extra = FAMILIES[family]
    cls = getattr(transformers, cls_name)
    if extra is None:  # GPT-2 names its sizes differently
        return cls(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=256,
                   pad_token_id=pad_token_id)
    return cls(vocab_size=vocab_size, pad_token_id=pad_token_id, **HIDDEN, **extra)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """family -> a local HF directory: random-init weights and the tiny model's tokenizer."""
    from transformers import AutoModelForCausalLM

    tiny = compose(["model=tiny"]).model
    tok = models.load_tokenizer(tiny)
    tok_dir = models.tokenizer_dir(tiny.name, tiny.path, models._tiny_vocab(tiny))
    dirs = {}
    for family in FAMILIES:
        out = tmp_path_factory.mktemp(family)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(
            family_config(family, len(tok), tok.pad_token_id))
        model.save_pretrained(out)
        for f in tok_dir.iterdir():
            if f.is_file():
                shutil.copy(f, out / f.name)
        dirs[family] = out
    return dirs


def cell_cfg(path, adapter):
    return compose(["model=hf", f"model.path={path}", *ADAPTERS[adapter],
                    "train.batch_size=4", "train.physical_batch_size=null", "train.lr=1e-2",
                    "train.local_steps=1", "train.seq_len=16", "federation.num_clients=4",
                    "federation.clients_per_round=2", "federation.rounds=1"])


def per_example_loop(model, batch, trainable):
    grads = {n: [] for n in trainable}
    for x in batch:
        model.zero_grad()
        dpsgd.sequence_loss(model, x[None]).backward()
        for n, p in trainable.items():
            grads[n].append(p.grad.detach().clone())
    model.zero_grad()
    return {n: torch.stack(g) for n, g in grads.items()}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_architecture_matrix(family, adapter, family_dirs, tiny_data, tmp_path):
    cfg = cell_cfg(family_dirs[family], adapter)
    loaded = models.build(cfg.model, seed=0, device="cpu")
    model = loaded.model
    assert models.unwrap(model).config.model_type == family
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable
    if adapter == "ffa-lora":
        assert all("lora_B" in n for n in trainable)
    with torch.no_grad():  # LoRA B starts at zero: make every gradient non-trivial
        for n, p in trainable.items():
            if "lora_B" in n:
                p.normal_(0, 0.05)

    # Per-sample gradients of the engine the run uses equal a per-example loop.
    assert dpsgd.resolve_engine(model) == ENGINES[adapter]
    torch.manual_seed(0)
    batch = torch.randint(0, 500, (3, 12))
    expected = per_example_loop(model, batch, trainable)
    with dpsgd.per_sample_gradients(model) as wrapped:
        dpsgd.sequence_loss(wrapped, batch).backward()
        for n, p in trainable.items():
            torch.testing.assert_close(p.grad_sample, expected[n], rtol=1e-3, atol=1e-6)
    model.zero_grad()

    # One DP round moves only the adapter.
    start = models.adapter_state(model)
    result = local_round(loaded, start, tiny_data.clients[0].train, cfg, noise_multiplier=1.0,
                         seed=0)
    assert result.event.noise_multiplier == 1.0
    assert all(np.isfinite(d).all() for d in result.delta.values())
    assert any(np.abs(d).max() > 0 for d in result.delta.values())
    models.load_adapter_state(model, {k: start[k] + result.delta[k] for k in start})

    # Export it as a run would be exported, then generate text from the export.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    models.unwrap(model).save_pretrained(run_dir / "adapter")
    exported = export.export_merged(run_dir, tmp_path / "merged")
    assert (tmp_path / "merged" / "config.json").is_file(), exported
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    text = export.generate_batch(merged, loaded.tokenizer, ["My lord, I", "To be"],
                                 max_new_tokens=3, use_cache=adapter != "prompt")
    assert len(text) == 2 and all(isinstance(t, str) for t in text)
    if adapter != "prompt":  # merged LoRA: the same logits as the adapter it came from
        ids = loaded.tokenizer(["My lord, I"], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, model(ids).logits,
                                       rtol=1e-4, atol=1e-4)
    loaded_again = export.load_adapter(run_dir)
    rows = export._compare_any_way(loaded_again, loaded.tokenizer)
    assert len(rows) == len(export.SAMPLE_PROMPTS)
