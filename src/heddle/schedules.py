"""Periodic schedules: ``app.periodic(task, every=... | cron=..., tz=...)``, checked where they are declared.

nats-server keeps the time. Each schedule becomes a message-schedule definition
(ADR-51, nats-server 2.14+) on ``heddle.schedules.def.{app}.{name}`` in the
``HEDDLE_SCHEDULES`` stream; at every due time the server itself publishes the
definition's body, a :class:`ScheduledCall`, as a tick on
``heddle.schedules.tick.{app}.{name}``. Every worker process that loads the app
hosts a :class:`~heddle.scheduler.Scheduler` on one shared durable consumer of
the app's ticks, so each tick goes to one process, which sends the task with the
id ``periodic:{app}:{name}:{tick ms}``: a tick delivered again (its process died
before acking it) is the same task, dropped by JetStream's deduplication or by the
worker that finds its result stored. Why the server and not a lease among the
workers: the server already is the one clock every process shares; no worker
holds anything a crash could take with it, and no election is needed.

Missed ticks run once: a tick is published with ``Nats-Rollup: sub``, so while no
worker of the app runs, each tick replaces the one before it, and the first worker
to come back runs the newest of them once (a nats-server that was itself down also
skips ahead and fires once). This module declares, checks and describes schedules;
:mod:`heddle.scheduler` is the actor that installs them and turns ticks into tasks.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from cronsim import CronSim, CronSimError

from heddle import names
from heddle.errors import ConfigError, DecodeError, EncodeError, HeddleError
from heddle.send import encode_args
from heddle.settings import check_name
from heddle.task import Task

if TYPE_CHECKING:
    from heddle.connections import Client

# What nats-server's cron reads in each field (its parser is robfig/cron's, with a seconds
# field first): '*' or '?', a number or a three-letter name (months and weekdays only), a
# range, each with an optional step. No L, W or #: cronsim reads them, the server would not.
_NUM = r"\d{1,2}"
_NAMED = r"(?:\d{1,2}|[A-Za-z]{3})"
_CRON_FIELDS = tuple(
    re.compile(rf"(?:[*?]|{v}(?:-{v})?)(?:/\d{{1,2}})?") for v in (_NUM, _NUM, _NUM, _NAMED, _NAMED)
)
_CRON_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True)
class Schedule:
    """One periodic schedule of an app: run ``task`` with ``args``/``kwargs`` every ``every_s`` or on ``cron``.

    Attributes:
        name: Unique in the app; a subject token.
        task: The task's name.
        every_s: Whole seconds between runs (or None for a cron schedule).
        cron: Five-field cron expression (minute hour day-of-month month day-of-week).
        tz: IANA time zone ``cron`` is read in (None: UTC).
    """

    name: str
    task: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    every_s: int | None = None
    cron: str | None = None
    tz: str | None = None

    def __repr__(self) -> str:
        return f"<Schedule {self.name!r} {self.task} {self.describe()}>"

    def describe(self) -> str:
        """``every 2s`` or ``cron */5 * * * * (Europe/Berlin)``."""
        if self.every_s is not None:
            return f"every {_seconds_text(self.every_s)}"
        return f"cron {self.cron}" + (f" ({self.tz})" if self.tz else " (UTC)")

    @property
    def nats_pattern(self) -> str:
        """The ``Nats-Schedule`` header: ``@every 2s``, or the cron expression with a seconds field first."""
        if self.every_s is not None:
            return f"@every {self.every_s}s"
        return f"0 {self.cron}"

    def definition_headers(self, app: str) -> dict[str, str]:
        """Headers of this schedule's definition message (nats-server's message schedules)."""
        headers = {
            names.HDR_NATS_SCHEDULE: self.nats_pattern,
            names.HDR_NATS_SCHEDULE_TARGET: names.tick_subject(app, self.name),
            # Each tick replaces the one before it: ticks missed while no worker ran run once.
            names.HDR_NATS_SCHEDULE_ROLLUP: "sub",
        }
        if self.tz:
            headers[names.HDR_NATS_SCHEDULE_TIME_ZONE] = self.tz
        return headers

    def call(self) -> ScheduledCall:
        """The body of every tick: what to send."""
        return ScheduledCall(schedule=self.name, task=self.task, args=list(self.args), kwargs=dict(self.kwargs))

    def next_cron_run(self, after: float) -> float:
        """Epoch seconds of the first cron time strictly after ``after`` (cron schedules only)."""
        assert self.cron is not None
        zone = ZoneInfo(self.tz) if self.tz else UTC
        start = datetime.fromtimestamp(int(after), zone)
        return next(CronSim(self.cron, start)).timestamp()


class ScheduledCall(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The body of a schedule's definition, published by nats-server as every tick: the task to send."""

    v: int = 1
    schedule: str
    task: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}


