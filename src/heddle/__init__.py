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

from heddle import llm as llm  # heddle.llm.complete, YAML LLM workers (backends load lazily)
from heddle.app import Heddle
from heddle.context import TaskContext, current_task
from heddle.errors import (
    ArgumentTypeError,
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
    Retry,
    ServerStartError,
    TaskError,
    TaskExpired,
    TaskIdError,
    TaskOptionError,
    TaskRevoked,
    TaskTimeout,
)
from heddle.graphs.canvas import GraphResult, Signature, chain, chord, group
from heddle.graphs.pipeline import Pipeline
from heddle.messages import FAILURE, PENDING, RETRY, REVOKED, STARTED, SUCCESS
from heddle.results import AsyncResult
from heddle.settings import Settings
from heddle.task import Task, TaskOptions
from heddle.task import shared_task as task
from heddle.version import __version__
from heddle.worker import Worker

__all__ = [
    "FAILURE",
    "PENDING",
    "RETRY",
    "REVOKED",
    "STARTED",
    "SUCCESS",
    "ArgumentTypeError",
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
    "Retry",
    "ServerStartError",
    "Settings",
    "Signature",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskExpired",
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
