"""Health, readiness and metrics over HTTP for the actors of one process.

``GET /healthz``
    Live: the event loop and every actor's message loop went round within
    ``liveness_timeout_s``. A hung loop fails it, a slow broker does not.
``GET /readyz``
    Ready: every actor has subscribed to its consumers (its ``ready`` event is
    set), NATS is connected, JetStream answers, the actor's consumers exist, and
    Valkey answers. A worker is not ready before its subscription exists, so
    the first messages never go to nobody.
``GET /metrics``
    The Prometheus text format: the task counters and duration histogram of
    :mod:`heddle.metrics`, plus gauges read at scrape time (in-flight tasks,
    consumer pending and ack-pending, actor readiness).

The server runs on an event loop in a thread of its own, so it still answers
when the actors' loop is blocked, and ``/healthz`` can say so. Checks that need
the actors' connections run on the actors' loop with a timeout.

Any actor can be served: it needs ``ready`` (an :class:`asyncio.Event`) and
``last_tick`` (the :func:`time.monotonic` time its message loop last went
round). Optional attributes add checks and gauges:

* ``conns``: its :class:`~heddle.app.Connections` (NATS, JetStream, Valkey checks);
* ``consumers``: ``(stream, durable)`` pairs it consumes (existence checks,
  pending and ack-pending gauges);
* ``inflight``: a sized collection of what it is working on (in-flight gauge);
* ``needs_valkey``: False if it does not use Valkey (default True);
* ``actor_kind`` and ``worker_type``: labels (default: the class name, lower case).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import json
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from heddle import metrics
from heddle.errors import HealthServerError, HeddleError
from heddle.redact import redact as _redact
from heddle.settings import DEFAULT_HEALTH_HOST

if TYPE_CHECKING:
    from heddle.connections import Connections
    from heddle.settings import Settings

log = logging.getLogger("heddle.health")

LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"
METRICS_PATH = "/metrics"
PATHS = (LIVENESS_PATH, READINESS_PATH, METRICS_PATH)

# Where a HealthServer made directly listens; actor processes use HEDDLE_HEALTH_HOST.
DEFAULT_HOST = DEFAULT_HEALTH_HOST
_READ_TIMEOUT_S = 5.0
_JSON = "application/json"


class HealthTarget(Protocol):
    """What the health server needs of an actor (see the module docstring for the optional rest)."""

    ready: asyncio.Event

    @property
    def last_tick(self) -> float: ...


# Any URL-like token: scheme://anything up to a space, quote or closing bracket.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\")\]]+")


def redact(url: str) -> str:
    """``url`` (or a list of URLs) with its secrets replaced by ``***``: :func:`heddle.redact.redact`."""
    return _redact(url)


def redact_text(text: str, url: str) -> str:
    """``text`` with every secret replaced, ``url``'s wherever they occur: :func:`heddle.redact.redact`."""
    return _redact(text, url)


def describe(actor: object) -> str:
    """A short name for an actor in messages: ``worker shop``, ``router``."""
    labels = _labels(actor)
    return f"{labels['actor']} {labels['worker_type']}".strip()


def _labels(actor: object) -> dict[str, str]:
    kind = getattr(actor, "actor_kind", None) or type(actor).__name__.lower()
    return {"actor": str(kind), "worker_type": str(getattr(actor, "worker_type", "") or "")}


async def connection_problems(conns: Connections, timeout_s: float, *, valkey: bool = True) -> list[str]:
    """What keeps these connections from serving: NATS, JetStream, then Valkey (empty if fine)."""
    problems: list[str] = []
    broker = conns.broker
    if not broker.connected:
        problems.append(f"NATS: not connected to {redact(broker.url)} (reconnecting)")
    else:
        try:
            await broker.account_info(timeout_s)
        except HeddleError as exc:
            problems.append(f"JetStream: {exc}")
    if valkey:
        try:
            await asyncio.wait_for(conns.backend.ping(), timeout_s)
        except TimeoutError:
            problems.append(f"Valkey: no answer from {redact(conns.backend.url)} within {timeout_s:g}s")
        except HeddleError as exc:
            problems.append(f"Valkey: {exc}")
    return problems


