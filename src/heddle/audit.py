"""The audit: every submitted task is either final or listed, so a loss cannot hide.

Each send records the task id in one Valkey sorted set (``heddle:submitted``,
scored by the time it was sent); storing a final state (SUCCESS, FAILURE,
REVOKED) removes it, in the same pipelined round trip as the store. What is
left there after a deadline has not reached a final state: still queued behind
others, running long, waiting out a countdown, or lost. :func:`unfinished`
lists those with their stored state; ``heddle status --audit`` and the
Workshop's Audit page show them.

Sends are recorded in groups: every send made in one turn of the event loop
shares one ``ZADD``, written while the message is being published (a group
commit), so the audit costs no extra round trip per task. A send is recorded
before ``sent()`` returns; if Valkey cannot be reached the send still succeeds
and the gap is logged, since the message itself is safe in JetStream.
Entries older than the result TTL are dropped when the audit is read, as the
records they would be compared with have expired too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import msgspec

from heddle.errors import HeddleError
from heddle.messages import READY_STATES

if TYPE_CHECKING:
    from heddle.store import ResultBackend

log = logging.getLogger("heddle.audit")


class Unfinished(msgspec.Struct, frozen=True):
    """A submitted task with no final state yet."""

    id: str
    submitted_at: float
    state: str  # PENDING (never claimed), STARTED or RETRY
    worker: str = ""
    started_at: float = 0.0


class AuditReport(msgspec.Struct, frozen=True):
    """Tasks sent more than ``older_than_s`` ago without a final state (the oldest first)."""

    older_than_s: float
    total: int
    tasks: list[Unfinished]


class SubmissionLog:
    """Records sent task ids in groups: one ZADD per turn of the event loop.

    Args:
        backend: The result store the audit set lives in.
    """

    def __init__(self, backend: ResultBackend) -> None:
        self.backend = backend
        self._batch: list[tuple[str, float]] = []
        self._done: asyncio.Future[None] | None = None

    def record(self, task_id: str) -> asyncio.Future[None]:
        """Add ``task_id`` to the next group; the future is done once the group is written."""
        self._batch.append((task_id, time.time()))
        if self._done is None:
            loop = asyncio.get_running_loop()
            self._done = loop.create_future()
            loop.call_soon(lambda: asyncio.ensure_future(self._write()))
        return self._done

    async def _write(self) -> None:
        batch, self._batch = self._batch, []
        done, self._done = self._done, None
        try:
            await self.backend.record_submitted(batch)
        except HeddleError as exc:
            log.warning("%d sent tasks are not in the audit (%s); their messages are safe in JetStream",
                        len(batch), exc)
        finally:
            # Never hold a send back: the audit is a record, not a condition of sending.
            if done is not None and not done.done():
                done.set_result(None)


async def unfinished(backend: ResultBackend, older_than_s: float, limit: int = 100) -> AuditReport:
    """Tasks sent more than ``older_than_s`` seconds ago that have no final state (oldest first).

    Raises:
        HeddleError: ``older_than_s`` is negative or ``limit`` below 1.
        BackendError: Valkey cannot be read.
    """
    if older_than_s < 0:
        raise HeddleError(f"older_than_s must be >= 0 seconds, got {older_than_s}")
    if limit < 1:
        raise HeddleError(f"limit must be >= 1, got {limit}")
    now = time.time()
    await backend.drop_submitted_before(now - backend.settings.result_ttl_s)
    for _ in range(3):
        total, entries = await backend.submitted_before(now - older_than_s, limit)
        seen = await backend.progress_many([tid for tid, _ in entries])
        # A repeat send of a task that had already finished is recorded again but never
        # stored again (the worker finds the final state and skips it): drop those here.
        final = [tid for (tid, _), (state, _, _) in zip(entries, seen, strict=True) if state in READY_STATES]
        if not final:
            break
        await backend.forget_submitted(final)
    rows = [
        Unfinished(id=tid, submitted_at=at, state=state, worker=worker, started_at=started_at)
        for (tid, at), (state, worker, started_at) in zip(entries, seen, strict=True)
        if state not in READY_STATES
    ]
    return AuditReport(older_than_s=older_than_s, total=total, tasks=rows)
