"""In-process orchestrators for tests: run task graphs next to ``running_worker`` / ``aworker``.

Example::

    from heddle.testing import running_worker
    from heddle.testing.orchestrators import running_orchestrator

    with running_worker(app), running_orchestrator(app):
        assert (add.s(1, 2) | add.s(3)).delay().get(timeout=10) == 6
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING

from heddle.testing import running_actors, start_actors

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.orchestrator import Orchestrator

__all__ = ["aorchestrator", "running_orchestrator"]


@contextlib.asynccontextmanager
async def aorchestrator(app: Heddle, max_concurrent_goals: int = 16) -> AsyncIterator[Orchestrator]:
    """Run an orchestrator on the current loop until the block exits."""
    from heddle.orchestrator import Orchestrator

    orch = Orchestrator(app, max_concurrent_goals=max_concurrent_goals)
    (runner,) = await start_actors([orch])
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

    make = lambda: [Orchestrator(app, max_concurrent_goals=max_concurrent_goals)]  # noqa: E731
    with running_actors(app, make, start_timeout_s) as (orch,):
        yield orch
