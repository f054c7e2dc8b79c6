"""``AsyncResult``: a handle on one task's state and result.

It reads the result store (:mod:`heddle.store`) and waits through the
connection's watches (:mod:`heddle.notices`); it never talks to a server itself.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import time
from collections.abc import AsyncGenerator, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from heddle import names
from heddle.errors import BackendError, ResultTimeout, TaskError, TaskExpired, TaskRevoked
from heddle.messages import EXPIRED_ERROR, FAILURE, PENDING, READY_STATES, REVOKED, SUCCESS, ResultRecord
from heddle.notices import RECHECK_S

if TYPE_CHECKING:
    from heddle.chunks import StreamChunk
    from heddle.connections import Client
    from heddle.notices import Watch

R = TypeVar("R")


class AsyncResult(Generic[R]):
    """A handle on a task's state and result, like Celery's ``AsyncResult``.

    Sync code calls :meth:`get`, :meth:`revoke` and the properties; async code
    awaits :meth:`aget`, :meth:`arevoke` and :meth:`astate`.

    Args:
        task_id: The task id.
        app: The app whose connections are used.
        task_name: Name of the task, when known.

    Raises:
        TaskIdError: ``task_id`` cannot be a subject token (``>``, ``*``, whitespace...).
    """

    # A client holding many handles at once (a burst of sends, then their results) has
    # the garbage collector walk every one of them, repeatedly: no __dict__ each.
    # A handle can still be weakly referenced, as before it had slots.
    __slots__ = ("__weakref__", "_bridge", "_for_thread", "_loop", "_record", "_sent", "_watch", "app", "eta",
                 "id", "task_name", "worker_type")

    def __init__(self, task_id: str, app: Client, task_name: str = "") -> None:
        # The id becomes a subject token: ">" would subscribe to every task's result.
        self.id = names.check_task_id(task_id)
        self.app = app
        self.task_name = task_name
        # Set by apply_async from async code: the publish runs as a task on the
        # caller's loop, and waiting on the result first waits for the publish.
        self._sent: Any = None
        # The result-notice watch made *before* the task was published, on the loop
        # that published it (heddle.notices): no notice can be missed.
        self._watch: Watch | None = None
        self._loop: Any = None
        self._record: ResultRecord | None = None
        # For a sync caller: the watch's outcome, passed to the caller's thread by the
        # loop itself, so get() blocks on it without a hop to the loop and back.
        self._for_thread = False
        self._bridge: concurrent.futures.Future[ResultRecord] | None = None
        #: Set by the send: the worker type it went to and when it may run (epoch s), for
        #: a timeout that says why there is no result yet.
        self.worker_type = ""
        self.eta: float | None = None

    def __repr__(self) -> str:
        return f"<AsyncResult {self.task_name or 'task'}[{self.id}]>"

    def track_send(self, sending: Any) -> None:
        """The publish of this task runs as ``sending`` on the caller's loop; waits wait for it first."""
        self._sent = sending

    def for_thread(self) -> None:
        """The send runs for a sync caller, who waits in its own thread (set before the send runs)."""
        self._for_thread = True

    def watch_from(self, watch: Watch, loop: Any) -> None:
        """Wait through ``watch``, made on ``loop`` (and running it) before the task was published."""
        self._watch, self._loop = watch, loop
        if self._for_thread:
            bridge: concurrent.futures.Future[ResultRecord] = concurrent.futures.Future()

            def settled() -> None:
                if watch.done.cancelled():
                    bridge.cancel()  # evicted or released: get() takes the full path
                else:
                    bridge.set_result(watch.done.result())

            watch.when_settled(settled)
            self._bridge = bridge

    @property
    def final_record(self) -> ResultRecord | None:
        """The final record, once a wait (``aget``/``get``) or a read found it; else None."""
        return self._record

    # -- async API -----------------------------------------------------------------

    async def sent(self) -> None:
        """Wait until the task message is stored by JetStream (raises if publishing failed)."""
        if self._sent is not None:
            await self._sent

    async def _fetch(self) -> tuple[str, ResultRecord | None]:
        if self._record is not None:
            return self._record.state, self._record
        conns = await self.app.connections()
        state, record = await conns.backend.read(self.id)
        if record is not None and state in READY_STATES:
            self._record = record
        return state, record

    async def astate(self) -> str:
        """The task's current state: PENDING, STARTED, RETRY, SUCCESS, FAILURE or REVOKED."""
        return (await self._fetch())[0]

    async def aget(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Wait for the task's result without polling.

        Args:
            timeout: Seconds to wait; None waits forever.
            propagate: Raise :class:`TaskError` / :class:`TaskRevoked` for failed or
                revoked tasks (otherwise return the error object).

        Raises:
            ResultTimeout: The result did not arrive in time.
            TaskError: The task raised (remote type, message and traceback attached).
            TaskRevoked: The task was revoked.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        return await self._aget(deadline, timeout, propagate)

    async def _aget(self, deadline: float | None, timeout: float | None, propagate: bool) -> R:
        import asyncio

        await self.sent()
        record = await self._wait(asyncio.get_running_loop(), deadline, timeout)
        value: R = self._outcome(record, propagate)
        return value

    async def _wait(self, loop: Any, deadline: float | None, timeout: float | None) -> ResultRecord:
        if self._record is not None:
            return self._record
        conns = await self.app.connections()
        watch = self._watch if self._loop is loop else None
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        record = await conns.watches.wait(self.id, watch, remaining)
        if record is None:
            state = PENDING
            with contextlib.suppress(BackendError):
                state = (await conns.backend.read(self.id))[0]
            raise ResultTimeout(
                f"no result for task {self.task_name or 'task'}[{self.id}] within {timeout}s (state {state}); "
                f"{await self._why_pending(conns, state)}"
            )
        self._record = record
        return record

    async def _why_pending(self, conns: Any, state: str) -> str:
        """What to check when a wait timed out: the schedule, or the worker type's live workers."""
        scheduled = scheduled_note(self.eta) if state == PENDING else None
        if scheduled is not None:
            return f"it is {scheduled}: wait past that"
        return await worker_note(conns, self.worker_type, f"`heddle inspect {self.id}`")

    def _outcome(self, record: ResultRecord, propagate: bool) -> Any:
        if record.state == SUCCESS:
            return record.result
        err = self._error(record)
        if propagate:
            raise err
        return err

    def _error(self, record: ResultRecord) -> Exception:
        if record.state == REVOKED:
            if record.error is not None and record.error.type == EXPIRED_ERROR:
                return TaskExpired(record.error.message)
            return TaskRevoked(f"task {self.id} was revoked")
        info = record.error
        if info is None:
            return TaskError(self.id, "heddle.UnknownError", f"task ended in {record.state}")
        return TaskError(self.id, info.type, info.message, info.traceback)

    async def astream(self, timeout: float | None = None) -> AsyncGenerator[StreamChunk, None]:
        """Yield the task's streamed reply text, chunk by chunk, from the first, until the task ends.

        A task streams when its LLM worker has ``stream: true`` or it was sent with
        ``stream=True`` (:mod:`heddle.chunks`). Joining late loses nothing: the chunks
        are replayed from the first, in order, then each new one as it is published.
        The iteration ends once the task's final state is stored (at once for a task
        that streams nothing); read the result with :meth:`aget` as usual. Each chunk
        is a ``str``; ``chunk.new_reply`` marks the first chunk of a reply that
        supersedes the text before it (a retry, a repair, an escalation).

        Args:
            timeout: Seconds to wait for the task to end; None waits forever.

        Raises:
            ResultTimeout: The task did not end in time.

        Example:
            >>> async for chunk in handle.astream(timeout=60):
            ...     print(chunk, end="", flush=True)
        """
        import asyncio

        from heddle.chunks import follow

        deadline = None if timeout is None else time.monotonic() + timeout
        await self.sent()
        conns = await self.app.connections()
        ended = self._wait(asyncio.get_running_loop(), deadline, timeout)
        async for chunk in follow(conns.broker, self.id, ended):
            yield chunk

    def stream(self, timeout: float | None = None) -> Iterator[StreamChunk]:
        """Iterate over the task's streamed reply text from sync code (see :meth:`astream`).

        Example:
            >>> for chunk in handle.stream(timeout=60):
            ...     print(chunk, end="", flush=True)
        """
        self.app.refuse_blocking_in_loop("result.stream()", "async for chunk in result.astream()")
        chunks = self.astream(timeout)

        async def step() -> StreamChunk:
            return await chunks.__anext__()

        try:
            while True:
                try:
                    yield self.app.run_sync(step(), self._portal_timeout(timeout))
                except StopAsyncIteration:
                    return
        finally:
            with contextlib.suppress(Exception):
                self.app.run_sync(chunks.aclose(), 30.0)

    async def arevoke(self) -> None:
        """Revoke: a pending or delayed task never runs; a running one is cancelled."""
        conns = await self.app.connections()
        await conns.revoke(self.id, self.task_name)

    # -- sync API ------------------------------------------------------------------

    def get(self, timeout: float | None = None, propagate: bool = True) -> R:
        """Block until the result is ready and return it (see :meth:`aget`)."""
        self.app.refuse_blocking_in_loop("result.get()", "await result.aget()")
        deadline = None if timeout is None else time.monotonic() + timeout
        bridge, watch = self._bridge, self._watch
        if self._record is None and bridge is not None and watch is not None and watch.fresh:
            # The task was sent from this thread and JetStream stored it as new, so its notice
            # settles the watch: wait for that here, with no hop to the loop. The store is not
            # read here, so after RECHECK_S (or the timeout) the full wait takes over, which reads it.
            first = RECHECK_S if timeout is None else min(timeout, RECHECK_S)
            with contextlib.suppress(concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                self._record = bridge.result(first)
            if self._record is not None:
                value: R = self._outcome(self._record, propagate)
                return value
        return self.app.run_sync(self._aget(deadline, timeout, propagate), self._portal_timeout(timeout))

    def _portal_timeout(self, timeout: float | None) -> float | None:
        return None if timeout is None else timeout + 30.0

    def revoke(self) -> None:
        """Revoke the task (see :meth:`arevoke`)."""
        self.app.run_sync(self.arevoke(), 30.0)

    @property
    def state(self) -> str:
        """Current state, read from Valkey."""
        return self.app.run_sync(self.astate(), 30.0)

    status = state

    def ready(self) -> bool:
        """True if the task has finished (SUCCESS, FAILURE or REVOKED)."""
        return self.state in READY_STATES

    def successful(self) -> bool:
        """True if the task finished with SUCCESS."""
        return self.state == SUCCESS

    def failed(self) -> bool:
        """True if the task finished with FAILURE."""
        return self.state == FAILURE

    @property
    def record(self) -> ResultRecord | None:
        """The stored result record (state, result, error, timings, metadata) or None."""
        return self.app.run_sync(self._fetch(), 30.0)[1]

    @property
    def result(self) -> Any:
        """The return value if SUCCESS, the error if FAILURE/REVOKED, else None."""
        state, record = self.app.run_sync(self._fetch(), 30.0)
        if record is None or state not in READY_STATES:
            return None
        return self._outcome(record, propagate=False)

    @property
    def traceback(self) -> str | None:
        """The remote traceback text of a failed task, else None."""
        record = self.record
        if record is None or record.error is None:
            return None
        return record.error.traceback


def scheduled_note(eta: float | None, now: float | None = None) -> str | None:
    """"scheduled to run at HH:MM:SS UTC, N s from now" for a countdown or eta still ahead; else None.

    Shared by a timed-out wait (which knows the eta it sent) and ``heddle inspect``
    (which reads it from the queued message).
    """
    now = time.time() if now is None else now
    if eta is None or eta <= now:
        return None
    at = time.strftime("%H:%M:%S UTC", time.gmtime(eta))
    return f"scheduled to run at {at}, {eta - now:.0f}s from now"


async def worker_note(conns: Any, worker_type: str, look_closer: str = "") -> str:
    """Whether a worker of ``worker_type`` is alive to run a waiting task, and what to do if not.

    Args:
        conns: The :class:`~heddle.connections.Connections` (it follows the workers bucket).
        worker_type: The worker type the task was sent to ("" when not known).
        look_closer: Where to look when workers are alive (a command), if anywhere.
    """
    wt = worker_type
    if not wt:
        return "is a worker running for it (`heddle-worker -A yourmodule`)?"
    alive = await conns.worker_type_alive(wt)
    if alive is False:
        return (f"no worker of type {wt!r} is alive: start one (`heddle-worker -A yourmodule` for an app "
                f"named {wt!r}, or `heddle worker --config {wt}.yaml` for an LLM worker)")
    if alive:
        return (f"workers of type {wt!r} are alive but have not finished it: it may be slow, waiting "
                f"behind others or rate-limited" + (f" ({look_closer})" if look_closer else ""))
    return f"is a worker of type {wt!r} running (`heddle-worker -A yourmodule`)?"
