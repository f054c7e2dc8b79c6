"""The application object: settings, the task registry, and connections per event loop."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import importlib
import threading
from collections.abc import Callable, Coroutine, Mapping
from datetime import timedelta
from types import ModuleType
from typing import Any, TypeVar, overload

from heddle.connections import Connections, TracksSend, client_name
from heddle.errors import ConfigError, DuplicateTaskError, HeddleError
from heddle.redact import redact
from heddle.results import AsyncResult as _AsyncResult
from heddle.schedules import Schedule, declare
from heddle.send import send_by_name
from heddle.settings import Settings, check_name
from heddle.task import P, R, Task, TaskDecorator

T = TypeVar("T")

def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed: the portal's loop is Heddle's own, and sync callers wait on it."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _Portal:
    """A background event loop thread that runs client coroutines for sync callers."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or not self._thread or not self._thread.is_alive():
                loop = _new_loop()
                ready = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name="heddle-portal", daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def in_portal(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on the portal loop and block until it finishes."""
        loop = self._ensure()
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        return fut.result(timeout_s)

    def running_loop(self) -> asyncio.AbstractEventLoop | None:
        """The portal's loop while its thread runs (None before the first sync call and after stop)."""
        loop, thread = self._loop, self._thread
        return loop if thread is not None and thread.is_alive() else None

    def call_soon(self, start: Callable[[], asyncio.Future[T]], timeout_s: float | None = None) -> T:
        """Call ``start`` on the portal loop (a plain call in its next step); block until its future is done.

        Lighter than :meth:`call` for work that is one call and then a wait: no task is
        made for it, and the caller is woken by the future's own callback.
        """
        loop = self._ensure()
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                started = start()
            except BaseException as exc:
                done.set_exception(exc)
                return
            started.add_done_callback(functools.partial(_pass_on, done))

        loop.call_soon_threadsafe(run)
        return done.result(timeout_s)

    def stop(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()


def _pass_on(done: concurrent.futures.Future[T] | asyncio.Future[T], fut: asyncio.Future[T]) -> None:
    """Give ``done`` (a waiting thread's, or another future of the loop) the outcome of ``fut``.

    A done-callback of ``fut``, run on the loop that settled it.
    """
    if done.done():
        return
    if fut.cancelled():
        done.cancel()
    elif (exc := fut.exception()) is not None:
        done.set_exception(exc)
    else:
        done.set_result(fut.result())


class _Held:
    """An async caller's sends held back while the connection's pending publishes are at their bound.

    A burst larger than the bound (``[t.apply_async() for ...]``) used to become a task
    per send past it, each waiting for its own turn: a task, a coroutine and their
    futures per message, and a wake-up each. Held sends wait in call order instead, and
    one task queues them with ``now`` whenever answers make room. One that ``now``
    declines for another reason (a reconnect, more result watches open than the
    connection keeps) is sent the full way as a task, and so is every send held behind
    it, in order, as all were before.
    """

    def __init__(self, app: Heddle, conns: Connections) -> None:
        self._app = app
        self.conns = conns
        self._items: collections.deque[tuple[Callable[[Connections], asyncio.Future[Any] | None],
                                             Callable[[], Coroutine[Any, Any, None]],
                                             asyncio.Future[Any]]] = collections.deque()
        self._task: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        """Whether sends are held (a later send must wait behind them)."""
        return bool(self._items)

    def add(self, now: Callable[[Connections], asyncio.Future[Any] | None],
            send: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Future[Any]:
        """Hold a send; the future of its publish."""
        loop = asyncio.get_running_loop()
        out: asyncio.Future[Any] = loop.create_future()
        self._items.append((now, send, out))
        if self._task is None:
            self._task = loop.create_task(self._release(), name="heddle-held-sends")
        return out

    async def drained(self) -> None:
        """Wait until every held send is queued (or handed to a task of its own)."""
        while self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _release(self) -> None:
        items, conns = self._items, self.conns
        try:
            while items:
                await conns.broker.pubacks.room()
                while items:
                    now, _, out = items[0]
                    sent = now(conns)
                    if sent is None:
                        break
                    items.popleft()
                    sent.add_done_callback(functools.partial(_pass_on, out))
                if items and not conns.broker.pubacks.full():
                    self._as_tasks()
        finally:
            self._task = None
            if items:  # cancelled (the loop is closing): what is left goes as it would have
                self._as_tasks()

    def _as_tasks(self) -> None:
        while self._items:
            _, send, out = self._items.popleft()
            task = self._app.send_as_task(send)
            task.add_done_callback(functools.partial(_pass_on, out))


def _now_or_as_task(
    now: Callable[[Connections], asyncio.Future[Any] | None],
    send: Callable[[], Coroutine[Any, Any, None]],
    conns: Connections,
) -> asyncio.Future[Any]:
    """The future of a send queued by ``now`` on ``conns``, or of ``send()`` run as a task where ``now`` declines."""
    sent = now(conns)
    return sent if sent is not None else asyncio.ensure_future(send())


class Heddle:
    """A Heddle application: a named set of tasks plus the settings to reach the servers.

    Tasks of an app are consumed by workers of worker type ``name`` on
    ``heddle.tasks.{name}.{tier}``.

    Args:
        name: App name; also the worker type its tasks are routed to.
        nats_url: NATS URL; default ``$NATS_URL`` or ``nats://127.0.0.1:4222``.
        valkey_url: Valkey URL; default ``$VALKEY_URL`` or ``valkey://127.0.0.1:6379/0``.
        settings: A full :class:`~heddle.settings.Settings` (overrides the two URLs).
        **overrides: Individual settings, e.g. ``result_ttl_s=3600``.

    Example:
        >>> app = Heddle("shop")
        >>> @app.task(retries=3)
        ... def add(x: int, y: int) -> int:
        ...     return x + y
    """

    def __init__(
        self,
        name: str = "heddle",
        *,
        nats_url: str | None = None,
        valkey_url: str | None = None,
        settings: Settings | None = None,
        **overrides: Any,
    ) -> None:
        self.name = check_name("app name", name)
        if settings is None:
            settings = Settings.load(nats_url=nats_url, valkey_url=valkey_url, **overrides)
        elif overrides or nats_url or valkey_url:
            settings = settings.with_(
                **{k: v for k, v in dict(nats_url=nats_url, valkey_url=valkey_url).items() if v},
                **overrides,
            )
        self.settings = settings
        self.tasks: dict[str, Task[Any, Any]] = {}
        # The most model tokens one task may write (a YAML LLM worker's max_output_tokens);
        # its workers announce it, and routers add it to a task's token estimate.
        self.max_output_tokens = 0
        #: Periodic schedules by name (``app.periodic``), run by every worker process that loads the app.
        self.schedules: dict[str, Schedule] = {}
        # Plain dict: uvloop loops cannot be weakly referenced. Closed loops are pruned.
        self._conns: dict[asyncio.AbstractEventLoop, asyncio.Future[Connections]] = {}
        self._portal = _Portal()
        self._pending_sends: set[asyncio.Task[Any]] = set()
        # Per loop: sends held back while the connection's pending publishes are at their bound.
        self._held: dict[asyncio.AbstractEventLoop, _Held] = {}

    def __repr__(self) -> str:
        return f"<Heddle {self.name!r} nats={redact(self.settings.nats_url)} tasks={len(self.tasks)}>"

    def configure(self, **overrides: Any) -> None:
        """Change settings (e.g. ``nats_url``) before the app connects.

        Raises:
            HeddleError: The app already has open connections; call ``close()`` first.
        """
        if self._conns:
            open_loops = [lp for lp in self._conns if not lp.is_closed()]
            if open_loops and self.settings.with_(**overrides) != self.settings:
                raise HeddleError(
                    f"app {self.name!r} is already connected; call app.close() / await "
                    f"app.aclose() before configure()"
                )
        self.settings = self.settings.with_(**overrides)

    @property
    def worker_type(self) -> str:
        """The worker type (routing key) of this app's Python tasks."""
        return self.name

    # -- declaring tasks -----------------------------------------------------------

    @overload
    def task(self, fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...
    @overload
    def task(self, /, **options: Any) -> TaskDecorator: ...

    def task(self, fn: Any = None, /, **options: Any) -> Any:
        """Declare a task; use bare (``@app.task``) or with options (``@app.task(retries=3)``).

        Options: ``name``, ``retries``, ``retry_backoff``, ``retry_backoff_max``,
        ``retry_jitter``, ``retry_delay``, ``autoretry_for``, ``timeout``, ``tier``.
        """
        def decorate(f: Any) -> Any:
            t: Task[Any, Any] = Task(f, app=self, **options)
            self.register(t)
            return t

        return decorate(fn) if fn is not None else decorate

    def register(self, task: Task[Any, Any]) -> None:
        """Add a task to this app's registry; a different task with the same name is an error."""
        existing = self.tasks.get(task.name)
        if existing is not None and existing is not task:
            raise DuplicateTaskError(
                f"task name {task.name!r} is already used by {existing.fn.__module__}."
                f"{existing.fn.__qualname__} in app {self.name!r}; give one of them "
                f"another name with @task(name='...')"
            )
        self.tasks[task.name] = task

    def include(self, *modules: ModuleType | str) -> list[Task[Any, Any]]:
        """Bind the shared (``@heddle.task``) tasks of ``modules`` to this app; return them.

        ``heddle worker -A module`` includes the module it loads; a client that sends
        shared tasks includes their modules once: ``app.include("shop.tasks")``.

        Raises:
            ConfigError: A module cannot be imported, or one of its shared tasks is
                already bound to another app.
        """
        found: list[Task[Any, Any]] = []
        for m in modules:
            try:
                module = importlib.import_module(m) if isinstance(m, str) else m
            except ImportError as exc:
                raise ConfigError(f"app {self.name!r} cannot include {m!r}: {exc}") from exc
            for value in list(vars(module).values()):
                if isinstance(value, Task) and value.is_shared and value not in found:
                    value.bind_shared(self)
                    self.register(value)
                    found.append(value)
        return found

    def periodic(
        self,
        task: Task[Any, Any] | str,
        *,
        every: float | timedelta | None = None,
        cron: str | None = None,
        tz: str | None = None,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        name: str | None = None,
    ) -> Schedule:
        """Run ``task`` periodically: every ``every`` seconds, or on a ``cron`` expression read in ``tz``.

        Whichever worker processes load this app (``heddle worker -A``, ``heddle dev``)
        run the schedule together: nats-server keeps the time and each tick becomes
        one task, ``periodic:{app}:{name}:{tick ms}``, whatever the number of workers;
        a tick missed while no worker ran runs once when one comes back
        (:mod:`heddle.schedules` says how and why).

        Args:
            task: One of this app's tasks, or its name.
            every: Whole seconds (>= 1) between runs, or a timedelta.
            cron: Five-field cron expression (``"*/5 * * * *"``) or ``@hourly``, ``@daily``...
            tz: IANA time zone the cron expression is read in (default UTC).
            args: Positional arguments of every run.
            kwargs: Keyword arguments of every run.
            name: Unique schedule name (default: the task's short name).

        Returns:
            The :class:`~heddle.schedules.Schedule`.

        Raises:
            ConfigError: A bad interval, cron expression or time zone, an unknown task,
                or a name already taken; the message says what to change.
            TypeError: The arguments do not fit the task.

        Example:
            >>> app.periodic(cleanup, every=60)
            >>> app.periodic(report, cron="0 9 * * mon-fri", tz="Europe/Berlin", args=("daily",))
        """
        if isinstance(task, Task) and task.is_shared and task.name not in self.tasks:
            task.bind_shared(self)  # a shared task of the module being loaded, not yet included
            self.register(task)
        schedule = declare(self, task, every=every, cron=cron, tz=tz, args=args, kwargs=kwargs, name=name,
                           taken=self.schedules)
        self.schedules[schedule.name] = schedule
        return schedule

    # -- connections ---------------------------------------------------------------

    async def connections(self) -> Connections:
        """The connections bound to the running loop, connecting on first use."""
        loop = asyncio.get_running_loop()
        opened = self._opened(loop)
        if opened is not None:
            return opened  # the per-call fast path: no shield, no extra future
        fut = self._conns.get(loop)
        if fut is None:
            for old in [lp for lp in self._conns if lp.is_closed()]:
                del self._conns[old]
        if fut is None or (fut.done() and (fut.cancelled() or fut.exception() is not None)):
            fut = loop.create_task(self._open())
            self._conns[loop] = fut
        return await asyncio.shield(fut)

    def _opened(self, loop: asyncio.AbstractEventLoop) -> Connections | None:
        """``loop``'s connections if they are open (not connecting, not failed)."""
        fut = self._conns.get(loop)
        if fut is None or not fut.done() or fut.cancelled() or fut.exception() is not None:
            return None
        return fut.result()

    async def _open(self) -> Connections:
        conns = Connections(self.settings, client_name(self.name))
        await conns.start()
        return conns

    def use_connections(self, conns: Connections) -> None:
        """Use an already open Connections (a worker's) for this loop."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Connections] = loop.create_future()
        fut.set_result(conns)
        self._conns[loop] = fut

    async def connect(self) -> None:
        """Open connections on the running loop now (otherwise done on first use).

        They are made ready for sends too: a burst of ``apply_async()`` right after is
        queued in its callers' steps, with no task per send.
        """
        conns = await self.connections()
        await conns.ready_to_send()

    async def aclose(self) -> None:
        """Wait for pending sends and close this loop's connections."""
        loop = asyncio.get_running_loop()
        held = self._held.pop(loop, None)
        if held is not None:
            await held.drained()
        if self._pending_sends:
            await asyncio.gather(*list(self._pending_sends), return_exceptions=True)
        conns = self._opened(loop)
        if conns is not None:
            await conns.broker.publishes_settled()  # the sends made in their callers' step
        self._conns.pop(loop, None)
        if conns is not None:
            await conns.close()

    def close(self) -> None:
        """Close the connections used by sync callers and stop their thread."""
        if self._portal._loop is not None:
            with contextlib.suppress(Exception):
                self.run_sync(self.aclose(), 10)
        self._portal.stop()

    def run_sync(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run ``coro`` on this app's background loop for a sync caller; block until it is done."""
        return self._portal.call(coro, timeout_s)

    def refuse_blocking_in_loop(self, what: str, instead: str) -> None:
        """Raise if ``what`` (a blocking call) is made from a running event loop; name ``instead``."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if not self._portal.in_portal():
            raise HeddleError(
                f"{what} blocks and would stall the running event loop; use `{instead}` "
                f"in async code"
            )

    # -- sending -------------------------------------------------------------------

    def dispatch(
        self,
        result: TracksSend,
        now: Callable[[Connections], asyncio.Future[Any] | None],
        send: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        """Send a task: queued in the caller's step where it can be, else run to the end.

        ``now`` queues the message on open connections without awaiting and returns the
        future of its publish, or None when it has to wait (nothing sent); ``send`` makes
        the coroutine that sends it the full way. An async caller's send is made with
        ``now`` on its own loop's open connections while no earlier send is waiting (those
        go first, so a connection publishes in the order of the calls); it is held (one
        task queues the held ones as room comes, :class:`_Held`) while the pending
        publishes are at their bound, else run as a task of ``send``. A sync caller's is
        handed to the portal as ``now`` once the portal's connections are open (a plain
        call in the loop's next step, no task), and as ``send`` before that or when
        ``now`` declines.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None and not self._portal.in_portal():
            held = self._held.get(loop)
            if held:  # sends are waiting for room: this one waits behind them
                result.track_send(held.add(now, send))
                return
            conns = None if self._pending_sends else self._opened(loop)
            sent = now(conns) if conns is not None else None
            if sent is None:
                if conns is not None and conns.broker.pubacks.full():
                    if held is None or held.conns is not conns:
                        held = self._held[loop] = _Held(self, conns)
                    sent = held.add(now, send)
                else:
                    sent = self.send_as_task(send)
            result.track_send(sent)
            return
        result.for_thread()
        timeout_s = self.settings.connect_timeout_s * 3 + 10
        portal = self._portal.running_loop()
        conns = self._opened(portal) if portal is not None and loop is None else None
        if conns is None:
            self.run_sync(send(), timeout_s)
            return
        self._portal.call_soon(functools.partial(_now_or_as_task, now, send, conns), timeout_s)

    def send_as_task(self, send: Callable[[], Coroutine[Any, Any, None]]) -> asyncio.Task[None]:
        """Run ``send()`` as a task on the running loop; later sends wait for it (to keep their order)."""
        task = asyncio.get_running_loop().create_task(send())
        self._pending_sends.add(task)
        task.add_done_callback(self._pending_sends.discard)
        return task

    def AsyncResult(self, task_id: str, task_name: str = "") -> _AsyncResult[Any]:
        """A handle on an existing task by id."""
        return _AsyncResult(task_id, self, task_name)

    def send_task(
        self,
        name: str,
        args: tuple[Any, ...] | list[Any] | dict[str, Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> _AsyncResult[Any]:
        """Send a task by name, without importing its code (see ``Task.apply_async``).

        A dict as ``args`` is one input object, as YAML LLM workers take it:
        ``app.send_task("summarizer", {"text": ...})``.
        """
        return send_by_name(self, name, args, kwargs, **options)
