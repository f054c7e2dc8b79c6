"""Wire messages: msgspec Structs encoded as msgpack, each with a version field.

Schema evolution rules (msgspec's): new fields get defaults and go at the end;
fields are never renamed or retyped; a reader rejects a higher ``v`` it does not
understand. Encoders and decoders are module-level and built once.

Anything on the bus can publish, so every task and goal message a consumer takes
is decoded through :func:`decode`: bounded in size and depth before msgspec sees
it, and every failure, whatever msgspec or Python raised, a
:class:`~heddle.errors.DecodeError` that says why.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import msgspec

from heddle.errors import DecodeError, TaskExpired, TaskIdError
from heddle.names import check_task_id

WIRE_VERSION: Final = 1

# Task states, as Celery names them.
PENDING: Final = "PENDING"
STARTED: Final = "STARTED"
RETRY: Final = "RETRY"
SUCCESS: Final = "SUCCESS"
FAILURE: Final = "FAILURE"
REVOKED: Final = "REVOKED"
READY_STATES: Final = frozenset({SUCCESS, FAILURE, REVOKED})
# ErrorInfo.type of a REVOKED record whose task expired before it started.
EXPIRED_ERROR: Final = f"{TaskExpired.__module__}.{TaskExpired.__qualname__}"
ALL_STATES: Final = (PENDING, STARTED, RETRY, SUCCESS, FAILURE, REVOKED)


class TaskMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One task invocation on the wire."""

    v: int = WIRE_VERSION
    id: str
    task: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    eta: float | None = None
    tier: str | None = None
    headers: dict[str, str] = {}
    submitted_at: float = 0.0
    expires: float | None = None  # epoch seconds; not started by then, it never runs
    priority: int | None = None  # 0-9, 9 highest (heddle.bands); None: the default, 5
    budget_usd: float | None = None  # what its model calls may cost in all (heddle.llm.prices)


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A remote exception as text; exceptions never cross the wire as objects."""

    type: str
    message: str
    traceback: str = ""


class ResultRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, gc=False):
    """A task's state and outcome as stored in Valkey and sent in result notices."""

    # gc=False: not tracked by the garbage collector, which a client holding many results
    # would otherwise walk again and again. Safe because a record is never part of a
    # reference cycle: it is frozen, and built from decoded values or a task's return value.

    v: int = WIRE_VERSION
    id: str
    state: str
    task: str = ""
    result: Any = None
    error: ErrorInfo | None = None
    retries: int = 0
    worker: str = ""
    tier: str = ""
    started_at: float = 0.0
    finished_at: float = 0.0
    meta: dict[str, Any] = {}


