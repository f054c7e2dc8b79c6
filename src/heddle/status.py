"""``heddle status``, ``heddle events`` and ``heddle inspect``: look at a running system.

* :func:`gather_status` reads JetStream (streams, consumers, the workers KV
  bucket) and samples task events for a moment to measure throughput.
* :func:`tail_events` follows ``heddle.events.>`` live, with filters.
* :func:`inspect_task` reads a task's stored result record from Valkey and,
  where its message still exists (still queued in the task stream, or in the
  dead-letter stream), its arguments; a queued task's stream, subject and
  sequence say where it waits (:func:`find_queued`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import time
from collections.abc import Callable
from typing import Any

import msgspec
from rich.console import Console
from rich.table import Table
from rich.text import Text

from heddle import events, names, registry
from heddle.app import Heddle
from heddle.audit import AuditReport, unfinished
from heddle.broker import Broker
from heddle.errors import DecodeError, HeddleError
from heddle.messages import PENDING, RETRY, ResultRecord, task_decoder
from heddle.messages import decode as bounded_decode
from heddle.redact import redact
from heddle.registry import ALIVE_TTL_S, WorkerInfo
from heddle.results import scheduled_note, worker_note
from heddle.schedules import ScheduleState, read_states, schedule_of, when_text

STREAMS = (names.TASKS_STREAM, names.DLQ_STREAM, names.GOALS_STREAM)
# The audit's default deadline: a task sent this long ago should have finished.
DEFAULT_AUDIT_AGE_S = 300.0


class ConsumerRow(msgspec.Struct, frozen=True):
    """One durable consumer's counters."""

    stream: str
    name: str
    pending: int
    ack_pending: int
    redelivered: int
    waiting: int


class StreamRow(msgspec.Struct, frozen=True):
    """One stream's size."""

    name: str
    messages: int
    bytes: int
    consumers: int


class WorkerRow(msgspec.Struct, frozen=True):
    """One live worker, with when it last announced itself."""

    info: WorkerInfo
    last_seen: float


class Status(msgspec.Struct):
    """What ``heddle status`` shows."""

    streams: list[StreamRow]
    consumers: list[ConsumerRow]
    workers: list[WorkerRow]
    dead_letters: int
    sample_s: float = 0.0
    counts: dict[str, int] = {}
    # The audit (heddle.audit): tasks sent more than audit.older_than_s ago, not final.
    audit: AuditReport | None = None

    def rate(self, state: str) -> float:
        """Events of ``state`` per second during the sample."""
        return self.counts.get(state, 0) / self.sample_s if self.sample_s else 0.0


def _epoch(value: Any) -> float:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00")[:26] + "+00:00").timestamp()
        except ValueError:
            return 0.0
    return 0.0


async def list_workers(app: Heddle) -> list[WorkerRow]:
    """Workers whose last heartbeat is younger than the registry's TTL, by type."""
    conns = await app.connections()
    try:
        found = await registry.entries(conns.broker)
    except HeddleError:  # no bucket yet: no worker has started
        return []
    rows: list[WorkerRow] = []
    now = time.time()
    for entry in found:
        if entry.key.startswith(names.ROUTING_RULES_PREFIX):
            continue
        try:
            wi = registry.worker_info(entry.value)
        except DecodeError:
            continue
        seen = _epoch(entry.stored.time) or wi.started_at
        if now - seen <= ALIVE_TTL_S:
            rows.append(WorkerRow(wi, seen))
    rows.sort(key=lambda r: (r.info.worker_type, r.info.id))
    return rows


async def read_streams(broker: Broker) -> tuple[list[StreamRow], list[ConsumerRow]]:
    """Every Heddle stream's size, and every consumer on them (workers', the router's, the orchestrators').

    A stream that cannot be read (not created yet, or not allowed) is left out.
    """
    streams, consumers = [], []
    for name in STREAMS:
        try:
            si = await broker.stream_info(name)
        except HeddleError:
            continue
        streams.append(StreamRow(name, si.state.messages, si.state.bytes, si.state.consumer_count))
        try:
            infos = await broker.consumers_info(name)
        except HeddleError:
            infos = []
        for ci in infos:
            consumers.append(ConsumerRow(
                name, ci.name, ci.num_pending or 0, ci.num_ack_pending or 0,
                ci.num_redelivered or 0, ci.num_waiting or 0,
            ))
    consumers.sort(key=lambda c: (c.stream, c.name))
    return streams, consumers


