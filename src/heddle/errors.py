"""Heddle's exceptions, all rooted at :class:`HeddleError`.

The tree::

    HeddleError
    ├── ConfigError              bad settings, options or YAML
    │   ├── TaskOptionError      unknown or invalid @task option
    │   ├── DuplicateTaskError   two tasks registered under one name
    │   ├── ConfigFileError      a YAML config file is invalid; lists every error with file and line
    │   └── LLMConfigError       a model tier has no backend configured; names the variables to set
    ├── EncodeError              an argument or result msgspec cannot encode
    ├── ArgumentTypeError        an argument does not fit its parameter's type hint (also a TypeError)
    ├── DecodeError              bytes that are not a valid Heddle message
    ├── TaskIdError              a task id that cannot be a subject token (also a ValueError)
    ├── BrokerError              NATS / JetStream failures (translated in broker.py)
    │   ├── BrokerUnavailable    nats-server cannot be reached
    │   └── MessageTooLarge      a message and its headers exceed the server's max_payload
    ├── BackendError             Valkey failures (translated in results.py)
    │   └── BackendUnavailable   valkey-server cannot be reached
    ├── ResultTimeout            ``AsyncResult.get(timeout=...)`` ran out
    ├── TaskTimeout              a task ran past its ``timeout`` and was cancelled
    ├── TaskRevoked              the task was revoked before it produced a result
    │   └── TaskExpired          its ``expires`` time passed before a worker started it
    ├── Retry                    raised *by a task* to ask for another attempt (``after_s``, ``exc``)
    ├── TaskError                the task raised; carries the remote type, message, traceback
    ├── ServerStartError         an embedded nats-server or valkey-server did not start
    ├── PreflightError           NATS, JetStream or Valkey failed a check before an actor started
    ├── HealthServerError        the health/metrics HTTP server cannot listen on its port
    └── LLMError                 a model call or the model's output failed
        ├── LLMBackendError      the provider failed (HTTP status, connection); names backend, URL, model
        │   └── LLMTimeout       every attempt of a model request ran past its timeout
        ├── LLMInputError        a task's input does not match the worker's input_schema
        ├── LLMOutputError       the output does not match output_schema, even after the repair attempt
        └── BudgetExceeded       the next model call would take a task or goal past its budget_usd

nats-py, valkey, httpx and anthropic exceptions never escape the public API untranslated.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ArgumentTypeError",
    "BackendError",
    "BackendUnavailable",
    "BrokerError",
    "BrokerUnavailable",
    "BudgetExceeded",
    "ConfigError",
    "ConfigFileError",
    "DecodeError",
    "DuplicateTaskError",
    "EncodeError",
    "HealthServerError",
    "HeddleError",
    "LLMBackendError",
    "LLMConfigError",
    "LLMError",
    "LLMInputError",
    "LLMOutputError",
    "LLMTimeout",
    "MessageTooLarge",
    "PreflightError",
    "ResultTimeout",
    "Retry",
    "ServerStartError",
    "TaskError",
    "TaskExpired",
    "TaskIdError",
    "TaskOptionError",
    "TaskRevoked",
    "TaskTimeout",
]


class HeddleError(Exception):
    """Raised for every failure Heddle reports; the root of the tree."""


class ConfigError(HeddleError):
    """Raised when settings, task options or a config file are invalid."""


class TaskOptionError(ConfigError):
    """Raised when ``@task`` is given an unknown or invalid option."""


class DuplicateTaskError(ConfigError):
    """Raised when a second task is registered under a name already in use."""


class EncodeError(HeddleError):
    """Raised when an argument or a result cannot be encoded as msgpack."""


class ArgumentTypeError(HeddleError, TypeError):
    """Raised when an argument does not fit its parameter's type hint and cannot be converted to it."""


class DecodeError(HeddleError):
    """Raised when bytes from the wire are not a valid Heddle message."""


class TaskIdError(HeddleError, ValueError):
    """Raised when a task id is empty, too long, or holds characters a NATS subject token cannot."""


class BrokerError(HeddleError):
    """Raised when a NATS or JetStream operation fails."""


class BrokerUnavailable(BrokerError):
    """Raised when nats-server cannot be reached."""


class MessageTooLarge(BrokerError):
    """Raised before publishing a message that, with its headers, exceeds the server's max_payload.

    Sending it would make nats-server close the connection (and nats-py does not
    reconnect after that), so it is refused here instead.
    """


