"""The actor loop: what the worker, the router and the orchestrator share.

One loop for every JetStream consumer Heddle runs: connect, bind the durable
consumer (:class:`~heddle.pull.Feed`, re-bound after reconnects), fetch as many
messages as there are free slots, hand each batch to the actor's :meth:`Actor.handle`,
keep in-flight messages alive with in-progress acks, dead-letter what JetStream
gives up on (one MaxDeliver policy, :func:`dead_letter_exhausted`), and stop on
request. An actor supplies its consumer, its handler, its slots and what to do at
start and at the end; nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from heddle import events, names
from heddle.background import cancel_and_wait
from heddle.errors import DecodeError, HeddleError
from heddle.messages import (
    FAILURE,
    ErrorInfo,
    ResultRecord,
    TaskMessage,
    copyable_headers,
    decode,
    decode_advisory,
    task_decoder,
    usable_task_id,
)
from heddle.pull import Feed, ack_now

if TYPE_CHECKING:
    from heddle.broker import Message as Msg
    from heddle.connections import Client, Connections

log = logging.getLogger("heddle.actor")

# Task names are quoted in reasons at most this long.
_NAME_IN_REASON = 200


class Actor:
    """Base of the worker, the router and the orchestrator: one consumer, one loop.

    Subclasses set :attr:`what` (for log lines), :attr:`max_batch`, and implement
    :meth:`ensure_consumer` and :meth:`handle`; they may override :meth:`free_slots`,
    :meth:`in_progress`, :meth:`on_start`, :meth:`on_stop`, :attr:`exhausted_why`,
    :attr:`max_deliver`.

    Args:
        app: Gives settings and the connections of the running loop.
    """

    what = "messages"
    max_batch = 256
    fetch_timeout_s = 1.0
    backoff_s = 0.5
    # Said in the reason of a message dead-lettered after MaxDeliver.
    exhausted_why = "its consumers crashed or stalled on it"

    def __init__(self, app: Client) -> None:
        self.app = app
        self.settings = app.settings
        #: The MaxDeliver of this actor's consumer.
        self.max_deliver = app.settings.max_deliver
        self.ready = asyncio.Event()
        #: Monotonic time the loop last went round (for liveness probes).
        self.last_tick = time.monotonic()
        self.conns: Connections | None = None
        self.feed: Feed | None = None
        self._stop = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._subs: list[Any] = []
        self._bg: list[asyncio.Task[Any]] = []

    # -- what an actor supplies ------------------------------------------------------

    async def ensure_consumer(self, conns: Connections) -> tuple[str, str]:
        """Create or update the durable consumer; return ``(durable, stream)``."""
        raise NotImplementedError

    async def handle(self, msgs: list[Msg]) -> None:
        """Take a batch of fetched messages (each is acked, nak'd or kept by the actor)."""
        raise NotImplementedError

    def free_slots(self) -> int:
        """How many more messages this actor takes now (0: wait for :meth:`slot_freed`)."""
        return self.max_batch

    def in_progress(self) -> Iterable[tuple[Msg, str]]:
        """``(message, id)`` of the work in flight, kept alive with in-progress acks."""
        return ()

    @property
    def filter_subject(self) -> str:
        """The subject filter of this actor's consumer (a max-deliveries advisory must match it)."""
        raise NotImplementedError

    async def on_start(self, conns: Connections) -> None:
        """After the consumer is bound, before :attr:`ready` is set (subscriptions, announcements)."""

    async def on_stop(self) -> None:
        """After the loop ends: drain in-flight work (the consumer is unbound afterwards)."""

    def on_exhausted(self) -> None:
        """Called after a message was dead-lettered (counters)."""

    # -- the loop ----------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop fetching and drain (safe to call from a signal handler)."""
        self._stop.set()
        self._slot_freed.set()

    def slot_freed(self) -> None:
        """Wake the loop: work finished, so it can fetch more."""
        self._slot_freed.set()

    @property
    def stopping(self) -> bool:
        """True once a stop was requested."""
        return self._stop.is_set()

    @property
    def stop_event(self) -> asyncio.Event:
        """Set when a stop is requested (for feeds of the actor's own that cut a back-off short)."""
        return self._stop

    @property
    def subscriptions(self) -> list[Any]:
        """Core NATS subscriptions, unsubscribed when the actor unbinds."""
        return self._subs

    async def next_batch(self, n: int) -> list[Msg]:
        """The next messages to handle, up to ``n``: by default, from the actor's consumer."""
        assert self.feed is not None
        return await self.feed.fetch(n, self.fetch_timeout_s)

    @property
    def consumers(self) -> list[tuple[str, str]]:
        """``(stream, durable)`` this actor consumes (for readiness checks and lag metrics)."""
        return [(self._stream, self.feed.durable)] if self.feed is not None and self.feed.durable else []

    async def sleep_unless_stopped(self, seconds: float) -> None:
        """Wait ``seconds``, or less if a stop is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def run(self) -> None:
        """Connect, consume until :meth:`request_stop`, then drain and unbind."""
        conns = self.conns = await self.app.connections()
        broker = conns.broker
        await conns.ensure_streams()
        self._stream = ""

        async def ensure() -> tuple[str, str]:
            durable, self._stream = await self.ensure_consumer(conns)
            return durable, self._stream

        self.feed = feed = Feed(broker, ensure, self._stop, self.what, self.backoff_s)
        await feed.start()
        advisory = names.MAX_DELIVERIES_ADVISORY.format(stream=self._stream, consumer=feed.durable)
        self._subs.append(await broker.subscribe(advisory, cb=self._on_max_deliveries))
        await self.on_start(conns)
        await broker.flush()
        self._bg.append(asyncio.get_running_loop().create_task(self._progress_loop(), name="heddle-progress"))
        self.ready.set()
        try:
            await self._loop()
        finally:
            try:
                await self.on_stop()
            finally:
                await self._unbind()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            self.last_tick = time.monotonic()
            free = self.free_slots()
            if free <= 0:
                self._slot_freed.clear()
                # Wake now and then: an actor full of long work is still a live loop.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), self.fetch_timeout_s)
                continue
            msgs = await self.next_batch(min(free, self.max_batch))
            if not msgs:
                continue
            try:
                await self.handle(msgs)
            except Exception:
                # Never let one batch stop the loop; unacked messages come back after AckWait.
                log.exception("failed to handle a batch of %d %s", len(msgs), self.what)

    async def reject(
        self,
        msg: Msg,
        reason: str,
        *,
        task_id: str,
        task_name: str = "",
        error_type: str = "heddle.DeadLettered",
        worker_type: str = "",
    ) -> bool:
        """Dead-letter a message that can never be handled, fail its result, ack it, announce it.

        ``task_id`` must be usable as a subject token, or empty (a message whose id
        cannot be one fails no result). If the dead letter cannot be written, the
        message is left for redelivery. Returns True if it was dead-lettered.
        """
        assert self.conns is not None
        broker = self.conns.broker
        seq = seq_of(msg)
        stream = self._stream or names.TASKS_STREAM
        log.warning("%s: dead-lettering message #%d (%s): %s", self.what, seq, task_id or "without a usable id",
                    reason)
        try:
            await broker.dead_letter(
                msg.data,
                reason,
                task_id=task_id,
                subject=msg.subject,
                dedup_key=f"{stream}:{seq}",
                original_headers=copyable_headers(msg.headers),
            )
            if task_id:
                await self.conns.store_final(ResultRecord(
                    id=task_id,
                    state=FAILURE,
                    task=task_name[:_NAME_IN_REASON],
                    error=ErrorInfo(type=error_type, message=reason),
                    worker=getattr(self, "name", self.what),
                    finished_at=time.time(),
                ), *names.notice_route(msg.headers))
        except HeddleError as exc:
            log.warning("could not dead-letter message #%d (%s); leaving it for redelivery", seq, exc)
            return False
        await acknowledge(msg, "ack", task_id or f"#{seq}")
        self.on_exhausted()
        await events.publish(  # heddle.events hook
            broker,
            events.task_event(events.DEAD_LETTERED, task_id, task=task_name[:_NAME_IN_REASON],
                              worker_type=worker_type[:_NAME_IN_REASON], worker=getattr(self, "name", self.what),
                              error=reason),
        )
        return True

    async def _progress_loop(self) -> None:
        """Tell JetStream that in-flight work is alive, so AckWait can stay short."""
        interval = max(0.2, self.settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            for msg, work_id in list(self.in_progress()):
                await acknowledge(msg, "in_progress", work_id)

    async def _on_max_deliveries(self, msg: Msg) -> None:
        assert self.conns is not None and self.feed is not None
        if await dead_letter_exhausted(
            self.conns,
            msg.data,
            stream=self._stream,
            consumer=self.feed.durable,
            filter_subject=self.filter_subject,
            max_deliver=self.max_deliver,
            actor=getattr(self, "name", self.what),
            why=self.exhausted_why,
        ):
            self.on_exhausted()

    async def _unbind(self) -> None:
        await cancel_and_wait(*self._bg)
        self._bg.clear()
        # Unsubscribe the pull subscription before closing (nats-py's drain waits for
        # its queue to empty otherwise); what it still holds is nak'd for redelivery.
        if self.feed is not None:
            await self.feed.close()
        # nats-py buffers acks and naks; a round trip makes sure the server has them
        # before the process exits.
        if self.conns is not None:
            with contextlib.suppress(Exception):
                await self.conns.broker.flush(timeout_s=2)
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()


def seq_of(msg: Msg) -> int:
    """A JetStream message's stream sequence number (0 if it has none)."""
    try:
        return msg.metadata.sequence.stream
    except Exception:
        return 0


# nats-py's exception for an ack on a closed connection, by name: only broker.py imports
# nats-py. The connection's loss is logged by the broker itself.
_CLOSED = "ConnectionClosedError"


async def acknowledge(
    msg: Msg, action: str, task_id: str, *, delay: float | None = None, logger: logging.Logger = log
) -> bool:
    """``ack``, ``nak`` (redeliver after ``delay``), ``term`` or ``in_progress`` a message; never raises.

    Every failure is logged with ``task_id``: at debug level when it is routine (the
    message was acknowledged already, a redelivery race; or the connection is
    closed, which the broker reports itself), else as a warning. The worker, the
    router and the orchestrator acknowledge through here.

    Returns:
        True if the acknowledgement was sent.
    """
    try:
        if action == "in_progress":
            await msg.in_progress()
        elif msg.is_acked:
            logger.debug("not %sing the message of task %s: it was acknowledged already", action, task_id)
            return False
        elif action == "ack":
            if not ack_now(msg):
                await msg.ack()
        elif action == "nak":
            await msg.nak(delay=delay)
        elif action == "term":
            await msg.term()
        else:
            raise ValueError(f"unknown acknowledgement {action!r}; use ack, nak, term or in_progress")
    except Exception as exc:
        level = logging.DEBUG if type(exc).__name__ == _CLOSED else logging.WARNING
        logger.log(level, "could not %s the message of task %s: %r", action, task_id, exc)
        return False
    return True


def subject_matches(subject: str, pattern: str) -> bool:
    """True if ``subject`` matches the NATS subject ``pattern`` (``*`` one token, ``>`` the rest)."""
    tokens = subject.split(".")
    for i, want in enumerate(pattern.split(".")):
        if want == ">":
            return len(tokens) > i
        if i >= len(tokens) or (want != "*" and want != tokens[i]):
            return False
    return len(tokens) == pattern.count(".") + 1


async def dead_letter_exhausted(
    conns: Connections,
    advisory: bytes,
    *,
    stream: str,
    consumer: str,
    filter_subject: str,
    max_deliver: int,
    actor: str,
    why: str,
    logger: logging.Logger = log,
) -> bool:
    """Dead-letter the message a max-deliveries advisory names, if the advisory is this consumer's.

    nats-py leaves a message past MaxDeliver in a work-queue stream, so the worker
    and the router act on JetStream's advisory (``$JS.EVENT.ADVISORY.CONSUMER.
    MAX_DELIVERIES.{stream}.{consumer}``): copy the message to the dead-letter
    stream with the reason, fail its result, delete it. Anyone on the bus can
    publish on that subject, so the advisory must name this ``stream`` and
    ``consumer``, count at least ``max_deliver`` deliveries, and point at a
    message on ``filter_subject``; any other is ignored with a warning.

    Returns:
        True if this call dead-lettered the message.
    """
    try:
        adv = decode_advisory(advisory)
    except DecodeError as exc:
        logger.warning("ignoring max-deliveries advisory that is not one (%s): %r", exc, advisory[:200])
        return False
    if adv.stream != stream or adv.consumer != consumer:
        logger.warning("ignoring max-deliveries advisory for %r/%r: this is %s/%s",
                       adv.stream[:100], adv.consumer[:100], stream, consumer)
        return False
    seq = adv.stream_seq
    if adv.deliveries < max_deliver:
        logger.warning("ignoring max-deliveries advisory for #%d: %d deliveries, below MaxDeliver %d",
                       seq, adv.deliveries, max_deliver)
        return False
    broker = conns.broker
    try:
        stored = await broker.get_stream_msg(stream, seq)
    except HeddleError:
        return False  # gone: acked at last, or handled by another replica
    subject = stored.subject or ""
    if not subject_matches(subject, filter_subject):
        logger.warning("ignoring max-deliveries advisory for #%d: it is on %s, not %s",
                       seq, subject[:200], filter_subject)
        return False
    data = stored.data or b""
    headers = stored.headers or {}
    try:
        tm: TaskMessage | None = decode(task_decoder, data)
    except DecodeError:
        tm = None
    task_id = usable_task_id(tm.id if tm else None, names.task_id_of(headers))
    task_name = (tm.task if tm else headers.get(names.HDR_TASK, ""))[:_NAME_IN_REASON]
    reason = f"delivered {adv.deliveries} times without being acknowledged (MaxDeliver); {why}"
    logger.warning("dead-lettering message #%d (task %s): %s", seq, task_id or "without a usable id", reason)
    try:
        await broker.dead_letter(
            data,
            reason,
            task_id=task_id,
            subject=subject,
            dedup_key=f"{stream}:{seq}",
            original_headers=copyable_headers(headers),
        )
        if task_id:
            await conns.store_final(ResultRecord(
                id=task_id,
                state=FAILURE,
                task=task_name,
                error=ErrorInfo(type="heddle.MaxDeliveriesExceeded", message=reason),
                worker=actor,
                finished_at=time.time(),
            ), *names.notice_route(headers))
        await broker.delete_stream_msg(stream, seq)
    except HeddleError as exc:
        logger.warning("could not dead-letter message #%d: %s", seq, exc)
        return False
    return True