async def gather_status(
    app: Heddle, sample_s: float = 1.0, older_than_s: float = DEFAULT_AUDIT_AGE_S, audit_limit: int = 20
) -> Status:
    """Read streams, consumers, live workers, the dead-letter count and the audit; sample events.

    Args:
        app: Gives the connections.
        sample_s: Seconds to count task events for (0: skip).
        older_than_s: The audit lists tasks sent longer ago than this without a final state.
        audit_limit: At most this many of them (the oldest first); the total is always counted.
    """
    conns = await app.connections()
    await conns.ensure_streams()
    broker = conns.broker
    counts: dict[str, int] = {}

    async def count(msg: Any) -> None:
        state = msg.subject[len(names.TASK_EVENTS_PREFIX):]
        counts[state] = counts.get(state, 0) + 1

    sub = await broker.subscribe(names.TASK_EVENTS_PREFIX + "*", cb=count) if sample_s > 0 else None
    streams, consumers = await read_streams(broker)
    dead = next((s.messages for s in streams if s.name == names.DLQ_STREAM), 0)
    workers = await list_workers(app)
    if sub is not None:
        await asyncio.sleep(sample_s)  # the sample window itself, not a wait for a condition
        await sub.unsubscribe()
    report = await unfinished(conns.backend, older_than_s, audit_limit)
    return Status(streams, consumers, workers, dead, sample_s, counts, report)


def _ago(t: float, now: float | None = None) -> str:
    return f"{max(0.0, (time.time() if now is None else now) - t):.1f}s ago" if t else "-"


def print_status(console: Console, st: Status) -> None:
    """Render :class:`Status` as rich tables."""
    t = Table(title="streams")
    for col in ("stream", "messages", "bytes", "consumers"):
        t.add_column(col)
    for s in st.streams:
        t.add_row(s.name, str(s.messages), str(s.bytes), str(s.consumers))
    console.print(t)
    t = Table(title="consumers")
    for col in ("stream", "consumer", "pending", "ack pending", "redelivered", "waiting pulls"):
        t.add_column(col)
    for c in st.consumers:
        t.add_row(c.stream, c.name, str(c.pending), str(c.ack_pending), str(c.redelivered), str(c.waiting))
    console.print(t)
    t = Table(title=f"workers online ({len(st.workers)})")
    for col in ("worker type", "id", "tiers", "concurrency", "host", "pid", "last seen"):
        t.add_column(col)
    for w in st.workers:
        i = w.info
        t.add_row(i.worker_type, i.id, ",".join(i.tiers), str(i.concurrency), i.host, str(i.pid), _ago(w.last_seen))
    console.print(t)
    console.print(f"dead letters: {st.dead_letters}")
    if st.audit is not None:
        print_audit(console, st.audit)
    if st.sample_s:
        parts = [f"{s} {st.rate(s):.1f}/s" for s in events.TASK_STATES if st.counts.get(s)]
        console.print(f"throughput over {st.sample_s:g}s: " + (", ".join(parts) or "idle"))


def print_audit(console: Console, report: AuditReport) -> None:
    """The tasks sent more than ``report.older_than_s`` ago that have no final state."""
    age = f"{report.older_than_s:g}s"
    if not report.total:
        console.print(f"audit: every task sent more than {age} ago has a final state")
        return
    t = Table(title=f"audit: {report.total} task(s) sent more than {age} ago without a final state")
    for col in ("task id", "state", "sent", "worker", "started"):
        t.add_column(col)
    for u in report.tasks:
        t.add_row(u.id, u.state, _ago(u.submitted_at), u.worker or "-", _ago(u.started_at))
    console.print(t)
    if report.total > len(report.tasks):
        console.print(f"(the oldest {len(report.tasks)} shown; --limit shows more)")
    console.print("PENDING: never started (queued, delayed, or its message is lost); STARTED/RETRY: "
                  "running, waiting for a retry, or its worker died. `heddle inspect ID` shows one.")


# -- events ------------------------------------------------------------------------------


