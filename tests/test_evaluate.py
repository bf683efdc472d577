"""The 'base' evaluation is the bare base model, whatever adapter is attached."""

import pytest
import torch

from fedllm import models
from fedllm.config import compose
from fedllm.evaluate import evaluate


@pytest.mark.parametrize("adapter", ["prompt_tuning", "lora"])
def test_base_model_evaluation_ignores_the_fresh_adapter(adapter):
    cfg = compose(["model=tiny", f"adapter={adapter}"])
    tok = models.load_tokenizer(cfg.model)
    bare = models.load_base_model(cfg.model, vocab_size=len(tok), seed=0)
    x = torch.randint(0, 1000, (4, 16), generator=torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    expected = evaluate(bare, x, 2, cpu)["eval_loss"]
    wrapped = models.attach_adapter(models.load_base_model(cfg.model, len(tok), seed=0),
                                    cfg.model, seed=0)
    assert evaluate(wrapped, x, 2, cpu, base_model=True)["eval_loss"] == pytest.approx(expected)
    with_adapter = evaluate(wrapped, x, 2, cpu)["eval_loss"]
    if adapter == "prompt_tuning":  # a fresh soft prompt changes the outputs; LoRA's B=0 does not
        assert with_adapter != pytest.approx(expected)
    else:
        assert with_adapter == pytest.approx(expected)
