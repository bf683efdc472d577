"""Partition units into clients, split each client's units into train and held-out, tokenize,
and pack into fixed-length sequences.

Clients are ordered by size (largest first, ties by id), so ``federation.num_clients=N`` takes
the N largest eligible clients and every process (server, simulated or real nodes) agrees on
which client index is which.

This module builds the whole federation in memory (the library's in-process uses: audit,
studies, tests); a run's processes use ``per_client``, which gives the same clients and
sequences one client at a time.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from fedllm.data.chat import PAD_ID, context_id, encode_chat, has_target, prompt_response_messages
from fedllm.data.sources import DataError, Unit, load_units

log = logging.getLogger(__name__)

UNIT_SEPARATOR = "\n\n"
# data.unit=record: positions after a record's last token hold PAD_ID; tokens the model reads
# but is not trained on (an instruction record's prompt) are context ids; the loss skips both
# (``fedllm.data.chat``, ``dpsgd.per_sequence_losses``).
UNIT_MODES = ("sequence", "record")


@dataclass
class ClientData:
    client_id: str
    train: torch.Tensor   # [n, seq_len] token ids (record mode: right-padded with PAD_ID)
    eval: torch.Tensor    # [m, seq_len] held-out token ids


@dataclass
class FederatedData:
    clients: list[ClientData]
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def client_ids(self) -> list[str]:
        return [c.client_id for c in self.clients]

    def eval_sequences(self, max_sequences: int) -> torch.Tensor:
        """Held-out sequences pooled round-robin over clients (deterministic)."""
        pools = [c.eval for c in self.clients if len(c.eval)]
        if not pools:
            raise DataError("no client has enough held-out text for one evaluation sequence")
        out, i = [], 0
        while len(out) < max_sequences and any(i < len(p) for p in pools):
            out.extend(p[i] for p in pools if i < len(p))
            i += 1
        return torch.stack(out[:max_sequences])


def group_units(units: list[Unit], partitioning: str, num_partitions: int | None,
                seed: int) -> "OrderedDict[str, list[Unit]]":
    """Natural grouping by owner, or IID re-partitioning with flwr-datasets."""
    if partitioning == "natural":
        groups: OrderedDict[str, list[Unit]] = OrderedDict()
        for u in units:
            groups.setdefault(u.client_id, []).append(u)
        return groups
    from datasets import Dataset
    from flwr_datasets.partitioner import IidPartitioner

    n = num_partitions or len({u.client_id for u in units})
    if n > len(units):
        raise DataError(f"cannot split {len(units)} units into {n} IID partitions")
    partitioner = IidPartitioner(num_partitions=n)
    # IidPartitioner shards contiguously (flwr-datasets shuffles in FederatedDataset, which we
    # bypass): shuffle first, with the run seed, or each partition is one owner's units.
    partitioner.dataset = Dataset.from_dict({"index": list(range(len(units)))}).shuffle(seed=seed)
    groups = OrderedDict()
    for pid in range(n):
        idx = partitioner.load_partition(pid)["index"]
        groups[f"iid-{pid:05d}"] = [units[i] for i in idx]
    return groups


def encode_units(units: list[Unit], tokenizer) -> list[list[int]]:
    """Each unit's token ids: plain text all scored; an instruction record (prompt/response or
    messages) scored on the assistant's tokens only (``fedllm.data.chat``)."""
    out: list[list[int] | None] = [None] * len(units)
    texts = [(i, u.text) for i, u in enumerate(units) if u.text is not None]
    if texts:  # one batched call for plain text
        ids = tokenizer([t for _, t in texts], add_special_tokens=False)["input_ids"]
        for (i, _), row in zip(texts, ids):
            out[i] = row
    for i, u in enumerate(units):
        if u.text is None:
            messages = u.messages or prompt_response_messages(u.prompt, u.response)
            try:
                out[i] = encode_chat(messages, tokenizer)
            except ValueError as exc:
                raise DataError(f"client {u.client_id}: {exc}") from None
    return out


