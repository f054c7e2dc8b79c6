"""nats-py's client with a quicker header parser: what :class:`heddle.broker.Broker` connects with.

Part of the transport with :mod:`heddle.broker` and :mod:`heddle.pull`. Every
task delivery carries half a dozen headers (``Nats-Msg-Id``, the task name, the
worker type, the notice token...), and nats-py 2.16 parses each header name
with a generator over its characters to reject names holding whitespace: a
third of a worker's Python calls per task went there. :class:`Connection` does
the same check with one regular-expression search and parses the same way
otherwise; ``tests/test_fetch.py`` pins it to nats-py's result.
"""

from __future__ import annotations

import re

from nats.aio.client import Client

__all__ = ["Connection", "parse_header_lines"]

_CRLF = b"\r\n"
# What str.isspace() calls whitespace (re's \s in a str pattern is the same set).
_WHITESPACE = re.compile(r"\s")


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """A NATS header block (``Name: Value`` lines) as a dict, as nats-py parses it.

    Lines without a colon, names that are not ASCII and names holding
    whitespace are skipped; values are stripped and decoded as UTF-8 with
    replacement characters for bad bytes; a later line wins over an earlier one.
    """
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        try:
            key = name.strip().decode("ascii")
        except UnicodeDecodeError:
            continue
        if _WHITESPACE.search(key):
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


class Connection(Client):
    """A nats-py ``Client`` whose header parsing costs one regex search per header instead of a loop."""

    _parse_header_lines = staticmethod(parse_header_lines)
