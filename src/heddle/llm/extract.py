"""Find the JSON in a model's reply: bare, in a code fence, or after a preamble.

Models wrap JSON in Markdown fences, put "Here is the result:" before it or a
sentence after it, and reasoning models add ``<think>`` blocks. ``extract_json``
tries, in order: the whole reply; each fenced block; then every ``{`` or ``[``
from left to right, decoding one JSON value there and ignoring what follows.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["NoJSONFound", "extract_json"]

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\r?\n(.*?)```", re.DOTALL)
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
# Bound on the positions tried in prose, so a long reply full of braces stays cheap.
_MAX_CANDIDATES = 200


class NoJSONFound(ValueError):
    """Raised when a reply holds no JSON value; the message says what the reply looked like."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_decoder = json.JSONDecoder(parse_constant=_reject_constant)


def _loads(text: str) -> Any:
    value, end = _decoder.raw_decode(text)
    if text[end:].strip():
        raise ValueError("extra data after the JSON value")
    return value


def extract_json(reply: str) -> Any:
    """Return the first JSON value found in ``reply``.

    Raises:
        NoJSONFound: Nothing in the reply decodes as a JSON object or array.

    Example:
        >>> extract_json('Sure! ```json\\n{"label": "spam"}\\n``` Anything else?')
        {'label': 'spam'}
    """
    text = _THINK.sub("", reply).strip().lstrip("\ufeff")
    if not text:
        raise NoJSONFound("the reply is empty")
    try:
        return _loads(text)
    except ValueError:
        pass
    for match in _FENCE.finditer(text):
        body = match.group(2).strip()
        try:
            return _loads(body)
        except ValueError:
            found = _scan(body)
            if found is not _MISSING:
                return found
    found = _scan(text)
    if found is not _MISSING:
        return found
    snippet = text if len(text) <= 120 else text[:117] + "..."
    raise NoJSONFound(f"no JSON object or array found in the reply {snippet!r}")


_MISSING = object()


def _scan(text: str) -> Any:
    tried = 0
    for i, ch in enumerate(text):
        if ch not in "{[":
            continue
        tried += 1
        if tried > _MAX_CANDIDATES:
            break
        try:
            value, _ = _decoder.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(value, dict | list):
            return value
    return _MISSING
