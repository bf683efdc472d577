"""Using a trained adapter: load it, generate, merge and export it (fedllm.export, CLI).

The run directories are made the way the ServerApp finishes a run (config.yaml, then the
adapter saved with PEFT's save_pretrained), on the tiny random-init model, with adapter
weights drawn at random so that the adapter visibly changes the model.
"""

import json

import numpy as np
import pytest
import torch

from fedllm import export, models
from fedllm.cli import main
from fedllm.config import compose, to_yaml
from fedllm.report import SMOLLM2_HUB_ID, model_card

PROMPT = "To be, or not to be"


def make_run_dir(path, adapter: str):
    cfg = compose(["model=tiny", f"adapter={adapter}", "run.seed=3"])
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(to_yaml(cfg))
    loaded = models.build(cfg.model, seed=cfg.run.seed, device="cpu")
    rng = np.random.default_rng(0)
    trained = {k: rng.normal(0, 0.5, v.shape).astype(np.float32)
               for k, v in models.adapter_state(loaded.model).items()}
    models.load_adapter_state(loaded.model, trained)
    models.unwrap(loaded.model).save_pretrained(path / "adapter")
    export.set_portable_base(path / "adapter", cfg)
    return path, trained


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("export") / "lora", "lora")


@pytest.fixture(scope="module")
def prompt_run(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("export") / "pt", "prompt_tuning")


@pytest.fixture(scope="module")
def lora_model(lora_run):
    return export.load_adapter(lora_run[0]), export.load_tokenizer(lora_run[0])


def logits(model, tokenizer, text=PROMPT):
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_load_adapter_restores_the_trained_adapter_on_the_training_base(lora_run, lora_model):
    from peft import PeftModel

    run_dir, trained = lora_run
    model, tokenizer = lora_model
    assert isinstance(model, PeftModel)
    loaded = models.adapter_state(model)
    assert loaded.keys() == trained.keys()
    for name, value in trained.items():
        np.testing.assert_array_equal(loaded[name], value)
    # The frozen base is rebuilt as training built it (tiny: from the run's seed).
    cfg = export.run_config(run_dir)
    fresh = models.load_base_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.run.seed)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, tokenizer), logits(fresh, tokenizer))