def split_units(client_id: str, members: list[Unit], eval_fraction: float, seed: int
                ) -> tuple[list[Unit], list[Unit]]:
    """Held-out share of a client's units: each unit is held out by a seeded hash of its own
    content, never by its position among the others, so removing one record moves no other
    record between training and held-out (the neighbouring datasets DP compares differ in that
    one record's examples only)."""
    train, evals = [], []
    for u in members:
        (evals if _held_out(u, client_id, eval_fraction, seed) else train).append(u)
    return train, evals


def _held_out(unit: Unit, client_id: str, eval_fraction: float, seed: int) -> bool:
    key = json.dumps([seed, client_id, unit.text, unit.prompt, unit.response, unit.messages])
    draw = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0**64
    return draw < eval_fraction


def pack(token_lists: list[list[int]], seq_len: int) -> torch.Tensor:
    flat = [t for tokens in token_lists for t in tokens]
    n = len(flat) // seq_len
    if n == 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    return torch.tensor(flat[: n * seq_len], dtype=torch.long).view(n, seq_len)


def pad_records(token_lists: list[list[int]], seq_len: int) -> torch.Tensor:
    """One row per record (the unit of privacy with data.unit=record): truncated to seq_len,
    right-padded with PAD_ID; a record with no scored token after its first (too short, or an
    answer cut off by the truncation) has nothing to predict and is dropped. Causal attention
    means the padding never changes a real token's loss."""
    rows = [ids[:seq_len] + [PAD_ID] * (seq_len - len(ids[:seq_len]))
            for ids in token_lists if has_target(ids[:seq_len])]
    if not rows:
        return torch.empty((0, seq_len), dtype=torch.long)
    return torch.tensor(rows, dtype=torch.long)


def encode(parts: list[list[Unit]], tokenizer, seq_len: int, unit: str = "sequence"
           ) -> list[torch.Tensor]:
    """Each part's units as training examples: ``record`` makes each unit exactly one example;
    ``sequence`` packs the units into seq_len-token sequences (one record may span several,
    several records share one: the privacy unit is then a window, not a record)."""
    if unit == "sequence":
        return [pack(_joined(part, tokenizer), seq_len) for part in parts]
    flat = [u for part in parts for u in part]
    enc = encode_units(flat, tokenizer)
    out, i = [], 0
    for part in parts:
        out.append(pad_records(enc[i:i + len(part)], seq_len))
        i += len(part)
    return out


def _joined(part: list[Unit], tokenizer) -> list[list[int]]:
    """A part's units as one token stream, separated by UNIT_SEPARATOR. Plain text is joined
    before tokenizing (as it always was); instruction records are encoded one by one."""
    if all(u.text is not None for u in part):
        text = UNIT_SEPARATOR.join(u.text for u in part)
        return [tokenizer(text, add_special_tokens=False)["input_ids"]] if part else []
    sep = [context_id(t) for t in tokenizer(UNIT_SEPARATOR, add_special_tokens=False)["input_ids"]]
    stream: list[int] = []
    for k, ids in enumerate(encode_units(part, tokenizer)):
        stream += (sep if k else []) + ids
    return [stream]


def build_federated_data(data_cfg, tokenizer, *, seq_len: int, min_sequences: int,
                         num_clients: int | None, seed: int) -> FederatedData:
    units = load_units(data_cfg)
    if not units:
        raise DataError(f"data source {data_cfg.name!r} yielded no text")
    groups = group_units(units, data_cfg.partitioning,
                         num_clients if data_cfg.partitioning == "iid" else None, seed)
    ids, train_parts, eval_parts = [], [], []
    for cid, members in groups.items():
        train, evals = split_units(cid, members, data_cfg.eval_fraction, seed)
        ids.append(cid)
        train_parts.append(train)
        eval_parts.append(evals)
    unit = getattr(data_cfg, "unit", "record")
    enc_train = encode(train_parts, tokenizer, seq_len, unit)
    enc_eval = encode(eval_parts, tokenizer, seq_len, unit)

    clients, skipped = [], {}
    for cid, train, ev in zip(ids, enc_train, enc_eval):
        if len(train) < min_sequences:
            skipped[cid] = f"{_count(len(train), unit, seq_len)} < {min_sequences} needed"
            continue
        clients.append(ClientData(cid, train, ev))
    # Not logged here: every process (CLI, server, each client) builds the federation; the CLI
    # names the skipped clients once (``skipped_clients_message``, ``skipped_clients.json``).
    clients = select_clients(clients, lambda c: len(c.train), num_clients,
                             min_sequences=min_sequences, seq_len=seq_len, unit=unit)
    return FederatedData(clients=clients, skipped=skipped)


