"""Per-client data loading: a client reads only its own partition and gets exactly the
sequences the whole-corpus path (``build_federated_data``) gives it."""

import json
import random

import pytest
import torch

from fedllm.config import compose
from fedllm.data.federated import build_federated_data
from fedllm.data.per_client import (ClientIndex, build_client_index, load_client,
                                    pooled_eval_sequences)
from fedllm.data.sources import DataError

SEQ_LEN, MIN_SEQ = 32, 4
WORDS = "thou art more lovely and more temperate rough winds do shake the darling buds".split()


def write_corpus(root, sizes: dict[str, int], seed: int = 0):
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, n in sizes.items():
        (root / f"{name}.jsonl").write_text("".join(
            json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))}) + "\n"
            for _ in range(n)))
    return root


def same_clients(old, index: ClientIndex, load):
    """Index sizes, order and skips match the old path, and so does every client's data."""
    assert index.client_ids == old.client_ids
    assert index.skipped == old.skipped
    for pos, client in enumerate(old.clients):
        new = load(pos)
        assert new.client_id == client.client_id
        assert (index.clients[pos].num_train, index.clients[pos].num_eval) == \
            (len(client.train), len(client.eval))
        assert torch.equal(new.train, client.train) and torch.equal(new.eval, client.eval)


@pytest.mark.parametrize("unit", ["sequence", "record"])
def test_jsonl_client_reads_only_its_own_file(tmp_path, tiny_loaded, unit):
    tok = tiny_loaded.tokenizer
    data_dir = write_corpus(tmp_path / "data", {"ann": 60, "bob": 40, "cy": 2, "dee": 80})
    cfg = compose(["model=tiny", "data=jsonl", f"data.path={data_dir}", f"data.unit={unit}"])
    kw = dict(seq_len=SEQ_LEN, min_sequences=MIN_SEQ, num_clients=None, seed=3)
    old = build_federated_data(cfg.data, tok, **kw)
    index = build_client_index(cfg.data, tok, **kw, where=tmp_path / "cache")
    assert "cy" in index.skipped and len(index.clients) == 3

    def load(pos):
        keep = f"{index.clients[pos].client_id}.jsonl"
        for f in data_dir.iterdir():  # every other client's file is gone
            if f.name != keep:
                f.rename(tmp_path / f.name)
        try:
            return load_client(cfg.data, tok, index, pos, seq_len=SEQ_LEN, seed=3)
        finally:
            for f in tmp_path.glob("*.jsonl"):
                f.rename(data_dir / f.name)

    same_clients(old, index, load)


def test_index_is_cached_and_follows_the_files(tmp_path, tiny_loaded):
    tok = tiny_loaded.tokenizer
    data_dir = write_corpus(tmp_path / "data", {"ann": 60, "bob": 40})
    cfg = compose(["model=tiny", "data=jsonl", f"data.path={data_dir}"])
    kw = dict(seq_len=SEQ_LEN, min_sequences=MIN_SEQ, num_clients=None, seed=0,
              where=tmp_path / "cache")
    first = build_client_index(cfg.data, tok, **kw)
    (cached,) = (tmp_path / "cache").glob("index-*.json")
    cached.write_text(cached.read_text().replace('"ann"', '"from-cache"'))
    assert build_client_index(cfg.data, tok, **kw).client_ids[0] == "from-cache"  # not rebuilt
    write_corpus(data_dir, {"cat": 90}, seed=1)  # a new client file: a new index
    again = build_client_index(cfg.data, tok, **kw)
    assert again.client_ids == ["cat"] + first.client_ids
    assert len(list((tmp_path / "cache").glob("index-*.json"))) == 2


def test_plays_clients_and_pooled_eval_match_whole_corpus(tiny_loaded):
    tok = tiny_loaded.tokenizer
    cfg = compose(["model=tiny", "data.plays=[hamlet,macbeth]"])
    kw = dict(seq_len=64, min_sequences=8, num_clients=None, seed=0)
    old = build_federated_data(cfg.data, tok, **kw)
    index = build_client_index(cfg.data, tok, **kw)
    same_clients(old, index, lambda pos: load_client(cfg.data, tok, index, pos, seq_len=64,
                                                     seed=0))
    for max_seq in (5, 64, 10_000):
        assert torch.equal(pooled_eval_sequences(cfg.data, tok, index, max_seq, seq_len=64,
                                                 seed=0), old.eval_sequences(max_seq))


def test_iid_partitions_come_from_the_on_disk_corpus(tmp_path, tiny_loaded):
    tok = tiny_loaded.tokenizer
    data_dir = write_corpus(tmp_path / "data", {f"c{i}": 30 + 10 * i for i in range(5)})
    cfg = compose(["model=tiny", "data=jsonl", f"data.path={data_dir}", "data.partitioning=iid"])
    kw = dict(seq_len=SEQ_LEN, min_sequences=MIN_SEQ, num_clients=4, seed=7)
    old = build_federated_data(cfg.data, tok, **kw)
    cache = tmp_path / "cache"
    index = build_client_index(cfg.data, tok, **kw, where=cache)
    # The corpus and its seeded permutation are on disk (memory-mapped by each client).
    assert index.num_partitions == 4 and len(list(cache.glob("corpus-*-seed7.arrow"))) == 1
    assert len(list(cache.glob("corpus-*.arrow"))) == 2
    same_clients(old, index, lambda pos: load_client(cfg.data, tok, index, pos,
                                                     seq_len=SEQ_LEN, seed=7, where=cache))


def test_missing_client_file_is_one_readable_error(tmp_path, tiny_loaded):
    tok = tiny_loaded.tokenizer
    data_dir = write_corpus(tmp_path / "data", {"ann": 60, "bob": 40})
    cfg = compose(["model=tiny", "data=jsonl", f"data.path={data_dir}"])
    index = build_client_index(cfg.data, tok, seq_len=SEQ_LEN, min_sequences=MIN_SEQ,
                               num_clients=None, seed=0)
    (data_dir / "ann.jsonl").unlink()
    with pytest.raises(DataError, match="ann.jsonl not found"):
        load_client(cfg.data, tok, index, index.client_ids.index("ann"), seq_len=SEQ_LEN, seed=0)
    with pytest.raises(DataError, match="partition-id 5 but only 2 clients"):
        load_client(cfg.data, tok, index, 5, seq_len=SEQ_LEN, seed=0)


def test_simulated_client_app_gets_its_partition_from_the_cached_index(tmp_path, tiny_cfg,
                                                                       tiny_data, monkeypatch):
    """The ClientApp's ``this_client`` (partition-id) matches the whole-corpus federation, and
    the index it used is the one cached in the run directory."""
    import copy

    from fedllm.clients.app import this_client

    monkeypatch.delenv("FEDLLM_CACHE", raising=False)  # default: under the run directory
    cfg = copy.deepcopy(tiny_cfg)
    cfg.run.dir = str(tmp_path / "run")
    for position in (0, len(tiny_data.clients) - 1):
        client = this_client(cfg, {"partition-id": position})
        expected = tiny_data.clients[position]
        assert client.client_id == expected.client_id
        assert torch.equal(client.train, expected.train) and torch.equal(client.eval, expected.eval)
    assert len(list((tmp_path / "run" / ".cache" / "data").glob("index-*.json"))) == 1
