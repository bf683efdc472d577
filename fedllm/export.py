"""Use a trained adapter: load it on its base model, generate text, merge it, export it.

A run directory holds ``config.yaml`` (how the base model was loaded) and ``adapter/`` (the
PEFT adapter the ServerApp exported). ``load_adapter`` rebuilds the base model exactly as
training did (``fedllm.models``: tiny random-init from the run's seed, the bundled SmolLM2 via
the cache, a local HF directory or ``.gguf`` file) and loads the adapter on top of it.

Exports:
  * ``export_merged``: a standard Hugging Face checkpoint. LoRA is merged into the weights
    (``merge_and_unload``); a soft prompt changes no weight, so prompt tuning exports the base
    model plus the PEFT adapter directory, and says so.
  * ``export_gguf``: a llama.cpp model file (fp32), written with the ``gguf`` package's
    ``GGUFWriter``, for Llama-architecture models whose tokenizer comes from a GGUF file (the
    bundled SmolLM2, ``model.path=*.gguf``, and ``model=tiny``, which borrows SmolLM2's).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fedllm.report import SAMPLES_FILE, portable_base_model

log = logging.getLogger("fedllm.export")

# Fixed prompts for the model card's sample generations (short and greedy: the ServerApp
# generates them at the end of every run).
SAMPLE_PROMPTS = ("To be, or not to be,", "My lord, I", "Good morrow, sweet")
SAMPLE_TOKENS = 24


class ExportError(RuntimeError):
    """A run directory cannot be loaded or exported as asked (one readable line)."""


# --------------------------------------------------------------------------- loading

def run_config(run_dir: Path):
    from fedllm.config import load_run_config

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a fedllm run directory (no config.yaml)")
    return load_run_config(path)


def adapter_dir(run_dir: Path) -> Path:
    path = Path(run_dir) / "adapter"
    if not (path / "adapter_config.json").is_file():
        raise ExportError(f"{run_dir} has no exported adapter (adapter/adapter_config.json): "
                          "the run did not finish; `fedllm resume` it first")
    return path


def load_tokenizer(run_dir: Path):
    """The tokenizer the run trained with."""
    return _tokenizer(run_config(run_dir))


def _tokenizer(cfg):
    from fedllm import models

    try:
        return models.load_tokenizer(cfg.model)
    except models.ModelError as exc:
        raise ExportError(str(exc)) from None


def load_base(cfg, tokenizer):
    """The frozen base model, rebuilt exactly as training built it (same source, same seed)."""
    from fedllm import models

    try:
        return models.load_base_model(cfg.model, vocab_size=len(tokenizer), seed=cfg.run.seed)
    except models.ModelError as exc:
        raise ExportError(str(exc)) from None


def load_adapter(run_dir: Path, device: str = "cpu"):
    """The run's trained adapter on its base model: a ``peft.PeftModel`` in eval mode."""
    return load_run_model(run_dir, device)[1]


def load_run_model(run_dir: Path, device: str = "cpu"):
    """(config, ``peft.PeftModel`` in eval mode, tokenizer) of a finished run."""
    from peft import PeftModel

    cfg = run_config(run_dir)
    adapter = adapter_dir(run_dir)
    tokenizer = _tokenizer(cfg)
    model = PeftModel.from_pretrained(load_base(cfg, tokenizer), adapter)
    model.to(device)
    model.eval()
    return cfg, model, tokenizer


def is_prompt_tuning(model) -> bool:
    return bool(getattr(model.active_peft_config, "is_prompt_learning", False))


# --------------------------------------------------------------------------- generation

def generate(model, tokenizer, prompt: str, max_new_tokens: int = 32, adapter: bool = True,
             do_sample: bool = False) -> str:
    """The continuation of ``prompt`` (new text only), greedy by default (deterministic).

    ``adapter=False`` generates with the base model alone (adapter disabled).
    """
    return generate_batch(model, tokenizer, [prompt], max_new_tokens, adapter, do_sample)[0]


def generate_batch(model, tokenizer, prompts: list[str], max_new_tokens: int = 32,
                   adapter: bool = True, do_sample: bool = False,
                   use_cache: bool = True) -> list[str]:
    """Continuations of several prompts in one ``generate`` call (left-padded batch): on a
    CPU a step costs about the same for 1 or 3 sequences, so batching divides the cost."""
    import torch

    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # new tokens must follow each prompt directly
    try:
        inputs = tokenizer(list(prompts), return_tensors="pt", padding=True).to(device)
    finally:
        tokenizer.padding_side = side
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=use_cache,
                  pad_token_id=tokenizer.pad_token_id)
    if not do_sample:  # no sampling knobs: the model's generation_config may carry some
        kwargs.update(temperature=None, top_p=None, top_k=None)
    with torch.no_grad(), _cpu_threads(1 if device.type == "cpu" else None):
        if adapter:
            out = model.generate(**inputs, **kwargs)
        else:
            with model.disable_adapter():
                out = model.get_base_model().generate(**inputs, **kwargs)
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


