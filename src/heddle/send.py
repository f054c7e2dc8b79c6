"""The send path: validate, encode and publish a task or a graph, in one place.

``Task.apply_async``, ``app.send_task``, canvas graphs and the orchestrator's
nodes all send through here, downward: this module knows the app only as a
:class:`~heddle.connections.Client` and publishes through its connections.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import math
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from heddle import names
from heddle.errors import DecodeError, EncodeError, TaskOptionError
from heddle.messages import TaskMessage, check_payload, encoder
from heddle.results import AsyncResult
from heddle.settings import Settings, check_name

if TYPE_CHECKING:
    from heddle.connections import Client, Connections

APPLY_OPTIONS = frozenset(
    {"countdown", "eta", "expires", "priority", "task_id", "headers", "tier", "worker_type", "budget_usd"}
)


# Task ids are 128 random bits in hex, as uuid4().hex but drawn from the OS 256 at a time
# (one system call per 256 sends instead of one each). Unpredictable, as before: an id is
# all that stands between a client and someone else's result (docs/security.md).
_IDS_PER_DRAW = 256
_spare_ids: list[str] = []


def _forget_spare_ids() -> None:
    # A forked child must not send ids its parent also holds.
    _spare_ids.clear()


os.register_at_fork(after_in_child=_forget_spare_ids)


def new_task_id() -> str:
    """A fresh task id: 32 hex digits, random."""
    try:
        return _spare_ids.pop()  # atomic: two threads never get the same one
    except IndexError:
        drawn = os.urandom(16 * _IDS_PER_DRAW).hex()
        _spare_ids.extend(drawn[i:i + 32] for i in range(32, len(drawn), 32))
        return drawn[:32]


def unknown_options_error(kind: str, given: set[str], known: frozenset[str], where: str) -> TaskOptionError:
    """The error for options nobody knows, with the closest known one for each."""
    parts = []
    for opt in sorted(given):
        close = difflib.get_close_matches(opt, known, n=1)
        parts.append(f"{opt!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TaskOptionError(
        f"unknown {kind} {', '.join(parts)} for {where}; known {kind}s: {', '.join(sorted(known))}"
    )


def encode_args(
    task: str, args: tuple[Any, ...], kwargs: dict[str, Any], arg_names: Sequence[str] = ()
) -> tuple[list[Any], dict[str, Any]]:
    """Check encodability and name the first argument that fails (by parameter name when known)."""
    for i, a in enumerate(args):
        try:
            encoder.encode(a)
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            which = f"argument {arg_names[i]!r}" if i < len(arg_names) else f"argument {i}"
            raise EncodeError(
                f"{which} of task {task!r} ({type(a).__name__}) cannot be sent: {exc}. "
                f"Pass plain data (str, int, float, bool, None, list, dict, datetime, "
                f"msgspec.Struct, dataclass); never objects that need pickle"
            ) from None
    for k, v in kwargs.items():
        try:
            encoder.encode(v)
        except (TypeError, msgspec.EncodeError, OverflowError) as exc:
            raise EncodeError(
                f"argument {k!r} of task {task!r} ({type(v).__name__}) cannot be sent: {exc}. "
                f"Pass plain data (str, int, float, bool, None, list, dict, datetime, "
                f"msgspec.Struct, dataclass); never objects that need pickle"
            ) from None
    return list(args), kwargs


def check_message_size(settings: Settings, what: str, payload: bytes) -> None:
    """Refuse, at the call site, a message larger than ``settings.max_message_bytes``."""
    if len(payload) > settings.max_message_bytes:
        raise EncodeError(
            f"{what}: its arguments encode to {len(payload):,} bytes, over the limit of "
            f"{settings.max_message_bytes:,} (setting max_message_bytes, below nats-server's max_payload); "
            f"pass large data by reference (a path, a URL, an object-store key) instead"
        )
    try:
        # The limits every consumer decodes under (depth, inflated size): a message a
        # worker would dead-letter is refused here instead.
        check_payload(payload)
    except DecodeError as exc:
        raise EncodeError(f"{what}: its arguments cannot be sent: {exc}") from None


def eta_epoch(countdown: float | None, eta: datetime | float | None) -> float | None:
    """Epoch seconds to run at, from ``countdown`` or ``eta`` (None: now)."""
    if countdown is not None and eta is not None:
        raise TypeError("pass countdown= or eta=, not both")
    if countdown is not None:
        if not isinstance(countdown, int | float) or countdown < 0:
            raise TypeError(f"countdown must be seconds >= 0, got {countdown!r}")
        return time.time() + float(countdown)
    if isinstance(eta, datetime):
        if eta.tzinfo is None:
            raise TypeError("eta must be timezone-aware, e.g. datetime.now(timezone.utc) + delta")
        return eta.astimezone(UTC).timestamp()
    if eta is not None:
        return float(eta)
    return None


def expires_epoch(expires: datetime | float | None, eta: float | None, now: float) -> float | None:
    """Epoch seconds after which the task must not start, from seconds or an aware datetime.

    Raises:
        TypeError: Not seconds > 0 or an aware datetime, or not after the task's eta
            (it could never run).
    """
    if expires is None:
        return None
    if isinstance(expires, datetime):
        if expires.tzinfo is None:
            raise TypeError("expires must be timezone-aware, e.g. datetime.now(timezone.utc) + delta")
        at = expires.astimezone(UTC).timestamp()
    elif isinstance(expires, int | float) and not isinstance(expires, bool) and 0 < expires < float("inf"):
        at = now + float(expires)
    else:
        raise TypeError(f"expires must be seconds > 0 or an aware datetime, got {expires!r}")
    if eta is not None and at <= eta:
        raise TypeError("expires is not after the task's countdown/eta: it could never run; move one of them")
    return at


def check_budget_usd(value: object, where: str) -> float | None:
    """``value`` as a budget in US dollars (None stays None), or a TypeError that says what to pass."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise TypeError(f"budget_usd for {where} must be US dollars > 0 (e.g. 0.25), got {value!r}")
    return float(value)


