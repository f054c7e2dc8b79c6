"""Wire messages: msgspec Structs encoded as msgpack, each with a version field.

Schema evolution rules (msgspec's): new fields get defaults and go at the end;
fields are never renamed or retyped; a reader rejects a higher ``v`` it does not
understand. Encoders and decoders are module-level and built once.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

WIRE_VERSION: Final = 1

# Task states, as Celery names them.
PENDING: Final = "PENDING"
STARTED: Final = "STARTED"
RETRY: Final = "RETRY"
SUCCESS: Final = "SUCCESS"
FAILURE: Final = "FAILURE"
REVOKED: Final = "REVOKED"
READY_STATES: Final = frozenset({SUCCESS, FAILURE, REVOKED})
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


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A remote exception as text; exceptions never cross the wire as objects."""

    type: str
    message: str
    traceback: str = ""


class ResultRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A task's state and outcome as stored in Valkey and sent in result notices."""

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
