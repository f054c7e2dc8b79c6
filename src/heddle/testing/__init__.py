"""Test against the real thing: embedded servers, in-process workers, a pytest plugin.

``EmbeddedServers`` starts a real nats-server (JetStream on) and a real
valkey-server on free loopback ports (``EmbeddedValkeySentinel`` and
``EmbeddedValkeyCluster`` a highly available Valkey); ``heddle_process`` runs a ``heddle``
command against them as a subprocess. ``running_worker`` runs a worker for an
app in a background thread; ``aworker`` runs one on the current event loop.
The pytest plugin (installed with the package) provides the fixtures
``heddle_servers``, ``heddle_app`` and ``heddle_worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any

from heddle.testing.processes import heddle_process
from heddle.testing.servers import (
    EmbeddedNats,
    EmbeddedServers,
    EmbeddedValkey,
    free_port,
    nats_server_binary,
    valkey_server_binary,
)
from heddle.testing.valkey_ha import EmbeddedValkeyCluster, EmbeddedValkeySentinel

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.worker import Worker

__all__ = [
    "EmbeddedNats",
    "EmbeddedServers",
    "EmbeddedValkey",
    "EmbeddedValkeyCluster",
    "EmbeddedValkeySentinel",
    "aworker",
    "free_port",
    "heddle_process",
    "nats_server_binary",
    "running_actors",
    "running_worker",
    "start_actors",
    "valkey_server_binary",
]


async def start_actors(actors: list[Any]) -> list[asyncio.Future[Any]]:
    """Start actors; return their run futures once all are ready (or one failed)."""
    runners = [asyncio.ensure_future(a.run()) for a in actors]
    waits = [asyncio.ensure_future(a.ready.wait()) for a in actors]
    pending = set(runners) | set(waits)
    while any(not w.done() for w in waits):
        _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        if any(r.done() for r in runners):
            break
    for w in waits:
        w.cancel()
    failed = [r for r in runners if r.done()]
    if failed:
        for a in actors:
            a.request_stop()
        await asyncio.gather(*runners, return_exceptions=True)
        failed[0].result()  # raises the start-up error
    return runners


def _actors(app: Heddle, concurrency: int, grace_s: float, tier: str | None, router: bool) -> list[Any]:
    from heddle.router import Router
    from heddle.rules import RouterRules
    from heddle.worker import Worker

    actors: list[Any] = [Worker(app, concurrency=concurrency, grace_s=grace_s, tier=tier)]
    if router:
        actors.append(Router(app, rules=RouterRules(unknown_worker_grace_s=30.0)))
    return actors


@contextlib.contextmanager
def running_actors(
    app: Heddle, make: Callable[[], list[Any]], start_timeout_s: float = 20.0, stop_timeout_s: float = 35.0
) -> Iterator[list[Any]]:
    """Run the actors ``make()`` builds on a fresh loop in a background thread until the block exits.

    ``make`` runs on that loop (actors bind asyncio objects to it). The block starts
    only once every actor is ready; on exit each is asked to stop and drain, and
    the app's connections on that loop are closed.
    """
    started = threading.Event()
    holder: dict[str, Any] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> None:
            actors = make()
            holder["loop"], holder["actors"] = loop, actors
            try:
                runners = await start_actors(actors)
                started.set()
                await asyncio.gather(*runners)
            finally:
                await app.aclose()

        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            holder["error"] = exc
        finally:
            started.set()
            loop.close()

    thread = threading.Thread(target=run, name=f"heddle-actors-{app.name}", daemon=True)
    thread.start()
    if not started.wait(start_timeout_s):
        raise RuntimeError(f"actors for {app.name} did not start within {start_timeout_s}s")
    if "error" in holder:
        raise holder["error"]
    loop: asyncio.AbstractEventLoop = holder["loop"]
    actors: list[Any] = holder["actors"]
    try:
        yield actors
    finally:
        for actor in actors:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(actor.request_stop)
        thread.join(stop_timeout_s)
        if "error" in holder:
            raise holder["error"]


@contextlib.contextmanager
def running_worker(
    app: Heddle,
    concurrency: int = 8,
    grace_s: float = 5.0,
    start_timeout_s: float = 20.0,
    router: bool = True,
) -> Iterator[Worker]:
    """Run a worker (and, like ``heddle worker``, a router) for ``app`` in a background thread.

    The worker is subscribed to its consumer and announced to routers before
    the block starts, so no message sent inside the block waits for it.
    """
    make = lambda: _actors(app, concurrency, grace_s, None, router)  # noqa: E731
    with running_actors(app, make, start_timeout_s, grace_s + 30) as actors:
        yield actors[0]


@contextlib.asynccontextmanager
async def aworker(
    app: Heddle,
    concurrency: int = 8,
    grace_s: float = 5.0,
    tier: str | None = None,
    router: bool = True,
) -> AsyncIterator[Worker]:
    """Run a worker for ``app`` (all tiers, or only ``tier``) and a router on the current loop."""
    actors = _actors(app, concurrency, grace_s, tier, router)
    runners = await start_actors(actors)
    try:
        yield actors[0]
    finally:
        for actor in actors:
            actor.request_stop()
        await asyncio.gather(*runners)
