"""The worker: consume a worker type's tasks from JetStream, run them, store results.

Per fetched batch the hot path is: decode every message, one pipelined Valkey
round trip to claim them (skipping tasks whose final result is already stored),
run them (async tasks on the loop, sync tasks in a thread pool), then one
pipelined round trip to store the outcomes, a core-NATS result notice each, and
the acks. A message is acked only after its final state is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import math
import os
import socket
import time
import traceback
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from heddle import events, names
from heddle.actor import Actor, acknowledge, seq_of
from heddle.bands import Bands
from heddle.chunks import bind_broker
from heddle.context import TaskContext, set_current_task
from heddle.errors import (
    ArgumentTypeError,
    BackendError,
    BrokerError,
    DecodeError,
    EncodeError,
    HeddleError,
    Retry,
    TaskIdError,
    TaskTimeout,
)
from heddle.limits import Lease, Leases, slot_key, wait_s
from heddle.messages import (
    EXPIRED_ERROR,
    FAILURE,
    READY_STATES,
    RETRY,
    REVOKED,
    SUCCESS,
    ErrorInfo,
    ResultRecord,
    TaskMessage,
    check_version,
    copyable_headers,
    decode,
    revoke_decoder,
    task_decoder,
    usable_task_id,
)
from heddle.metrics import WorkerMetrics
from heddle.ratelimit import RateLimiter
from heddle.registry import Heartbeat, WorkerInfo, worker_id
from heddle.store import StoreRequest, encode_record
from heddle.version import __version__

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.broker import Message as Msg
    from heddle.connections import Connections
    from heddle.task import Task

log = logging.getLogger("heddle.worker")

# Tasks in flight per worker process unless --concurrency says otherwise. A waiting
# async task costs a coroutine, so the worker fetches this many at once and keeps
# JetStream, Valkey and the notices pipelined (256 gains 5-15 % more on a no-op
# worker, docs/benchmarks.md "Defaults"). Sync tasks run in a
# thread pool of the same size: for CPU-bound sync work set it near the core count
# and run more processes.
DEFAULT_CONCURRENCY = 64
_BACKOFF_S = 0.5
# A countdown that is this close is run now rather than deferred again.
_ETA_SLACK_S = 0.01
# The longest a delayed task is handed back for at once; one due later comes back
# and is handed back again (a nak delay is nanoseconds in an int64).
_MAX_NAK_DELAY_S = 24 * 3600.0
# Deliveries a task waiting for a concurrency slot leaves spare below MaxDeliver (heddle.limits).
_DELIVERY_SPARE = 3
# The longest a task's received and started events wait to leave with its outcome (heddle.events.Held).
EVENT_HOLD_S = 0.01
# Task names quoted in reasons and logs are cut to this (a hostile one can be megabytes).
_NAME_IN_REASON = 200


@dataclass(eq=False)
class Job:
    """One task message in flight on this worker."""

    msg: Msg
    message: TaskMessage
    task: Task[Any, Any]
    retries: int
    started_at: float
    runner: asyncio.Future[Any] | None = None
    revoked: bool = False
    abandoned: bool = False
    done: bool = False
    context: TaskContext | None = None
    lease: Lease | None = None  # its concurrency slot (heddle.limits), given back when settled


@dataclass(eq=False)
class Outcome:
    """What running a job produced, waiting to be stored and acked."""

    job: Job
    state: str
    result: Any = None
    error: ErrorInfo | None = None
    exc: BaseException | None = None
    finished_at: float = field(default_factory=time.time)


# Frames of the worker's own machinery (Heddle, asyncio, the thread pool) that come
# before the task's code in a traceback.
_MACHINERY = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep + "heddle" + os.sep,
              os.sep + "asyncio" + os.sep, os.sep + "concurrent" + os.sep + "futures" + os.sep)


def _retries_ran_out(o: Outcome, used: int, allowed: int) -> Outcome:
    """The final failure of a task that raised Retry with none left: it says so, with the cause."""
    assert isinstance(o.exc, Retry)
    cause = o.exc.exc if o.exc.exc is not None else o.exc
    info = _error_info(cause)
    message = f"retries ran out ({used} of {allowed} used): {info.message}"
    error = ErrorInfo(type=info.type, message=message, traceback=info.traceback)
    return Outcome(o.job, FAILURE, error=error, exc=o.exc, finished_at=o.finished_at)


def _error_info(exc: BaseException) -> ErrorInfo:
    t = type(exc)
    te = traceback.TracebackException.from_exception(exc)
    frames = list(te.stack)
    # A remote traceback starts at the task's own code, not at the worker that called it.
    first = next((i for i, f in enumerate(frames) if not any(m in f.filename for m in _MACHINERY)), 0)
    te.stack = traceback.StackSummary.from_list(frames[first:])
    return ErrorInfo(
        type=f"{t.__module__}.{t.__qualname__}",
        message=str(exc),
        traceback="".join(te.format()),
    )


class Worker(Actor):
    """Runs one app's tasks (an :class:`~heddle.actor.Actor` on the worker type's consumer).

    Args:
        app: The app whose tasks to run; it consumes ``heddle.tasks.{app.name}.*``.
        concurrency: Most tasks in flight at once (async on the loop, sync in threads).
        grace_s: On shutdown, how long in-flight tasks may take to finish before
            they are cancelled and nak'd for prompt redelivery.
        name: Worker identity recorded in results (default ``host:pid``).
    """

    def __init__(
        self,
        app: Heddle,
        *,
        concurrency: int = DEFAULT_CONCURRENCY,
        grace_s: float = 30.0,
        name: str | None = None,
        tier: str | None = None,
        default_tier: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise HeddleError(f"concurrency must be >= 1, got {concurrency}")
        super().__init__(app)
        self.concurrency = concurrency
        self.grace_s = grace_s
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"
        self.worker_type = app.worker_type
        if tier is not None and tier not in names.TIERS:
            raise HeddleError(f"tier must be one of {', '.join(names.TIERS)}, got {tier!r}")
        # None: consume every tier of the worker type; a tier: only that one.
        self.tier = tier
        # The tier routers pick when neither a rule nor the task names one.
        self.default_tier = default_tier or tier or app.settings.default_tier
        self._heartbeat: Heartbeat | None = None
        self.inflight: dict[str, Job] = {}
        self.stats = {"received": 0, "succeeded": 0, "failed": 0, "retried": 0, "dead_lettered": 0,
                      "expired": 0, "waiting": 0}
        self._releasing: list[Lease] = []  # slots of settled tasks, given back after the store
        self._leases: Leases  # made in on_start, on the connection's result store
        self._tokens: RateLimiter
        # Priority bands (heddle.bands); normal_idle: the last look at the default band found nothing.
        self._bands = Bands(self)
        self.normal_idle = True
        self.metrics = WorkerMetrics(self.worker_type)
        self._outcomes: list[Outcome] = []
        self._outcome_ready = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="heddle-task")
        # Sync tasks still running in their threads when the grace period ended: their
        # messages are nak'd, but a thread cannot be stopped, and the interpreter waits
        # for it at exit unless the process exits hard (the CLI does).
        self.abandoned_threads = 0

    what = "tasks"
    exhausted_why = "the task probably crashes or hangs its worker"

    # -- the actor's parts ---------------------------------------------------------

    async def ensure_consumer(self, conns: Connections) -> tuple[str, str]:
        return await conns.broker.ensure_consumer(self.worker_type, self.tier), names.TASKS_STREAM

    @property
    def filter_subject(self) -> str:
        return names.worker_filter(self.worker_type, self.tier)

    def free_slots(self) -> int:
        return self.concurrency - len(self.inflight)

    def in_progress(self) -> Iterable[tuple[Msg, str]]:
        running = ((job.msg, job.message.id) for job in self.inflight.values())
        return itertools.chain(running, ((msg, "held") for msg in self._bands.held()))

    def slot_freed(self) -> None:
        super().slot_freed()
        self._bands.wake()

    async def next_batch(self, n: int) -> list[Msg]:
        # A held high-priority task (or a low one that has waited long enough) goes first.
        held = self._bands.next_for_free_slot(self.normal_idle)
        if held is not None:
            return [held]
        msgs = await super().next_batch(n)
        idle = not msgs
        if idle and not self.normal_idle:
            self._bands.wake()  # a held low-priority task may start now
        self.normal_idle = idle
        return msgs

    def on_exhausted(self) -> None:
        self.stats["dead_lettered"] += 1

    async def on_start(self, conns: Connections) -> None:
        broker = conns.broker
        self._subs.append(await broker.subscribe(names.REVOKE_SUBJECT, cb=self._on_revoke))
        # Announce this worker before reporting ready, so routers route to it.
        self._heartbeat = Heartbeat(
            broker,
            WorkerInfo(
                id=worker_id(),
                worker_type=self.worker_type,
                tiers=[self.tier] if self.tier else ["*"],
                default_tier=self.default_tier,
                concurrency=self.concurrency,
                host=socket.gethostname(),
                pid=os.getpid(),
                version=__version__,
                started_at=time.time(),
                tasks=sorted(self.app.tasks),
                max_output_tokens=int(getattr(self.app, "max_output_tokens", 0)),
            ),
            lambda state, info: events.publish(broker, events.worker_event(state, info)),  # heddle.events hook
        )
        await self._heartbeat.start()
        self._held = events.Held(broker, EVENT_HOLD_S)
        self._bg.append(asyncio.get_running_loop().create_task(self._flush_loop(), name="heddle-flush"))
        # Concurrency slots last one AckWait: a SIGKILLed worker's free themselves in that time.
        self._leases = Leases(conns.backend, self.settings.ack_wait_s)
        self._tokens = RateLimiter(conns.backend)  # settles routers' model-token charges
        self._bg.append(asyncio.get_running_loop().create_task(self._lease_loop(), name="heddle-leases"))
        await self._bands.start(conns)
        log.info("worker %s consuming %s", self.name, self.filter_subject)

    async def handle(self, msgs: list[Msg]) -> None:
        await self._accept(msgs)

    async def _accept(self, msgs: list[Msg]) -> None:
        assert self.conns is not None
        now = time.time()
        batch: list[tuple[Msg, TaskMessage, Task[Any, Any]]] = []
        for msg in msgs:
            self.stats["received"] += 1
            # Each message alone: whatever one holds, the others in its batch still run.
            try:
                admitted = await self._admit(msg, now)
            except Exception:
                log.exception("could not take message #%d; it is redelivered", seq_of(msg))
                continue
            if admitted is not None:
                batch.append(admitted)
        if not batch:
            return
        leases: dict[str, Lease] = {}
        if any(task.options.concurrency_limit is not None for _, _, task in batch):
            batch, leases = await self._take_slots(batch)
            if not batch:
                return
        try:
            claims = await self.conns.backend.claim_many([tm.id for _, tm, _ in batch], self.name)
        except BackendError as exc:
            log.warning("cannot claim %d tasks (%s); naking for redelivery", len(batch), exc)
            for msg, tm, _ in batch:
                await acknowledge(msg, "nak", tm.id, delay=_BACKOFF_S * 2)
            self._releasing.extend(ls for tid, ls in leases.items() if tid not in self.inflight)
            await self.sleep_unless_stopped(_BACKOFF_S)
            return
        loop = asyncio.get_running_loop()
        for (msg, tm, task), claim in zip(batch, claims, strict=True):
            if claim.previous_state in READY_STATES:
                # Final result already stored (a duplicate, a redelivery after a
                # crash between store and ack, or a revoked task): do not run again,
                # but announce the stored result for whoever sent this copy.
                if claim.final_record:
                    await self.conns.notify(tm.id, claim.final_record, *names.notice_route(msg.headers))
                await acknowledge(msg, "ack", tm.id)
                if tm.id in leases and tm.id not in self.inflight:
                    self._releasing.append(leases[tm.id])
                continue
            running = self.inflight.get(tm.id)
            if running is not None:
                # The same message redelivered while it still runs here (AckWait
                # passed, e.g. the loop was blocked). Acking this delivery would
                # remove the message while the task is unfinished; instead the
                # running job adopts the newest delivery and acks that when done.
                running.msg = msg
                continue
            job = Job(msg, tm, task, claim.retries, time.time(), lease=leases.get(tm.id))
            self.inflight[tm.id] = job
            job.runner = loop.create_task(self._execute(job))
            headers = msg.headers or {}
            # Held until the outcome is written (or EVENT_HOLD_S), to leave in the same write.
            if names.HDR_ROUTED_BY not in headers:
                # Sent here directly (heddle.routes): no router announced it.
                self._held.add(events.received(  # heddle.events hook
                    msg.data, headers, headers.get(names.HDR_TIER, ""), by=self.name))
            self._held.add(events.job_task_event(events.STARTED, job, self))  # heddle.events hook

    async def _take_slots(
        self, batch: list[tuple[Msg, TaskMessage, Task[Any, Any]]]
    ) -> tuple[list[tuple[Msg, TaskMessage, Task[Any, Any]]], dict[str, Lease]]:
        """Take the concurrency slots of limited tasks; the ones that find none wait, holding no slot here."""
        wanted: list[tuple[Msg, TaskMessage, Lease]] = []
        for msg, tm, task in batch:
            value = task.concurrency_value(tm.args, tm.kwargs)
            if value is not None:
                assert task.options.concurrency_limit is not None
                key = task.options.concurrency_key
                label = f"{key}={value}" if key is not None else "*"
                wanted.append((msg, tm, Lease(slot_key(task.name, value), tm.id, task.options.concurrency_limit,
                                              label)))
        try:
            got = await self._leases.acquire([lease for _, _, lease in wanted])
        except HeddleError as exc:
            log.warning("cannot take concurrency slots (%s); those tasks try again shortly", exc)
            got = [False] * len(wanted)
        held: dict[str, Lease] = {}
        waiting: set[int] = set()
        for (msg, tm, lease), ok in zip(wanted, got, strict=True):
            if ok:
                held[tm.id] = lease
            else:
                waiting.add(id(msg))
                await self._wait_for_slot(msg, tm)
        return [b for b in batch if id(b[0]) not in waiting], held

    async def _wait_for_slot(self, msg: Msg, tm: TaskMessage) -> None:
        """Give a task with no free slot back for a short while; near MaxDeliver, as a fresh copy."""
        assert self.conns is not None
        self.stats["waiting"] += 1
        delivered = msg.metadata.num_delivered or 1
        if delivered < self.max_deliver - _DELIVERY_SPARE:
            await acknowledge(msg, "nak", tm.id, delay=wait_s(delivered))
            return
        # Each try was a delivery: a fresh copy starts its count over (the claim in
        # Valkey keeps a copy left by a crash between these two steps from running twice).
        headers = {k: v for k, v in (msg.headers or {}).items() if k != names.HDR_ROUTED_BY}
        copy = int(headers.get(names.HDR_WAITED, "0") or 0) + 1
        headers[names.HDR_WAITED] = str(copy)
        headers[names.HDR_MSG_ID] = f"{tm.id}:waited{copy}"
        try:
            subject = await self.conns.route(names.INCOMING_SUBJECT, headers)
            headers[names.HDR_TASK_ID] = tm.id  # a direct route takes the task id from Nats-Msg-Id
            await self.conns.broker.publish(subject, msg.data, headers)
        except HeddleError as exc:
            log.warning("cannot put waiting task %s back (%s); it is redelivered", tm.id, exc)
            await acknowledge(msg, "nak", tm.id, delay=wait_s(delivered))
            return
        await acknowledge(msg, "ack", tm.id)

    async def _lease_loop(self) -> None:
        """Renew the concurrency slots of running tasks; give back those of settled ones."""
        while True:
            await asyncio.sleep(self._leases.ttl_s / 3)
            held = [job.lease for job in self.inflight.values() if job.lease is not None]
            try:
                await self._leases.renew(held)
            except HeddleError as exc:
                log.warning("cannot renew %d concurrency slots (%s)", len(held), exc)
            await self._release_slots()

    async def _release_slots(self) -> None:
        if not self._releasing:
            return
        done, self._releasing = self._releasing, []
        try:
            await self._leases.release(done)
        except HeddleError as exc:
            # Their leases run out on their own within ttl_s.
            log.warning("cannot give back %d concurrency slots (%s)", len(done), exc)

    async def _admit(self, msg: Msg, now: float) -> tuple[Msg, TaskMessage, Task[Any, Any]] | None:
        """Decode and check one message: return it to run, or dead-letter or delay it here."""
        try:
            tm = decode(task_decoder, msg.data)
        except DecodeError as exc:
            self.metrics.received(msg.subject, "")
            await self._reject(msg, f"undecodable task message: {exc}")
            return None
        task = self.app.tasks.get(tm.task)
        # Only known names become metric labels: a header or a name from the bus could be anything.
        self.metrics.received(msg.subject, tm.task if task is not None else "")
        try:
            check_version(tm.v)
            # The id becomes a subject token (its result notice) and a Valkey key.
            names.check_task_id(tm.id)
        except (DecodeError, TaskIdError) as exc:
            await self._reject(msg, str(exc), tm)
            return None
        if task is None:
            await self._reject(
                msg,
                f"unknown task {tm.task[:_NAME_IN_REASON]!r} for worker type {self.worker_type!r}; import "
                f"the module that defines it in the worker (-A) or fix the name",
                tm,
            )
            return None
        if tm.expires is not None and (now >= tm.expires or (tm.eta is not None and tm.eta >= tm.expires)):
            await self._expire(msg, tm, now)
            return None
        if tm.eta is not None:
            if not math.isfinite(tm.eta):
                await self._reject(msg, f"eta {tm.eta!r} is not a time (epoch seconds)", tm)
                return None
            wait = tm.eta - now
            if wait > _ETA_SLACK_S:
                # A delayed task goes back to the stream until its time; it holds no slot.
                await acknowledge(msg, "nak", tm.id, delay=min(wait, _MAX_NAK_DELAY_S))
                return None
        return msg, tm, task

    async def _expire(self, msg: Msg, tm: TaskMessage, now: float) -> None:
        """End a task whose ``expires`` passed before it started: REVOKED, with TaskExpired."""
        assert self.conns is not None
        when = datetime.fromtimestamp(tm.expires or now, UTC).isoformat(timespec="milliseconds")
        error = ErrorInfo(
            type=EXPIRED_ERROR,
            message=f"task {tm.task}[{tm.id}] expired at {when} before a worker started it; it never ran",
        )
        record = ResultRecord(id=tm.id, state=REVOKED, task=tm.task, worker=self.name, finished_at=now,
                              error=error)
        # A final state stored first (it ran, or was revoked) stands; either way this copy is done.
        await self.conns.store_final(record, *names.notice_route(msg.headers))
        self.stats["expired"] += 1
        await acknowledge(msg, "ack", tm.id)
        await events.publish(self.conns.broker, events.task_event(  # heddle.events hook
            events.EXPIRED, tm.id, task=tm.task, worker_type=self.worker_type, worker=self.name,
            error=f"{EXPIRED_ERROR}: {error.message}"))

    async def _reject(self, msg: Msg, reason: str, tm: TaskMessage | None = None) -> None:
        """Dead-letter a message that can never run, fail its result, and ack it."""
        assert self.conns is not None
        headers = msg.headers or {}
        # An undecodable message has only its headers to name its task, and an id that
        # cannot be a subject token names nothing: it goes in no subject and no key.
        task_id = usable_task_id(tm.id if tm else None, names.task_id_of(headers))
        task_name = (tm.task if tm else headers.get(names.HDR_TASK, ""))[:_NAME_IN_REASON]
        await self.reject(msg, reason, task_id=task_id, task_name=task_name, worker_type=self.worker_type)

    # -- running -------------------------------------------------------------------

    async def _execute(self, job: Job) -> None:
        task = job.task
        tm = job.message
        timeout = task.options.timeout
        outcome: Outcome
        job.context = ctx = TaskContext(
            id=tm.id,
            name=tm.task,
            tier=(job.msg.headers or {}).get(names.HDR_TIER) or tm.tier or "",
            retries=job.retries,
            headers=tm.headers,
            worker=self.name,
            budget_usd=tm.budget_usd,
        )
        if job.lease is not None:  # which concurrency slots it ran in, for inspect and the Workshop
            ctx.meta["concurrency"] = f"{job.lease.label} (limit {job.lease.limit})"
        # This coroutine runs in its own asyncio task, so the context var is local to it.
        set_current_task(ctx)
        bind_broker(self.conns.broker if self.conns is not None else None)  # token streams (heddle.chunks)
        try:
            args, kwargs = tm.args, tm.kwargs
            if task.arguments is not None:  # type hints: the declared types, from plain data
                args, kwargs = task.arguments.convert(args, kwargs)
            if task.is_async:
                coro = task.fn(*args, **kwargs)
                result = await (asyncio.wait_for(coro, timeout) if timeout else coro)
            else:
                loop = asyncio.get_running_loop()
                call = contextvars.copy_context().run
                fut = loop.run_in_executor(self._pool, call, _call, task.fn, args, kwargs)
                result = await (asyncio.wait_for(fut, timeout) if timeout else fut)
            outcome = Outcome(job, SUCCESS, result=result)
        except asyncio.CancelledError:
            if not (job.revoked or job.abandoned):
                raise
            # Revoked: REVOKED is already stored; shutdown: the message is nak'd.
            outcome = Outcome(job, "CANCELLED")
        except TimeoutError:
            exc = TaskTimeout(f"task {task.name}[{tm.id}] exceeded its timeout of {timeout}s and was cancelled")
            outcome = Outcome(job, FAILURE, error=_error_info(exc), exc=exc)
        except Exception as exc:
            outcome = Outcome(job, FAILURE, error=_error_info(exc), exc=exc)
        job.done = True
        if job.revoked and outcome.state != "CANCELLED":
            outcome = Outcome(job, "CANCELLED")
        self._outcomes.append(outcome)
        self._outcome_ready.set()

    # -- storing and acking --------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self._outcome_ready.wait()
            self._outcome_ready.clear()
            await self._flush()

    async def _flush(self) -> None:
        """Store every finished outcome, then notify and ack; retried on Valkey errors."""
        assert self.conns is not None
        while self._outcomes:
            outcomes, self._outcomes = self._outcomes, []
            try:
                await self._settle(outcomes)
                await self._release_slots()
            except (BackendError, BrokerError) as exc:
                # Keep the outcomes (the in-progress loop keeps their messages alive)
                # and try again; the tasks are not run twice.
                log.warning("cannot store %d results (%s); retrying", len(outcomes), exc)
                self._outcomes[:0] = outcomes
                await asyncio.sleep(_BACKOFF_S)

    async def _settle(self, outcomes: list[Outcome]) -> None:
        assert self.conns is not None
        backend, broker = self.conns.backend, self.conns.broker
        max_deliver = self.settings.max_deliver
        requests: list[StoreRequest] = []
        plans: list[tuple[Outcome, str, bytes, float]] = []  # outcome, action, record, delay
        for o in outcomes:
            job = o.job
            if o.state == "CANCELLED":
                plans.append((o, "ack" if job.revoked else "nak", b"", 0.0))
                continue
            tm = job.message
            retries = job.retries
            if o.state == FAILURE:
                opts = job.task.options
                delivered = job.msg.metadata.num_delivered or 1
                asked = isinstance(o.exc, Retry)  # the task asked for it: autoretry_for does not apply
                can_retry = (
                    retries < opts.retries
                    and o.exc is not None
                    # A wrong argument is wrong on every attempt.
                    and not isinstance(o.exc, ArgumentTypeError)
                    and (asked or isinstance(o.exc, opts.autoretry_for))
                    and delivered < max_deliver
                )
                if asked and not can_retry:
                    o = _retries_ran_out(o, retries, opts.retries)
                if can_retry:
                    after_s = o.exc.after_s if isinstance(o.exc, Retry) else None
                    delay = opts.backoff_s(retries) if after_s is None else after_s
                    rec = self._record(o, RETRY, retries + 1)
                    requests.append(StoreRequest(tm.id, RETRY, rec, retries + 1))
                    plans.append((o, "retry", rec, delay))
                    continue
            rec = self._record(o, o.state, retries)  # may turn an unencodable SUCCESS into FAILURE
            requests.append(StoreRequest(tm.id, o.state, rec, channel=names.channel_of(job.msg.headers)))
            plans.append((o, "final", rec, 0.0))
        stored = await backend.store_many(requests) if requests else []
        await self._settle_token_charges(outcomes)
        # Every task's received and started go before its outcome, in the same write.
        await self._held.flush()
        it = iter(zip(stored, requests, strict=True))
        for o, action, rec, delay in plans:
            job = o.job
            msg = job.msg
            if action == "nak":
                await acknowledge(msg, "nak", job.message.id)
            elif action == "ack":
                await acknowledge(msg, "ack", job.message.id)
            elif action == "retry":
                next(it)
                self.stats["retried"] += 1
                self.metrics.retried(msg.subject, job.message.task, o.finished_at - job.started_at)
                await acknowledge(msg, "nak", job.message.id, delay=delay)
                await events.job_event(broker, events.RETRIED, job, self, o)  # heddle.events hook
            else:
                wrote, request = next(it)
                if wrote:
                    if not self.conns.told_by_store(request.channel):
                        # Never raises: a lost notice costs waiters a re-read, not the result.
                        await self.conns.notify(job.message.id, rec, names.sender_of(msg.headers))
                    if o.state == FAILURE:
                        self.stats["failed"] += 1
                        self.metrics.failed(msg.subject, job.message.task, o.finished_at - job.started_at)
                        reason = f"{o.error.type}: {o.error.message}" if o.error else "failed"
                        await broker.dead_letter(
                            msg.data,
                            f"failed after {job.retries + 1} attempt(s): {reason}",
                            task_id=job.message.id,
                            subject=msg.subject,
                            dedup_key=f"{names.TASKS_STREAM}:{msg.metadata.sequence.stream}",
                            original_headers=copyable_headers(msg.headers),
                        )
                    else:
                        self.stats["succeeded"] += 1
                        self.metrics.succeeded(msg.subject, job.message.task, o.finished_at - job.started_at)
                    # heddle.events hook: one publish per finished task
                    done = events.FAILED if o.state == FAILURE else events.SUCCEEDED
                    await events.job_event(broker, done, job, self, o)
                await acknowledge(msg, "ack", job.message.id)
            self._finish(job)

    async def _settle_token_charges(self, outcomes: list[Outcome]) -> None:
        """Settle what routers charged these tasks' model-token buckets with the usage they reported."""
        charges: list[tuple[list[str], float, float]] = []
        for o in outcomes:
            job = o.job
            charge = (job.msg.headers or {}).get(names.HDR_TOKEN_CHARGE)
            if not charge or job.context is None:
                continue
            estimate, _, keys = charge.partition(" ")
            meta = job.context.meta
            used = float(meta.get("input_tokens", 0) or 0) + float(meta.get("output_tokens", 0) or 0)
            # The router charged the estimate once, for the first delivery; later attempts pay as they go.
            charged = float(estimate) if estimate.isdigit() and (job.msg.metadata.num_delivered or 1) == 1 else 0.0
            prefix = names.RATE_KEY_PREFIX
            buckets = [k for k in keys.split(",") if k.startswith(prefix)][:4]  # only Heddle's own buckets
            charges.append((buckets, used - charged, float(meta.get("rate_limited_s", 0) or 0)))
        if charges:
            try:
                await self._tokens.settle(charges)
            except HeddleError as exc:
                log.warning("cannot settle model-token charges of %d tasks (%s)", len(charges), exc)

    def _record(self, o: Outcome, state: str, retries: int) -> bytes:
        job = o.job
        tm = job.message
        record = ResultRecord(
            id=tm.id,
            state=state,
            task=tm.task,
            result=o.result if state == SUCCESS else None,
            error=o.error,
            retries=retries,
            worker=self.name,
            tier=(job.msg.headers or {}).get(names.HDR_TIER) or tm.tier or "",
            started_at=job.started_at,
            finished_at=o.finished_at,
            meta=self._meta(job),
        )
        try:
            return encode_record(record)
        except (TypeError, ValueError, msgspec.EncodeError, OverflowError, RecursionError) as exc:
            err = EncodeError(
                f"result of task {tm.task} ({type(o.result).__name__}) or its current_task().meta "
                f"cannot be encoded: {exc}; return plain data (str, int, float, list, dict, "
                f"msgspec.Struct, dataclass)"
            )
            o.state, o.result, o.error, o.exc = FAILURE, None, _error_info(err), err
            return encode_record(
                msgspec.structs.replace(record, state=FAILURE, result=None, error=o.error, meta={})
            )

    def _meta(self, job: Job) -> dict[str, Any]:
        meta = dict(job.context.meta) if job.context is not None else {}
        headers = job.msg.headers or {}
        reason = headers.get(names.HDR_ROUTE_REASON)
        if reason:
            meta["route"] = {"tier": headers.get(names.HDR_TIER, ""), "reason": reason}
        return meta

    def _finish(self, job: Job) -> None:
        if self.inflight.get(job.message.id) is job:
            del self.inflight[job.message.id]
            if job.lease is not None:
                self._releasing.append(job.lease)
        self.slot_freed()

    # -- control -------------------------------------------------------------------

    async def _on_revoke(self, msg: Msg) -> None:
        try:
            notice = decode(revoke_decoder, msg.data)
        except DecodeError:
            return
        job = self.inflight.get(notice.id)
        if job is None or job.done:
            return
        job.revoked = True
        if job.task.is_async and job.runner is not None:
            job.runner.cancel()
        # A sync task cannot be interrupted: it is marked, and its result discarded.

    # -- shutdown ------------------------------------------------------------------

    async def on_stop(self) -> None:
        """Finish in-flight work within the grace period, nak the rest, store every outcome."""
        await self._bands.close()  # held tasks never started: back to the stream at once
        deadline = time.monotonic() + self.grace_s
        while self.inflight and time.monotonic() < deadline:
            self._slot_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), max(0.0, deadline - time.monotonic()))
        for job in list(self.inflight.values()):
            if not job.done:
                job.abandoned = True
                if job.runner is not None and job.task.is_async:
                    job.runner.cancel()
                else:
                    # A sync task still running in its thread: hand its message back now.
                    await acknowledge(job.msg, "nak", job.message.id)
                    self._finish(job)
                    self.abandoned_threads += 1
        # Let cancelled runners record their outcome, then settle everything.
        runners = [j.runner for j in self.inflight.values() if j.runner is not None]
        if runners:
            await asyncio.wait(runners, timeout=5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._flush(), 10)
        with contextlib.suppress(Exception):
            await self._held.flush()
        if self._heartbeat is not None:
            await self._heartbeat.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped: %s", self.name, self.stats)


def _call(fn: Any, args: list[Any], kwargs: dict[str, Any]) -> Any:
    return fn(*args, **kwargs)
