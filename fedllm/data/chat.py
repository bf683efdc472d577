"""Records as token ids with the tokens the loss scores marked: plain text scores every token;
instruction records (``prompt``/``response``, or ``messages`` in the chat format) score only
the assistant's tokens (completion-only, as TRL's SFT trainer does).

A token the model reads but is not trained to predict (the user's turn, a system turn, the
template's markup) is stored as ``context_id(t) = -(t + 2)``; ``PAD_ID = -1`` fills a record
after its last token. ``model_ids`` recovers the ids the model reads; ``scored`` says which
positions are targets. One int tensor thus carries ids and loss mask through packing, padding,
caching and Poisson sampling unchanged.
"""

from __future__ import annotations

import json

import torch

ROLES = ("system", "user", "assistant")
PAD_ID = -1


def context_id(token: int) -> int:
    return -(token + 2)


def model_ids(encoded: torch.Tensor) -> torch.Tensor:
    """The ids the model reads: context tokens decoded, padding fed as token 0."""
    return torch.where(encoded >= 0, encoded, (-encoded - 2).clamp(min=0))


def scored(encoded: torch.Tensor) -> torch.Tensor:
    """True where the token is a training target."""
    return encoded >= 0


class ChatError(ValueError):
    """A ``messages`` value that is not a conversation."""


def parse_messages(value) -> str:
    """Check a record's ``messages`` (a list of {"role", "content"} with at least one
    assistant turn) and return it as canonical JSON (records are stored as strings)."""
    if not isinstance(value, list) or not value:
        raise ChatError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) \
                or msg.get("role") not in ROLES:
            raise ChatError(f"'messages'[{i}] must be an object with a 'role' in "
                            f"{'/'.join(ROLES)} and a string 'content'")
        out.append({"role": msg["role"], "content": msg["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ChatError("'messages' has no assistant turn: nothing to train on")
    return json.dumps(out, ensure_ascii=False)


def prompt_response_messages(prompt: str, response: str) -> str:
    """A prompt/response record is the two-turn conversation user -> assistant (no system
    turn is added here; a chat template may add its own, as it would for TRL)."""
    return json.dumps([{"role": "user", "content": prompt},
                       {"role": "assistant", "content": response}], ensure_ascii=False)


def render_chat(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character spans of the assistant's turns.

    With a chat template, exactly as the tokenizer renders it; an assistant turn's span is what
    rendering that turn adds after the prompt for it (``add_generation_prompt=True``): its
    content and end-of-turn markup, which a model must learn to emit. Without a template, the
    contents joined by newlines."""
    if not getattr(tokenizer, "chat_template", None):
        text, spans = "", []
        for m in messages:
            start = len(text)
            text += m["content"] + "\n"
            if m["role"] == "assistant":
                spans.append((start, len(text)))
        return text, spans
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False,
                                               add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ChatError("the tokenizer's chat template does not render a conversation's "
                            "turns as prefixes of it; the assistant's tokens cannot be located")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(messages_json: str, tokenizer) -> list[int]:
    """Token ids of one conversation; tokens outside the assistant's turns as context ids."""
    text, spans = render_chat(json.loads(messages_json), tokenizer)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # a slow (Python) tokenizer has no character offsets
        raise ChatError("instruction records need a fast tokenizer (character offsets) to "
                        "find the assistant's tokens") from None
    out = []
    for token, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"]):
        in_turn = any(a <= start < b for a, b in spans)
        out.append(token if in_turn else context_id(token))
    return out


def has_target(ids: list[int]) -> bool:
    """A sequence trains on something: a scored token after the first position."""
    return any(t >= 0 for t in ids[1:])