@contextlib.contextmanager
def _cpu_threads(count: int | None):
    """Run torch on ``count`` CPU threads inside the block (None: unchanged).

    Decoding runs one token at a time: tiny matrix products, where synchronising threads
    costs more than it saves. Measured on SmolLM2 (2 shared cores): 12 greedy tokens took
    0.5 s of CPU on one thread against 5-6 s on two.
    """
    import torch

    before = torch.get_num_threads()
    if count is not None:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Comparison:
    prompt: str
    base: str
    adapter: str


def compare(model, tokenizer, prompts, max_new_tokens: int = 32,
            use_cache: bool = True) -> list[Comparison]:
    """Base-model and adapter continuations of each prompt, greedy, one batch per side."""
    prompts = list(prompts)
    base = generate_batch(model, tokenizer, prompts, max_new_tokens, adapter=False,
                          use_cache=use_cache)
    tuned = generate_batch(model, tokenizer, prompts, max_new_tokens, adapter=True,
                           use_cache=use_cache)
    return [Comparison(prompt=p, base=b, adapter=a) for p, b, a in zip(prompts, base, tuned)]


def sample_generations(cfg, model, tokenizer) -> dict:
    """The model card's samples: fixed prompts, base vs adapter, greedy and short.

    A random-init tiny model only produces noise, so its samples are skipped with a note.
    """
    if cfg.model.name == "tiny":
        return {"skipped": "model=tiny is a random-init test model: its generations are noise, "
                           "so no samples were generated"}
    was_training = model.training
    model.eval()
    try:
        rows = _compare_any_way(model, tokenizer)
    except Exception as exc:  # a model generate() cannot serve: the run's files still land
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        log.warning("no samples for the model card: generation failed (%s)", reason)
        return {"skipped": f"generation failed for this model ({reason})"}
    finally:
        model.train(was_training)
    return {"max_new_tokens": SAMPLE_TOKENS, "decoding": "greedy",
            "samples": [vars(r) for r in rows]}


def _compare_any_way(model, tokenizer) -> list[Comparison]:
    """``compare``, and without the KV cache where cached decoding fails. Seen: OPT with a
    soft prompt (PEFT 0.21, transformers 5) adds position embeddings for the prompt tokens
    only and fails at the first cached step; uncached greedy decoding gives the same text."""
    try:
        return compare(model, tokenizer, SAMPLE_PROMPTS, SAMPLE_TOKENS)
    except RuntimeError as exc:
        log.info("cached generation failed (%s); generating without the cache", exc)
        return compare(model, tokenizer, SAMPLE_PROMPTS, SAMPLE_TOKENS, use_cache=False)


def write_samples(run_dir: Path, cfg, model, tokenizer) -> None:
    """``samples.json`` in the run directory; the model card (fedllm.report) reads it."""
    from fedllm.io import atomic_write_text

    doc = sample_generations(cfg, model, tokenizer)
    atomic_write_text(Path(run_dir) / SAMPLES_FILE, json.dumps(doc, indent=2) + "\n")


