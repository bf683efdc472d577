"""Held-out loss and perplexity."""

from __future__ import annotations

import math

import torch

from fedllm.models import unwrap
from fedllm.privacy.dpsgd import per_sequence_losses


@torch.no_grad()
def evaluate(model, sequences: torch.Tensor, batch_size: int, device: torch.device,
             *, base_model: bool = False) -> dict:
    """Mean next-token loss over equal-length held-out sequences, and its perplexity.

    ``base_model=True`` evaluates with the adapter disabled: the bare base model. (For LoRA the
    initial adapter is the identity anyway; a fresh soft prompt is not, and "base" must mean
    the model before any fine-tuning.)
    """
    losses = sequence_losses(model, sequences, batch_size, device, base_model=base_model)
    loss = losses.sum().item() / max(len(losses), 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}


@torch.no_grad()
def sequence_losses(model, sequences: torch.Tensor, batch_size: int, device: torch.device,
                    *, base_model: bool = False) -> torch.Tensor:
    """Each held-out sequence's mean next-token loss (float32, on the CPU)."""
    if base_model:
        with unwrap(model).disable_adapter():
            return sequence_losses(model, sequences, batch_size, device)
    was_training = model.training
    model.eval()
    out = [per_sequence_losses(model, batch.to(device)).float().cpu()
           for batch in torch.split(sequences, batch_size)]
    if was_training:
        model.train()
    return torch.cat(out) if out else torch.zeros(0)