def test_generate_gives_base_and_adapter_text_greedy_and_deterministic(lora_run, lora_model):
    model, tokenizer = lora_model
    base = export.generate(model, tokenizer, PROMPT, max_new_tokens=8, adapter=False)
    tuned = export.generate(model, tokenizer, PROMPT, max_new_tokens=8, adapter=True)
    assert base.strip() and tuned.strip()
    assert base != tuned  # the (random, large) adapter changes the continuation
    assert export.generate(model, tokenizer, PROMPT, max_new_tokens=8, adapter=True) == tuned
    # "base" is the base model alone: the same text a bare base model generates.
    cfg = export.run_config(lora_run[0])
    fresh = models.load_base_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.run.seed)
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = fresh.generate(**ids, max_new_tokens=8, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == base


def test_generate_with_a_soft_prompt(prompt_run):
    model, tokenizer = export.load_adapter(prompt_run[0]), export.load_tokenizer(prompt_run[0])
    assert export.is_prompt_tuning(model)
    rows = export.compare(model, tokenizer, [PROMPT], max_new_tokens=6)
    assert rows[0].base.strip() and rows[0].adapter.strip()
    # A random-init model repeats one token either way, so check the decoding itself: the
    # first new token is the argmax of the soft-prompted (resp. bare) model's last logits.
    with_prompt = logits(model, tokenizer)[0, -1]
    with model.disable_adapter():
        bare = logits(model, tokenizer)[0, -1]
    assert not torch.allclose(with_prompt, bare)
    for text, last in ((rows[0].adapter, with_prompt), (rows[0].base, bare)):
        first = export.generate(model, tokenizer, PROMPT, max_new_tokens=1,
                                adapter=text is rows[0].adapter)
        assert first == tokenizer.decode([int(last.argmax())]) and text.startswith(first)


def test_cli_generate_prints_base_and_adapter_side_by_side(lora_run, capsys):
    assert main(["generate", str(lora_run[0]), "--prompt", PROMPT, "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "base model" in out and "with adapter" in out and "greedy" in out


def test_export_merged_lora_is_a_plain_checkpoint_with_the_peft_logits(lora_run, lora_model,
                                                                      tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "merged"
    assert main(["export", str(lora_run[0]), "--merged", str(out_dir)]) == 0
    assert "merge_and_unload" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(out_dir)
    assert not any("lora" in name for name in merged.state_dict())
    model, tokenizer = lora_model
    torch.testing.assert_close(logits(merged, tokenizer), logits(model, tokenizer),
                               rtol=1e-4, atol=1e-4)
    assert "merge_and_unload" in (out_dir / "README.md").read_text()


def test_export_merged_prompt_tuning_exports_base_plus_soft_prompt(prompt_run, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "merged"
    assert main(["export", str(prompt_run[0]), "--merged", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    assert "nothing to merge" in printed and "soft_prompt" in printed
    assert "nothing to merge" in (out_dir / "README.md").read_text()
    restored = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out_dir),
                                         out_dir / "soft_prompt")
    original = export.load_adapter(prompt_run[0])
    tokenizer = export.load_tokenizer(prompt_run[0])
    torch.testing.assert_close(logits(restored, tokenizer), logits(original, tokenizer))


def test_export_refuses_a_used_directory_and_a_non_run(lora_run, tmp_path, capsys):
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("x")
    assert main(["export", str(lora_run[0]), "--merged", str(used)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in used.iterdir()) == ["keep.txt"]
    assert main(["export", str(tmp_path), "--merged", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "no config.yaml" in err and len(err.strip().splitlines()) == 1
    assert main(["export", str(lora_run[0])]) == 2


def test_gguf_export_round_trips_names_shapes_and_logits(lora_run, lora_model, tmp_path):
    import gguf
    from transformers import AutoModelForCausalLM

    path = tmp_path / "model.gguf"
    assert main(["export", str(lora_run[0]), "--gguf", str(path)]) == 0
    reader = gguf.GGUFReader(path)
    model, tokenizer = lora_model
    config = model.config
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    hidden, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    assert shapes["token_embd.weight"] == (config.vocab_size, hidden)
    assert "output.weight" not in shapes  # tied to the embedding, as in the model
    for block in range(config.num_hidden_layers):
        assert shapes[f"blk.{block}.attn_q.weight"] == (hidden, hidden)
        assert shapes[f"blk.{block}.attn_k.weight"] == (kv, hidden)
        assert shapes[f"blk.{block}.ffn_up.weight"] == (config.intermediate_size, hidden)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == config.num_hidden_layers
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == config.vocab_size
    # Faithful: transformers' GGUF loader (llama.cpp's layout, q/k un-permuted) gives back
    # the adapter's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    torch.testing.assert_close(logits(reloaded, tokenizer), logits(model, tokenizer),
                               rtol=1e-4, atol=1e-4)


def test_gguf_writer_handles_grouped_query_attention(tmp_path):
    """SmolLM2 has 9 query heads and 3 key/value heads: k's rows are permuted per kv head."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=48, intermediate_size=96,
                         num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path / "gqa.gguf"
    export._write_gguf(model, models.smollm2_gguf_path(), path, name="gqa test")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    ids = torch.tensor([[1, 500, 42, 7, 9000]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_gguf_export_of_a_soft_prompt_is_refused_with_the_reason(prompt_run, tmp_path, capsys):
    path = tmp_path / "model.gguf"
    assert main(["export", str(prompt_run[0]), "--gguf", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no place for learned input embeddings" in err and "--merged" in err
    assert not path.exists() and list(tmp_path.iterdir()) == []


def hf_dir(tmp_path):
    path = tmp_path / "my-llama"
    path.mkdir()
    (path / "config.json").write_text("{}")
    return path


def test_gguf_export_from_a_hf_directory_names_the_converter(tmp_path):
    cfg = compose(["model=hf", f"model.path={hf_dir(tmp_path)}", "adapter=lora"])
    with pytest.raises(export.ExportError, match="convert_hf_to_gguf.py"):
        export._tokenizer_gguf(cfg)


# --------------------------------------------------------------------------- model card

def _card(overrides, samples=None):
    cfg = compose(overrides)
    report = {"example_level": None, "user_level": None, "rounds": 1, "delta": 1e-5}
    return model_card(cfg, report, None, samples)


def front_matter(card: str) -> str:
    return card.split("---")[1]


def test_model_card_base_model_is_portable(tmp_path):
    assert f'base_model: "{SMOLLM2_HUB_ID}"' in front_matter(_card([]))
    path = hf_dir(tmp_path)
    assert f'base_model: "{path}"' in front_matter(_card(["model=hf", f"model.path={path}"]))
    assert "base_model" not in front_matter(_card(["model=tiny"]))
    assert ".cache" not in _card([])


def test_exported_adapter_config_points_at_the_portable_base(lora_run, tmp_path):
    cfg = compose([])
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/root/.cache/fedllm/smollm2-135m-instruct"}))
    export.set_portable_base(adapter, cfg)
    assert json.loads((adapter / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == SMOLLM2_HUB_ID


def test_model_card_shows_sample_generations_or_why_not(lora_model):
    model, tokenizer = lora_model
    tiny = compose(["model=tiny", "adapter=lora"])
    skipped = export.sample_generations(tiny, model, tokenizer)
    assert "random-init" in _card(["model=tiny"], skipped).split("## Sample generations")[1]
    rows = export.compare(model, tokenizer, ["My lord,"], max_new_tokens=3)
    samples = {"max_new_tokens": 3, "decoding": "greedy", "samples": [vars(r) for r in rows]}
    section = _card([], samples).split("## Sample generations")[1]
    assert '"My lord,"' in section
    assert f"base: {json.dumps(rows[0].base)}" in section
    assert f"adapter: {json.dumps(rows[0].adapter)}" in section


def test_gguf_export_never_replaces_an_existing_file(lora_run, tmp_path, capsys):
    path = tmp_path / "mine.gguf"
    path.write_bytes(b"a model file someone made earlier")
    assert main(["export", str(lora_run[0]), "--gguf", str(path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert path.read_bytes() == b"a model file someone made earlier"


def _soft_prompted_opt(tokenizer):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    base = OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64,
                                    num_hidden_layers=2, num_attention_heads=2,
                                    word_embed_proj_dim=32, max_position_embeddings=128,
                                    pad_token_id=tokenizer.pad_token_id)).eval()
    return get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))


def test_the_model_cards_samples_survive_a_model_whose_cached_decoding_fails():
    """OPT with a soft prompt fails at the first cached decoding step (PEFT adds position
    embeddings for the prompt tokens only): the samples are generated without the cache, and
    a model that cannot generate at all leaves a one-line reason instead of a traceback."""
    from types import SimpleNamespace

    from fedllm.config import compose
    from fedllm.models import load_tokenizer

    tokenizer = load_tokenizer(compose(["model=tiny"]).model)
    model = _soft_prompted_opt(tokenizer)
    with pytest.raises(RuntimeError):
        export.compare(model, tokenizer, ["My lord, I", "To be"], max_new_tokens=3)
    cfg = SimpleNamespace(model=SimpleNamespace(name="hf"))
    doc = export.sample_generations(cfg, model, tokenizer)
    assert len(doc["samples"]) == len(export.SAMPLE_PROMPTS) and "skipped" not in doc

    def broken(*args, **kwargs):
        raise ValueError("this model cannot\ngenerate")

    model.generate = broken
    doc = export.sample_generations(cfg, model, tokenizer)
    assert doc["skipped"].startswith("generation failed for this model (ValueError: this model")
    assert "\n" not in doc["skipped"]
