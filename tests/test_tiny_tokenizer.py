"""The tiny model's tokenizer: SmolLM2's byte-level BPE cut to its first N tokens."""

import pytest

from fedllm import models
from fedllm.config import ConfigError, compose

TEXT = ("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer "
        "the slings and arrows of outrageous fortune — naïve café, 1603.")


def test_truncated_tokenizer_keeps_the_first_tokens_and_round_trips(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    full = models.load_tokenizer(compose(["model=tiny", "model.tiny.vocab_size=null"]).model)
    full_dir = models.tokenizer_dir("tiny", None, None)
    monkeypatch.setenv("FEDLLM_CACHE", str(tmp_path))  # build it fresh, not from a cache
    small_dir = models._truncated_tokenizer(full_dir, 1024)
    assert small_dir.parent == tmp_path
    small = AutoTokenizer.from_pretrained(small_dir)
    assert len(small) == 1024 and len(full) == 49152
    ids = small(TEXT)["input_ids"]
    assert max(ids) < 1024 and len(ids) > len(full(TEXT)["input_ids"])
    assert small.decode(ids) == TEXT  # byte-level: nothing is lost, only split finer
    # The tokens kept are the full tokenizer's, id for id.
    vocab = full.get_vocab()
    assert all(vocab[tok] == i for tok, i in small.get_vocab().items())
    assert small.eos_token_id == full.eos_token_id and small.pad_token == full.pad_token
    # The base model follows the tokenizer: its output layer has 1,024 rows.
    cfg = compose(["model=tiny", "model.tiny.vocab_size=1024"])
    base = models.load_base_model(cfg.model, vocab_size=len(small), seed=0)
    assert base.get_output_embeddings().weight.shape[0] == 1024


@pytest.mark.parametrize("value", ["100", "0", "abc"])
def test_too_small_a_vocabulary_is_refused_up_front(value):
    with pytest.raises(ConfigError, match="model.tiny.vocab_size"):
        compose(["model=tiny", f"model.tiny.vocab_size={value}"])

