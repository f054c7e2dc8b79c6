"""The audit: every submitted task is either final or listed, so a loss cannot hide.

Each send records the task id in one Valkey sorted set (``heddle:submitted``,
scored by the time it was sent, to within the 50 ms of its group below);
storing a final state (SUCCESS, FAILURE, REVOKED) removes it, in the same
pipelined round trip as the store. What is left there after a deadline has
not reached a final state: still queued behind others, running long, waiting
out a countdown, or lost. :func:`unfinished`
lists those with their stored state; ``heddle status --audit`` and the
Workshop's Audit page show them.

Sends are recorded in groups: one ``ZADD`` for the sends of up to 50 ms (or
1,000 sends), written in the background, so the audit costs no round trip on
the send path; the group's entries are scored by the time of its first send.
The trade: a client that dies within those 50 ms of a send leaves it out of
the audit (its message is safe in JetStream and runs as usual);
``app.aclose()`` writes what is left. If Valkey cannot be reached the send
still succeeds and the gap is logged.
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

# Sends are written to the audit set at most this long after they were made, or
# as soon as this many are waiting: one ZADD for many sends, off the send path.
FLUSH_S = 0.05
FLUSH_AT = 1000


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
    """Records sent task ids in groups: one ZADD per :data:`FLUSH_S`, or per :data:`FLUSH_AT` sends.

    Args:
        backend: The result store the audit set lives in.
    """

    def __init__(self, backend: ResultBackend) -> None:
        self.backend = backend
        self._batch: list[str] = []
        self._since = 0.0  # when the first send of the group was made
        self._timer: asyncio.TimerHandle | None = None
        self._writes: set[asyncio.Task[None]] = set()

    def record(self, task_id: str) -> None:
        """Add ``task_id`` to the next group (written within :data:`FLUSH_S`, never awaited)."""
        if not self._batch:
            self._since = time.time()
        self._batch.append(task_id)
        if len(self._batch) >= FLUSH_AT:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(FLUSH_S, self._flush)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, []
        if batch:
            task = asyncio.ensure_future(self._write(batch, self._since))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _write(self, batch: list[str], sent_at: float) -> None:
        try:
            await self.backend.record_submitted(batch, sent_at)
        except HeddleError as exc:
            log.warning("%d sent tasks are not in the audit (%s); their messages are safe in JetStream",
                        len(batch), exc)

    async def close(self) -> None:
        """Write what is left (on close)."""
        self._flush()
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)


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
