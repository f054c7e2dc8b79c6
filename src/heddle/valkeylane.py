"""Connections to Valkey taken over from valkey-py: a lane for the scripts on every task's path, and feeds.

Every task crosses Valkey twice (its claim and its store, :mod:`heddle.store`),
and on a lone task both round trips are on the caller's critical path. Through
valkey-py's pool and pipeline a script call pays for a connection checked out
and back in, a pipeline object, its command stack and response callbacks, and a
coroutine per read: ``benchmarks/test_valkey_lane.py`` times one task's claim
at 233 us that way and 159-172 us on the lane, against 78-80 us for a bare
``PING`` (docs/benchmarks.md).

A :class:`Lane` is that plain protocol: one connection per result store (per
event loop), requests written at once and answered in order (so concurrent
callers pipeline on it), replies parsed in C by ``libvalkey``'s reader (the
one valkey-py uses) inside ``data_received``, which resolves the caller's
future directly: no reader task between the socket and the caller.

It does not open the connection itself: valkey-py does (address, Sentinel's
primary, TLS, AUTH, SELECT, protocol version, client name, exactly as for the
pool), and the lane then takes the connected transport over. That relies on
valkey-py 6's ``Connection._reader``/``_writer`` (asyncio streams);
``tests/test_valkey_lane.py`` pins it.

A :class:`ChannelFeed` is the same take-over for a connection in subscribe mode:
a client's result notices (:mod:`heddle.notices`) are parsed in ``data_received``
and handed on there, and a connection that is lost or stops answering its PINGs is
reopened a moment later.

The lane never decides what an error means. A request it cannot answer (the
connection is lost or was never made, or no reply came within the socket
timeout) raises :class:`LaneDown`, and :mod:`heddle.store` sends the request
again through the pool, whose failover handling then applies; error replies are
returned as values for the store to look at.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import libvalkey

log = logging.getLogger("heddle.valkeylane")

# An error reply from the server (returned among the replies, never raised).
ReplyError = libvalkey.ReplyError


class LaneDown(Exception):
    """Raised when the lane cannot answer a request; the caller sends it through the pool instead."""


async def _take(connection: Any) -> tuple[asyncio.Transport, tuple[Any, Any]]:
    """Connect valkey-py's ``connection`` and take its transport and streams from it.

    The streams must stay referenced by whoever takes the transport: a collected
    StreamWriter closes it.

    Raises:
        LaneDown: The connection cannot be taken over (not stream-based, or holding
            unread bytes); valkey-py's own errors are raised as they are.
    """
    await connection.connect()
    reader, writer = getattr(connection, "_reader", None), getattr(connection, "_writer", None)
    transport = getattr(writer, "transport", None)
    if reader is None or transport is None or not hasattr(transport, "set_protocol"):
        await connection.disconnect()
        raise LaneDown(f"cannot take over a {type(connection).__name__}: it has no stream transport")
    if getattr(reader, "_buffer", b""):
        await connection.disconnect()
        raise LaneDown("the connection holds unread replies")
    # valkey-py lets go of it: its connection object no longer owns a socket.
    connection._reader = connection._writer = None
    return transport, (reader, writer)


def _replies(reader: Any, data: bytes) -> tuple[list[Any], str]:
    """Feed ``data`` to a libvalkey reader: every whole reply now readable, and why reading
    broke off ("" if it did not: a protocol error, after which nothing can be trusted)."""
    reader.feed(data)
    replies: list[Any] = []
    while True:
        try:
            reply = reader.gets()
        except Exception as exc:
            return replies, f"unreadable reply ({exc})"
        if reply is False:
            return replies, ""
        replies.append(reply)


class _Request:
    """Replies expected for one :meth:`Lane.execute`, in order."""

    __slots__ = ("done", "left", "replies", "sent_at")

    def __init__(self, n: int, done: asyncio.Future[list[Any]], sent_at: float) -> None:
        self.left = n
        self.replies: list[Any] = []
        self.done = done
        self.sent_at = sent_at


class Lane(asyncio.Protocol):
    """One connection to Valkey, taken over from valkey-py once connected; see the module docstring.

    Args:
        transport: The connected transport (TCP or TLS) whose protocol this becomes.
        timeout_s: A request with no reply after this long fails the lane (the
            server hangs, or the network dropped the connection silently).
    """

    def __init__(self, transport: asyncio.Transport, timeout_s: float) -> None:
        self._transport = transport
        self._timeout_s = timeout_s
        self._reader = libvalkey.Reader()
        self._pending: collections.deque[_Request] = collections.deque()
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self._streams: tuple[Any, Any] = (None, None)
        self.closed = False
        #: Requests answered (tests and benchmarks read it to see the lane in use).
        self.answered = 0

    @classmethod
    async def take_over(cls, connection: Any, timeout_s: float) -> Lane:
        """Connect valkey-py's ``connection`` (from its pool's ``make_connection()``) and take its transport.

        Raises:
            LaneDown: The connection cannot be taken over (not stream-based, or
                holding unread bytes); valkey-py's own errors are raised as they are.
        """
        transport, streams = await _take(connection)
        lane = cls(transport, timeout_s)
        lane._streams = streams
        transport.set_protocol(lane)
        return lane

    # -- the protocol -----------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        replies, broken = _replies(self._reader, data)
        pending = self._pending
        for reply in replies:
            if not pending:
                self._fail("a reply that no request asked for")
                return
            req = pending[0]
            req.replies.append(reply)
            req.left -= 1
            if req.left == 0:
                pending.popleft()
                self.answered += 1
                if not req.done.done():
                    req.done.set_result(req.replies)
        if broken:
            self._fail(broken)

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost ({exc})" if exc else "connection closed")

    def eof_received(self) -> bool | None:
        self._fail("the server closed the connection")
        return None

    # -- requests ---------------------------------------------------------------------

    async def execute(self, commands: Sequence[Sequence[Any]]) -> list[Any]:
        """Send ``commands`` in one write; their replies, in order (error replies as :data:`ReplyError` values).

        Raises:
            LaneDown: The lane is closed, or closed before every reply came.
        """
        if self.closed:
            raise LaneDown("the lane is closed")
        pack = libvalkey.pack_command
        data = b"".join([pack(tuple(c)) for c in commands])
        done: asyncio.Future[list[Any]] = self._loop.create_future()
        self._pending.append(_Request(len(commands), done, time.monotonic()))
        try:
            self._transport.write(data)
        except Exception as exc:  # a transport that broke under us: nothing was sent
            self._fail(f"cannot write ({exc!r})")
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._timeout_s, self._check)
        return await done

    def _check(self) -> None:
        """Fail the lane if its oldest request has waited longer than the timeout; else look again later."""
        self._watchdog = None
        if self.closed or not self._pending:
            return
        waited = time.monotonic() - self._pending[0].sent_at
        if waited >= self._timeout_s:
            self._fail(f"no reply within {self._timeout_s:g}s")
            return
        self._watchdog = self._loop.call_later(self._timeout_s - waited, self._check)

    def _fail(self, why: str) -> None:
        if not self.closed:
            self.closed = True
            self._transport.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._pending:
            req = self._pending.popleft()
            if not req.done.done():
                req.done.set_exception(LaneDown(why))

    def close(self) -> None:
        """Close the connection; requests still waiting raise :class:`LaneDown`."""
        self._fail("the lane was closed")


class LaneKeeper:
    """The lane of one result store: opened on the pool's server, left when it fails, reopened after a pause.

    Args:
        make_connection: valkey-py's ``pool.make_connection`` (the server, or Sentinel's primary).
        timeout_s: The lanes' reply timeout (the pool's socket timeout).
        retry_s: After a lane is lost (or cannot be opened), requests go through the
            pool for at least this long before a new one is opened in the background,
            so a server that is down is not dialled twice per request.
        on_lost: Told why, each time a lane is left (for a debug log line).
    """

    def __init__(
        self, make_connection: Callable[[], Any], timeout_s: float, retry_s: float, on_lost: Callable[[str], None]
    ) -> None:
        self._make_connection = make_connection
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._on_lost = on_lost
        self.lane: Lane | None = None
        self._retry_at = 0.0
        self._opening: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Open a lane now (at connect); without one, requests use the pool until a reopen succeeds."""
        try:
            self.lane = await Lane.take_over(self._make_connection(), self._timeout_s)
        except Exception as exc:
            self._on_lost(f"cannot open one ({exc})")
            self._retry_at = time.monotonic() + self._retry_s

    def current(self) -> Lane | None:
        """The open lane, or None (then a new one is opened in the background, once the pause is over)."""
        lane = self.lane
        if lane is not None and not lane.closed:
            return lane
        if lane is not None:
            self.lost("it was closed")
        if (self._opening is None or self._opening.done()) and time.monotonic() >= self._retry_at:
            self._retry_at = time.monotonic() + self._retry_s
            self._opening = asyncio.get_running_loop().create_task(self.open(), name="heddle-valkey-lane")
        return None

    def lost(self, why: str) -> None:
        """Leave the lane (it failed a request); requests go through the pool for a while."""
        if self.lane is not None:
            self.lane.close()
        self.lane = None
        self._retry_at = time.monotonic() + self._retry_s
        self._on_lost(why)

    def close(self) -> None:
        """Close the lane and stop opening one."""
        if self._opening is not None:
            self._opening.cancel()
            self._opening = None
        if self.lane is not None:
            self.lane.close()
            self.lane = None


