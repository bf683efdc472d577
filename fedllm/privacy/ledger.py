"""Persistent per-client privacy ledger.

One JSON file per client holds every DP release the client ever made, across runs. Rules:
  * write-ahead: an event is recorded *before* the noised update leaves the client, so a
    crash can over-count spent budget, never under-count it;
  * idempotent per (run id, round): a resumed run does not record the same release twice;
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
import re
import time
from dataclasses import dataclass
from pathlib import Path

from fedllm.io import atomic_write_bytes, atomic_write_text
from fedllm.privacy.accounting import AccountingError, PrivacyEvent, epsilon

FORMAT = "fedllm-privacy-ledger"
VERSION = 1


class LedgerError(RuntimeError):
    """The ledger cannot be read or trusted; training must not proceed."""


@dataclass(frozen=True)
class LedgerEntry:
    run_id: str
    round: int
    event: PrivacyEvent
    time: float

    def to_dict(self) -> dict:
        return {"run_id": self.run_id, "round": self.round, "time": self.time,
                "event": self.event.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "LedgerEntry":
        return cls(run_id=str(data["run_id"]), round=int(data["round"]),
                   event=PrivacyEvent.from_dict(data["event"]), time=float(data["time"]))


def ledger_filename(client_id: str) -> str:
    """A safe, collision-free file name for any client id."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", client_id).strip("._")[:80] or "client"
    digest = hashlib.sha256(client_id.encode()).hexdigest()[:10]
    return f"{stem}-{digest}.json"


def _checksum(entries: list[dict]) -> str:
    canonical = json.dumps(entries, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


class Ledger:
    def __init__(self, path: Path, client_id: str, entries: list[LedgerEntry] | None = None):
        self.path = Path(path)
        self.client_id = client_id
        self.entries: list[LedgerEntry] = list(entries or [])

    # ------------------------------------------------------------------ reading
    @classmethod
    def open(cls, directory: str | Path, client_id: str) -> "Ledger":
        path = Path(directory) / ledger_filename(client_id)
        if not path.exists():
            return cls(path, client_id)
        return cls(path, client_id, _read_entries(path, client_id))

    def events(self) -> list[PrivacyEvent]:
        return [e.event for e in self.entries]

    def has(self, run_id: str, round_: int) -> bool:
        return any(e.run_id == run_id and e.round == round_ for e in self.entries)

    def epsilon(self, delta: float, accountant: str = "pld") -> float:
        return epsilon(self.events(), delta, accountant)

    def epsilon_with(self, planned: PrivacyEvent, delta: float, accountant: str = "pld") -> float:
        """Lifetime epsilon if ``planned`` were released too."""
        return epsilon(self.events() + [planned], delta, accountant)

    # ------------------------------------------------------------------ writing
    def record(self, run_id: str, round_: int, event: PrivacyEvent) -> bool:
        """Persist one release (write-ahead). Returns False if (run, round) is already there."""
        with self._locked():
            # Re-read under the lock: another process may have written since we opened.
            if self.path.exists():
                self.entries = _read_entries(self.path, self.client_id)
            if self.has(run_id, round_):
                return False
            entry = LedgerEntry(run_id=run_id, round=round_, event=event, time=time.time())
            entries = self.entries + [entry]
            payload = [e.to_dict() for e in entries]
            document = {"format": FORMAT, "version": VERSION, "client_id": self.client_id,
                        "entries": payload, "sha256": _checksum(payload)}
            atomic_write_text(self.path, json.dumps(document, indent=1) + "\n")
            self.entries = entries
            return True

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _read_entries(path: Path, client_id: str) -> list[LedgerEntry]:
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
    if document.get("version") != VERSION:
        raise corrupt(f"unsupported version {document.get('version')!r}")
    if document.get("client_id") != client_id:
        raise corrupt(f"it belongs to client {document.get('client_id')!r}, not {client_id!r}")
    payload = document.get("entries")
    if not isinstance(payload, list) or document.get("sha256") != _checksum(payload):
        raise corrupt("checksum mismatch")
    try:
        return [LedgerEntry.from_dict(e) for e in payload]
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
# Exactly-once releases across a server crash: a client keeps the last update it released in
# each run. If the resumed server asks again for the same (run, round), the client resends that
# same update instead of training again, so one ledger entry still describes everything
# released. One file per (client, run): runs sharing a ledger directory never evict each
# other's copy (a resumed run's interrupted round is always its latest one).

def _release_path(directory: str | Path, client_id: str, run_id: str) -> Path:
    run_tag = hashlib.sha256(run_id.encode()).hexdigest()[:12]
    return Path(directory) / (ledger_filename(client_id)[:-5] + f".{run_tag}.last-release.npz")


def save_release(directory: str | Path, client_id: str, run_id: str, round_: int,
                 update: "dict", metrics: dict) -> None:
    import io

    import numpy as np

    meta = json.dumps({"run_id": run_id, "round": round_, "metrics": metrics,
                       "order": list(update)}).encode()
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(meta, np.uint8),
             **{f"a{i}": np.asarray(v) for i, v in enumerate(update.values())})
    atomic_write_bytes(_release_path(directory, client_id, run_id), buf.getvalue())


def load_release(directory: str | Path, client_id: str, run_id: str, round_: int
                 ) -> "tuple[dict, dict] | None":
    import numpy as np

    path = _release_path(directory, client_id, run_id)
    if not path.exists():
        return None
    try:
        with np.load(path) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            if meta["run_id"] != run_id or meta["round"] != round_:
                return None
            update = {k: data[f"a{i}"].copy() for i, k in enumerate(meta["order"])}
    except (OSError, ValueError, KeyError):
        return None  # no usable copy: the release never left, so training again is safe
    return update, meta["metrics"]