def matches(ev: dict[str, Any], task: str | None, states: list[str] | None, kinds: list[str] | None) -> bool:
    """True if the described event passes the ``heddle events`` filters.

    Worker heartbeats (one per worker every 2 s) pass only when ``states`` asks for them.
    """
    if kinds and ev.get("kind") not in kinds:
        return False
    if ev.get("state") == events.HEARTBEAT and not (states and events.HEARTBEAT in states):
        return False
    if states and ev.get("state") not in states:
        return False
    return not task or task in (ev.get("id"), ev.get("node_task_id"), ev.get("task"))


async def tail_events(
    app: Heddle,
    on_event: Callable[[dict[str, Any]], None],
    *,
    task: str | None = None,
    states: list[str] | None = None,
    kinds: list[str] | None = None,
    count: int | None = None,
    timeout_s: float | None = None,
    ready: asyncio.Event | None = None,
) -> int:
    """Follow ``heddle.events.>``; call ``on_event`` for each matching event; return how many matched.

    Stops after ``count`` events or ``timeout_s`` seconds (both optional).
    """
    conns = await app.connections()
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def cb(msg: Any) -> None:
        ev = events.describe(msg.subject, msg.data)
        if ev is not None and matches(ev, task, states, kinds):
            queue.put_nowait(ev)

    sub = await conns.broker.subscribe(names.EVENTS_ALL, cb=cb)
    await conns.broker.flush()
    if ready is not None:
        ready.set()
    seen = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        while count is None or seen < count:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                break
            try:
                ev = await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                break
            on_event(ev)
            seen += 1
    finally:
        await sub.unsubscribe()
    return seen


def format_event(ev: dict[str, Any]) -> Text:
    """One line for ``heddle events``; plain text, never markup from the event itself."""
    when = dt.datetime.fromtimestamp(ev.get("at") or time.time()).strftime("%H:%M:%S.%f")[:-3]
    kind, state = ev.get("kind", "?"), ev.get("state", "?")
    style = {"succeeded": "green", "failed": "red", "dead_lettered": "red", "retried": "yellow"}.get(state, "")
    line = Text(f"{when} {kind:<6} ")
    line.append(f"{state:<13}", style=style)
    if kind == "task":
        line.append(f" {ev.get('task', '')}[{ev.get('id', '')}] {ev.get('worker_type', '')}/{ev.get('tier', '')}")
        line.append(f" by {ev.get('worker', '')}")
        if ev.get("duration_s"):
            line.append(f" in {ev['duration_s'] * 1000:.1f}ms")
        if ev.get("input_tokens") or ev.get("output_tokens"):
            line.append(f" tokens {ev.get('input_tokens', 0)}/{ev.get('output_tokens', 0)}")
        if ev.get("error"):
            line.append(f" {ev['error'][:200]}")
    elif kind == "worker":
        line.append(f" {ev.get('worker_type', '')} {ev.get('id', '')} tiers={','.join(ev.get('tiers', []))}")
    elif kind == "goal":
        line.append(f" goal {ev.get('id', '')} {ev.get('path', '')} {ev.get('name', '')}")
    elif kind == "llm":
        line.append(f" {ev.get('worker_type', '')}[{ev.get('id', '')}] {ev.get('model', '')} "
                    f"tokens {ev.get('input_tokens', 0)}/{ev.get('output_tokens', 0)}")
    return line


# -- inspect -----------------------------------------------------------------------------


class QueuedMessage(msgspec.Struct, frozen=True):
    """A task's message still in the task stream: where it waits, and for what."""

    stream: str
    subject: str
    seq: int
    stored_at: float  # when JetStream stored it (epoch s)
    worker_type: str
    tier: str = ""  # "" on heddle.tasks.incoming: the router has not picked one yet
    eta: float | None = None  # countdown / eta: not run before this (epoch s)
    waiting_for: str = ""  # what it waits for, from the workers alive now

    def describe(self, now: float | None = None) -> str:
        """One line: "on stream S, subject X (seq N), stored 3.0s ago"."""
        return (f"on stream {self.stream}, subject {self.subject} (seq {self.seq}), "
                f"stored {_ago(self.stored_at, now)}")


