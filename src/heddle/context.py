"""What a running task can know about itself: ``heddle.current_task()``."""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from heddle.errors import HeddleError


@dataclass
class TaskContext:
    """The task being run by this worker, and metadata it adds to its result.

    Attributes:
        id: Task id.
        name: Task name.
        tier: Tier the task was routed to.
        retries: Retries already made before this attempt.
        headers: String headers given to ``apply_async(headers=...)``.
        worker: Worker identity (``host:pid``).
        meta: Extra, msgpack-encodable metadata stored with the result (for
            example token usage of an LLM call).
        budget_usd: What the task's model calls may cost in all, from
            ``apply_async(budget_usd=...)`` (or a goal's remaining budget); None: no limit.
    """

    id: str
    name: str
    tier: str
    retries: int
    headers: dict[str, str]
    worker: str
    meta: dict[str, Any] = field(default_factory=dict)
    budget_usd: float | None = None


_current: ContextVar[TaskContext | None] = ContextVar("heddle_current_task", default=None)


def set_current_task(ctx: TaskContext | None) -> None:
    """Make ``ctx`` the running task of this coroutine or thread (the worker does, per task)."""
    _current.set(ctx)


def task_context() -> TaskContext | None:
    """The running task's context, or None outside a task (unlike :func:`current_task`, never raises)."""
    return _current.get()


def current_task() -> TaskContext:
    """The context of the task running in this coroutine or thread.

    Raises:
        HeddleError: Called outside a task run by a worker.
    """
    ctx = _current.get()
    if ctx is None:
        raise HeddleError("current_task() is only available inside a task run by a worker")
    return ctx