class CommandList:
    """Stands in for a valkey-py pipeline where a caller queues extra commands: records them for a lane."""

    def __init__(self, commands: list[Sequence[Any]]) -> None:
        self._commands = commands

    def zrem(self, key: str, *members: str) -> None:
        """Queue ``ZREM key member...``."""
        self._commands.append(("ZREM", key, *members))

    def execute_command(self, *args: Any) -> None:
        """Queue any command."""
        self._commands.append(args)


class _Subscribed(asyncio.Protocol):
    """One connection in subscribe mode: pushes parsed in ``data_received`` and handed to its feed."""

    def __init__(self, feed: ChannelFeed, transport: asyncio.Transport) -> None:
        self._feed = feed
        self._transport = transport
        self._reader = libvalkey.Reader()
        self._streams: tuple[Any, Any] = (None, None)
        self.closed = False
        self.confirmed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.pinged = False  # a PING is out and unanswered

    def data_received(self, data: bytes) -> None:
        replies, broken = _replies(self._reader, data)
        for reply in replies:
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message":
                self._feed.deliver(reply[2])
            elif isinstance(reply, list) and len(reply) == 3 and reply[0] == b"subscribe":
                if reply[1] == self._feed.channel_bytes:
                    if not self.confirmed.done():
                        self.confirmed.set_result(None)
                else:
                    self._feed.subscribed(reply[1])
            elif isinstance(reply, list) and len(reply) == 3 and reply[0] == b"unsubscribe":
                continue
            elif isinstance(reply, ReplyError):
                self.fail(f"the server refused: {reply}")
                return
            else:  # a PING's answer (["pong", ""] in RESP2, PONG in RESP3)
                self.pinged = False
        if broken:
            self.fail(broken)

    def ping(self) -> None:
        if self.pinged:
            self.fail("no answer to a PING")
            return
        self.pinged = True
        self.write(("PING",))

    def write(self, command: tuple[str, ...]) -> None:
        self._transport.write(libvalkey.pack_command(command))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(f"connection lost ({exc})" if exc else "connection closed")

    def eof_received(self) -> bool | None:
        self.fail("the server closed the connection")
        return None

    def fail(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self._transport.abort()
        if not self.confirmed.done():
            self.confirmed.set_exception(LaneDown(why))
        self._feed.lost(self, why)


class ChannelFeed:
    """The messages of one Valkey pub/sub channel, handed to a callback as they arrive.

    The connection is opened by valkey-py (as for a :class:`Lane`) and taken over,
    so a message costs no reader task: it is parsed in ``data_received`` and
    ``on_message`` runs there. A lost connection (or one that stops answering the
    PING sent every ``ping_s``) is reopened after ``retry_s``, and ``on_ready`` runs
    each time the subscription is confirmed again: messages published meanwhile
    are gone, as pub/sub keeps nothing. More channels can be followed on the same
    connection for a while (:meth:`add`, :meth:`remove`); they are subscribed again
    with it.

    Args:
        make_connection: valkey-py's ``pool.make_connection`` (the server, or Sentinel's primary).
        channel: The channel.
        on_message: Called with each message's bytes.
        on_ready: Called after every confirmed subscription but the first.
        on_lost: Told why, each time the connection is lost (for a log line).
        timeout_s: How long a subscription may take to be confirmed.
        retry_s: The pause before a lost connection is reopened.
        ping_s: How often the connection is checked.
    """

    def __init__(
        self,
        make_connection: Callable[[], Any],
        channel: str,
        on_message: Callable[[bytes], None],
        on_ready: Callable[[], None],
        on_lost: Callable[[str], None],
        timeout_s: float,
        retry_s: float,
        ping_s: float = 5.0,
    ) -> None:
        self._make_connection = make_connection
        self.channel = channel
        self._on_message = on_message
        self._on_ready = on_ready
        self._on_lost = on_lost
        self._timeout_s = timeout_s
        self._retry_s = retry_s
        self._ping_s = ping_s
        self.channel_bytes = channel.encode()
        # The channels added, each with its subscription's confirmation (None once confirmed).
        self._more: dict[bytes, asyncio.Future[None] | None] = {}
        self._conn: _Subscribed | None = None
        self._task: asyncio.Task[None] | None = None
        self._pinger: asyncio.TimerHandle | None = None
        self._closed = False
        #: Messages handed on (tests read it to see the feed in use).
        self.delivered = 0

    @property
    def ready(self) -> bool:
        """True while the subscription is confirmed and its connection open."""
        c = self._conn
        return c is not None and not c.closed and c.confirmed.done() and c.confirmed.exception() is None

    async def start(self) -> bool:
        """Subscribe now; True once confirmed. If it cannot be, it is tried again in the background."""
        try:
            await self._open()
        except Exception as exc:
            self._on_lost(f"cannot subscribe ({exc})")
            self._try_again()
            return False
        return True

    async def _open(self) -> None:
        transport, streams = await _take(self._make_connection())
        conn = _Subscribed(self, transport)
        conn._streams = streams
        transport.set_protocol(conn)
        self._conn = conn
        for ch, confirmed in self._more.items():
            if confirmed is None:
                self._more[ch] = asyncio.get_running_loop().create_future()
        transport.write(libvalkey.pack_command(("SUBSCRIBE", self.channel, *self._more)))
        try:
            await asyncio.wait_for(asyncio.shield(conn.confirmed), self._timeout_s)
        except TimeoutError:
            conn.fail(f"SUBSCRIBE not confirmed within {self._timeout_s:g}s")
            raise LaneDown(f"SUBSCRIBE not confirmed within {self._timeout_s:g}s") from None
        self._schedule_ping()

    async def add(self, channel: str) -> bool:
        """Follow ``channel`` too; True once the server confirmed it (False: the feed is down or slow).

        Its messages go to ``on_message`` like the others'. Until :meth:`remove`, it is
        subscribed again whenever the connection is.
        """
        key = channel.encode()
        if key not in self._more:
            self._more[key] = asyncio.get_running_loop().create_future()
            if self.ready and self._conn is not None:
                self._conn.write(("SUBSCRIBE", channel))
        confirmed = self._more[key]
        if confirmed is None:
            return self.ready
        try:
            await asyncio.wait_for(asyncio.shield(confirmed), self._timeout_s)
        except TimeoutError:
            return False
        except asyncio.CancelledError:
            if confirmed.cancelled():  # removed meanwhile
                return False
            raise
        return self.ready

    def remove(self, channel: str) -> None:
        """Stop following a channel :meth:`add` added."""
        confirmed = self._more.pop(channel.encode(), None)
        if confirmed is not None:
            confirmed.cancel()
        if self.ready and self._conn is not None:
            self._conn.write(("UNSUBSCRIBE", channel))

    def subscribed(self, channel: bytes) -> None:
        """The server confirmed an added channel."""
        confirmed = self._more.get(channel)
        if confirmed is not None:
            self._more[channel] = None
            if not confirmed.done():
                confirmed.set_result(None)

    def deliver(self, data: bytes) -> None:
        self.delivered += 1
        try:
            self._on_message(data)
        except Exception:  # one bad message must not take the connection's reader down
            log.exception("a message on %s could not be handled; it is skipped", self.channel)

    def _schedule_ping(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
        self._pinger = asyncio.get_running_loop().call_later(self._ping_s, self._ping)

    def _ping(self) -> None:
        self._pinger = None
        c = self._conn
        if c is None or c.closed or self._closed:
            return
        c.ping()
        if not c.closed:
            self._schedule_ping()

    def lost(self, conn: _Subscribed, why: str) -> None:
        if conn is not self._conn or self._closed:
            return
        self._conn = None
        self._on_lost(why)
        self._try_again()

    def _try_again(self) -> None:
        if not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._reopen(), name="heddle-valkey-feed")

    async def _reopen(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._retry_s)
            try:
                await self._open()
            except Exception as exc:
                self._on_lost(f"cannot subscribe again ({exc})")
                continue
            self._on_ready()
            return

    def close(self) -> None:
        """Unsubscribe for good: close the connection and stop reopening it."""
        self._closed = True
        if self._pinger is not None:
            self._pinger.cancel()
            self._pinger = None
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.fail("the feed was closed")