def set_portable_base(adapter_path: Path, cfg) -> None:
    """Point the exported adapter_config.json at a portable base model (a hub id or the path
    the user gave), never at fedllm's local conversion cache."""
    from fedllm.io import atomic_write_text

    path = Path(adapter_path) / "adapter_config.json"
    doc = json.loads(path.read_text())
    doc["base_model_name_or_path"] = portable_base_model(cfg)
    atomic_write_text(path, json.dumps(doc, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- merged export

@dataclass
class ExportResult:
    path: Path
    description: str  # what was exported and how to load it (also in the export's README)


def export_merged(run_dir: Path, out_dir: Path) -> ExportResult:
    """A standard Hugging Face checkpoint in ``out_dir`` (which must not exist or be empty)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_free(out_dir)
    cfg, model, tokenizer = load_run_model(run_dir)
    with _staging_dir(out_dir) as tmp:
        if is_prompt_tuning(model):
            description = _save_base_with_prompt(model, cfg, tmp, out_dir)
        else:
            description = _save_merged_lora(model, tmp, out_dir)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(_export_readme(cfg, description))
    return ExportResult(path=out_dir, description=description)


def _save_merged_lora(model, tmp: Path, out_dir: Path) -> str:
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # training turned the KV cache off; inference wants it
    merged.save_pretrained(tmp)
    return (f"the base model with the LoRA adapter merged into its weights (merge_and_unload): "
            f"a plain Hugging Face checkpoint. Load it with "
            f"transformers.AutoModelForCausalLM.from_pretrained({str(out_dir)!r}); "
            f"no PEFT needed.")


def _save_base_with_prompt(model, cfg, tmp: Path, out_dir: Path) -> str:
    base = model.get_base_model()
    base.config.use_cache = True
    base.save_pretrained(tmp)
    model.save_pretrained(tmp / "soft_prompt")
    set_portable_base(tmp / "soft_prompt", cfg)
    return (f"prompt tuning changes no weight of the model, so there is nothing to merge: "
            f"{out_dir} holds the unchanged base model (Hugging Face checkpoint) and, in "
            f"soft_prompt/, the PEFT prompt-tuning adapter (its trained virtual-token "
            f"embeddings, 'prompt_embeddings'). Load both: "
            f"base = transformers.AutoModelForCausalLM.from_pretrained({str(out_dir)!r}); "
            f"model = peft.PeftModel.from_pretrained(base, {str(out_dir / 'soft_prompt')!r}). "
            f"The base checkpoint alone does not contain what was trained.")


def _export_readme(cfg, description: str) -> str:
    from fedllm.report import describe_adapter

    return (f"# fedllm export\n\nBase model: `{portable_base_model_name(cfg)}`"
            f"; trained: {describe_adapter(cfg.model)}.\n\nWhat this directory holds: "
            f"{description}\n\n"
            f"The privacy guarantee of the training run (its `adapter/README.md` and "
            f"`privacy_report.html`) applies unchanged: exporting is post-processing.\n")


def _check_free(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty directory: choose a new one")
    check_destination(out_dir, "--merged")


def check_destination(target: Path, option: str) -> None:
    """``target`` can be created: its nearest existing ancestor is a writable directory (so an
    export is refused before the model is loaded, not after)."""
    target = Path(target).expanduser()
    for parent in target.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ExportError(f"{option} {target}: {parent} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ExportError(f"{option} {target}: {parent} is not writable")
            return


@contextlib.contextmanager
def _staging_dir(target: Path):
    """Write into a temporary sibling, then rename: a failed export leaves nothing behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.is_dir():
        target.rmdir()  # empty (checked before)
    os.replace(tmp, target)


# --------------------------------------------------------------------------- GGUF export

GGUF_ARCH = "llama"


def export_gguf(run_dir: Path, out_file: Path) -> ExportResult:
    """A llama.cpp model file (``general.architecture=llama``, fp32 tensors) of the base model
    with the LoRA adapter merged; tokenizer metadata copied from the source GGUF."""
    run_dir, out_file = Path(run_dir), Path(out_file)
    if out_file.exists():  # never replaced silently (a model file can take hours to remake)
        raise ExportError(f"--gguf: {out_file} already exists; remove it or choose another "
                          "file name")
    check_destination(out_file, "--gguf")
    cfg = run_config(run_dir)
    if cfg.model.adapter == "prompt_tuning":
        raise ExportError(
            "GGUF export of a prompt-tuning run is not possible: a GGUF model file holds "
            "weights, hyperparameters and a tokenizer, with no place for learned input "
            "embeddings prepended to every prompt, and a soft prompt changes no weight that "
            "could be merged. Use `fedllm export RUN_DIR --merged DIR` (base model + PEFT soft "
            "prompt) or train with adapter=lora")
    source = _tokenizer_gguf(cfg)
    model = load_run_model(run_dir)[1]
    merged = model.merge_and_unload()
    _check_llama(merged.config)
    with _staging_file(out_file) as tmp:
        # The tiny model's tokenizer is SmolLM2's cut to its first N tokens: cut the copy too.
        cut = cfg.model.name == "tiny" and not cfg.model.path and cfg.model.tiny.vocab_size
        _write_gguf(merged, source, tmp, name=f"fedllm {portable_base_model_name(cfg)} + LoRA",
                    cut_vocab=bool(cut))
    return ExportResult(path=out_file, description=(
        f"a llama.cpp GGUF file (architecture llama, fp32) of the base model with the LoRA "
        f"adapter merged, tokenizer from {source.name}. Run it with llama.cpp, e.g. "
        f"`llama-cli -m {out_file}`; quantize it with llama.cpp's llama-quantize if wanted"))


def portable_base_model_name(cfg) -> str:
    return portable_base_model(cfg) or "tiny random-init Llama"


def _tokenizer_gguf(cfg) -> Path:
    """The GGUF file whose tokenizer metadata the export copies (llama.cpp needs its own
    tokenizer form, including the pre-tokenizer name, which only a GGUF source carries)."""
    from fedllm import models

    path = cfg.model.path
    if cfg.model.name in ("smollm2", "tiny") and not path:
        try:
            return models.smollm2_gguf_path()
        except models.ModelError as exc:
            raise ExportError(str(exc)) from None
    if path and Path(path).suffix == ".gguf":
        return Path(path).expanduser()
    raise ExportError(
        f"GGUF export needs the tokenizer in llama.cpp's form, which fedllm copies from the "
        f"model's source GGUF file; this run's model.path ({path}) is not a .gguf file. Export "
        f"with --merged DIR and convert that checkpoint with llama.cpp's convert_hf_to_gguf.py")


def _check_llama(config) -> None:
    if config.model_type != "llama":
        raise ExportError(f"GGUF export supports Llama-architecture models only; this base model "
                          f"is {config.model_type!r}. Export with --merged DIR and convert it "
                          "with llama.cpp's convert_hf_to_gguf.py")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported "
                          "here; use llama.cpp's convert_hf_to_gguf.py on --merged DIR")


def _write_gguf(model, source: Path, out: Path, name: str, cut_vocab: bool = False) -> None:
    """``cut_vocab``: the model's tokenizer is the source's first ``vocab_size`` tokens."""
    import gguf

    config = model.config
    reader = gguf.GGUFReader(source)
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab != config.vocab_size and not (cut_vocab and vocab > config.vocab_size):
        raise ExportError(f"GGUF export: the model has {config.vocab_size} token embeddings but "
                          f"the tokenizer of {source.name} has {vocab} tokens")
    writer = gguf.GGUFWriter(out, GGUF_ARCH)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    _add_hyperparameters(writer, config)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    _copy_tokenizer(reader, writer, config.vocab_size)
    for gguf_name, array in _gguf_tensors(model):
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _add_hyperparameters(writer, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _copy_tokenizer(reader, writer, vocab_size: int) -> None:
    """The source's tokenizer fields; cut to the first ``vocab_size`` tokens (and the merges
    that make them) when the model uses a truncated copy of it (``model.tiny.vocab_size``)."""
    import gguf

    from fedllm import models

    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    kept = {token: i for i, token in enumerate(tokens[:vocab_size])}
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if vocab_size < len(tokens) and key == "tokenizer.ggml.merges":
            value = value[:vocab_size - models.FIRST_MERGE_ID]
            if not models.merges_in_token_order(value, kept):
                raise ExportError("GGUF export: the source tokenizer's merges do not follow its "
                                  "token order, so it cannot be cut to the model's vocabulary")
        elif vocab_size < len(tokens) and vtype == gguf.GGUFValueType.ARRAY \
                and len(value) == len(tokens):
            value = value[:vocab_size]  # tokens, scores, token types: one per token
        elif key.endswith("_token_id") and not 0 <= int(value) < vocab_size:
            raise ExportError(f"GGUF export: {key} = {value} is outside the model's "
                              f"{vocab_size}-token vocabulary")
        writer.add_key_value(key, value, vtype, sub_type=sub_type)


def _gguf_tensors(model):
    """(GGUF name, fp32 array) of every weight, in llama.cpp's layout.

    llama.cpp rotates q and k in interleaved pairs, Hugging Face in halves, so q_proj and
    k_proj rows are permuted back (as llama.cpp's own converter does). A tied lm_head is the
    token embedding and is not stored twice.
    """
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"GGUF export: no llama.cpp name for tensor {hf_name}")
        array = tensor.detach().to("cpu").float().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            array = _interleave_rope_rows(array, config.num_attention_heads)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            array = _interleave_rope_rows(array, config.num_key_value_heads)
        yield gguf_name, array


def _interleave_rope_rows(weight, heads: int):
    """Hugging Face's half-split rotary layout → llama.cpp's interleaved one (per head)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape).copy())


@contextlib.contextmanager
def _staging_file(target: Path):
    if target.is_dir():
        raise ExportError(f"{target} is a directory; give a file name, e.g. model.gguf")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    try:
        yield Path(name)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
    os.replace(name, target)
