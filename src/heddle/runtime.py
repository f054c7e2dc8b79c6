"""Running actors in a process: load the user's app, run the actors with health and
signals, drain them, and exit when the bus is lost for good.

The CLI (:mod:`heddle.cli`) and the Workshop build on this; it knows no command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import sys
import traceback
from typing import Any, Protocol

from heddle.app import Heddle
from heddle.errors import BrokerUnavailable, ConfigError
from heddle.health import redact_text, start_health_server


def load_app(spec: str) -> Heddle:
    """Import ``module[:attribute]`` and return its :class:`Heddle` app."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ConfigError(
                f"cannot import {module_name!r} given to -A: {exc}. Run from the directory that "
                f"contains it, or add that directory to PYTHONPATH"
            ) from exc
        # Found, but an import inside it failed: that import is what to fix.
        raise ConfigError(f"importing {module_name!r} given to -A failed, in its own code:\n{_user_traceback(exc)}"
                          f"Install {missing!r} or fix that import") from exc
    except Exception as exc:
        raise ConfigError(f"importing {module_name!r} given to -A failed, in its own code:\n{_user_traceback(exc)}"
                          f"Fix the error above") from exc
    apps = {k: v for k, v in vars(module).items() if isinstance(v, Heddle)}
    if attr:
        if not hasattr(module, attr):
            has = f"its apps: {', '.join(sorted(apps))}" if apps else "it defines no heddle.Heddle app"
            raise ConfigError(f"module {module_name!r} has no attribute {attr!r} ({has})")
        obj = getattr(module, attr)
        if not isinstance(obj, Heddle):
            raise ConfigError(f"{module_name}:{attr} is {type(obj).__name__}, not a heddle.Heddle app")
        obj.include(module)  # the module's shared @heddle.task tasks belong to the app -A names
        return obj
    chosen = apps.get("app") or (next(iter(apps.values())) if len(apps) == 1 else None)
    if chosen is not None:
        chosen.include(module)
        return chosen
    if not apps:
        raise ConfigError(
            f"module {module_name!r} defines no heddle.Heddle app; add `app = heddle.Heddle('name')` "
            f"or point -A at module:attribute"
        )
    raise ConfigError(
        f"module {module_name!r} defines several apps ({', '.join(sorted(apps))}); "
        f"choose one with -A {module_name}:NAME"
    )


def _user_traceback(exc: BaseException) -> str:
    """``exc``'s traceback without the import machinery's frames: where the user's code failed."""
    te = traceback.TracebackException.from_exception(exc)
    machinery = (__file__, importlib.__file__)
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if f.filename not in machinery and not f.filename.startswith("<frozen importlib")]
    )
    return "".join(te.format())


def install_loop_policy() -> None:
    """Use uvloop for the actors' event loop where it is installed."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


class Actor(Protocol):
    """A loop hosted by an actor process: the worker, the router, the orchestrator."""

    ready: asyncio.Event

    @property
    def last_tick(self) -> float:
        """Monotonic time the actor's message loop last went round (``/healthz``)."""
        ...

    async def run(self) -> None: ...

    def request_stop(self) -> None: ...


async def run_actors(app: Heddle, actors: list[Actor], health_port: int | None) -> None:
    """Run actors until SIGTERM/SIGINT, then drain all of them; health and metrics served meanwhile.

    If one actor fails (at start-up, say), the others are stopped and drained too.
    """
    health = await start_health_server(actors, app.settings, health_port)

    def stop_all() -> None:
        if health is not None:
            health.mark_draining()
        for actor in actors:
            actor.request_stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all)
    runs = [asyncio.ensure_future(a.run()) for a in actors]
    lost = asyncio.ensure_future(_bus_lost(actors))
    try:
        pending: set[asyncio.Future[Any]] = {*runs, lost}
        while not all(r.done() for r in runs):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                stop_all()
                break
        await asyncio.gather(*runs)
        if lost.done() and not lost.cancelled() and lost.exception() is not None:
            raise lost.exception()  # type: ignore[misc]
    finally:
        lost.cancel()
        if health is not None:
            await health.stop()
        await app.aclose()


async def _bus_lost(actors: list[Actor]) -> None:
    """Raise once any actor's NATS connection is closed for good (nats-py will not reconnect).

    The process cannot do its work again: it drains and exits with the error, so a
    supervisor (Kubernetes, systemd) starts a fresh one.
    """
    while True:
        brokers = {id(c.broker): c.broker for a in actors if (c := getattr(a, "conns", None)) is not None}
        for broker in brokers.values():
            if broker.lost:
                raise BrokerUnavailable(f"{redact_text(broker.lost, broker.url)}; exiting so it can be restarted")
        waits = [asyncio.ensure_future(b.lost_event.wait()) for b in brokers.values()]
        # Actors connect after start-up: look again now and then for new connections.
        waits.append(asyncio.ensure_future(asyncio.sleep(1.0)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()


def run_actor_process(app: Heddle, actor: Actor, health_port: int | None) -> None:
    """The main loop of a one-actor process (``heddle router``, ``orchestrator``, ``workshop``)."""
    install_loop_policy()
    asyncio.run(run_actors(app, [actor], health_port))
