"""Heddle: a Celery-style task queue on NATS JetStream for multi-LLM workflows.

Example:
    >>> import heddle
    >>> app = heddle.Heddle("shop")
    >>> @app.task(retries=3, retry_backoff=True, timeout=30)
    ... def add(x: int, y: int) -> int:
    ...     return x + y
    >>> # add.delay(2, 3).get(timeout=10) == 5, with a worker running:
    >>> # heddle-worker -A shop.tasks
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, overload

from heddle import llm as llm  # heddle.llm.complete, YAML LLM workers (backends load lazily)
from heddle.app import Heddle
from heddle.canvas import GraphResult, Signature, chain, chord, group
from heddle.context import TaskContext, current_task
from heddle.errors import (
    BackendError,
    BackendUnavailable,
    BrokerError,
    BrokerUnavailable,
    ConfigError,
    DecodeError,
    DuplicateTaskError,
    EncodeError,
    HeddleError,
    MessageTooLarge,
    ResultTimeout,
    ServerStartError,
    TaskError,
    TaskIdError,
    TaskOptionError,
    TaskRevoked,
    TaskTimeout,
)
from heddle.messages import FAILURE, PENDING, RETRY, REVOKED, STARTED, SUCCESS
from heddle.pipeline import Pipeline
from heddle.results import AsyncResult
from heddle.settings import Settings
from heddle.task import P, R, Task, TaskDecorator, TaskOptions
from heddle.version import __version__
from heddle.worker import Worker

__all__ = [
    "FAILURE",
    "PENDING",
    "RETRY",
    "REVOKED",
    "STARTED",
    "SUCCESS",
    "AsyncResult",
    "BackendError",
    "BackendUnavailable",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "DecodeError",
    "DuplicateTaskError",
    "EncodeError",
    "GraphResult",
    "Heddle",
    "HeddleError",
    "MessageTooLarge",
    "Pipeline",
    "ResultTimeout",
    "ServerStartError",
    "Settings",
    "Signature",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskIdError",
    "TaskOptionError",
    "TaskOptions",
    "TaskRevoked",
    "TaskTimeout",
    "Worker",
    "__version__",
    "chain",
    "chord",
    "current_task",
    "group",
    "task",
]


@overload
def task(fn: Callable[P, Coroutine[Any, Any, R]], /) -> Task[P, R]: ...
@overload
def task(fn: Callable[P, R], /) -> Task[P, R]: ...
@overload
def task(**options: Any) -> TaskDecorator: ...


def task(fn: Any = None, /, **options: Any) -> Any:
    """Declare a shared task: a task of a module that does not name its app.

    It belongs to the one app that includes its module: ``app.include("shop.tasks")``,
    or the app ``heddle worker -A shop.tasks`` loads (which includes the module it
    loads). There is no process-wide registry: until an app includes it, sending it
    raises an error that says how to bind it.
    """

    def decorate(f: Any) -> Any:
        return Task(f, app=None, **options)

    return decorate(fn) if fn is not None else decorate
