"""In-process orchestrators for tests: run task graphs next to ``running_worker`` / ``aworker``.

Example::

    from heddle.testing import running_worker
    from heddle.testing.orchestrators import running_orchestrator

    with running_worker(app), running_orchestrator(app):
        assert (add.s(1, 2) | add.s(3)).delay().get(timeout=10) == 6
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.orchestrator import Orchestrator

__all__ = ["aorchestrator", "running_orchestrator"]


@contextlib.asynccontextmanager
async def aorchestrator(app: Heddle, max_concurrent_goals: int = 16) -> AsyncIterator[Orchestrator]:
    """Run an orchestrator on the current loop until the block exits."""
    from heddle.orchestrator import Orchestrator

    orch = Orchestrator(app, max_concurrent_goals=max_concurrent_goals)
    runner = asyncio.ensure_future(orch.run())
    ready = asyncio.ensure_future(orch.ready.wait())
    await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
    if runner.done():
        ready.cancel()
        runner.result()  # raises the start-up error
    try:
        yield orch
    finally:
        orch.request_stop()
        await runner


@contextlib.contextmanager
def running_orchestrator(
    app: Heddle, max_concurrent_goals: int = 16, start_timeout_s: float = 20.0
) -> Iterator[Orchestrator]:
    """Run an orchestrator for ``app``'s servers in a background thread until the block exits.

    It is bound to the goals consumer before the block starts.
    """
    from heddle.orchestrator import Orchestrator

    started = threading.Event()
    holder: dict[str, object] = {}

    def run() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)

        async def main() -> None:
            orch = Orchestrator(app, max_concurrent_goals=max_concurrent_goals)
            holder["orch"], holder["loop"] = orch, loop
            runner = asyncio.ensure_future(orch.run())
            ready = asyncio.ensure_future(orch.ready.wait())
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

    thread = threading.Thread(target=run, name=f"heddle-orchestrator-{app.name}", daemon=True)
    thread.start()
    if not started.wait(start_timeout_s):
        raise RuntimeError(f"orchestrator did not start within {start_timeout_s}s")
    if "error" in holder:
        raise holder["error"]  # type: ignore[misc]
    orch: Orchestrator = holder["orch"]  # type: ignore[assignment]
    loop: asyncio.AbstractEventLoop = holder["loop"]  # type: ignore[assignment]
    try:
        yield orch
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(orch.request_stop)
        thread.join(30)
        if "error" in holder:
            raise holder["error"]  # type: ignore[misc]