class RevokeNotice(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Broadcast to every worker: stop or skip this task."""

    v: int = WIRE_VERSION
    id: str


encoder: Final = msgspec.msgpack.Encoder()
task_decoder: Final = msgspec.msgpack.Decoder(TaskMessage)
record_decoder: Final = msgspec.msgpack.Decoder(ResultRecord)
revoke_decoder: Final = msgspec.msgpack.Decoder(RevokeNotice)
any_decoder: Final = msgspec.msgpack.Decoder()


# -- bounded decoding ----------------------------------------------------------------

# A task or goal message larger than this is refused before it is decoded. nats-server's
# max_payload is 1 MiB by default and the server warns when it is set above 8 MiB, so
# only a server configured past its own advice delivers anything bigger.
MAX_MESSAGE_BYTES: Final = 8 * 1024 * 1024
# Memory a message may decode to, estimated before decoding (see _scan). Text and bytes
# decode to about their own size, floats to ~3.5x, lists of small records to ~10x, but
# empty lists and maps to ~70x: four 1 MiB messages of one-element lists took +160 MB
# of a worker's memory. 32 MiB lets a 1 MiB message of records through and stops those.
MAX_DECODED_BYTES: Final = 32 * 1024 * 1024
# Deepest nesting of lists and maps (serde_json's default limit). msgspec itself only
# stops near Python's recursion limit, with a RecursionError, and deep values break
# whatever recurses over them next (the task, repr, the result encoder).
MAX_DEPTH: Final = 128

# Bytes that may start a map or a list: fixmap, fixarray, array16/32, map16/32.
_CONTAINER_BYTES: Final = bytes([*range(0x80, 0xA0), 0xDC, 0xDD, 0xDE, 0xDF])
# No msgpack byte decodes to more than ~72 bytes (an empty map: a dict and its slot),
# so a payload this small cannot pass MAX_DECODED_BYTES and needs no size scan.
_SCAN_ABOVE: Final = MAX_DECODED_BYTES // 72
_SLOT: Final = 8  # the pointer a value takes in its list or dict
# Fixed-size scalars: lead byte -> encoded length, estimated decoded size.
_FIXED: Final = {
    0xCA: (5, 24), 0xCB: (9, 24),  # float32/64 -> float
    0xCC: (2, 32), 0xCD: (3, 32), 0xCE: (5, 32), 0xCF: (9, 36),  # uint8..64 -> int
    0xD0: (2, 32), 0xD1: (3, 32), 0xD2: (5, 32), 0xD3: (9, 36),  # int8..64 -> int
    0xD4: (3, 66), 0xD5: (4, 67), 0xD6: (6, 69), 0xD7: (10, 73), 0xD8: (18, 81),  # fixext -> Ext
}
# Length-prefixed values: lead byte -> width of the length, extra header bytes, object overhead.
_SIZED: Final = {
    0xD9: (1, 0, 49), 0xDA: (2, 0, 49), 0xDB: (4, 0, 49),  # str8/16/32 -> str
    0xC4: (1, 0, 33), 0xC5: (2, 0, 33), 0xC6: (4, 0, 33),  # bin8/16/32 -> bytes
    0xC7: (1, 1, 65), 0xC8: (2, 1, 65), 0xC9: (4, 1, 65),  # ext8/16/32 -> Ext (type byte)
}

_T = TypeVar("_T")

# Headers a consumer copies onto a message it publishes again (a routed copy, a dead
# letter), counted in characters (UTF-8 makes at most 4x as many bytes). Heddle's own
# come to a few hundred; thousands, from the bus, could push the copy past the server's
# max_payload, and nats-server closes the connection of a client that sends one.
MAX_HEADER_CHARS: Final = 4096


def headers_size(headers: dict[str, str]) -> int:
    """Characters ``headers`` take on the wire, near enough (``key: value\\r\\n`` each)."""
    return sum(map(len, headers)) + sum(map(len, headers.values())) + 4 * len(headers)


def copyable_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """``headers`` to copy onto a dead letter: all of them, or none if there are too many."""
    if not headers:
        return {}
    return headers if headers_size(headers) <= MAX_HEADER_CHARS else {}


def check_payload(data: bytes) -> None:
    """Raise :class:`~heddle.errors.DecodeError` if ``data`` is too big to decode safely.

    Refused: more than :data:`MAX_MESSAGE_BYTES`, an estimated decoded size over
    :data:`MAX_DECODED_BYTES`, or lists and maps nested deeper than :data:`MAX_DEPTH`.
    A short message costs a length check, a longer one with few bytes that could
    start a list or map one ``bytes.translate``; only the rest is walked, in time
    linear in the number of values (~0.2 s for 1 MiB of one-element lists).
    """
    size = len(data)
    if size > MAX_MESSAGE_BYTES:
        raise DecodeError(f"the message is {size:,} bytes; the limit is {MAX_MESSAGE_BYTES:,}")
    if size < MAX_DEPTH:
        return  # too short to nest that deep or to inflate far: most tasks stop here
    if size <= _SCAN_ABOVE and size - len(data.translate(None, _CONTAINER_BYTES)) < MAX_DEPTH:
        return
    _scan(data)


def _scan(data: bytes) -> None:
    """Walk msgpack ``data`` without building it: estimate its decoded size and depth.

    Malformed or truncated input ends the walk quietly; the decoder reports it.
    """
    end = len(data)
    i = 0
    cost = 0
    left = 1  # values still to read in the innermost open list or map
    open_: list[int] = []  # values still to read in each enclosing one
    while True:
        if not left:
            if not open_:
                return
            left = open_.pop()
            continue
        if i >= end:
            return
        b = data[i]
        left -= 1
        if b <= 0x7F or b >= 0xE0 or 0xC0 <= b <= 0xC3:  # fixint, nil, bool: cached objects
            i += 1
            cost += _SLOT
            continue
        if 0xA0 <= b <= 0xBF:  # fixstr
            n = b & 0x1F
            i += 1 + n
            cost += _SLOT + 49 + n
        elif b <= 0x9F or b >= 0xDC:  # fixmap, fixarray, array16/32, map16/32
            if b <= 0x9F:
                items, is_map = b & 0x0F, b <= 0x8F
                i += 1
            else:
                width = 2 if b in (0xDC, 0xDE) else 4
                items, is_map = int.from_bytes(data[i + 1 : i + 1 + width], "big"), b >= 0xDE
                i += 1 + width
            if len(open_) >= MAX_DEPTH:
                raise DecodeError(f"the message nests lists or maps deeper than {MAX_DEPTH} levels")
            values = 2 * items if is_map else items
            if values > end - i:
                return  # declares more values than there are bytes left: truncated
            if is_map:
                cost += _SLOT + (64 + 30 * max(items, 4) if items else 64)
            else:
                cost += _SLOT + 56
            if values:
                open_.append(left)
                left = values
        elif b in _FIXED:
            n, size = _FIXED[b]
            i += n
            cost += _SLOT + size
        elif b in _SIZED:
            width, extra, size = _SIZED[b]
            n = int.from_bytes(data[i + 1 : i + 1 + width], "big")
            i += 1 + width + extra + n
            cost += _SLOT + size + n
        else:  # 0xC1 is never used: the decoder reports it
            return
        if cost > MAX_DECODED_BYTES:
            raise DecodeError(
                f"the message would decode to more than {MAX_DECODED_BYTES // (1024 * 1024)} MiB "
                f"({len(data):,} bytes of small lists, maps or values)"
            )


def decode(decoder: msgspec.msgpack.Decoder[_T], data: bytes) -> _T:
    """Decode a message taken from the bus, bounded by :func:`check_payload`.

    Raises:
        DecodeError: For every failure (msgspec's, a RecursionError, anything else),
            with the reason; the caller dead-letters the message.
    """
    check_payload(data)
    try:
        return decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(str(exc)) from None
    except RecursionError:
        raise DecodeError("the message nests too deeply to decode") from None
    except Exception as exc:  # MemoryError included: one message must never end a loop
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None


def check_version(v: int, what: str = "message") -> None:
    """Raise :class:`~heddle.errors.DecodeError` unless this code reads wire version ``v``."""
    if not 1 <= v <= WIRE_VERSION:
        raise DecodeError(f"unsupported {what} version {v} (this reader takes 1..{WIRE_VERSION})")


def usable_task_id(*candidates: object) -> str:
    """The first candidate that can be a task id (a subject token), or ``""`` if none can.

    A message's failure is recorded under this id; an id that fails
    :func:`~heddle.names.check_task_id` is never put in a subject or a key.
    """
    for candidate in candidates:
        try:
            return check_task_id(candidate)
        except TaskIdError:
            continue
    return ""


class MaxDeliveriesAdvisory(msgspec.Struct, frozen=True, kw_only=True):
    """JetStream's ``io.nats.jetstream.advisory.v1.max_deliver`` (JSON), as nats-server sends it.

    Published on ``$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}``
    when the message at ``stream_seq`` was delivered ``deliveries`` times (the
    consumer's MaxDeliver) without an ack. Other fields (type, id, timestamp,
    domain) are ignored.
    """

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


# Real advisories are ~250 bytes of flat JSON.
MAX_ADVISORY_BYTES: Final = 4096
max_deliveries_decoder: Final = msgspec.json.Decoder(MaxDeliveriesAdvisory)


def decode_advisory(data: bytes) -> MaxDeliveriesAdvisory:
    """A max-deliveries advisory; :class:`~heddle.errors.DecodeError` if it is not one."""
    if len(data) > MAX_ADVISORY_BYTES:
        raise DecodeError(f"the advisory is {len(data):,} bytes; real ones are under {MAX_ADVISORY_BYTES:,}")
    try:
        return max_deliveries_decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise DecodeError(str(exc)) from None
    except Exception as exc:
        raise DecodeError(f"{type(exc).__name__}: {exc}") from None
