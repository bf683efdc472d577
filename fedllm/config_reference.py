"""The configuration reference, generated from the schema itself: every key of
``FedLLMConfig`` with its type (an enum's choices), its default from ``conf/`` and its help
text, which is the schema's own comment for that field (on its line, or the comment lines just
above it). The documentation site renders this table at build time (``docs/hooks.py``), so the
reference cannot drift from the code.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import io
import tokenize
import typing
from dataclasses import dataclass


@dataclass(frozen=True)
class KeyDoc:
    key: str        # dotted path, e.g. "privacy.example.target_epsilon"
    type: str       # "int", "float or null", "one of: a, b"
    default: str    # the composed default of conf/, as YAML would print it
    help: str       # the schema's comment for the field ("" if it has none)


def field_comments(cls: type) -> dict[str, str]:
    """{field name: its comment} from the class body's source: a trailing comment on the
    field's line, else the run of comment lines directly above it."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if name not in names or ":" not in line:
            continue
        if number in comments and not line.strip().startswith("#"):
            out[name] = comments[number]
            continue
        above, k = [], number - 1
        while k in comments and lines[k - 1].strip().startswith("#"):
            above.insert(0, comments[k])
            k -= 1
        out[name] = " ".join(above)
    return out


def _type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_type_name(inner[0])} or null" if len(inner) == 1 else "any"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "one of: " + ", ".join(str(m.value) for m in annotation)
    if origin in (list, typing.List):
        return f"list of {_type_name(args[0])}" if args else "list"
    if annotation is typing.Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


def _default(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_default(v) for v in value) + "]"
    return str(value)


def reference(cfg=None) -> list[KeyDoc]:
    """Every leaf key of the schema, in schema order, with the defaults of ``cfg`` (the
    composed defaults when None)."""
    from omegaconf import OmegaConf

    from fedllm.config import FedLLMConfig, compose, to_yaml

    if cfg is None:
        cfg = compose([])
    values = OmegaConf.to_container(OmegaConf.create(to_yaml(cfg)), resolve=True)
    rows: list[KeyDoc] = []

    def walk(cls: type, prefix: str, node) -> None:
        hints = typing.get_type_hints(cls)
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            value = node.get(f.name) if isinstance(node, dict) else None
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], key + ".", value)
            else:
                rows.append(KeyDoc(key, _type_name(hints[f.name]), _default(value),
                                   comments.get(f.name, "")))

    walk(FedLLMConfig, "", values)
    return rows


def markdown_table(rows: list[KeyDoc]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| key | type | default | help (the schema's own) |", "|---|---|---|---|"]
    lines += [f"| `{r.key}` | {cell(r.type)} | `{cell(r.default)}` | {cell(r.help)} |"
              for r in rows]
    return "\n".join(lines)
