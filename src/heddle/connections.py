"""One event loop's connections: NATS (:mod:`heddle.broker`) and Valkey (:mod:`heddle.store`),
with the services every actor and client shares on them (result watches, the audit log).

Actors, the CLI and the Workshop are handed a :class:`Connections`; the send path, result
handles and graphs reach theirs through a :class:`Client` (an app).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, NamedTuple, Protocol, TypeVar

from heddle import names
from heddle.audit import SubmissionLog
from heddle.broker import Broker
from heddle.errors import HeddleError
from heddle.messages import REVOKED, ResultRecord, RevokeNotice, encoder
from heddle.notices import Watch, Watches
from heddle.registry import Registry
from heddle.routes import Routes
from heddle.settings import Settings
from heddle.store import ResultBackend, StoreRequest, encode_record

T = TypeVar("T")
log = logging.getLogger("heddle.connections")

# Result-notice subscriptions made at send time and never waited on are dropped
# beyond this many per connection, oldest first, so a fire-and-forget producer
# does not grow without bound (heddle.notices.Watches).
MAX_WATCHES = 50_000
# After the workers bucket could not be read, tasks go through the router for this long
# before a send tries to follow the bucket again.
ROUTES_RETRY_S = 5.0


def client_name(app_name: str) -> str:
    """The connection name nats-server shows for a process of app ``app_name``."""
    return f"heddle-{app_name}@{socket.gethostname()}:{os.getpid()}"


class Connections:
    """One NATS connection and one Valkey pool, bound to one event loop."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.broker = Broker(settings, name)
        self.backend = ResultBackend(settings)
        self.watches = Watches(self.broker, self.backend, MAX_WATCHES)
        self.submissions = SubmissionLog(self.backend)
        self.broker.spill = self.backend.keep_payload
        self._streams_ready = False
        self._creating_streams: asyncio.Future[None] | None = None
        self._routes: asyncio.Future[Routes | None] | None = None

    async def start(self) -> None:
        """Connect both; close what was opened if either fails."""
        await self.broker.connect()
        try:
            await self.backend.connect()
        except BaseException:
            await self.broker.close()
            raise

    async def ensure_streams(self) -> None:
        """Create the streams once per connection.

        Callers that come while it is being done wait for that one creation (a burst of
        sends before the connection opened makes one set of requests, not one per send);
        after a failure the next call tries again.
        """
        if self._streams_ready:
            return
        creating = self._creating_streams
        if creating is None or (creating.done() and (creating.cancelled() or creating.exception() is not None)):
            creating = self._creating_streams = asyncio.ensure_future(self.broker.ensure_streams())
        await asyncio.shield(creating)
        self._streams_ready = True

    async def ready_to_send(self) -> None:
        """Make what a send in its caller's step needs (:meth:`send_now`): the streams, the routes
        when tasks go directly to their workers, and the result-notice subscription."""
        await self.ensure_streams()
        if self.broker.settings.direct_routing:
            await asyncio.shield(self._following())
        await self.watches.listen()

    async def route(self, subject: str, headers: dict[str, str]) -> str:
        """Where to publish a task for ``heddle.tasks.incoming``: its worker's subject when it can go directly.

        With ``direct_routing`` on, the first call starts following the workers bucket
        (:mod:`heddle.routes`); ``headers`` get the routed headers when the task goes directly.
        """
        if not self.broker.settings.direct_routing:
            return subject
        following = self._following()
        if following.done() and not following.cancelled() and following.exception() is None:
            routes = following.result()  # every send after the first: no shield, no extra future
        else:
            routes = await asyncio.shield(following)
        return routes.route(subject, headers) if routes is not None else subject

    async def worker_type_alive(self, worker_type: str) -> bool | None:
        """Whether a worker of ``worker_type`` is alive now (None: cannot tell).

        Read from the workers bucket the direct routes follow; without direct routing
        (per-role NATS users, who may not read the bucket) it cannot tell.
        """
        if not self.broker.settings.direct_routing:
            return None
        try:
            routes = await asyncio.wait_for(asyncio.shield(self._following()), 5)
        except (TimeoutError, HeddleError):
            return None
        return None if routes is None else worker_type in routes.registry.tiers

    def _following(self) -> asyncio.Future[Routes | None]:
        """The routes from the workers bucket, followed from the first call on (started once)."""
        if self._routes is None:
            self._routes = asyncio.ensure_future(self._start_routes())
        return self._routes

    async def _start_routes(self) -> Routes | None:
        registry = Registry(self.broker)
        try:
            await registry.start()
        except HeddleError as exc:
            await registry.stop()
            log.warning("cannot follow the live workers (%s); tasks go through the router, and a send "
                        "tries again in %.0fs", exc, ROUTES_RETRY_S)
            asyncio.get_running_loop().call_later(ROUTES_RETRY_S, self._forget_routes, self._routes)
            return None
        return Routes(registry, self.broker.settings.default_tier)

    def _forget_routes(self, failed: asyncio.Future[Routes | None] | None) -> None:
        """Let the next send follow the workers bucket again (``failed`` could not)."""
        if self._routes is failed:
            self._routes = None

    def send_now(self, task_id: str, subject: str, payload: bytes, headers: dict[str, str]) -> SendNow | None:
        """Send a task without awaiting, when nothing needs waiting for; else None, and nothing is sent.

        Does what :func:`heddle.send.publish` does (watch, audit, route, publish) in the
        caller's own step: a loop of sends that never yields (``[t.apply_async() for
        ...]``) reaches the server while it runs. ``headers`` are left as they are.
        """
        if not self._streams_ready:
            return None
        routes: Routes | None = None
        if subject == names.INCOMING_SUBJECT and self.broker.settings.direct_routing:
            following = self._routes
            if following is None or not following.done() or following.cancelled() or following.exception():
                return None
            routes = following.result()
        watch = self.watches.expect_now(task_id)
        if watch is None:
            return None
        headers = self.ask_for_notice(dict(headers))
        if routes is not None:
            subject = routes.route(subject, headers)
        sent = self.broker.publish_now(subject, payload, headers, on_stored=watch.stored)
        if sent is None:
            return None
        self.submissions.record(task_id)
        return SendNow(watch, sent)

    def ask_for_notice(self, headers: dict[str, str]) -> dict[str, str]:
        """``headers`` with the ones asking for this connection's result notice (NATS, and Valkey while followed)."""
        headers[names.HDR_NOTIFY] = self.watches.token
        if self.watches.on_valkey:
            headers[names.HDR_NOTIFY_VALKEY] = "1"
        return headers

    async def watch(self, task_id: str) -> Watch:
        """Subscribe to the result notice of a task sent elsewhere."""
        return await self.watches.watch(task_id)

    async def expect(self, task_id: str) -> Watch:
        """Watch the result of a task this connection sends with ``Heddle-Notify: {notice_token}``."""
        return await self.watches.expect(task_id)

    @property
    def notice_token(self) -> str:
        """The ``Heddle-Notify`` token of this connection's sends."""
        return self.watches.token

    def release_watch(self, task_id: str) -> None:
        """Stop watching a task's result notice (its result is read some other way)."""
        self.watches.release(task_id)

    async def store_final(self, record: ResultRecord, sender: str = names.NO_SENDER, channel: str = "") -> bool:
        """Store a final (or RETRY) record unless a final one is there, then announce it.

        The one path for every actor that ends a task: worker, router, orchestrator,
        revoke. ``sender`` and ``channel`` say where the task's message asked for its
        notice (:func:`heddle.names.notice_route`): a sender that follows Valkey is told
        there by the store itself (and handles elsewhere on the task's channel), so no
        NATS notice is sent. Returns False (and announces nothing) if a final state was
        stored first.
        """
        data = encode_record(record)
        if not await self.backend.store(StoreRequest(record.id, record.state, data, channel=channel)):
            return False
        if not self.told_by_store(channel):
            await self.notify(record.id, data, sender)
        return True

    def told_by_store(self, channel: str) -> bool:
        """Whether storing a final record with ``channel`` announced it (on Valkey): then no other notice is due."""
        return bool(channel) and self.backend.announces

    async def notify(self, task_id: str, record: bytes, sender: str = names.NO_SENDER, channel: str = "") -> None:
        """Announce a stored final record to whoever waits on it (heddle.notices).

        ``sender`` is the notice token the task was sent with (its connection follows
        ``heddle.results.{sender}.>``); handles on tasks sent elsewhere follow
        ``heddle.results.*.{id}``, so one notice reaches both. A sender that follows
        ``channel`` on Valkey is told there instead, and handles elsewhere on the task's
        channel (a store script tells them as it stores; this is for a record stored
        before, such as a duplicate's): then no NATS notice is sent.

        A record too large for one NATS message is announced empty: waiters read the
        store. Never raises: the record is stored, and waiters re-read the store when a
        notice is lost, so a failed notice costs latency, not the result.
        """
        if self.told_by_store(channel):
            try:
                await self.backend.announce(channel, task_id, record)
                return
            except HeddleError as exc:
                log.warning("could not announce the result of task %s on Valkey (%s); trying NATS", task_id, exc)
        subject = names.notice_subject(sender, task_id)
        try:
            if len(record) + 1024 > self.broker.max_payload:
                record = b""
            await self.broker.publish_core(subject, record)
        except HeddleError as exc:
            log.warning("could not announce the result of task %s (%s); waiters will read it from Valkey",
                        task_id, exc)

    async def revoke(self, task_id: str, task_name: str = "") -> None:
        """Store REVOKED (a pending task never runs) and tell workers (a running one is cancelled)."""
        now = time.time()
        # A task this connection sent is announced on its own notice subscription.
        sender, channel = names.NO_SENDER, ""
        if self.watches.get(task_id) is not None:
            sender = self.watches.token
            channel = names.notice_channel(sender) if self.watches.on_valkey else ""
        await self.store_final(ResultRecord(id=task_id, state=REVOKED, task=task_name, finished_at=now),
                               sender, channel)
        await self.broker.publish_core(names.REVOKE_SUBJECT, encoder.encode(RevokeNotice(id=task_id)))
        await self.broker.flush()

    async def close(self) -> None:
        """Close both connections."""
        await self.submissions.close()
        await self.watches.close()
        if self._routes is not None:
            routes = None
            with contextlib.suppress(BaseException):
                routes = await asyncio.wait_for(asyncio.shield(self._routes), 2)
            if routes is not None:
                await routes.registry.stop()
        await self.backend.close()
        await self.broker.close()