def usd(amount: float) -> str:
    """US dollars with the digits small sums need: ``$0.00042``, ``$1.5``, ``$0``."""
    return f"${amount:.6f}".rstrip("0").rstrip(".") if amount else "$0"


def check_priority(priority: object, where: str) -> int | None:
    """``priority`` if it is None or an int 0-9, else a TypeError that says so."""
    if priority is None or (
        isinstance(priority, int) and not isinstance(priority, bool)
        and names.MIN_PRIORITY <= priority <= names.MAX_PRIORITY
    ):
        return priority
    raise TypeError(
        f"priority for {where} must be an int from {names.MIN_PRIORITY} (lowest) to {names.MAX_PRIORITY} "
        f"(highest; default {names.DEFAULT_PRIORITY}), got {priority!r}"
    )


def send(
    app: Client,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    countdown: float | None = None,
    eta: datetime | float | None = None,
    expires: datetime | float | None = None,
    priority: int | None = None,
    task_id: str | None = None,
    headers: dict[str, str] | None = None,
    tier: str | None = None,
    worker_type: str | None = None,
    arg_names: Sequence[str] = (),
    budget_usd: float | None = None,
) -> AsyncResult[Any]:
    """Encode and send one task message; the single path every caller goes through.

    ``arg_names`` are the task's positional parameter names, for errors that name them.
    ``budget_usd`` is what the task's model calls may cost in all (``heddle.llm.prices``).
    """
    if tier is not None and tier not in names.TIERS:
        raise TypeError(f"tier must be one of {', '.join(names.TIERS)}, got {tier!r}")
    if task_id is not None:
        names.check_task_id(task_id)
    hdrs = dict(headers or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in hdrs.items()):
        raise TypeError("headers must map str to str")
    enc_args, enc_kwargs = encode_args(name, args, kwargs, arg_names)
    tid = task_id or new_task_id()
    now = time.time()
    starts = eta_epoch(countdown, eta)
    msg = TaskMessage(
        id=tid,
        task=name,
        args=enc_args,
        kwargs=enc_kwargs,
        eta=starts,
        tier=tier,
        headers=hdrs,
        submitted_at=now,
        expires=expires_epoch(expires, starts, now),
        priority=check_priority(priority, f"task {name!r}"),
        budget_usd=check_budget_usd(budget_usd, f"task {name!r}"),
    )
    payload = encoder.encode(msg)
    check_message_size(app.settings, f"task {name!r}", payload)
    # The router reads only these headers; the payload goes through it untouched.
    wire_headers = {
        names.HDR_MSG_ID: tid,
        names.HDR_TASK: name,
        names.HDR_WORKER_TYPE: check_name("worker_type", worker_type) if worker_type else app.worker_type,
    }
    if tier:
        wire_headers[names.HDR_TIER_REQUESTED] = tier
    if priority is not None and names.band_of(priority):
        # Routers and direct routes read it to pick the band's subject (heddle.bands).
        wire_headers[names.HDR_PRIORITY] = str(priority)
    subject = names.INCOMING_SUBJECT
    result: AsyncResult[Any] = AsyncResult(tid, app, name)
    result.worker_type, result.eta = wire_headers[names.HDR_WORKER_TYPE], msg.eta
    return submit(app, result, subject, payload, wire_headers)


