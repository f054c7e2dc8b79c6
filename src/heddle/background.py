"""Stopping background asyncio tasks for sure.

Python 3.11's ``asyncio.wait_for`` (nats-py and valkey-py wait with it) can swallow
a cancellation that arrives as its inner future completes: it returns the result
instead of raising ``CancelledError``. A loop that was cancelled at that moment
goes round again, and ``task.cancel(); await task`` then waits forever (a router
hung on stop this way while its rules announcement was being written). So a task
is cancelled again until it has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

# How long to wait for a cancelled task before cancelling it again.
_RECANCEL_S = 0.2


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` (None is skipped) and return once every one has ended; their outcomes are discarded."""
    given = [t for t in tasks if t is not None]
    pending = set(given)
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=_RECANCEL_S)
    for task in given:
        if not task.cancelled():
            with contextlib.suppress(BaseException):
                task.exception()  # retrieved, so asyncio does not log it as never retrieved
