"""The Workshop actor: follows events, serves the web UI with uvicorn on its own loop.

It is an actor like the others (``ready``, ``last_tick``, ``run()``,
``request_stop()``), so ``heddle dev`` hosts it next to the worker and the
health server probes it. The web app itself is in :mod:`heddle.workshop.web`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from heddle import events, names
from heddle.app import Heddle
from heddle.connections import Connections
from heddle.errors import ConfigError, HeddleError
from heddle.registry import Registry
from heddle.workshop.state import RecentTasks, Throughput

log = logging.getLogger("heddle.workshop")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
TOKEN_ENV = "HEDDLE_WORKSHOP_TOKEN"
_TICK_S = 2.0


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to serve beyond loopback without a token, or with a short one.

    :class:`Workshop` makes a token before this check when none is given, so
    it is the given token's length that stops it there.

    Raises:
        ConfigError: ``host`` is not loopback and no token is set, or the token is too short.
    """
    if not is_loopback(host) and not token:
        raise ConfigError(
            f"the Workshop would listen on {host}, beyond this machine, without a token; set "
            f"{TOKEN_ENV} to a long random secret (e.g. `export {TOKEN_ENV}=$(openssl rand -hex 24)`) "
            f"or bind to 127.0.0.1"
        )
    if token is not None and len(token) < 16:
        raise ConfigError(f"{TOKEN_ENV} is too short ({len(token)} characters); use at least 16 random characters")


