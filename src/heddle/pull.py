"""Pulling from a durable consumer: :class:`Puller` (one pull request open at a time) and
:class:`Feed` (the consumer an actor's loop pulls from, re-bound when stale).

Part of the transport with :mod:`heddle.broker`: the only other module that
touches nats-py. ``Puller`` relies on nats-py 2.16's subscription internals and
:func:`ack_now` on its message's; ``tests/test_fetch.py`` pins them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext, api

from heddle.broker import Broker
from heddle.errors import BrokerError
from heddle.natsclient import Connection, translate
from heddle.redact import redact

log = logging.getLogger("heddle.broker")


class Puller:
    """A pull subscription on a durable consumer whose :meth:`fetch` never sits on a message.

    Not nats-py's ``PullSubscription.fetch(batch > 1)``: when its first, no-wait
    pull request is refused with "408 Requests Pending" (another replica's
    request is waiting for the pending messages; routine when two processes share
    a consumer) or is answered by a status an earlier request left in the shared
    inbox, it falls back to a plain pull for ``batch`` messages and returns only
    once ``batch`` have arrived or the request expires; it also waits out the
    timeout whenever its request stays open after the first messages (MaxAckPending
    reached). Messages that arrive meanwhile wait in the client: the ~1 s stalls
    before a burst of deliveries (a router held ~220 tasks for 0.95 s). It can
    raise a bare ``TimeoutError`` that looks like a broken consumer, and takes
    "409 Consumer Deleted" for "no messages yet".

    Here at most one pull request is open at a time: it asks for the free slots
    and stays open until they are filled or it expires (the fetch timeout, 1 s
    for the actors), and :meth:`fetch` returns as soon as one message is in, with
    whatever else has arrived. A request still open when a fetch returns is taken
    over by the next fetch rather than doubled, so a worker never has more
    messages coming than the slots it asked for, and a worker taking one task at
    a time sends no pull request per task (nor does the server end one per task
    with a status): two messages fewer per task than one-shot (``no_wait``)
    requests, and about a tenth off a lone task's round trip (docs/benchmarks.md).
    """

    def __init__(self, psub: JetStreamContext.PullSubscription, durable: str, url: str) -> None:
        self.psub = psub
        self.durable = durable
        self._url = url
        self._sub = psub._sub
        self._queue: asyncio.Queue[Msg] = psub._sub._pending_queue
        self._next_subject = psub._nms
        self._inbox = psub._deliver
        # The open pull request: messages it may still deliver (0: none open), and
        # when to stop expecting its closing status (lost in a reconnect, say).
        self._open = 0
        self._open_until = 0.0
        # An error status found while collecting messages, raised by the next fetch.
        self._failed: BrokerError | None = None

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """Up to ``batch`` messages, as soon as there is one; ``[]`` after ``timeout_s`` without any.

        Raises:
            BrokerError: The server refused the pull (e.g. the consumer was deleted);
                re-bind the consumer.
        """
        try:
            return await self._fetch(batch, timeout_s)
        except (BrokerError, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise translate(exc, self._url, f"pulling from consumer {self.durable}") from exc

    async def _fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        msgs = self._take(batch)
        if msgs:
            return msgs
        if self._failed is not None:
            failed, self._failed = self._failed, None
            raise failed
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            now = loop.time()
            if now >= deadline:
                return []
            if not self._open or now >= self._open_until:
                await self._request(batch, timeout_s)
            try:
                async with asyncio.timeout_at(min(deadline, self._open_until)):
                    msg = await self._queue.get()
            except TimeoutError:
                continue
            self._taken(msg)
            status = _status(msg)
            if status is None:
                self._open = max(0, self._open - 1)
                return [msg, *self._take(batch - 1)]
            self._end(msg, status)
            if self._failed is not None:
                failed, self._failed = self._failed, None
                raise failed
            if status == api.StatusCode.REQUEST_TIMEOUT and _description(msg) == "Requests Pending":
                # Other requests (another replica's) are waiting for every pending
                # message: ask again shortly, after they have taken them.
                await asyncio.sleep(min(_PENDING_RETRY_S, max(0.0, deadline - loop.time())))

    async def _request(self, batch: int, expires_s: float) -> None:
        req = b'{"batch":%d,"expires":%d}' % (batch, int(expires_s * 1e9))
        await self.psub._nc.publish(self._next_subject, req, reply=self._inbox)
        self._open = batch
        self._open_until = asyncio.get_running_loop().time() + expires_s + _REQUEST_GRACE_S

    def _take(self, n: int) -> list[Msg]:
        """Messages already delivered, without waiting; statuses close the open request."""
        msgs: list[Msg] = []
        queue = self._queue
        while len(msgs) < n and not queue.empty():
            msg = queue.get_nowait()
            self._taken(msg)
            status = _status(msg)
            if status is None:
                msgs.append(msg)
            else:
                self._end(msg, status)
        self._open = max(0, self._open - len(msgs))
        return msgs

    def _taken(self, msg: Msg) -> None:
        # The bookkeeping nats-py's own next_msg() does: the pending size feeds its
        # slow-consumer limit, and Subscription.drain() joins the queue.
        self._sub._pending_size -= len(msg.data)
        self._queue.task_done()

    def _end(self, msg: Msg, status: str) -> None:
        """A status message: the request it answers is over; keep an error for the caller."""
        if status == api.StatusCode.CONTROL_MESSAGE:  # an idle heartbeat: the request goes on
            return
        self._open = 0
        # 408 is "Request Timeout" (expired) or "Requests Pending" (refused).
        if status not in (api.StatusCode.NO_MESSAGES, api.StatusCode.REQUEST_TIMEOUT):
            self._failed = BrokerError(
                redact(
                    f"nats-server at {redact(self._url)} refused a pull from consumer {self.durable}: "
                    f"{status} {_description(msg)}",
                    self._url,
                )
            )

    async def close(self) -> None:
        """Unsubscribe, and nak what was delivered but never fetched so it is redelivered at once."""
        with contextlib.suppress(Exception):
            await self.psub.unsubscribe()
        for msg in self._take(self._queue.qsize()):
            with contextlib.suppress(Exception):
                await msg.nak()


class Feed:
    """The durable consumer an actor's loop pulls from, bound again whenever it may be stale.

    One for the worker, the router and the orchestrator. After a reconnect (pull
    requests in flight are gone, and a restarted server may have lost the
    consumer) and after any failed pull, the next :meth:`fetch` re-creates the
    streams and the consumer and binds a new :class:`Puller`. A failed pull is
    logged and waited out (``backoff_s``, or until ``stop`` is set), never
    raised: a bad moment on the server never ends an actor's loop.

    Args:
        broker: The connected broker.
        ensure: Creates or updates the consumer; returns ``(durable, stream)``.
        stop: The actor's stop event (cuts a back-off short).
        what: What is fetched, for log lines ("tasks", "goals").
        backoff_s: How long to wait after a failed pull.
    """

    def __init__(
        self,
        broker: Broker,
        ensure: Callable[[], Awaitable[tuple[str, str]]],
        stop: asyncio.Event,
        what: str,
        backoff_s: float = 0.5,
    ) -> None:
        self.broker = broker
        self._ensure = ensure
        self._stop = stop
        self.what = what
        self.backoff_s = backoff_s
        self.durable = ""
        self._puller: Puller | None = None
        self._stale = False

    async def start(self) -> None:
        """Bind the first time, and follow reconnects; errors here are raised (fail fast at start)."""
        await self._bind()
        self.broker.on_reconnect(self._on_reconnect)

    async def _on_reconnect(self) -> None:
        self._stale = True

    async def _bind(self) -> Puller:
        old, self._puller = self._puller, None
        if old is not None:
            await old.close()
        self.durable, stream = await self._ensure()
        psub = await self.broker.pull_subscribe(self.durable, stream)
        self._puller = puller = Puller(psub, self.durable, self.broker.url)
        return puller

    async def fetch(self, batch: int, timeout_s: float) -> list[Msg]:
        """Up to ``batch`` messages as soon as there is one; ``[]`` after a timeout or a failed pull."""
        try:
            puller = self._puller
            if self._stale or puller is None:
                self._stale = False
                await self.broker.ensure_streams()
                puller = await self._bind()
                log.warning("re-bound pull consumer %s", self.durable)
            return await puller.fetch(batch, timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "fetching %s failed (%s); retrying in %.1fs",
                self.what,
                redact(repr(exc), self.broker.url),
                self.backoff_s,
            )
            self._stale = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.backoff_s)
            return []

    async def close(self) -> None:
        """Unsubscribe; what was delivered but never fetched is nak'd for redelivery."""
        if self._puller is not None:
            await self._puller.close()