def send_by_name(
    app: Client,
    name: str,
    args: tuple[Any, ...] | list[Any] | dict[str, Any] = (),
    kwargs: dict[str, Any] | None = None,
    **options: Any,
) -> AsyncResult[Any]:
    """``app.send_task``: send by name without the task's code."""
    unknown = set(options) - APPLY_OPTIONS
    if unknown:
        raise unknown_options_error("option", unknown, APPLY_OPTIONS, f"send_task({name!r})")
    if "worker_type" not in options and name not in app.tasks and "." not in name:
        # A bare name that is not one of this app's tasks names a worker type of its
        # own, such as a YAML LLM worker (``send_task("summarizer", ...)``).
        options["worker_type"] = name
    if isinstance(args, dict):
        # One input object, as YAML LLM workers take it: send_task("summarizer", {"text": ...}).
        # tuple(args) would silently send the dict's keys instead.
        args = (args,)
    return send(app, name, tuple(args), dict(kwargs or {}), **options)


def submit(
    app: Client, result: AsyncResult[Any], subject: str, payload: bytes, headers: dict[str, str]
) -> AsyncResult[Any]:
    """Publish an encoded message for ``result``: on the caller's loop, or to the end for sync callers.

    On an async caller's loop whose connections are open and have nothing waiting, the
    message is queued in this call (:func:`send_now`); otherwise a task on the loop
    sends it (:func:`publish`). Sends that had to wait go first: while one is pending,
    every later send waits too, so a connection publishes in the order of the calls. A
    sync caller's send is queued the same way on the portal's loop, in its next step.
    ``app.dispatch`` chooses.
    """
    app.dispatch(
        result,
        functools.partial(send_now, result=result, subject=subject, payload=payload, headers=headers),
        functools.partial(publish, app, result, subject, payload, headers),
    )
    return result


def send_now(conns: Connections, result: AsyncResult[Any], subject: str, payload: bytes,
             headers: dict[str, str]) -> asyncio.Future[Any] | None:
    """Queue ``result``'s message on ``conns`` without awaiting: the future of its publish, or None (nothing sent).

    None when something has to be waited for first (:meth:`Connections.send_now`); the
    result is watched from the running loop, which must be the connections' own.
    """
    now = conns.send_now(result.id, subject, payload, headers)
    if now is None:
        return None
    result.watch_from(now.watch, asyncio.get_running_loop())
    return now.sent


async def publish(app: Client, result: AsyncResult[Any], subject: str, payload: bytes,
                  headers: dict[str, str]) -> None:
    """Watch the result, record the send for the audit, and publish; done once JetStream stored it."""
    conns = await app.connections()
    await conns.ensure_streams()
    watch = await conns.expect(result.id)
    conns.ask_for_notice(headers)
    result.watch_from(watch, asyncio.get_running_loop())
    # Recorded in the background, with the other sends of this turn of the loop: the
    # audit never holds a send back (heddle.audit says what that trades).
    conns.submissions.record(result.id)
    if subject == names.INCOMING_SUBJECT:
        subject = await conns.route(subject, headers)
    watch.stored(await conns.broker.publish(subject, payload, headers))
