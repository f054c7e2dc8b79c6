"""JetStream publish acknowledgements: one reply subscription per connection, one future per publish.

A JetStream publish is a core-NATS publish with a reply subject; the stream
answers there with a small JSON document (``{"stream": ..., "seq": ...}`` or
``{"error": {...}}``). nats-py's ``publish_async`` does the same, but parses each
answer into a dataclass through ``dataclasses.fields()`` and takes a semaphore
per message, which together cost more client CPU than the rest of a task's send.
Here the answer is decoded by a typed msgspec decoder built once, a publish
beyond the bound on pending ones waits its turn (first come, first served, and
its deadline starts when it is published), and one sweeper fails the publishes
whose answer is late.

The connection is handed in (``heddle.broker`` owns it); nothing here imports nats-py.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from typing import Any

import msgspec

from heddle.errors import BrokerError

# How often unanswered publishes are checked against their deadline.
SWEEP_S = 0.5
# nats-server's status for a request nobody answered: no stream takes the subject.
_NO_RESPONDERS = "503"


class PublishAck(msgspec.Struct, frozen=True):
    """What the stream said about a stored message.

    Attributes:
        stream: The stream that stored it.
        seq: Its sequence number there.
        duplicate: True if the stream had it already (same ``Nats-Msg-Id`` within
            the duplicate window) and dropped this copy.
    """

    stream: str = ""
    seq: int = 0
    duplicate: bool = False


class _ApiError(msgspec.Struct):
    code: int = 0
    err_code: int = 0
    description: str = ""


class _Reply(msgspec.Struct):
    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_reply_decoder = msgspec.json.Decoder(_Reply)


class NoStreamAnswered(BrokerError):
    """Raised for a publish no stream answered (nats-server's "no responders"): worth sending again."""


class PubAcks:
    """The pending JetStream publishes of one connection.

    Args:
        max_pending: Most publishes awaiting their answer; a publish beyond it waits
            until one is answered (or times out).
    """

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._prefix = ""
        self._sub: Any = None
        self._tokens = itertools.count()
        self._pending: dict[str, asyncio.Future[PublishAck]] = {}
        self._deadlines: collections.deque[tuple[float, str]] = collections.deque()
        # Publishes waiting for room, in arrival order.
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        # Turns handed to waiting publishes that have not published yet.
        self._granted = 0
        self._sweeper: asyncio.Task[None] | None = None
        # Set once a publish would not have to wait (see room()).
        self._room: asyncio.Future[None] | None = None

    async def start(self, nc: Any) -> None:
        """Subscribe to this connection's reply subjects (nats-py re-subscribes after reconnects).

        ``nc`` is a :class:`heddle.natsclient.Connection`: the answers are handled in its reader.
        """
        self._prefix = nc.new_inbox() + "."
        self._sub = await nc.subscribe_inline(self._prefix + "*", self._on_reply)

    def __len__(self) -> int:
        return len(self._pending)

    async def publish(
        self, nc: Any, subject: str, payload: bytes, headers: dict[str, str] | None, timeout_s: float
    ) -> asyncio.Future[PublishAck]:
        """Publish with a reply subject; the future gets the stream's answer (TimeoutError after ``timeout_s``)."""
        if self._waiting or len(self._pending) >= self.max_pending:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(turn)
            try:
                await turn
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self._granted -= 1
                    self._make_room()  # a turn handed over and not taken passes to the next
                    self._wake_room()
                turn.cancel()
                raise
            self._granted -= 1
        token = format(next(self._tokens), "x")
        fut: asyncio.Future[PublishAck] = asyncio.get_running_loop().create_future()
        # Registered first: nc.publish may yield (a full flush queue), and the answer can
        # come in meanwhile.
        self._pending[token] = fut
        try:
            await nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
        except BaseException:
            del self._pending[token]
            self._make_room()
            self._wake_room()
            raise
        # Deadlines are appended in order, so the expired ones are always at the left.
        self._deadlines.append((time.monotonic() + timeout_s, token))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="heddle-puback-sweep")
        return fut

    def publish_now(
        self, nc: Any, subject: str, payload: bytes, headers: dict[str, str], timeout_s: float
    ) -> asyncio.Future[PublishAck] | None:
        """:meth:`publish` without awaiting: None (nothing sent) when it would have to wait.

        It would wait while the pending publishes are at the bound or others wait for
        room (they go first), and while nats-py cannot take the message at once
        (``nc.publish_now``, :class:`heddle.natsclient.Connection`).
        """
        if self._waiting or self._granted or len(self._pending) >= self.max_pending:
            return None
        token = format(next(self._tokens), "x")
        if not nc.publish_now(subject, payload, self._prefix + token, headers):
            return None
        # The answer cannot come before this returns: it is read by the loop, which is ours.
        fut: asyncio.Future[PublishAck] = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        self._deadlines.append((time.monotonic() + timeout_s, token))
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="heddle-puback-sweep")
        return fut

    def full(self) -> bool:
        """Whether a publish made now would have to wait its turn (:meth:`publish_now` declines)."""
        return bool(self._waiting) or self._granted > 0 or len(self._pending) >= self.max_pending

    async def room(self) -> None:
        """Wait until a publish made now would not have to wait its turn.

        For a sender that holds messages back while the pending publishes are at the
        bound (:class:`heddle.app.Heddle`'s held sends) and then queues them with
        :meth:`publish_now`: one waiter woken by the answers, not a turn per message.
        """
        while self.full():
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._room)

    def _wake_room(self) -> None:
        if self._room is not None and not self.full():
            if not self._room.done():
                self._room.set_result(None)
            self._room = None

    async def settled(self) -> None:
        """Wait until every pending publish is answered or has timed out."""
        while unanswered := [f for f in self._pending.values() if not f.done()]:
            await asyncio.gather(*unanswered, return_exceptions=True)

    def _make_room(self) -> None:
        """Give the free places to the publishes waiting longest."""
        free = self.max_pending - len(self._pending) - self._granted
        while free > 0 and self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                self._granted += 1
                free -= 1

    def _on_reply(self, msg: Any) -> None:
        fut = self._pending.pop(msg.subject[len(self._prefix):], None)
        if self._waiting:
            self._make_room()
        if self._room is not None:
            self._wake_room()
        if fut is None or fut.done():
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            fut.set_exception(NoStreamAnswered(
                "JetStream did not answer: no stream takes the subject, JetStream is not enabled "
                "(`nats-server --jetstream`), or the stream has no leader (a cluster electing one)"
            ))
            return
        try:
            reply = _reply_decoder.decode(msg.data)
        except msgspec.DecodeError:
            fut.set_exception(BrokerError(f"JetStream answered a publish with something else: {msg.data[:200]!r}"))
            return
        if reply.error is not None:
            e = reply.error
            fut.set_exception(BrokerError(
                f"JetStream refused the message: {e.description[:300]} (code {e.code}, err_code {e.err_code})"
            ))
            return
        fut.set_result(PublishAck(reply.stream, reply.seq, reply.duplicate))

    async def _sweep(self) -> None:
        deadlines, pending = self._deadlines, self._pending
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            while deadlines and (deadlines[0][0] <= now or deadlines[0][1] not in pending):
                _, token = deadlines.popleft()
                fut = pending.pop(token, None)
                if fut is not None and not fut.done():
                    fut.set_exception(TimeoutError())
            if self._waiting:
                self._make_room()
            if self._room is not None:
                self._wake_room()

    def close(self) -> None:
        """Stop the sweeper; publishes still unanswered fail with TimeoutError."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(TimeoutError())
        self._pending.clear()
        self._deadlines.clear()
        self._make_room()
        self._wake_room()