class BackendError(HeddleError):
    """Raised when a Valkey operation fails."""


class BackendUnavailable(BackendError):
    """Raised when valkey-server cannot be reached."""


class ResultTimeout(HeddleError):
    """Raised when waiting for a task's result takes longer than the timeout given."""


class TaskTimeout(HeddleError):
    """Raised when a task runs past its ``timeout`` and is cancelled."""


class TaskRevoked(HeddleError):
    """Raised when waiting on a task that was revoked."""


class TaskExpired(TaskRevoked):
    """Raised when waiting on a task whose ``expires`` time passed before a worker started it."""


class Retry(HeddleError):
    """Raised inside a task to ask for another attempt, no earlier than ``after_s`` seconds from now.

    It counts as a retry (``heddle.current_task().retries`` increments) and uses up
    the task's ``retries``; when none are left the task fails with an error saying
    that they ran out, and with ``exc``'s type and message when one is given.

    Args:
        after_s: Seconds to wait before the next attempt (default: the task's
            retry backoff).
        exc: The cause, kept for the final failure.
    """

    def __init__(self, after_s: float | None = None, exc: BaseException | None = None) -> None:
        if after_s is not None and (
            not isinstance(after_s, int | float) or isinstance(after_s, bool) or not 0 <= after_s < float("inf")
        ):
            raise TypeError(f"Retry(after_s=...) takes seconds >= 0, got {after_s!r}")
        self.after_s = None if after_s is None else float(after_s)
        self.exc = exc
        why = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        when = f" in {self.after_s:g}s" if self.after_s is not None else ""
        super().__init__(f"retry requested{when}{why}")


class ServerStartError(HeddleError):
    """Raised when an embedded nats-server or valkey-server fails to start."""


class PreflightError(HeddleError):
    """Raised when a pre-flight check of NATS, JetStream or Valkey fails before an actor starts."""


class HealthServerError(HeddleError):
    """Raised when the health and metrics HTTP server cannot listen on its host and port."""


class TaskError(HeddleError):
    """Raised by ``AsyncResult.get()`` when the task raised an exception.

    The remote exception is never unpickled: its type name, message and
    formatted traceback travel as text.

    Attributes:
        task_id: The id of the failed task.
        type_name: Qualified name of the remote exception type, e.g. ``builtins.ValueError``.
        remote_message: ``str()`` of the remote exception.
        remote_traceback: The formatted remote traceback.
    """

    def __init__(
        self,
        task_id: str,
        type_name: str,
        remote_message: str,
        remote_traceback: str = "",
    ) -> None:
        self.task_id = task_id
        self.type_name = type_name
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        super().__init__(f"task {task_id} failed: {type_name}: {remote_message}")


class ConfigFileError(ConfigError):
    """Raised when a YAML config file is invalid; ``issues`` holds every error with file and line."""

    def __init__(self, message: str, issues: list[Any] | None = None) -> None:
        super().__init__(message)
        self.issues = list(issues or [])


class LLMConfigError(ConfigError):
    """Raised when a model tier's backend is not configured; the message names the variables to set."""


class LLMError(HeddleError):
    """Raised when a model call or the model's output fails."""


class LLMBackendError(LLMError):
    """Raised when a model provider fails; the message names the backend, URL and model.

    Attributes:
        backend: ``anthropic``, ``lmstudio`` or ``ollama``.
        url: The endpoint called.
        model: The model requested.
        status: HTTP status of the last failed attempt, if there was a response.
    """

    def __init__(self, message: str, *, backend: str = "", url: str = "", model: str = "", status: int | None = None):
        super().__init__(message)
        self.backend = backend
        self.url = url
        self.model = model
        self.status = status


class LLMTimeout(LLMBackendError):
    """Raised when every attempt of a model request runs past its timeout."""


class LLMInputError(LLMError):
    """Raised when a task's input does not match the worker's ``input_schema`` (or is too long)."""


class LLMOutputError(LLMError):
    """Raised when the model's output is not valid for ``output_schema``, even after one repair attempt."""


class BudgetExceeded(LLMError):
    """Raised before a model call that would take a task or goal past its ``budget_usd``.

    Attributes:
        spent_usd: What the task (or goal) had spent when it stopped.
        budget_usd: Its budget.
    """

    def __init__(self, message: str, *, spent_usd: float = 0.0, budget_usd: float = 0.0) -> None:
        super().__init__(message)
        self.spent_usd = spent_usd
        self.budget_usd = budget_usd