class Workshop:
    """The Workshop web UI as an actor.

    Args:
        app: App whose settings reach NATS and Valkey (default ``Heddle("workshop")``).
        host: Address to listen on (loopback by default).
        port: TCP port; 0 takes a free one (see :attr:`port` once ready).
        token: Access token; default ``$HEDDLE_WORKSHOP_TOKEN``. Beyond loopback, when
            neither is given, the Workshop makes one (:attr:`token_generated`) and logs
            its login URL once it serves: a pod started without the Secret's key still
            starts, and whoever can read its log can log in.
        session_ttl_s: How long the signed session cookie a browser gets for the token lasts.
        config_dirs: Where YAML worker configs and pipelines are found (default ``configs/``).
        max_tasks: How many recent tasks are remembered.
        eval_db: SQLite file of the Evaluate page's runs (default ``.heddle/workshop.sqlite3``
            under the current directory, created on first use).
    """

    actor_kind = "workshop"

    def __init__(
        self,
        app: Heddle | None = None,
        *,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        token: str | None = None,
        session_ttl_s: float | None = None,
        config_dirs: list[Path] | None = None,
        max_tasks: int = 2000,
        eval_db: Path | None = None,
        port_flag: str = "--port",
        fallback_port: bool = False,
    ) -> None:
        token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
        # Beyond loopback a token is a must. Rather than refuse to start (a Kubernetes
        # Secret holding only the API key would leave the pod crash-looping), make one as
        # strong as `openssl rand` would, valid for this process only; run() logs the
        # login URL. A token that was given but is too short is still refused.
        self.token_generated = token is None and not is_loopback(host)
        if self.token_generated:
            token = secrets.token_urlsafe(32)
        check_bind(host, token)
        from heddle.workshop.web import DEFAULT_SESSION_TTL_S, Sessions, build_app

        ttl_s = DEFAULT_SESSION_TTL_S if session_ttl_s is None else session_ttl_s
        if not 0 < ttl_s < float("inf"):
            raise ConfigError(f"session_ttl_s must be a positive number of seconds, not {session_ttl_s!r}")
        self.app = app or Heddle("workshop")
        self.host = host
        self.port = port
        # The option that sets the port, named when it is busy; with fallback_port a busy
        # port is traded for a free one (heddle dev beside another heddle dev).
        self.port_flag = port_flag
        self.fallback_port = fallback_port
        self._sock: socket.socket | None = None
        self.token = token
        # Browsers hold a signed, expiring session, never the token (see web.Sessions).
        self.sessions = Sessions(token, ttl_s) if token else None
        self.csrf_token = secrets.token_urlsafe(32)
        self.config_dirs = config_dirs if config_dirs is not None else [Path("configs")]
        self.eval_db = (eval_db if eval_db is not None else Path(".heddle") / "workshop.sqlite3").absolute()
        # Awaited once serving has stopped, before the connections close (page modules'
        # background work, e.g. evaluation runs, ends there).
        self.stop_hooks: list[Callable[[], Awaitable[None]]] = []
        self.ready = asyncio.Event()
        self.conns: Connections | None = None
        self.recent = RecentTasks(max_tasks)
        self.throughput = Throughput()
        self.workers_seen: dict[str, tuple[float, dict[str, Any]]] = {}
        self.registry: Registry | None = None
        self.clients: set[asyncio.Queue[tuple[str, str]]] = set()
        self.stopping = asyncio.Event()
        self._last_tick = time.monotonic()
        self._server: Any = None
        self._sub: Any = None
        self.asgi = build_app(self)

    def __repr__(self) -> str:
        return f"<Workshop http://{self.host}:{self.port}>"

    @property
    def last_tick(self) -> float:
        """Monotonic time the Workshop's tick loop last went round."""
        return self._last_tick

    @property
    def url(self) -> str:
        """Where the Workshop is served."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def login_url(self) -> str:
        """The URL that logs a browser in: :attr:`url` with ``/?token=`` (the token itself: a secret)."""
        return f"{self.url}/?token={self.token}" if self.token else f"{self.url}/"

    def _announce_generated_token(self) -> None:
        # The one place the Workshop shows its token, on purpose: nobody else knows it.
        # Logged once, as a warning, so it shows at every log level and is easy to find.
        where = (f" (with the address you reach this Workshop at in place of {self.url}, e.g. its "
                 f"Kubernetes Service's)" if self.host in ("0.0.0.0", "::") else "")
        log.warning(
            "no %s set, so this Workshop made a login token for this process (a new one at every start; "
            "set %s to keep one). SECRET, keep this line private: log in at %s%s",
            TOKEN_ENV, TOKEN_ENV, self.login_url(), where,
        )

    def request_stop(self) -> None:
        """Stop serving (safe from a signal handler)."""
        self.stopping.set()
        if self._server is not None:
            self._server.should_exit = True

    # -- events -----------------------------------------------------------------------------

    async def _on_event(self, msg: Any) -> None:
        ev = events.describe(msg.subject, msg.data)
        if ev is None:
            return
        kind = ev["kind"]
        if kind == "task":
            self.recent.add(ev)
            self.throughput.add(ev["state"], ev.get("at"))
            self.broadcast("task", ev["id"])
        elif kind == "worker":
            if ev["state"] == events.OFFLINE:
                self.workers_seen.pop(ev["id"], None)
            else:
                self.workers_seen[ev["id"]] = (time.time(), ev)
        elif kind == "goal":
            self.broadcast("goal", ev["id"])
        elif kind == "llm":
            entry = self.recent.get(ev["id"])
            if entry is not None:
                entry.input_tokens = max(entry.input_tokens, ev.get("input_tokens", 0))
                entry.output_tokens = max(entry.output_tokens, ev.get("output_tokens", 0))

    def broadcast(self, event: str, data: str) -> None:
        """Send one SSE message to every connected page (dropped for a page that is far behind)."""
        for q in list(self.clients):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait((event, data))

    @contextlib.contextmanager
    def client(self) -> Iterator[asyncio.Queue[tuple[str, str]]]:
        """A queue of SSE messages for one page, for as long as it is connected."""
        q: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=1000)
        self.clients.add(q)
        try:
            yield q
        finally:
            self.clients.discard(q)

    # -- running ------------------------------------------------------------------------------

    def bind(self) -> socket.socket:
        """Take the port now (before the URL is shown); :meth:`run` serves on it.

        Raises:
            HeddleError: The port is taken (or not allowed), and no other may be used.
        """
        if self._sock is not None:
            return self._sock
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            busy = self.port
            if not self.fallback_port:
                sock.close()
                raise HeddleError(
                    f"the Workshop cannot listen on {self.host}:{busy}: {exc.strerror or exc}; "
                    f"choose another port with {self.port_flag}"
                ) from None
            sock.bind((self.host, 0))
            log.warning("port %d is taken (another heddle dev?); the Workshop listens on port %d instead "
                        "(%s chooses one)", busy, sock.getsockname()[1], self.port_flag)
        sock.listen(128)
        sock.setblocking(False)
        self.port = int(sock.getsockname()[1])
        self._sock = sock
        return sock

    async def run(self) -> None:
        """Follow events, serve the UI until :meth:`request_stop`, then close."""
        import uvicorn

        class _Server(uvicorn.Server):
            # The hosting process owns SIGINT/SIGTERM (heddle dev drains every actor).
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        sock = self.bind()
        conns = await self.app.connections()
        self.conns = conns
        try:
            await conns.ensure_streams()
            self._sub = await conns.broker.subscribe(names.EVENTS_ALL, cb=self._on_event)
            self.registry = Registry(conns.broker)
            await self.registry.start()
            await conns.broker.flush()
            config = uvicorn.Config(
                self.asgi, log_level="warning", lifespan="off", timeout_graceful_shutdown=2,
                access_log=False, server_header=False,
            )
            self._server = _Server(config)
            if self.stopping.is_set():
                self._server.should_exit = True
            serving = asyncio.ensure_future(self._server.serve(sockets=[sock]))
            ticker = asyncio.ensure_future(self._tick())
            try:
                while not self._server.started and not serving.done():
                    await asyncio.sleep(0.02)
                if self._server.started:
                    self.ready.set()
                    log.info("workshop on %s", self.url)
                    if self.token_generated:
                        self._announce_generated_token()
                await serving
            finally:
                self.stopping.set()
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
                for hook in self.stop_hooks:
                    try:
                        await hook()
                    except Exception:
                        log.exception("a Workshop stop hook failed")
        finally:
            sock.close()
            if self.registry is not None:
                await self.registry.stop()
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await self._sub.unsubscribe()
            await self.app.aclose()

    async def _tick(self) -> None:
        while True:
            self._last_tick = time.monotonic()
            self.broadcast("tick", str(int(time.time())))
            await asyncio.sleep(_TICK_S)
