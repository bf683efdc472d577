"""Persistent per-client privacy ledger.

One JSON file per client holds every DP release the client ever made, across runs, and the
client's lifetime budget. Rules:
  * write-ahead: an event is recorded *before* anything it describes leaves the client, so a
    crash can over-count spent budget, never under-count it;
  * every release is an entry: a training round (``purpose="train"``), the DP estimate of the
    client's size (``"size"``), a DP evaluation statistic (``"eval"``). Whether a request
    is a new release, a resend of a recorded one or refused is ``release_policy``'s call;
  * the lifetime budget only ever goes down (``lower_budget``): no run config can raise it;
  * atomic: temp file + fsync + rename, under an exclusive lock; a reader sees the old or the
    new ledger, never a torn one;
  * a corrupt or unreadable ledger is an error (the client refuses to train); it is never
    silently reset. A checksum over the entries detects truncation and bit rot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fedllm.io import atomic_write_bytes, atomic_write_text
from fedllm.privacy.accounting import AccountingError, PrivacyEvent, epsilon

FORMAT = "fedllm-privacy-ledger"
VERSION = 2  # 2: purpose/plan/note per entry, the lifetime budget
READABLE_VERSIONS = (1, 2)
PURPOSES = ("train", "size", "eval")


class LedgerError(RuntimeError):
    """The ledger cannot be read or trusted; training must not proceed."""


@dataclass(frozen=True)
class LedgerEntry:
    """One release. ``plan``: the fingerprint of the run plan a training release was made
    under (a run's plan may not change mid-run); ``note``: what a release needs to be reused
    (a size estimate's value and the data it describes)."""

    run_id: str
    round: int
    event: PrivacyEvent
    time: float
    purpose: str = "train"
    plan: str | None = None
    note: dict | None = None

    def to_dict(self) -> dict:
        out = {"run_id": self.run_id, "round": self.round, "time": self.time,
               "event": self.event.to_dict(), "purpose": self.purpose}
        if self.plan is not None:
            out["plan"] = self.plan
        if self.note is not None:
            out["note"] = self.note
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "LedgerEntry":
        purpose = str(data.get("purpose", "train"))  # version 1: training releases only
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose {purpose!r}")
        note = data.get("note")
        return cls(run_id=str(data["run_id"]), round=int(data["round"]),
                   event=PrivacyEvent.from_dict(data["event"]), time=float(data["time"]),
                   purpose=purpose, plan=None if data.get("plan") is None else str(data["plan"]),
                   note=dict(note) if isinstance(note, dict) else None)


def ledger_filename(client_id: str) -> str:
    """A safe, collision-free file name for any client id."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", client_id).strip("._")[:80] or "client"
    digest = hashlib.sha256(client_id.encode()).hexdigest()[:10]
    return f"{stem}-{digest}.json"


def _checksum(entries: list[dict], budget: float | None = None, version: int = VERSION) -> str:
    covered = entries if version == 1 else {"entries": entries, "budget": budget}
    canonical = json.dumps(covered, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Ledger:
    def __init__(self, path: Path, client_id: str, entries: list[LedgerEntry] | None = None,
                 budget: float | None = None):
        self.path = Path(path)
        self.client_id = client_id
        self.entries: list[LedgerEntry] = list(entries or [])
        self.budget = budget  # lifetime ε cap held by the ledger itself (None: not set yet)

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, directory: str | Path, client_id: str) -> "Ledger":
        path = Path(directory) / ledger_filename(client_id)
        if not path.exists():
            return cls(path, client_id)
        entries, budget = _read(path, client_id)
        return cls(path, client_id, entries, budget)

    def events(self) -> list[PrivacyEvent]:
        return [e.event for e in self.entries]

    def has(self, run_id: str, round_: int, purpose: str = "train") -> bool:
        return any(e.run_id == run_id and e.round == round_ and e.purpose == purpose
                   for e in self.entries)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        return epsilon(self.events(), delta, accountant)

    def epsilon_with(self, planned: PrivacyEvent, delta: float, accountant: str = "pld") -> float:
        """Lifetime epsilon if ``planned`` were released too."""
        return epsilon(self.events() + [planned], delta, accountant)

    # ------------------------------------------------------------------ writing
    def record(self, run_id: str, round_: int, event: PrivacyEvent, *, purpose: str = "train",
               plan: str | None = None, note: dict | None = None, again: bool = False) -> bool:
        """Persist one release (write-ahead). Returns False if (run, round, purpose) is already
        there, unless ``again``: a second release for the same round (its first copy was lost)
        is a second entry, never folded into the first."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
        with self._locked():
            self._reload()  # under the lock: another process may have written since we opened
            if self.has(run_id, round_, purpose) and not again:
                return False
            entry = LedgerEntry(run_id=run_id, round=round_, event=event, time=time.time(),
                                purpose=purpose, plan=plan, note=note)
            self._write(self.entries + [entry], self.budget)
            return True

    def lower_budget(self, budget: float | None) -> None:
        """Hold ``budget`` as the lifetime cap if it is stricter than the one held (a budget
        is never raised: not by a run's config, not by a later site setting)."""
        if budget is None:
            return
        with self._locked():
            self._reload()
            if self.budget is not None and self.budget <= budget:
                return
            self._write(self.entries, float(budget))

    def _reload(self) -> None:
        if self.path.exists():
            self.entries, self.budget = _read(self.path, self.client_id)

    def _write(self, entries: list[LedgerEntry], budget: float | None) -> None:
        payload = [e.to_dict() for e in entries]
        document = {"format": FORMAT, "version": VERSION, "client_id": self.client_id,
                    "budget": budget, "entries": payload, "sha256": _checksum(payload, budget)}
        atomic_write_text(self.path, json.dumps(document, indent=1) + "\n")
        self.entries, self.budget = entries, budget

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        with os.fdopen(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _read_entries(path: Path, client_id: str) -> list[LedgerEntry]:
    return _read(path, client_id)[0]


def _read(path: Path, client_id: str) -> tuple[list[LedgerEntry], float | None]:
    def corrupt(why: str) -> LedgerError:
        return LedgerError(
            f"privacy ledger {path} is unreadable ({why}); refusing to train. Restore it from a "
            "backup; fedllm never resets a ledger by itself")

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise corrupt(f"cannot read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise corrupt(f"invalid JSON at line {exc.lineno}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise corrupt("not a fedllm privacy ledger")
    version = document.get("version")
    if version not in READABLE_VERSIONS:
        raise corrupt(f"unsupported version {version!r}")
    if document.get("client_id") != client_id:
        raise corrupt(f"it belongs to client {document.get('client_id')!r}, not {client_id!r}")
    payload, budget = document.get("entries"), document.get("budget")
    if (not isinstance(payload, list)
            or document.get("sha256") != _checksum(payload, budget, version)):
        raise corrupt("checksum mismatch")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                               or not budget > 0):
        raise corrupt(f"invalid budget {budget!r}")
    try:
        return [LedgerEntry.from_dict(e) for e in payload], budget
    except (KeyError, TypeError, ValueError, AccountingError) as exc:
        raise corrupt(f"malformed entry: {exc}") from None


def read_ledger_dir(directory: str | Path) -> dict[str, list[LedgerEntry]]:
    """All ledgers in a directory, keyed by client id (raises on any corrupt one)."""
    out: dict[str, list[LedgerEntry]] = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            client_id = json.loads(path.read_text(encoding="utf-8"))["client_id"]
        except (OSError, ValueError, KeyError, TypeError):
            raise LedgerError(f"privacy ledger {path} is unreadable") from None
        out[client_id] = _read_entries(path, client_id)
    return out


# ----------------------------------------------------------------------------- release cache
# Exactly-once releases: a client keeps a copy of every reply it released, one file per
# (client, run, round, purpose). A server that asks again for a recorded (run, round) —
# a resumed server, a duplicated message, a replay — gets the same bytes back instead of a
# fresh, differently noised release that one ledger entry would not describe.

def _release_path(directory: str | Path, client_id: str, run_id: str, round_: int,
                  purpose: str) -> Path:
    run_tag = hashlib.sha256(run_id.encode()).hexdigest()[:12]
    return Path(directory) / (ledger_filename(client_id)[:-5]
                              + f".{run_tag}.{purpose}-{int(round_)}.release.npz")


def save_release(directory: str | Path, client_id: str, run_id: str, round_: int,
                 update: "dict", metrics: dict, purpose: str = "train") -> None:
    import io

    import numpy as np

    meta = json.dumps({"run_id": run_id, "round": round_, "purpose": purpose,
                       "metrics": metrics, "order": list(update)}).encode()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(meta, np.uint8),
             **{f"a{i}": np.asarray(v) for i, v in enumerate(update.values())})
    atomic_write_bytes(_release_path(directory, client_id, run_id, round_, purpose),
                       buf.getvalue())


def load_release(directory: str | Path, client_id: str, run_id: str, round_: int,
                 purpose: str = "train") -> "tuple[dict, dict] | None":
    """The copy of a recorded release, or None if there is none (or it is unreadable)."""
    import numpy as np

    path = _release_path(directory, client_id, run_id, round_, purpose)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            if (meta["run_id"], meta["round"], meta.get("purpose")) != (run_id, round_, purpose):
                return None
            update = {k: data[f"a{i}"].copy() for i, k in enumerate(meta["order"])}
    except (OSError, ValueError, KeyError):
        return None  # no usable copy: the policy treats a retry as a new, recorded release
    return update, meta["metrics"]


@contextlib.contextmanager
def release_lock(directory: str | Path, client_id: str, run_id: str, round_: int,
                 purpose: str = "train", wait: float = 0.0):
    """Held while one (run, round, purpose) is decided, computed and its copy saved. A second
    request for it (the server asked again while the first still trains) waits up to ``wait``
    seconds for the first to finish, then finds its copy; it yields False if the lock is
    still held then. The kernel releases the lock if the process dies, so a crash never
    blocks a later resume."""
    path = _release_path(directory, client_id, run_id, round_, purpose).with_suffix(".lock")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "a") as fh:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                time.sleep(min(0.5, max(deadline - time.monotonic(), 0.01)))
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