class TaskView(msgspec.Struct):
    """What is known about one task: its stored record, and its message if still kept."""

    id: str
    state: str
    record: ResultRecord | None = None
    args: list[Any] | None = None
    kwargs: dict[str, Any] | None = None
    dead_letter_id: int | None = None
    dead_letter_reason: str = ""
    # Still in the task stream (PENDING or waiting out a retry), with where and why.
    queued: QueuedMessage | None = None
    # When it was sent, from the audit (heddle.audit); 0.0 when not recorded.
    sent_at: float = 0.0
    # What the look in the task stream found, when it did not find the message.
    search_note: str = ""
    # Its expires time (epoch s), from its message: not started by then, it never runs.
    expires: float | None = None
    # Its priority (0-9), from its message; None: the default.
    priority: int | None = None
    # The periodic schedule that sent it (app.periodic), from its id.
    schedule: str = ""

    @property
    def known(self) -> bool:
        """Whether anything at all is known of the task."""
        return bool(self.record is not None or self.dead_letter_id is not None or self.queued or self.sent_at
                    or self.state != PENDING)

    def timeline(self) -> list[tuple[float, str]]:
        """``(epoch, what)`` pairs known from the record, oldest first."""
        out: list[tuple[float, str]] = []
        if self.sent_at:
            out.append((self.sent_at, "sent"))
        r = self.record
        if r is not None:
            if r.started_at:
                out.append((r.started_at, f"started on {r.worker or '?'} at tier {r.tier or '?'}"))
            if r.finished_at:
                out.append((r.finished_at, f"{r.state.lower()} after {r.retries} retries"))
        return sorted(out)


# How many sequence numbers of the task stream ``heddle inspect`` reads at most, newest
# first, to find a queued task (JetStream has no index by header), and how many at once.
QUEUE_SCAN_LIMIT = 20_000
_SCAN_BATCH = 128
# The audit's send time is the client's clock and a message's stored time the server's:
# the scan stops only at messages stored this long before the send.
_CLOCK_SLACK_S = 30.0
_SUBMITTED_AT_LUA = "return redis.call('ZSCORE', KEYS[1], ARGV[1])"


async def submitted_at(app: Heddle, task_id: str) -> float:
    """When ``task_id`` was sent, from the audit set (0.0: not recorded, or final already)."""
    conns = await app.connections()
    conns.backend.register_script("submitted_at", _SUBMITTED_AT_LUA)
    (score,) = await conns.backend.run_script_many("submitted_at", [([names.SUBMITTED_KEY], [task_id])])
    return float(score) if score else 0.0


def _hole(exc: HeddleError) -> bool:
    # A work-queue stream deletes what was acked: a sequence number without a message.
    # The broker says so only in words (nats-py's NotFoundError, JetStream's 10037).
    said = str(exc)
    return "NotFoundError" in said or "no message found" in said or "10037" in said


async def find_queued(
    app: Heddle, task_id: str, sent_at: float = 0.0, scan: int = QUEUE_SCAN_LIMIT
) -> tuple[QueuedMessage | None, str, bytes]:
    """Find ``task_id``'s message in the task stream: where it is and its payload, or None and why not.

    JetStream keeps no index by header, so this reads the stream newest first, up to
    ``scan`` sequence numbers, ``_SCAN_BATCH`` at once. It stops early once it has
    seen as many messages as the stream holds, or (with ``sent_at``, the send time
    from the audit) a message stored well before the task was sent. A task waits as
    its own message on ``heddle.tasks.incoming`` (for the router) or as the routed
    copy on ``heddle.tasks.{worker_type}.{tier}``; either carries its id
    (:func:`heddle.names.task_id_of`).
    """
    conns = await app.connections()
    await conns.ensure_streams()
    broker = conns.broker
    stream = names.TASKS_STREAM
    state = (await broker.stream_info(stream)).state
    if not state.messages:
        return None, f"{stream} holds no message", b""
    floor = sent_at - _CLOCK_SLACK_S if sent_at else 0.0
    last, first = state.last_seq, max(state.first_seq, state.last_seq - scan + 1)
    seen = 0

    async def get(seq: int) -> Any:
        try:
            return await broker.get_stream_msg(stream, seq)
        except HeddleError as exc:
            if _hole(exc):
                return None
            raise

    top = last
    while top >= first:
        seqs = range(top, max(first, top - _SCAN_BATCH + 1) - 1, -1)
        # The newest alone first: a role that may not read the stream fails once, not 128 times.
        batch = [await get(top)] if top == last else await asyncio.gather(*(get(q) for q in seqs))
        for seq, m in zip(seqs, batch, strict=False):
            if m is None:
                continue
            headers = dict(m.headers or {})
            if names.task_id_of(headers) == task_id:
                return await _queued(app, seq, m, headers), "", m.data or b""
            seen += 1
            if seen >= state.messages or (floor and 0 < _epoch(m.time) < floor):
                return None, f"not among the {seen} message(s) queued in {stream}", b""
        top -= len(batch)
    return None, (f"not among the newest {last - first + 1} sequence numbers of {stream} (it holds "
                  f"{state.messages} messages from seq {state.first_seq} to {last}; `heddle status` shows "
                  f"the queues)"), b""