class HealthServer:
    """Serves ``/healthz``, ``/readyz`` and ``/metrics`` for ``actors`` from a thread of its own.

    Start it from the actors' event loop (:meth:`start`), stop it there (:meth:`stop`).

    Args:
        actors: The actors of this process.
        port: TCP port; 0 takes a free one (see :attr:`port` after start).
        host: Address to listen on (all IPv4 interfaces by default, for kubelet probes).
        liveness_timeout_s: ``/healthz`` fails when a loop has not gone round for this long.
        check_timeout_s: Time each readiness round trip (JetStream, Valkey) may take; a
            whole answer takes at most 2.5 times this, below a 3 s probe timeout by default.
        registry: Metric families rendered on ``/metrics``.
    """

    def __init__(
        self,
        actors: Sequence[HealthTarget],
        *,
        port: int,
        host: str = DEFAULT_HOST,
        liveness_timeout_s: float = 60.0,
        check_timeout_s: float = 1.0,
        registry: metrics.Registry = metrics.REGISTRY,
    ) -> None:
        if liveness_timeout_s <= 0 or check_timeout_s <= 0:
            raise HeddleError("liveness_timeout_s and check_timeout_s must be > 0")
        self.actors = list(actors)
        self.host = host
        self.port = port
        self.liveness_timeout_s = liveness_timeout_s
        self.check_timeout_s = check_timeout_s
        self.registry = registry
        self.draining = False
        self._routes: dict[str, Callable[[], Awaitable[tuple[int, str, bytes]]]] = {
            LIVENESS_PATH: self._liveness_response,
            READINESS_PATH: self._readiness_response,
            METRICS_PATH: self._metrics_response,
        }
        self._beat = time.monotonic()
        self._beat_task: asyncio.Task[None] | None = None
        self._actor_loop: asyncio.AbstractEventLoop | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        return f"<HealthServer http://{self.host}:{self.port} actors={[describe(a) for a in self.actors]}>"

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Listen, from the actors' loop; raise HealthServerError if the port cannot be bound."""
        self._actor_loop = asyncio.get_running_loop()
        self._beat = time.monotonic()
        self._beat_task = self._actor_loop.create_task(self._heartbeat(), name="heddle-health-beat")
        bound: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._serve, args=(bound,), name="heddle-health", daemon=True)
        self._thread.start()
        try:
            self.port = await asyncio.wrap_future(bound)
        except BaseException:
            self._beat_task.cancel()
            raise

    def mark_draining(self) -> None:
        """The actors are shutting down: not ready any more, and live although their loops stop."""
        self.draining = True

    async def stop(self) -> None:
        """Stop serving and join the server thread."""
        if self._beat_task is not None:
            self._beat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat_task
        loop, closing, thread = self._loop, self._closing, self._thread
        if loop is not None and closing is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(closing.set)
        if thread is not None:
            await asyncio.to_thread(thread.join, 10)

    async def _heartbeat(self) -> None:
        # Runs on the actors' loop: if that loop is blocked, the beat goes stale.
        interval = min(1.0, self.liveness_timeout_s / 4)
        while True:
            self._beat = time.monotonic()
            await asyncio.sleep(interval)

    def _serve(self, bound: concurrent.futures.Future[int]) -> None:
        if not bound.set_running_or_notify_cancel():
            return  # start() was cancelled before the thread got going
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._main(loop, bound))
        finally:
            loop.close()

    async def _main(self, loop: asyncio.AbstractEventLoop, bound: concurrent.futures.Future[int]) -> None:
        self._closing = asyncio.Event()
        try:
            server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            bound.set_exception(
                HealthServerError(
                    f"cannot serve /healthz, /readyz and /metrics on {self.host}:{self.port}: "
                    f"{exc.strerror or exc}; choose another port with HEDDLE_HEALTH_PORT or --health-port"
                )
            )
            return
        self._loop = loop
        bound.set_result(int(server.sockets[0].getsockname()[1]))
        try:
            await self._closing.wait()
        finally:
            server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    # -- HTTP --------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            status, ctype, body, method = await self._dispatch(head)
            reason = http.client.responses.get(status, "")
            header = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                f"Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            ).encode("latin-1")
            writer.write(header if method == "HEAD" else header + body)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)

    async def _dispatch(self, head: bytes) -> tuple[int, str, bytes, str]:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, "text/plain", b"bad request\n", ""
        method, target = parts[0], parts[1]
        route = self._routes.get(target.split("?", 1)[0])
        if route is None:
            return 404, "text/plain", f"not found; try {', '.join(PATHS)}\n".encode(), method
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n", method
        status, ctype, body = await route()
        return status, ctype, body, method

    @staticmethod
    def _verdict(problems: list[str], ok: str, extra: dict[str, Any] | None = None) -> tuple[int, str, bytes]:
        # A probe says what is wrong, not where the servers are (the logs do): anyone who
        # can reach the health port reads this, so no URL, redacted or not, goes out.
        doc = {"status": "fail" if problems else ok, "problems": [_URL.sub("the server", p) for p in problems],
               **(extra or {})}
        return (503 if problems else 200), _JSON, (json.dumps(doc) + "\n").encode()

    # -- the checks --------------------------------------------------------------------

    def liveness(self) -> list[str]:
        """What makes this process not live (empty if it is); safe to call from any thread."""
        if self.draining:
            return []
        now = time.monotonic()
        limit = self.liveness_timeout_s
        problems: list[str] = []
        lag = now - self._beat
        if lag > limit:
            problems.append(
                f"the event loop has been blocked for {lag:.1f}s (limit {limit:g}s): something runs "
                f"blocking code on it (a sync call in an async task?)"
            )
        brokers: dict[int, Any] = {}
        for actor in self.actors:
            age = now - actor.last_tick
            if age > limit:
                problems.append(
                    f"{describe(actor)}: its message loop last went round {age:.1f}s ago (limit {limit:g}s)"
                )
            conns = getattr(actor, "conns", None)
            if conns is not None:
                brokers[id(conns.broker)] = conns.broker
        for broker in brokers.values():
            # Reading two attributes another thread sets is safe enough for a probe.
            if broker.lost:
                problems.append(f"NATS: {redact_text(broker.lost, broker.url)}; restart the process")
            elif broker.disconnected_at is not None and now - broker.disconnected_at > limit:
                problems.append(
                    f"NATS: cannot reach {redact(broker.url)} for {now - broker.disconnected_at:.1f}s "
                    f"(limit {limit:g}s)"
                )
        return problems

    async def _liveness_response(self) -> tuple[int, str, bytes]:
        return self._verdict(self.liveness(), "ok")

    async def readiness(self) -> list[str]:
        """What keeps the actors from being ready (empty if they are); runs on the actors' loop."""
        problems: list[str] = []
        nats_ok: dict[int, bool] = {}  # per Connections: actors of one process usually share one
        for actor in self.actors:
            name = describe(actor)
            if not actor.ready.is_set():
                problems.append(f"{name}: not subscribed to its consumers yet")
                continue
            conns: Connections | None = getattr(actor, "conns", None)
            if conns is None:
                continue
            if id(conns) not in nats_ok:
                found = await connection_problems(
                    conns, self.check_timeout_s, valkey=getattr(actor, "needs_valkey", True)
                )
                problems += found
                nats_ok[id(conns)] = not any(p.startswith(("NATS:", "JetStream:")) for p in found)
            if not nats_ok[id(conns)]:
                continue  # the consumer checks would only time out too
            for stream, durable in getattr(actor, "consumers", ()):
                try:
                    await conns.broker.consumer_info(stream, durable, self.check_timeout_s)
                except HeddleError as exc:
                    problems.append(f"{name}: {exc}")
        return problems

    async def _readiness_response(self) -> tuple[int, str, bytes]:
        if self.draining:
            return self._verdict(["shutting down: draining in-flight work"], "ready")
        budget = self.check_timeout_s * 2.5
        problems = await self._on_actor_loop(self.readiness(), budget)
        if problems is None:
            problems = [f"the checks did not finish within {budget:g}s (is the actors' event loop blocked?)"]
        return self._verdict(problems, "ready")

    async def gauges(self) -> list[metrics.Family]:
        """Gauges read at scrape time (runs on the actors' loop)."""
        ready, ages, inflight = [], [], []
        now = time.monotonic()
        consumers: dict[tuple[str, str], Connections] = {}
        for actor in self.actors:
            labels = _labels(actor)
            ready.append((labels, 1.0 if actor.ready.is_set() else 0.0))
            ages.append((labels, max(0.0, now - actor.last_tick)))
            jobs = getattr(actor, "inflight", None)
            if jobs is not None:
                inflight.append((labels, float(len(jobs))))
            conns = getattr(actor, "conns", None)
            if conns is not None and conns.broker.connected:
                for pair in getattr(actor, "consumers", ()):
                    consumers.setdefault(tuple(pair), conns)
        pending, ack_pending = [], []
        for (stream, durable), conns in consumers.items():
            try:
                info = await conns.broker.consumer_info(stream, durable, self.check_timeout_s)
            except HeddleError:
                continue
            labels = {"stream": stream, "consumer": durable}
            pending.append((labels, float(info.num_pending or 0)))
            ack_pending.append((labels, float(info.num_ack_pending or 0)))
        return [
            metrics.gauge("heddle_actor_ready", "1 if the actor has subscribed to its consumers.", ready),
            metrics.gauge(
                "heddle_actor_last_tick_age_seconds", "Seconds since the actor's message loop went round.", ages
            ),
            metrics.gauge("heddle_tasks_in_flight", "Tasks the actor is working on now.", inflight),
            metrics.gauge("heddle_consumer_pending", "Messages waiting in the consumer, not yet delivered.", pending),
            metrics.gauge(
                "heddle_consumer_ack_pending", "Messages delivered by the consumer and not yet acked.", ack_pending
            ),
        ]

    async def _metrics_response(self) -> tuple[int, str, bytes]:
        families = self.registry.families()
        gauges = await self._on_actor_loop(self.gauges(), self.check_timeout_s * 2.5)
        return 200, metrics.CONTENT_TYPE, metrics.render([*families, *(gauges or [])])

    async def _on_actor_loop(self, coro: Any, timeout_s: float) -> Any:
        """Run ``coro`` on the actors' loop; None if that loop is gone or does not answer in time."""
        loop = self._actor_loop
        if loop is None or loop.is_closed():
            coro.close()
            return None
        try:
            fut = asyncio.run_coroutine_threadsafe(coro, loop)
        except RuntimeError:
            coro.close()
            return None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout_s)
        except TimeoutError:
            fut.cancel()
            return None