_call_encoder = msgspec.msgpack.Encoder()
_call_decoder = msgspec.msgpack.Decoder(ScheduledCall)


def encode_call(call: ScheduledCall) -> bytes:
    """A tick's body."""
    return _call_encoder.encode(call)


def decode_call(data: bytes) -> ScheduledCall:
    """Read a tick's body.

    Raises:
        DecodeError: It is not a :class:`ScheduledCall` of a version this code reads.
    """
    try:
        call = _call_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise DecodeError(f"not a scheduled call: {exc}") from None
    if call.v != 1:
        raise DecodeError(f"scheduled call version {call.v} is newer than this worker reads (1)")
    return call


def declare(
    app: Client,
    task: Task[Any, Any] | str,
    *,
    every: float | timedelta | None = None,
    cron: str | None = None,
    tz: str | None = None,
    args: tuple[Any, ...] | list[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    name: str | None = None,
    taken: Mapping[str, Schedule] | None = None,
) -> Schedule:
    """Check a schedule as ``app.periodic`` declares it; return it.

    Raises:
        ConfigError: Neither or both of ``every`` and ``cron``; ``every`` not whole
            seconds >= 1; a cron expression that is not five valid fields; an unknown
            time zone, or one without ``cron``; a task the app does not know; a
            name that is taken or cannot be a subject token. The message says what
            to change.
        TypeError: The arguments do not fit the task (as ``apply_async`` would say).
        EncodeError: An argument cannot be sent.
    """
    task_name = _task_name(app, task)
    if name is None:
        name = task_name.rpartition(".")[2]
        how = f"the default name of a schedule is its task's short name ({name!r}); pass name='...'"
    else:
        how = "choose another name="
    if not isinstance(name, str):
        raise ConfigError(f"schedule name must be a string, got {name!r}")
    check_name("schedule name", name)
    if taken is not None and name in taken:
        raise ConfigError(f"schedule name {name!r} is already used in app {app.name!r} by {taken[name]!r}; {how}")
    where = f"schedule {name!r}"
    if (every is None) == (cron is None):
        raise ConfigError(f"{where}: pass every=SECONDS or cron='* * * * *', exactly one of them")
    every_s: int | None = None
    if every is not None:
        every_s = _every_seconds(where, every)
        if tz is not None:
            raise ConfigError(f"{where}: tz= applies to cron schedules; an every= interval is the same in every zone")
    else:
        cron = _check_cron(where, cron)
        if tz is not None:
            _check_tz(where, tz)
    if not isinstance(args, tuple | list) or not isinstance(kwargs, Mapping | None):
        raise TypeError(f"{where}: args must be a tuple or list and kwargs a dict")
    args, kw = tuple(args), dict(kwargs or {})
    local = app.tasks.get(task_name)
    if isinstance(local, Task):
        try:
            local.signature.bind(*args, **kw)
        except TypeError as exc:
            raise TypeError(f"{where}: bad arguments for task {task_name!r} with signature {local.signature}: "
                            f"{exc}") from None
        if local.arguments is not None:
            local.arguments.check(args, kw)
    try:
        encode_args(task_name, args, kw)
    except EncodeError as exc:
        raise EncodeError(f"{where}: {exc}") from None
    return Schedule(name=name, task=task_name, args=args, kwargs=kw, every_s=every_s, cron=cron, tz=tz)


def _task_name(app: Client, task: Task[Any, Any] | str) -> str:
    known = ", ".join(sorted(app.tasks)) or "none yet: declare the task before its schedule"
    if isinstance(task, Task):
        if app.tasks.get(task.name) is not task:
            raise ConfigError(
                f"task {task.name!r} is not a task of app {app.name!r} (its tasks: {known}); schedule it on the "
                f"app that declares it, or include its module first: app.include({task.fn.__module__!r})"
            )
        return str(task.name)
    if not isinstance(task, str):
        raise ConfigError(f"app.periodic takes a task or a task name, got {type(task).__name__}")
    if task not in app.tasks:
        raise ConfigError(f"unknown task {task!r} for a schedule of app {app.name!r}; its tasks: {known}")
    return task


def _every_seconds(where: str, every: float | timedelta) -> int:
    seconds = every.total_seconds() if isinstance(every, timedelta) else every
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds != seconds:
        raise ConfigError(f"{where}: every= takes seconds (a number or a timedelta), got {every!r}")
    if seconds <= 0:
        raise ConfigError(f"{where}: every= must be > 0 seconds, got {every!r}")
    if seconds < 1 or seconds != int(seconds) or seconds == float("inf"):
        raise ConfigError(
            f"{where}: every= must be whole seconds >= 1, got {every!r} (nats-server keeps the schedule and fires "
            f"on whole seconds); use every={max(1, round(seconds)) if seconds < 1e12 else 1}"
        )
    return int(seconds)


def _check_cron(where: str, cron: object) -> str:
    if not isinstance(cron, str):
        raise ConfigError(f"{where}: cron= takes a string such as '*/5 * * * *', got {cron!r}")
    expr = " ".join(cron.split())
    expr = _CRON_ALIASES.get(expr.lower(), expr)
    fields = expr.split(" ")
    if len(fields) != 5:
        aliases = ", ".join(sorted(_CRON_ALIASES))
        raise ConfigError(
            f"{where}: cron {cron!r} has {len(fields)} fields; give five (minute hour day-of-month month "
            f"day-of-week), e.g. '*/5 * * * *', or one of {aliases}"
        )
    for field_, pattern in zip(fields, _CRON_FIELDS, strict=True):
        if not all(pattern.fullmatch(part) for part in field_.split(",")):
            raise ConfigError(
                f"{where}: cron {cron!r} has {field_!r}, which nats-server's cron does not read; use numbers, "
                f"names (mon, jan), '*', ranges (1-5), lists (1,15) and steps (*/10), without L, W or #"
            )
    try:
        next(CronSim(expr, datetime.now(UTC)))
    except (CronSimError, StopIteration) as exc:
        raise ConfigError(f"{where}: cron {cron!r} is not a valid cron expression: {exc}") from None
    return expr


def _check_tz(where: str, tz: object) -> None:
    if not isinstance(tz, str) or not tz:
        raise ConfigError(f"{where}: tz= takes an IANA time zone name such as 'Europe/Berlin', got {tz!r}")
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{where}: unknown time zone {tz!r}; use an IANA name such as 'Europe/Berlin', 'America/New_York' "
            f"or 'UTC'"
        ) from None


