"""Waiting for results: result-notice subscriptions, backed by the stored record.

A worker stores a task's final record in Valkey, then publishes it as a notice on
core NATS, ``heddle.results.{sender}.{id}`` (:func:`heddle.names.notice_subject`):
the sending connection's token rides in the task's ``Heddle-Notify`` header, and
the connection takes the notices of all its sends with one subscription,
``heddle.results.{token}.>`` (no subscription per task). A handle on a task sent
elsewhere subscribes to ``heddle.results.*.{id}``. The notice is only a wake-up call: core NATS
keeps nothing, so a notice published while this client is disconnected, or before
its subscriptions are re-registered after a reconnect (a worker that reconnects
first flushes its buffered notices into a server that does not know our
subscription yet), is gone.

A connection also follows its own Valkey channel, ``heddle:notices:{token}``, and
while it does, its sends say so (``Heddle-Notify-Valkey``): the worker's store
script then publishes the final record there, and on the task's own channel
``heddle:task-notices:{id}`` for handles elsewhere, in the same step as it stores
it (:mod:`heddle.store`), and no NATS notice is sent: one notice per task. The
caller hears at once, with no hop back through the worker and nats-server, and
hears even where the bus refuses it notices (the ``client`` role,
docs/security.md). A handle elsewhere follows the task's channel on its own
connection's feed as well as the NATS subject. Valkey's pub/sub keeps nothing
either: when the feed's connection comes back, every open watch is read.

The stored record is the truth, so a watch settles on whichever comes first:

* a notice that carries this task's id and a final record (anything else on the
  subject or channel, junk bytes or another task's record, is ignored and a NATS
  watch re-subscribes); an empty NATS notice, or the task's result key on the
  channel, says the record is too large to announce, and the store is read;
* a read of the store when a wait starts on a watch that may have missed its
  notice (one made by the wait itself, or a task JetStream deduplicated);
* a read of the store for every open watch after each reconnect, once nats-py has
  re-registered the subscriptions (a record stored before the read is found by
  it; one stored after it is announced to the subscription), and after the Valkey
  feed subscribed again;
* a read of the store, every :data:`RECHECK_S`, for watches someone is waiting on
  (a notice lost on the publisher's side: the worker's connection failed between
  its store and its publish).

The reads are pipelined: one script call per :data:`_READ_CHUNK` watches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from heddle import names
from heddle.errors import DecodeError, HeddleError
from heddle.messages import READY_STATES, ResultRecord, record_decoder
from heddle.messages import decode as bounded_decode

if TYPE_CHECKING:
    from heddle.broker import Broker
    from heddle.store import ResultBackend
    from heddle.valkeylane import ChannelFeed

log = logging.getLogger("heddle.notices")

# How often the store is read again for a watch someone is waiting on.
RECHECK_S = 2.0
# Watches read per script call.
_READ_CHUNK = 1000
# How long a send waits for its connection's Valkey notice feed to be confirmed.
FEED_WAIT_S = 2.0


class Watch:
    """One task's result, awaited: settled by its notice or by a read of the store."""

    __slots__ = ("channel", "checked_at", "done", "fresh", "on_settled", "sub", "task_id", "waiting")

    def __init__(self, task_id: str, done: asyncio.Future[ResultRecord]) -> None:
        self.task_id = task_id
        self.done = done
        # Called as soon as ``done`` is settled or cancelled, in the same turn of the loop
        # (a done-callback of the future would run a turn later): what waits wakes a turn sooner.
        # None until one is added: most watches never have any, and a list each would be one
        # more object per task for the garbage collector to walk.
        self.on_settled: list[Callable[[], None]] | None = None
        self.sub: Any = None
        # The task's Valkey channel, when a handle elsewhere follows it on the connection's feed.
        self.channel = ""
        # True once a publish made through this watch was stored by JetStream as new:
        # such a message always ends in a notice, so waiting needs no first read.
        self.fresh = False
        # How many waits are on it (only awaited watches are re-read periodically).
        self.waiting = 0
        self.checked_at = time.monotonic()

    def when_settled(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` as soon as ``done`` is settled or cancelled (see :attr:`on_settled`)."""
        if self.on_settled is None:
            self.on_settled = [callback]
        else:
            self.on_settled.append(callback)

    def stored(self, ack: Any) -> None:
        """JetStream stored the task's message (``ack`` is its :class:`heddle.pubacks.PublishAck`).

        A new message always ends in a notice (a worker that finds the result already
        stored announces the stored one again), so waiting needs no first read unless
        the notice is lost (read again periodically); a duplicate JetStream dropped may
        have finished long ago.
        """
        self.fresh = self.fresh or not ack.duplicate


def _end(w: Watch, record: ResultRecord | None) -> None:
    """Settle ``w`` with ``record`` (or cancel it: no notice will come through it) and wake its waiters."""
    if not w.done.done():
        if record is None:
            w.done.cancel()
        else:
            w.done.set_result(record)
    callbacks, w.on_settled = w.on_settled, None
    for cb in callbacks or ():
        cb()


class Watches:
    """Every open watch of one connection (one event loop).

    Args:
        broker: The connection the notices come in on.
        backend: The result store that holds the truth.
        max_watches: Watches made at send time and never waited on are dropped
            beyond this many, oldest first, so a fire-and-forget producer does not
            grow without bound; a later wait on one reads the store.
    """

    def __init__(self, broker: Broker, backend: ResultBackend, max_watches: int = 50_000) -> None:
        self.broker = broker
        self.backend = backend
        self.max_watches = max_watches
        self._open: OrderedDict[str, Watch] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        #: This connection's notice token: tasks sent with it in ``Heddle-Notify`` are
        #: announced on ``heddle.results.{token}.{id}``.
        self.token = uuid.uuid4().hex[:16]
        self._mux: Any = None
        self._mux_prefix = f"{names.RESULT_SUBJECT_PREFIX}{self.token}."
        self._feed: ChannelFeed | None = None
        self._feed_started: asyncio.Future[None] | None = None
        self._key_prefix = names.RESULT_KEY_PREFIX.encode()
        broker.on_reconnect(self._on_reconnect)

    def __len__(self) -> int:
        return len(self._open)

    @property
    def on_valkey(self) -> bool:
        """True while this connection follows its notices on Valkey: sends then ask for them there."""
        return self._feed is not None and self._feed.ready

    @property
    def feed_messages(self) -> int:
        """Messages the Valkey feed has handed on (tests read it to see the feed in use)."""
        return self._feed.delivered if self._feed is not None else 0

    def get(self, task_id: str) -> Watch | None:
        """The open watch of a task, if any."""
        return self._open.get(task_id)

    async def watch(self, task_id: str) -> Watch:
        """The task's open watch, or a new one subscribed to its notice (whoever sent the task)."""
        w = self._waiting(task_id)
        if w is not None:
            return w
        w = self._add(task_id)
        await self._subscribe(w)
        await self._follow_feed()
        if self.on_valkey and self._feed is not None:
            # A sender told on Valkey gets no NATS notice sent: its store tells the task's channel.
            w.channel = names.task_notice_channel(task_id)
            await self._feed.add(w.channel)
        await self._evict()
        return w

    async def expect(self, task_id: str) -> Watch:
        """A watch for a task this connection is about to send with ``Heddle-Notify: {token}``.

        Its notice comes in on the connection's one notice subscription, made here
        the first time (before the task's publish on the same connection, so the
        server knows it before any worker can answer).
        """
        w = self._waiting(task_id)
        if w is not None:
            return w
        await self.listen()
        w = self._add(task_id)
        if len(self._open) > self.max_watches:
            await self._evict()
        return w

    async def listen(self) -> None:
        """Make the notice subscription and follow the Valkey feed (once each): then :meth:`expect_now` can watch."""
        if self._mux is None:
            # ">": a task id may hold dots (graph nodes: ``{goal}:0.3``), so it can be several tokens.
            self._mux = await self.broker.subscribe(self._mux_prefix + ">", inline=self._on_mux)
        await self._follow_feed()

    def expect_now(self, task_id: str) -> Watch | None:
        """:meth:`expect` without awaiting: None when it would have to wait (first sends, or over the bound)."""
        w = self._waiting(task_id)
        if w is not None:
            return w
        if not self._listening() or len(self._open) >= self.max_watches:
            return None
        return self._add(task_id)

    def _waiting(self, task_id: str) -> Watch | None:
        """The open watch on ``task_id`` whose notice has not come yet, if any."""
        w = self._open.get(task_id)
        return w if w is not None and not w.done.done() else None

    def _add(self, task_id: str) -> Watch:
        w = Watch(task_id, asyncio.get_running_loop().create_future())
        self._open[task_id] = w
        return w

    def _listening(self) -> bool:
        """The notice subscription is made and the Valkey feed (if results are announced) confirmed."""
        if self._mux is None:
            return False
        if self._feed_started is None:
            return not self.backend.announces
        return self._feed_started.done()

    async def _follow_feed(self) -> None:
        """Start following this connection's Valkey channel (once), and wait until it is confirmed."""
        if self._feed_started is None and self.backend.announces:
            self._feed = self.backend.follow(names.notice_channel(self.token), self._on_feed, self._on_feed_back)
            self._feed_started = asyncio.ensure_future(self._start_feed(self._feed))
        if self._feed_started is not None and not self._feed_started.done():
            # Every send (and watch) until the feed is confirmed waits for it, so that a
            # burst of first sends asks for notices on Valkey too.
            await self._feed_started

    def _on_mux(self, msg: Any) -> None:
        w = self._open.get(msg.subject[len(self._mux_prefix):])
        if w is None or w.done.done():
            return
        data = msg.data
        if not data:
            # An empty notice: the record was too large to announce; it is in the store.
            self._spawn(self._read_all("after an empty notice", [w]))
            return
        record = _valid_record(w.task_id, data)
        if record is not None:
            self._settle(w, record)
            return
        log.warning("ignored a result notice for task %s that is not its final record (%d bytes)",
                    w.task_id, len(data))

    async def _start_feed(self, feed: ChannelFeed) -> None:
        # FEED_WAIT_S at most: a feed that is slow to start goes on starting (and one that
        # cannot keeps trying) in the background, and sends go on without it meanwhile.
        starting = asyncio.ensure_future(feed.start())
        self._tasks.add(starting)
        starting.add_done_callback(self._tasks.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(starting), FEED_WAIT_S)

    def _on_feed(self, data: bytes) -> None:
        if data.startswith(self._key_prefix):
            # The record was too large to announce: its key says which task to read.
            w = self._open.get(data[len(self._key_prefix):].decode("utf-8", "replace"))
            if w is not None and not w.done.done():
                self._spawn(self._read_all("after a notice too large to carry its record", [w]))
            return
        try:
            record = bounded_decode(record_decoder, data)
        except DecodeError:
            log.debug("ignored %d bytes on %s that are no result record", len(data), names.notice_channel(self.token))
            return
        w = self._open.get(record.id)
        if w is not None and not w.done.done() and record.state in READY_STATES:
            self._settle(w, record)

    def _on_feed_back(self) -> None:
        # Notices published while the feed was down are gone: read what they would have said.
        self._spawn(self._read_all("after the Valkey notice feed came back"))

    async def _subscribe(self, w: Watch) -> None:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(lambda f: self._on_notice(w, f))
        w.sub = await self.broker.subscribe(names.result_subject(w.task_id), future=fut)

    def _on_notice(self, w: Watch, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() or w.done.done():
            return
        data = fut.result().data
        if not data:
            # An empty notice: the record was too large to announce; it is in the store.
            self._spawn(self._resubscribe(w))
            return
        record = _valid_record(w.task_id, data)
        if record is not None:
            # The subscription was limited to one message: the server has dropped it.
            self._settle(w, record, unsubscribe=False)
            return
        log.warning("ignored a result notice for task %s that is not its final record (%d bytes)",
                    w.task_id, len(data))
        # The subscription took one message; take the next, and read the store in case
        # the real notice came in between.
        self._spawn(self._resubscribe(w))

    async def _resubscribe(self, w: Watch) -> None:
        if w.done.done() or self._open.get(w.task_id) is not w:
            return
        try:
            await self._subscribe(w)
            await self.broker.flush()
        except HeddleError as exc:
            log.warning("cannot re-subscribe to the result of task %s (%s); reading the store instead",
                        w.task_id, exc)
        await self.read([w])

    def _settle(self, w: Watch, record: ResultRecord, unsubscribe: bool = True) -> None:
        _end(w, record)
        if self._open.get(w.task_id) is w:
            del self._open[w.task_id]
        if unsubscribe and w.sub is not None:  # a watch on the connection's notice subscription has none
            self._spawn(_unsubscribe(w.sub))
        self._leave_channel(w)

    def _leave_channel(self, w: Watch) -> None:
        if w.channel:
            if self._feed is not None:
                self._feed.remove(w.channel)
            w.channel = ""

    async def read(self, watches: list[Watch]) -> None:
        """Settle every watch whose final record is stored (pipelined reads)."""
        now = time.monotonic()
        todo = [w for w in watches if not w.done.done()]
        for i in range(0, len(todo), _READ_CHUNK):
            chunk = todo[i : i + _READ_CHUNK]
            for w in chunk:
                w.checked_at = now
            found = await self.backend.final_records([w.task_id for w in chunk])
            for w in chunk:
                data = found.get(w.task_id)
                record = _valid_record(w.task_id, data) if data else None
                if record is not None:
                    self._settle(w, record)

    async def wait(self, task_id: str, w: Watch | None, timeout_s: float | None) -> ResultRecord | None:
        """Wait for a task's final record; None after ``timeout_s``.

        Args:
            task_id: The task.
            w: The watch made when the task was sent (on this loop), if any.
            timeout_s: Seconds to wait; None waits forever.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            record, ended = await self._wait_once(task_id, w, deadline)
            if record is not None or ended:
                return record
            # The watch was cancelled under us (released or evicted while another
            # waiter used it): watch again, with a read, for the time that is left.
            w = None

    async def _wait_once(
        self, task_id: str, w: Watch | None, deadline: float | None
    ) -> tuple[ResultRecord | None, bool]:
        """One wait on one watch: ``(record, ended)``; ``ended`` is False if the watch was cancelled."""
        if w is None or (w.done.done() and w.done.cancelled()) or (
            not w.done.done() and self._open.get(task_id) is not w
        ):
            w = await self.watch(task_id)
            # Make sure the server has the subscription before reading: a record stored
            # before the read is seen by it, one stored after it is announced.
            try:
                await self.broker.flush()
            except HeddleError as exc:
                log.debug("flush before reading result %s failed (%s); a reconnect re-reads it", task_id, exc)
            need_read = True
        else:
            need_read = not w.fresh
        w.waiting += 1
        self._ensure_sweeper()
        try:
            if need_read and not w.done.done():
                try:
                    await self.read([w])
                except HeddleError as exc:
                    # The connection was open a moment ago; the sweeper reads again.
                    log.warning("cannot read the result of task %s yet (%s); waiting for its notice", task_id, exc)
            if not w.done.done():
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                await _woken(w, remaining)
            if w.done.done() and not w.done.cancelled():
                return w.done.result(), True
            timed_out = deadline is not None and time.monotonic() >= deadline
            return None, timed_out or not w.done.cancelled()
        finally:
            w.waiting -= 1

    def release(self, task_id: str) -> None:
        """Stop watching a task whose result the caller will not wait for through this watch."""
        w = self._open.pop(task_id, None)
        if w is not None:
            _end(w, None)
            self._spawn(_unsubscribe(w.sub))
            self._leave_channel(w)

    async def _evict(self) -> None:
        spared = 0
        while len(self._open) > self.max_watches and spared < len(self._open):
            task_id, w = next(iter(self._open.items()))
            if w.waiting:
                self._open.move_to_end(task_id)
                spared += 1
                continue
            del self._open[task_id]
            # Cancelled, the future tells a later wait that no notice will come, so it
            # subscribes and reads the store itself instead of waiting out its timeout.
            _end(w, None)
            self._leave_channel(w)
            await _unsubscribe(w.sub)

    async def _on_reconnect(self) -> None:
        # nats-py has re-registered every subscription before calling this.
        self._spawn(self._read_all("after a reconnect"))

    async def _read_all(self, why: str, some: list[Watch] | None = None) -> None:
        watches = [w for w in (self._open.values() if some is None else some) if not w.done.done()]
        if not watches:
            return
        try:
            await self.read(watches)
        except HeddleError as exc:
            log.warning("cannot re-read %d awaited results %s (%s); the next sweep tries again",
                        len(watches), why, exc)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="heddle-result-sweep")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(RECHECK_S)
            due = time.monotonic() - RECHECK_S
            awaited = [w for w in self._open.values() if w.waiting and not w.done.done() and w.checked_at <= due]
            if awaited:
                try:
                    await self.read(awaited)
                except HeddleError as exc:
                    log.warning("cannot re-read %d awaited results (%s); trying again in %.0fs",
                                len(awaited), exc, RECHECK_S)
            elif not any(w.waiting for w in self._open.values()):
                self._sweeper = None
                return

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Cancel every watch and the background work."""
        self._mux = None
        if self._feed is not None:
            self._feed.close()
            self._feed = None
        if self._feed_started is not None:
            self._feed_started.cancel()
            self._feed_started = None
        for w in self._open.values():
            _end(w, None)
        self._open.clear()
        for t in [self._sweeper, *self._tasks]:
            if t is not None:
                t.cancel()
        self._sweeper = None


async def _woken(w: Watch, timeout_s: float | None) -> None:
    """Wait until ``w`` is settled or cancelled, or ``timeout_s`` passes; never cancels ``w.done``.

    Not ``asyncio.wait((w.done,))``: it is woken by a done-callback, a turn of the loop
    after the notice, and wakes this task another turn later; ``on_settled`` wakes it at once.
    """
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not woken.done():
            woken.set_result(None)

    w.when_settled(wake)
    timer = loop.call_later(timeout_s, wake) if timeout_s is not None else None
    try:
        await woken
    finally:
        if timer is not None:
            timer.cancel()
        if w.on_settled is not None and wake in w.on_settled:
            w.on_settled.remove(wake)


def _valid_record(task_id: str, data: bytes) -> ResultRecord | None:
    """The record in ``data`` if it is this task's final record; None for anything else."""
    try:
        record = bounded_decode(record_decoder, data)
    except DecodeError:
        return None
    if record.id != task_id or record.state not in READY_STATES:
        return None
    return record


async def _unsubscribe(sub: Any) -> None:
    # A closed connection or a subscription that already took its one message: nothing to undo.
    if sub is not None:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
