"""Test against the real thing: embedded servers, in-process workers, a pytest plugin.

``EmbeddedServers`` starts a real nats-server (JetStream on) and a real
valkey-server on free loopback ports. ``running_worker`` runs a worker for an
app in a background thread; ``aworker`` runs one on the current event loop.
The pytest plugin (installed with the package) provides the fixtures
``heddle_servers``, ``heddle_app`` and ``heddle_worker``.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from heddle.testing.servers import (
    EmbeddedNats,
    EmbeddedServers,
    EmbeddedValkey,
    free_port,
    nats_server_binary,
    valkey_server_binary,
)

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.worker import Worker

__all__ = [
    "EmbeddedNats",
    "EmbeddedServers",
    "EmbeddedValkey",
    "aworker",
    "free_port",
    "nats_server_binary",
    "running_worker",
    "valkey_server_binary",
]


@contextlib.contextmanager
def running_worker(
    app: Heddle, concurrency: int = 8, grace_s: float = 5.0, start_timeout_s: float = 20.0
) -> Iterator[Worker]:
    """Run a worker for ``app`` in a background thread until the block exits.

    The worker is subscribed to its consumer before the block starts, so no
    message sent inside the block waits for it to come up.
    """
    from heddle.worker import Worker

    started = threading.Event()
    holder: dict[str, object] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> None:
            worker = Worker(app, concurrency=concurrency, grace_s=grace_s)
            holder["worker"], holder["loop"] = worker, loop
            runner = asyncio.ensure_future(worker.run())
            ready = asyncio.ensure_future(worker.ready.wait())
            await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
            started.set()
            try:
                await runner
            finally:
                ready.cancel()
                await app.aclose()

        try:
            loop.run_until_complete(main())
        except BaseException as exc:
            holder["error"] = exc
        finally:
            started.set()
            loop.close()

    thread = threading.Thread(target=run, name=f"heddle-worker-{app.name}", daemon=True)
    thread.start()
    if not started.wait(start_timeout_s):
        raise RuntimeError(f"worker for {app.name} did not start within {start_timeout_s}s")
    if "error" in holder:
        raise holder["error"]  # type: ignore[misc]
    worker: Worker = holder["worker"]  # type: ignore[assignment]
    loop: asyncio.AbstractEventLoop = holder["loop"]  # type: ignore[assignment]
    try:
        yield worker
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(worker.request_stop)
        thread.join(grace_s + 30)
        if "error" in holder:
            raise holder["error"]  # type: ignore[misc]


@contextlib.asynccontextmanager
async def aworker(
    app: Heddle, concurrency: int = 8, grace_s: float = 5.0, tier: str | None = None
) -> AsyncIterator[Worker]:
    """Run a worker for ``app`` (all tiers, or only ``tier``) on the current loop until the block exits."""
    from heddle.worker import Worker

    worker = Worker(app, concurrency=concurrency, grace_s=grace_s, tier=tier)
    runner = asyncio.ensure_future(worker.run())
    ready = asyncio.ensure_future(worker.ready.wait())
    await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        ready.cancel()
        runner.result()  # raises the start-up error
    try:
        yield worker
    finally:
        worker.request_stop()
        await runner