async def _queued(app: Heddle, seq: int, m: Any, headers: dict[str, str]) -> QueuedMessage:
    """The found message, with what it waits for (the same words as a timed-out wait)."""
    conns = await app.connections()
    worker_type = headers.get(names.HDR_WORKER_TYPE, "")
    eta = None
    with contextlib.suppress(DecodeError):
        eta = bounded_decode(task_decoder, m.data or b"").eta
    scheduled = scheduled_note(eta)
    if scheduled is not None:
        waiting = f"{scheduled}, for a worker of type {worker_type!r}"
    else:
        worker = f"a worker of type {worker_type!r}; {await worker_note(conns, worker_type)}"
        waiting = f"waiting for {worker}"
        if m.subject == names.INCOMING_SUBJECT:
            waiting = (f"waiting for a router to send it on (`heddle router`, or a process hosting one), "
                       f"then for {worker}")
    return QueuedMessage(
        stream=names.TASKS_STREAM, subject=m.subject, seq=seq, stored_at=_epoch(m.time), worker_type=worker_type,
        tier=headers.get(names.HDR_TIER, ""), eta=eta, waiting_for=waiting,
    )


async def find_dead_letter(app: Heddle, task_id: str, scan: int = 1000) -> tuple[int, dict[str, str], bytes] | None:
    """The newest dead letter of ``task_id`` among the last ``scan`` ones."""
    conns = await app.connections()
    await conns.ensure_streams()
    info = await conns.broker.stream_info(names.DLQ_STREAM)
    if not info.state.messages:
        return None
    first = max(info.state.first_seq, info.state.last_seq - scan + 1)
    for seq in range(info.state.last_seq, first - 1, -1):
        try:
            m = await conns.broker.get_stream_msg(names.DLQ_STREAM, seq)
        except HeddleError:
            continue
        headers = dict(m.headers or {})
        if headers.get(names.HDR_TASK_ID) == task_id:
            return seq, headers, m.data or b""
    return None


async def inspect_task(app: Heddle, task_id: str) -> TaskView:
    """A task's state, record, and arguments: from its queued message or its dead-letter copy.

    A task with no final state is looked for in the task stream (:func:`find_queued`),
    which says where it waits and for what.
    """
    conns = await app.connections()
    state, record = await conns.backend.read(task_id)
    view = TaskView(task_id, state, record, schedule=schedule_of(task_id) or "")
    dl = await find_dead_letter(app, task_id)
    if dl is not None:
        view.dead_letter_id, headers, data = dl[0], dl[1], dl[2]
        view.dead_letter_reason = headers.get(names.HDR_REASON, "")
        _take_args(view, data)
    if state in (PENDING, RETRY) and dl is None:
        view.sent_at = await submitted_at(app, task_id)
        try:
            view.queued, view.search_note, data = await find_queued(app, task_id, view.sent_at)
        except HeddleError as exc:
            view.search_note = f"cannot look in {names.TASKS_STREAM}: {exc}"
        else:
            if view.queued is not None:
                _take_args(view, data)
    return view


def _take_args(view: TaskView, data: bytes) -> None:
    try:
        tm = bounded_decode(task_decoder, data)
        view.args, view.kwargs, view.expires, view.priority = tm.args, tm.kwargs, tm.expires, tm.priority
    except DecodeError:
        pass