async def start_health_server(
    actors: Sequence[HealthTarget], settings: Settings, port: int | None = None, host: str | None = None
) -> HealthServer | None:
    """Start the health server of an actor process, on ``port`` or ``settings.health_port``.

    It listens on ``host``, else ``settings.health_host`` (``HEDDLE_HEALTH_HOST``).

    Returns None (and serves nothing) when neither names a port.

    Raises:
        HealthServerError: The port cannot be bound (in use, not permitted).
    """
    port = settings.health_port if port is None else port
    if port is None:
        return None
    host = settings.health_host if host is None else host
    server = HealthServer(actors, port=port, host=host, liveness_timeout_s=settings.liveness_timeout_s)
    await server.start()
    log.info("health server on http://%s:%d (%s)", host, server.port, " ".join(PATHS))
    return server


def probe(port: int, *, ready: bool = False, host: str = "127.0.0.1", timeout_s: float = 3.0) -> tuple[bool, str]:
    """Ask a health server whether its process is live (or ready); ``(ok, what it said)``.

    This is what ``heddle healthcheck`` runs: plain blocking ``http.client``,
    so a probe costs no event loop.
    """
    path = READINESS_PATH if ready else LIVENESS_PATH
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
    except ConnectionRefusedError:
        return False, (
            f"nothing listens on {host}:{port}; is the actor running, with HEDDLE_HEALTH_PORT={port}?"
        )
    except TimeoutError:
        return False, f"no answer from {host}:{port}{path} within {timeout_s:g}s"
    except (OSError, http.client.HTTPException) as exc:
        return False, f"cannot ask {host}:{port}{path}: {exc!r}"
    finally:
        conn.close()
    try:
        doc = json.loads(body)
        problems = [str(p) for p in doc.get("problems", [])]
        said = "; ".join(problems) if problems else str(doc.get("status", ""))
    except (ValueError, AttributeError):
        said = body[:200].decode(errors="replace").strip()
    ok = resp.status == 200
    return ok, f"{path} {resp.status}: {said}"