def _seconds_text(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def when_text(at: float | None, now: float) -> str:
    """``2026-12-06 10:05:02 UTC (in 3s)`` or ``(4s ago)``; ``-`` for None."""
    if at is None:
        return "-"
    stamp = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    delta = at - now
    return f"{stamp} ({f'in {delta:.0f}s' if delta >= 0 else f'{-delta:.0f}s ago'})"


def schedule_of(task_id: str) -> str | None:
    """The schedule name in a periodic task's id (``periodic:{app}:{name}:{tick}``), else None."""
    if not task_id.startswith(names.PERIODIC_ID_PREFIX):
        return None
    parts = task_id[len(names.PERIODIC_ID_PREFIX):].split(":")
    return parts[1] if len(parts) == 3 else None


# -- state, for `heddle schedules` and the Workshop ------------------------------------------


@dataclass
class ScheduleState:
    """A schedule with what the servers know of it.

    Attributes:
        app: The app (worker type) the schedule belongs to.
        installed: nats-server holds its definition (a worker of the app started since it was declared).
        last_run: Epoch seconds of the last tick a worker sent as a task (None: never).
        last_task_id: That task's id.
        next_run: Epoch seconds of the next tick (None: not installed, or unknown).
    """

    schedule: Schedule
    app: str = ""
    installed: bool = False
    last_run: float | None = None
    last_task_id: str | None = None
    next_run: float | None = None


async def read_states(app: Client, schedules: Mapping[str, Schedule]) -> list[ScheduleState]:
    """The state of each of ``schedules`` (declared by ``app``), by name: from nats-server and Valkey.

    Raises:
        BrokerError, BackendError: A server cannot be reached.
    """
    conns = await app.connections()
    try:
        defined = await conns.broker.stream_subjects(names.SCHEDULES_STREAM, names.schedule_subject(app.name))
    except HeddleError:
        defined = {}  # no stream yet: no worker of any app with schedules has started
    states = [ScheduleState(schedules[k], app.name) for k in sorted(schedules)]
    for st in states:
        st.installed = names.schedule_subject(app.name, st.schedule.name) in defined
    await _fill(conns, states)
    return states


async def read_installed(client: Client) -> list[ScheduleState]:
    """Every schedule nats-server holds, of every app, as its workers installed it (the Workshop's list).

    Raises:
        BackendError: Valkey cannot be reached.
    """
    conns = await client.connections()
    broker = conns.broker
    try:
        defined = await broker.stream_subjects(names.SCHEDULES_STREAM, names.schedule_subject("*", "*"))
    except HeddleError:
        return []
    states = []
    for subject in sorted(defined):
        app, name = subject.split(".")[-2:]
        try:
            stored = await broker.last_stream_msg(names.SCHEDULES_STREAM, subject)
            schedule = schedule_from_definition(name, stored.headers or {}, stored.data or b"")
        except (HeddleError, ValueError):
            continue  # purged meanwhile, or not a definition Heddle wrote
        states.append(ScheduleState(schedule, app, installed=True))
    await _fill(conns, states)
    return states


def schedule_from_definition(name: str, headers: Mapping[str, str], data: bytes) -> Schedule:
    """The :class:`Schedule` a stored definition describes.

    Raises:
        ValueError: It is not a definition Heddle wrote.
    """
    try:
        call = decode_call(data)
    except DecodeError as exc:
        raise ValueError(str(exc)) from None
    pattern = headers.get(names.HDR_NATS_SCHEDULE, "")
    common: dict[str, Any] = {"name": name, "task": call.task, "args": tuple(call.args), "kwargs": call.kwargs}
    if pattern.startswith("@every ") and pattern.endswith("s") and pattern[7:-1].isdigit():
        return Schedule(every_s=int(pattern[7:-1]), **common)
    if pattern.startswith("0 ") and len(pattern.split()) == 6:
        return Schedule(cron=pattern[2:], tz=headers.get(names.HDR_NATS_SCHEDULE_TIME_ZONE) or None, **common)
    raise ValueError(f"not a Heddle schedule pattern: {pattern!r}")


async def _fill(conns: Any, states: list[ScheduleState]) -> None:
    """Fill in the last run (Valkey) and the next run of ``states``."""
    now = time.time()
    rows = await conns.backend.get_fields_many([names.schedule_key(st.app, st.schedule.name) for st in states])
    for state, row in zip(states, rows, strict=True):
        s = state.schedule
        if row.get("tick"):
            state.last_run = float(row["tick"])
            state.last_task_id = row.get("task_id") or None
        if s.cron is not None:
            state.next_run = s.next_cron_run(now)
        elif state.installed and s.every_s is not None:
            state.next_run = await _next_every(conns.broker, state.app, s, now)


async def _next_every(broker: Any, app: str, s: Schedule, now: float) -> float | None:
    """The next tick of an ``every`` schedule: as nats-server said with its last tick, else from its definition."""
    assert s.every_s is not None
    try:
        tick = await broker.last_stream_msg(names.SCHEDULES_STREAM, names.tick_subject(app, s.name))
        said = (tick.headers or {}).get(names.HDR_NATS_SCHEDULE_NEXT)
        if said:
            at = datetime.fromisoformat(said.replace("Z", "+00:00")).timestamp()
            if at >= now - 1:
                return at
    except (HeddleError, ValueError):
        pass
    try:
        definition = await broker.last_stream_msg(names.SCHEDULES_STREAM, names.schedule_subject(app, s.name))
    except HeddleError:
        return None
    # The server's rule (nats-server scheduler.go): the first tick one interval after the
    # definition was stored, on a whole second; ticks that fell in the past are skipped.
    start = definition.time.timestamp() if definition.time is not None else now
    at = round(start) + s.every_s
    if at < now:
        at += ((now - at) // s.every_s + 1) * s.every_s
    return float(at)