def select_clients(clients: list, num_train, num_clients: int | None, *, min_sequences: int,
                   seq_len: int, unit: str = "record") -> list:
    """The federation's clients in its fixed order (largest first, then by id), cut to
    ``num_clients``; ``num_train(client)`` is a client's training-sequence count."""
    clients = sorted(clients, key=lambda c: (-num_train(c), c.client_id))
    if num_clients is not None:
        if len(clients) < num_clients:
            raise DataError(
                f"federation.num_clients={num_clients} but only {len(clients)} clients have at "
                f"least {_count(min_sequences, unit, seq_len)} "
                f"(train.batch_size / data.min_client_sequences)")
        clients = clients[:num_clients]
    if not clients:
        raise DataError(f"no client has at least {_count(min_sequences, unit, seq_len)}; "
                        "lower train.batch_size or data.min_client_sequences")
    return clients


SKIPPED_FILE = "skipped_clients.json"
SKIPPED_NAMED_IN_LOG = 10


def skipped_clients_message(data: FederatedData, where: str) -> str | None:
    """One log line that names every skipped client with its reason (up to
    SKIPPED_NAMED_IN_LOG of them; ``where`` holds them all)."""
    if not data.skipped:
        return None
    items = list(data.skipped.items())
    named = "; ".join(f"{cid}: {why}" for cid, why in items[:SKIPPED_NAMED_IN_LOG])
    more = (f"; and {len(items) - SKIPPED_NAMED_IN_LOG} more" if len(items) > SKIPPED_NAMED_IN_LOG
            else "")
    total = len(items) + len(data.clients)
    return (f"Skipped {len(items)} of {total} clients with too little data ({named}{more}); "
            f"all of them, with reasons: {where}")


def load_local_units(data_path: str, client_id: str) -> list[Unit]:
    """A site's own data: a .jsonl or .txt file, or a directory of them (all this client's)."""
    from pathlib import Path

    from fedllm.data.sources import load_jsonl_dir, load_jsonl_file, load_text_dir, load_text_file

    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(f"node data path {path} does not exist")
    if path.is_dir():
        units = []
        if any(path.glob("*.jsonl")):
            units += load_jsonl_dir(str(path))
        if any(path.glob("*.txt")):
            units += load_text_dir(str(path))
        if not units:
            raise DataError(f"node data path {path} holds no .jsonl or .txt files")
    elif path.suffix in (".jsonl", ".txt"):
        units = (load_jsonl_file if path.suffix == ".jsonl" else load_text_file)(path)
        if not units:
            raise DataError(f"node data file {path} holds no text")
    else:
        raise DataError(f"node data path {path}: expected a .jsonl/.txt file or a directory")
    return [Unit(client_id, u.text, u.prompt, u.response, u.messages) for u in units]


def _count(n: int, unit: str, seq_len: int) -> str:
    return (f"{n} training records" if unit == "record"
            else f"{n} training sequences of {seq_len} tokens")


def build_local_client(data_path: str, client_id: str, tokenizer, *, seq_len: int,
                       eval_fraction: float, min_sequences: int, seed: int,
                       unit: str = "sequence") -> ClientData:
    """ClientData for one deployed site from its local files (same split and packing)."""
    units = load_local_units(data_path, client_id)
    train, evals = split_units(client_id, units, eval_fraction, seed)
    client = ClientData(client_id, *encode([train, evals], tokenizer, seq_len, unit))
    if len(client.train) < min_sequences:
        raise DataError(f"node data at {data_path} gives {_count(len(client.train), unit, seq_len)}"
                        f"; at least {min_sequences} are needed")
    return client