def print_task(console: Console, v: TaskView) -> None:
    """Render :class:`TaskView`."""
    r = v.record
    console.print(Text(f"task {v.id}", style="bold"))
    console.print(Text(f"  state   {v.state}"))
    q = v.queued
    if q is not None:
        console.print(Text(f"  queued  {q.describe()}"))
        console.print(Text(f"          {q.waiting_for}"))
    elif v.search_note and v.state in (PENDING, RETRY):
        sent = f"sent {_ago(v.sent_at)}; " if v.sent_at else ""
        console.print(Text(f"  queue   {sent}{v.search_note}"))
    if r is not None:
        console.print(Text(f"  task    {r.task}"))
    if v.schedule:
        console.print(Text(f"  schedule {v.schedule} (sent by this periodic schedule; heddle schedules -A lists it)"))
    if r is not None:
        console.print(Text(f"  worker  {r.worker}   tier {r.tier or '-'}   retries {r.retries}"))
    if v.args is not None:
        console.print(Text(f"  args    {json.dumps(v.args, default=repr)}"))
        console.print(Text(f"  kwargs  {json.dumps(v.kwargs, default=repr)}"))
    else:
        console.print(Text("  args    (not kept: the message left the stream when it was acked; "
                           "the Workshop shows args from its events)"))
    if v.priority is not None:
        band = names.band_of(v.priority) or "default"
        console.print(Text(f"  priority {v.priority} ({band} band; 0 lowest, 9 highest)"))
    if v.expires is not None:
        left = v.expires - time.time()
        when = dt.datetime.fromtimestamp(v.expires, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        console.print(Text(f"  expires {when} ({f'in {left:.0f}s' if left > 0 else 'passed'}; "
                           f"not started by then, it never runs)"))
    if r is not None and r.state == "SUCCESS":
        console.print(Text(f"  result  {json.dumps(r.result, default=repr)}"))
    if r is not None and r.error is not None:
        console.print(Text(f"  error   {r.error.type}: {r.error.message}", style="red"))
        if r.error.traceback:
            console.print(Text(r.error.traceback))
    if v.dead_letter_id is not None:
        console.print(Text(f"  dead letter {v.dead_letter_id}: {v.dead_letter_reason}"))
    if r is not None and r.meta:
        console.print(Text(f"  meta    {json.dumps(r.meta, default=repr)}"))
    timeline = v.timeline()
    if timeline:
        console.print(Text("  timeline"))
        for at, what in timeline:
            console.print(Text(f"    {dt.datetime.fromtimestamp(at).strftime('%H:%M:%S.%f')[:-3]}  {what}"))


# -- the commands --------------------------------------------------------------------------


def add_status_commands(sub: Any) -> None:
    """Add ``status``, ``events``, ``inspect`` and ``schedules`` to the ``heddle`` parser."""
    s = sub.add_parser("status", help="streams, consumers, workers online, dead letters, throughput")
    s.add_argument("--sample", type=float, default=1.0, help="seconds to count task events for (0: skip)")
    s.add_argument("--audit", action="store_true",
                   help="only the audit: tasks sent more than --older-than seconds ago with no final state "
                        "(exit status 1 if there are any)")
    s.add_argument("--older-than", type=float, default=DEFAULT_AUDIT_AGE_S, metavar="SECONDS",
                   help=f"audit deadline in seconds (default {DEFAULT_AUDIT_AGE_S:g})")
    s.add_argument("--limit", type=int, default=20, help="list at most this many unfinished tasks (default 20)")
    s.add_argument("--json", action="store_true", help="with --audit: print the audit as JSON")
    e = sub.add_parser("events", help="follow lifecycle events (heddle.events.>) live")
    e.add_argument("--task", help="only events of this task id (or task name)")
    e.add_argument("--state", action="append", help="only this state (repeatable): " + ", ".join(
        events.TASK_STATES + events.WORKER_STATES) + "; worker heartbeats are shown only with --state heartbeat")
    e.add_argument("--kind", action="append", choices=["task", "worker", "goal", "llm"], help="only this kind")
    e.add_argument("--json", action="store_true", help="one JSON object a line")
    e.add_argument("--count", type=int, default=None, help="stop after N events")
    e.add_argument("--timeout", type=float, default=None, help="stop after N seconds")
    i = sub.add_parser("inspect", help="a task's state, args, result or error, and timeline")
    i.add_argument("task_id")
    i.add_argument("--json", action="store_true", help="print the record as JSON")
    sc = sub.add_parser("schedules", help="an app's periodic schedules: task, interval or cron, last and next run")
    sc.add_argument("-A", "--app", required=True, help="module[:attribute] holding the heddle.Heddle app")
    sc.add_argument("--json", action="store_true", help="one JSON object per schedule, in a list")


def run_status_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``heddle status|events|inspect``."""
    app = Heddle("status")
    out = Console()

    async def main() -> int:
        try:
            if args.command == "status":
                if args.sample < 0:
                    raise HeddleError(f"--sample must be >= 0, got {args.sample}")
                if args.older_than < 0:
                    raise HeddleError(f"--older-than must be seconds >= 0, got {args.older_than}")
                if args.limit < 1:
                    raise HeddleError(f"--limit must be >= 1, got {args.limit}")
                if args.audit:
                    conns = await app.connections()
                    report = await unfinished(conns.backend, args.older_than, args.limit)
                    if args.json:
                        print(json.dumps(msgspec.to_builtins(report)))
                    else:
                        print_audit(out, report)
                    return 1 if report.total else 0
                print_status(out, await gather_status(app, args.sample, args.older_than, args.limit))
            elif args.command == "events":
                def show(ev: dict[str, Any]) -> None:
                    if args.json:
                        print(json.dumps(ev, default=repr), flush=True)
                    else:
                        out.print(format_event(ev))

                if args.state:
                    bad = set(args.state) - set(events.TASK_STATES + events.WORKER_STATES + _GOAL_STATES)
                    if bad:
                        raise HeddleError(f"unknown --state {', '.join(sorted(bad))}; choose from "
                                          f"{', '.join(events.TASK_STATES + events.WORKER_STATES)}")
                ready = asyncio.Event()
                tail = asyncio.ensure_future(tail_events(
                    app, show, task=args.task, states=args.state, kinds=args.kind,
                    count=args.count, timeout_s=args.timeout, ready=ready))
                await asyncio.wait([tail, asyncio.ensure_future(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
                if ready.is_set():
                    console.print(f"following {names.EVENTS_ALL} on {redact(app.settings.nats_url)} (Ctrl-C stops)")
                await tail
            else:
                view = await inspect_task(app, args.task_id)
                if not view.known:
                    console.print(f"no task {args.task_id} is known (no stored state, no record of its send, "
                                  f"and {view.search_note or 'not queued'}; results expire after "
                                  f"{app.settings.result_ttl_s:g}s)", markup=False)
                    return 1
                if args.json:
                    print(json.dumps(msgspec.to_builtins(view), default=repr))
                else:
                    print_task(out, view)
            return 0
        finally:
            await app.aclose()

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130


_GOAL_STATES = ("dispatched", "succeeded", "failed", "recovered", "skipped", "revoked", "ended", "ok", "error")


# -- heddle schedules -------------------------------------------------------------------------


def schedule_rows(states: list[ScheduleState], now: float) -> list[dict[str, Any]]:
    """One JSON-able dict per schedule: name, task, every_s or cron and tz, installed, last and next run."""
    rows = []
    for st in states:
        s = st.schedule
        rows.append({
            "name": s.name, "task": s.task, "every_s": s.every_s, "cron": s.cron, "tz": s.tz,
            "args": list(s.args), "kwargs": dict(s.kwargs), "installed": st.installed,
            "last_run": st.last_run, "last_task_id": st.last_task_id, "next_run": st.next_run,
        })
    return rows


def print_schedules(console: Console, app_name: str, states: list[ScheduleState], now: float) -> None:
    """Render the schedules of an app as a table."""
    if not states:
        console.print(Text(f"app {app_name!r} declares no schedules (app.periodic)"))
        return
    table = Table(title=f"schedules of app {app_name!r}")
    for col in ("schedule", "task", "when", "last run", "next run"):
        table.add_column(col)
    for st in states:
        s = st.schedule
        nxt = when_text(st.next_run, now) if st.installed else "not installed: no worker of the app has started"
        table.add_row(s.name, s.task, s.describe(), when_text(st.last_run, now), nxt)
    console.print(table)


def run_schedules_command(args: argparse.Namespace, console: Console) -> int:
    """Run ``heddle schedules -A module``: every schedule the app declares, with its last and next run."""
    from heddle.runtime import load_app

    app = load_app(args.app)

    async def main() -> int:
        try:
            states = await read_states(app, app.schedules)
        finally:
            await app.aclose()
        now = time.time()
        if args.json:
            print(json.dumps(schedule_rows(states, now)))
        else:
            print_schedules(Console(), app.name, states, now)
        return 0

    try:
        return asyncio.run(main())
    except KeyboardInterrupt:
        return 130
