"""Atomic file writes (temp file in the same directory, fsync, rename) and append-only JSON
lines that tolerate a torn last line and nothing else; the lock that keeps one run per run
directory."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file (0600, as mkstemp makes it) + fsync + rename: readers see the old file or
    the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class JsonlError(ValueError):
    """A JSON-lines file has a damaged line that is not a torn last line."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (and missing parents) readable by its owner only (0700). An existing
    directory is left as it is: its permissions are its owner's choice."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and fsync. A torn last line left by a crash is cut off first, so
    the new record never fuses with it into one damaged line. A new file is created 0600:
    these files hold participation and privacy records."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a+b") as fh:
        _end_torn_tail(fh, Path(path))
        fh.write((json.dumps(record) + "\n").encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


def _end_torn_tail(fh, path: Path) -> None:
    """If the file does not end in a newline: end a complete last record with one, or cut
    off a torn one (it never reached the disk whole)."""
    size = fh.seek(0, os.SEEK_END)
    if size == 0:
        return
    fh.seek(size - 1)
    if fh.read(1) == b"\n":
        return
    start = _last_line_start(fh, size)
    fh.seek(start)
    tail = fh.read(size - start)
    if _parse_line(tail) is not None:
        fh.write(b"\n")
        return
    log.warning("%s: cutting off a torn last line (%d bytes) left by an interrupted write",
                path, size - start)
    fh.truncate(start)


def _last_line_start(fh, size: int, chunk: int = 65536) -> int:
    end = size
    while end > 0:
        begin = max(0, end - chunk)
        fh.seek(begin)
        newline = fh.read(end - begin).rfind(b"\n")
        if newline >= 0:
            return begin + newline + 1
        end = begin
    return 0


def _parse_line(raw: bytes) -> dict | None:
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def read_jsonl(path: Path) -> list[dict]:
    """Every record of a JSON-lines file. Only a torn last line (no final newline: a write cut
    short by a crash) is skipped, with a warning; any other damaged line raises JsonlError
    naming the file and line, since skipping it would silently lose a record."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    torn = lines.pop()  # b"" when the file ends in a newline, as every complete append does
    out = []
    for lineno, raw in enumerate(lines, 1):
        record = _parse_line(raw)
        if record is None:
            raise JsonlError(f"{path}:{lineno}: damaged line (not a JSON object); the file "
                             "cannot be trusted (only a torn last line is tolerated)")
        out.append(record)
    if torn:
        record = _parse_line(torn)
        if record is None:
            log.warning("%s:%d: ignoring a torn last line (an interrupted write)", path,
                        len(lines) + 1)
        else:
            out.append(record)
    return out


RUN_LOCK = ".fedllm.lock"


class RunDirBusy(RuntimeError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def run_dir_lock(run_dir: Path):
    """Hold an exclusive lock on ``run_dir`` for the life of a run (released by the kernel
    if the process dies). A second run on the same directory gets RunDirBusy at once."""
    run_dir = private_dir(run_dir)
    fh = open(run_dir / RUN_LOCK, "a+", encoding="utf-8")  # "a+": never clobber the holder's pid
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "unknown"
        fh.close()
        raise RunDirBusy(f"run.dir {run_dir} is in use by another fedllm run (pid {holder}); "
                         "wait for it to end or choose another run.dir") from None
    try:
        fh.truncate(0)
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        yield
    finally:
        fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()
