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
    if base_model:
        with unwrap(model).disable_adapter():
            return evaluate(model, sequences, batch_size, device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in torch.split(sequences, batch_size):
        total += per_sequence_losses(model, batch.to(device)).sum().item()
        count += len(batch)
    if was_training:
        model.train()
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0))}
