"""Opacus DP-SGD wiring for PEFT models.

Hard-won details:
  * Per-sample gradients of LoRA layers come from fedllm's fast path (``lora_fast``: a closed
    form inside one autograd function per layer); anything else (other adapters, LoRA
    variants) from Opacus' ``GradSampleModule`` with hooks. Either way only the trainable
    (adapter) parameters get them, and Opacus' DPOptimizer clips and noises. Ghost clipping
    is not used.
  * The loss is a per-sequence mean token loss averaged over the batch (``loss_reduction
    ="mean"``); Hugging Face's built-in loss averages over all tokens of the batch, which
    couples examples and breaks the per-sample analysis.
  * Poisson sampling is done here explicitly (each sequence independently with probability
    q), so the sample rate we account is exactly the one we run. Empty batches still take a
    noise-only step: skipping them would change the mechanism.
  * The GradSampleModule is closed after the round so the PEFT model can be reused.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from fedllm.data.chat import model_ids, scored


PRECISIONS = ("auto", "bf16", "fp32")


def autocast(device: torch.device, precision: str = "auto"):
    """The forward pass's precision; weights, gradients and the optimizer stay fp32.

    ``auto``: bf16 autocast on CUDA, fp32 elsewhere (what runs use). ``bf16``: bf16 autocast
    on any device. ``fp32``: no autocast (``experiments/gpu_check.py`` compares the two)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; one of {PRECISIONS}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def per_sequence_losses(model, input_ids: torch.Tensor, precision: str = "auto"
                        ) -> torch.Tensor:
    """Each sequence's mean next-token loss over its scored tokens.

    Ids below 0 are not targets (``fedllm.data.chat``): padding after a record's end (fed as
    token 0) and context an instruction record's model reads but is not trained to predict
    (fed as its real token). Under causal attention, padding cannot change a real position's
    logits, so a padded record's loss (and gradient) is the record's own."""
    ids = model_ids(input_ids)
    with autocast(ids.device, precision):
        logits = model(input_ids=ids).logits
    logits = real_token_logits(logits, ids)
    per_token = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(),
        ids[:, 1:].reshape(-1), reduction="none").view(ids.size(0), -1)
    weight = scored(input_ids)[:, 1:].to(per_token.dtype)
    return (per_token * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def real_token_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Drop the leading positions of virtual tokens (prompt tuning); only real tokens score."""
    return logits[:, logits.size(1) - input_ids.size(1):]


def check_per_sample(params, batch_size: int) -> None:
    """Every per-sample gradient must have one row per example, or clipping is not per sample
    (e.g. a layer that saw a batch of one and returned the batch's summed gradient)."""
    for p in params:
        sample = getattr(p, "grad_sample", None)  # None: Opacus' optimizer raises on its own
        rows = None if sample is None else (
            sum(len(s) for s in sample) if isinstance(sample, list) else sample.shape[0])
        if rows is not None and rows != batch_size:
            raise RuntimeError(
                f"per-sample gradient of a {tuple(p.shape)} parameter has {rows} rows for "
                f"{batch_size} examples: clipping would not be per example")


def sequence_loss(model, input_ids: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """Mean over the batch of each sequence's mean next-token loss."""
    return per_sequence_losses(model, input_ids, precision).mean()


def poisson_batch(data: torch.Tensor, sample_rate: float, rng) -> torch.Tensor:
    """Each row independently with probability ``sample_rate`` (may be empty). ``rng``: a
    ``fedllm.privacy.randomness`` source (the OS CSPRNG on a client)."""
    mask = rng.uniform(len(data)) < sample_rate
    return data[mask]


@contextlib.contextmanager
def grad_sample_module(model):
    """Wrap ``model`` for per-sample gradients; always unwrap (remove hooks) afterwards."""
    from opacus import GradSampleModule

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)
    try:
        yield gsm
    finally:
        gsm.remove_hooks()
        _clear_per_sample_state(model)


ENGINES = ("auto", "lora_fast", "opacus")


def resolve_engine(model, engine: str = "auto") -> str:
    """The per-sample gradient engine that will run: ``auto`` picks the LoRA fast path
    whenever it covers every trainable parameter, Opacus' hooks otherwise."""
    from fedllm.privacy import lora_fast

    if engine not in ENGINES:
        raise ValueError(f"unknown per-sample gradient engine {engine!r}")
    if engine == "auto":
        return "lora_fast" if lora_fast.applies(model) else "opacus"
    return engine


@contextlib.contextmanager
def per_sample_gradients(model, engine: str = "auto"):
    """Yield the module to run forward passes on so that backward stores ``grad_sample``
    on every trainable parameter (the fast path yields ``model`` itself)."""
    from fedllm.privacy import lora_fast

    if resolve_engine(model, engine) == "lora_fast":
        with lora_fast.lora_per_sample_gradients(model) as fast:
            try:
                yield fast
            finally:
                _clear_per_sample_state(model)
    else:
        with grad_sample_module(model) as gsm:
            yield gsm


def _clear_per_sample_state(model) -> None:
    for p in model.parameters():
        for attr in ("grad_sample", "summed_grad", "_processed"):
            if hasattr(p, attr):
                delattr(p, attr)


def make_dp_optimizer(optimizer, *, noise_multiplier: float, max_grad_norm: float,
                      expected_batch_size: int, noise):
    """Opacus' DPOptimizer (clipping, accumulation over chunks, noise, averaging) whose noise
    comes from ``noise``, a ``fedllm.privacy.randomness`` source (the OS CSPRNG on a client;
    ``None``: torch's global generator, for benchmarks only)."""
    from opacus.optimizers import DPOptimizer

    class NoiseFromSource(DPOptimizer):
        def add_noise(self):  # Opacus' add_noise, with the noise drawn from ``noise``
            from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

            for p in self.params:
                _check_processed_flag(p.summed_grad)
                std = self.noise_multiplier * self.max_grad_norm
                z = noise.normal(p.summed_grad.shape, std, device=p.summed_grad.device,
                                 dtype=p.summed_grad.dtype)
                p.grad = (p.summed_grad + z).view_as(p)
                _mark_as_processed(p.summed_grad)

    cls = DPOptimizer if noise is None else NoiseFromSource
    return cls(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
               expected_batch_size=expected_batch_size, loss_reduction="mean")


def dp_step(gsm, optimizer, batch: torch.Tensor, physical_batch_size: int | None,
            device: torch.device, precision: str = "auto") -> float | None:
    # ``gsm``: the module ``per_sample_gradients`` yielded (GradSampleModule or the model).
    """One DP-SGD step on a (possibly empty) Poisson batch. Returns the batch loss or None.

    A large logical batch is processed in physical chunks; the optimizer accumulates clipped
    per-sample gradients over the chunks and adds noise once, on the last one.
    """
    params = [p for p in gsm.parameters() if p.requires_grad]
    if len(batch) == 0:
        for p in params:  # noise-only step: zero per-sample gradients of an empty batch
            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None
    chunk = physical_batch_size or len(batch)
    chunks = list(torch.split(batch, chunk))
    total = 0.0
    for i, part in enumerate(chunks):
        loss = sequence_loss(gsm, part.to(device), precision)
        loss.backward()
        check_per_sample(params, len(part))
        total += loss.item() * len(part)
        if i < len(chunks) - 1:
            optimizer.signal_skip_step(do_skip=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return total / len(batch)