class SendNow(NamedTuple):
    """A send made by :meth:`Connections.send_now`: its result's watch, and its publish's ack to come."""

    watch: Watch
    sent: asyncio.Future[Any]


class TracksSend(Protocol):
    """A result handle that waits for its own publish (``AsyncResult``)."""

    def track_send(self, sending: Any) -> None: ...

    def for_thread(self) -> None: ...


class Client(Protocol):
    """What the send path, result handles and graphs need from an app (:class:`heddle.Heddle` is one).

    It names the app's settings and tasks, gives the connections of the running
    loop, and runs coroutines for sync callers.
    """

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> Settings: ...

    @property
    def worker_type(self) -> str: ...

    @property
    def tasks(self) -> Mapping[str, Any]: ...

    async def connections(self) -> Connections:
        """The connections bound to the running loop, connecting on first use."""
        ...

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` for a sync caller and block until it is done."""
        ...

    async def aclose(self) -> None:
        """Close the connections of the running loop."""
        ...

    def refuse_blocking_in_loop(self, what: str, instead: str) -> None:
        """Raise if a blocking call is made from a running event loop."""
        ...

    def dispatch(
        self,
        result: TracksSend,
        now: Callable[[Connections], asyncio.Future[Any] | None],
        send: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        """Send a task: queued in the caller's step where it can be, else run to the end (sync callers wait).

        ``now`` queues it on open connections without awaiting (None: it must wait);
        ``send`` makes the coroutine that sends it the full way.
        """
        ...


__all__ = ["MAX_WATCHES", "Client", "Connections", "SendNow", "TracksSend", "client_name"]