# A pull request whose closing status has not come this long after it expired is
# taken to be gone (its connection dropped, say).
_REQUEST_GRACE_S = 0.5
# After "408 Requests Pending", how long before asking again.
_PENDING_RETRY_S = 0.02


def ack_now(msg: Msg) -> bool:
    """Ack a delivered message in the caller's step, as ``await msg.ack()`` would; False if it must be awaited.

    The ack (an empty message on the delivery's reply subject) is queued for the
    connection's flusher like any other publish, in order with them. False, with
    nothing sent, for a message already acknowledged or without a reply subject
    (``msg.ack()`` raises what is wrong), or while the connection cannot take it at once.
    """
    nc = msg._client
    if msg._ackd or not msg.reply or not isinstance(nc, Connection) or not nc.publish_core_now(msg.reply, b""):
        return False
    msg._ackd = True
    return True


def _status(msg: Msg) -> str | None:
    """The status code of a pull-request status message; None for a stream message."""
    headers = msg.headers
    # A status from the server comes with no reply subject; a stream message always has
    # one (its ack subject), so a user's own "Status" header is never taken for one.
    if headers is None or msg.reply:
        return None
    return headers.get(api.Header.STATUS)


def _description(msg: Msg) -> str:
    return (msg.headers or {}).get(api.Header.DESCRIPTION, "").strip()


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class SubjectReader:
    """Every message stored on one subject of a limits stream, from the first, in order.

    An ordered consumer (ephemeral, in memory, flow-controlled; nats-py re-creates
    it from the next sequence if a delivery goes missing): a reader that opens
    after the writer began still gets every message the stream holds, then each
    new one as it is stored. A token stream's reader (:mod:`heddle.chunks`).

    Args:
        broker: A connected broker.
        stream: The stream.
        subject: The one subject to read.
    """

    def __init__(self, broker: Broker, stream: str, subject: str) -> None:
        self._broker = broker
        self.stream = stream
        self.subject = subject
        self._sub: Any = None
        #: Stream sequence of the last message returned (0: none yet).
        self.last_seq = 0

    def _js(self) -> JetStreamContext:
        if self._broker.js is None:
            raise BrokerError("broker is not connected; call connect() first")
        return self._broker.js

    async def open(self) -> None:
        """Create the consumer and start the deliveries."""
        try:
            self._sub = await self._js().subscribe(
                self.subject, stream=self.stream, ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.ALL, inactive_threshold=10.0,
            )
        except Exception as exc:
            raise translate(exc, self._broker.url, f"reading {self.subject} from {self.stream}") from exc

    async def next(self) -> bytes:
        """The next message's payload; waits until one is stored."""
        try:
            msg = await self._sub.next_msg(timeout=None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise translate(exc, self._broker.url, f"reading {self.subject} from {self.stream}") from exc
        self.last_seq = msg.metadata.sequence.stream
        data: bytes = msg.data
        return data

    async def stored_until(self) -> int:
        """Stream sequence of the newest message stored on the subject (0: none)."""
        try:
            raw = await self._js().get_last_msg(self.stream, self.subject)
        except nats.js.errors.NotFoundError:
            return 0
        except Exception as exc:
            raise translate(exc, self._broker.url, f"reading the last message on {self.subject}") from exc
        return int(raw.seq or 0)

    async def close(self) -> None:
        """Stop the deliveries (the server drops the consumer once it is unused)."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
