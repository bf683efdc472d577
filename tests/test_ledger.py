"""Persistent per-client ledgers: atomic, write-ahead, idempotent, never silently reset."""

import json
import os

import pytest

from fedllm.privacy.accounting import PrivacyEvent, epsilon
from fedllm.privacy.ledger import Ledger, LedgerError, ledger_filename, read_ledger_dir


def ev(z=1.0, steps=4, q=0.05):
    return PrivacyEvent(noise_multiplier=z, steps=steps, sample_rate=q)


def test_record_persist_and_compose(tmp_path):
    ledger = Ledger.open(tmp_path, "play/ROLE A")
    assert ledger.record("run1", 1, ev()) is True
    assert ledger.record("run1", 2, ev(z=2.0)) is True
    again = Ledger.open(tmp_path, "play/ROLE A")
    assert [e.round for e in again.entries] == [1, 2]
    assert again.epsilon(1e-5) == pytest.approx(epsilon([ev(), ev(z=2.0)], 1e-5))
    assert read_ledger_dir(tmp_path)["play/ROLE A"] == again.entries


def test_same_run_and_round_is_recorded_once(tmp_path):
    ledger = Ledger.open(tmp_path, "c")
    assert ledger.record("run1", 1, ev())
    assert not Ledger.open(tmp_path, "c").record("run1", 1, ev())
    assert len(Ledger.open(tmp_path, "c").entries) == 1


def test_file_names_are_safe_and_distinct():
    names = {ledger_filename(c) for c in ["a/b", "a_b", "a b", "../etc/passwd", "x" * 500]}
    assert len(names) == 5
    assert all("/" not in n and len(n) < 120 for n in names)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit", "other_client"])
def test_corrupt_ledger_refuses_with_clear_error(tmp_path, damage):
    ledger = Ledger.open(tmp_path, "c")
    ledger.record("run1", 1, ev())
    path = ledger.path
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff" * 10)
    elif damage == "edit":  # someone lowers the spent budget by hand
        doc = json.loads(text)
        doc["entries"][0]["event"]["noise_multiplier"] = 100.0
        path.write_text(json.dumps(doc))
    else:
        doc = json.loads(text)
        doc["client_id"] = "someone-else"
        path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="refusing to train"):
        Ledger.open(tmp_path, "c")
    assert path.exists()  # never reset


def test_interrupted_write_leaves_previous_ledger_readable(tmp_path, monkeypatch):
    ledger = Ledger.open(tmp_path, "c")
    ledger.record("run1", 1, ev())
    before = ledger.path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        Ledger.open(tmp_path, "c").record("run1", 2, ev())
    monkeypatch.undo()
    assert ledger.path.read_bytes() == before
    assert [e.round for e in Ledger.open(tmp_path, "c").entries] == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_epsilon_with_planned_event(tmp_path):
    ledger = Ledger.open(tmp_path, "c")
    ledger.record("r", 1, ev())
    assert ledger.epsilon_with(ev(), 1e-5) == pytest.approx(epsilon([ev(), ev()], 1e-5))
    assert ledger.epsilon_with(ev(), 1e-5) > ledger.epsilon(1e-5)


def test_release_cache_is_kept_per_run_and_client(tmp_path):
    """Two runs share a ledger directory: a later run's release must not evict the copy that a
    resumed earlier run needs (without it the client would retrain that round with fresh noise
    under the same ledger entry: a second, unaccounted release)."""
    import numpy as np

    from fedllm.privacy.ledger import load_release, save_release

    save_release(tmp_path, "alice", "run-a", 2, {"w": np.ones(3)}, {"m": 1})
    save_release(tmp_path, "alice", "run-b", 1, {"w": np.zeros(3)}, {"m": 2})
    update, metrics = load_release(tmp_path, "alice", "run-a", 2)
    assert np.array_equal(update["w"], np.ones(3)) and metrics == {"m": 1}
    assert load_release(tmp_path, "alice", "run-b", 1)[1] == {"m": 2}
    assert load_release(tmp_path, "bob", "run-a", 2) is None
