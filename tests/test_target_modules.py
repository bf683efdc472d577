"""model.lora.target_modules: ``auto`` fits each architecture; a wrong name is one line, exit 2.

Each family's module tree is built from a tiny config on the meta device (no weights), the way
``resolve_target_modules`` sees a real checkpoint's.
"""

import pytest
import torch

from fedllm import models
from fedllm.cli import main
from fedllm.config import compose

# model_type -> (transformers config class, tiny kwargs, what auto adapts)
FAMILIES = {
    "llama": ("LlamaConfig", {}, ["q_proj", "v_proj"]),
    "qwen2": ("Qwen2Config", {}, ["q_proj", "v_proj"]),
    "qwen3": ("Qwen3Config", {"head_dim": 16}, ["q_proj", "v_proj"]),
    "mistral": ("MistralConfig", {}, ["q_proj", "v_proj"]),
    "gemma2": ("Gemma2Config", {"head_dim": 16}, ["q_proj", "v_proj"]),
    "opt": ("OPTConfig", {"ffn_dim": 64, "word_embed_proj_dim": 32}, ["q_proj", "v_proj"]),
    "gpt2": ("GPT2Config", {"n_embd": 32, "n_layer": 2, "n_head": 2}, ["c_attn"]),
    "gpt_neox": ("GPTNeoXConfig", {}, ["query_key_value"]),
    "phi3": ("Phi3Config", {"pad_token_id": 0}, ["qkv_proj"]),
}
COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2)


def skeleton(model_type):
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, extra, _ = FAMILIES[model_type]
    cls = getattr(transformers, cls_name)
    kwargs = {**COMMON, **extra} if model_type != "gpt2" else {"vocab_size": 128, **extra}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cls(**kwargs))


def lora_cfg(targets="auto"):
    cfg = compose(["model=tiny", "adapter=lora"])
    cfg.model.lora.target_modules = targets
    return cfg.model


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_auto_adapts_each_familys_attention_projections(model_type):
    model = skeleton(model_type)
    assert model.config.model_type == model_type
    resolved = models.resolve_target_modules(lora_cfg(), model)
    assert resolved == FAMILIES[model_type][2]
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=resolved))
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())


def test_a_name_that_matches_no_layer_names_the_models_layers():
    with pytest.raises(models.ModelError) as err:
        models.resolve_target_modules(lora_cfg(["q_proj", "c_attn"]), skeleton("llama"))
    message = str(err.value)
    assert "'c_attn' matches no layer" in message and "\n" not in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message
    # A dotted suffix, as PEFT matches names, is a match.
    assert models.resolve_target_modules(lora_cfg(["self_attn.q_proj"]), skeleton("llama")) \
        == ["self_attn.q_proj"]


def test_the_run_records_the_resolved_list(tmp_path):
    from fedllm import api

    cfg, _ = api.prepare(compose(["model=tiny", "adapter=lora", f"run.dir={tmp_path / 'run'}"]))
    assert list(cfg.model.lora.target_modules) == ["q_proj", "v_proj"]
    prompt, _ = api.prepare(compose(["model=tiny", "adapter=prompt_tuning",
                                     f"run.dir={tmp_path / 'run2'}"]))
    assert prompt.model.lora.target_modules == "auto"  # prompt tuning adapts no layer


def test_a_wrong_target_module_is_one_line_and_exit_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["simulate", "model=tiny", "adapter=lora", "model.lora.target_modules=[c_attn]",
                 f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedllm: error: model.lora.target_modules: 'c_attn' matches no layer")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert not run_dir.exists()
