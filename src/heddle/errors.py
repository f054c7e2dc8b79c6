"""Heddle's exceptions, all rooted at :class:`HeddleError`.

The tree::

    HeddleError
    ├── ConfigError              bad settings, options or YAML
    │   ├── TaskOptionError      unknown or invalid @task option
    │   └── DuplicateTaskError   two tasks registered under one name
    ├── EncodeError              an argument or result msgspec cannot encode
    ├── DecodeError              bytes that are not a valid Heddle message
    ├── BrokerError              NATS / JetStream failures (translated in broker.py)
    │   └── BrokerUnavailable    nats-server cannot be reached
    ├── BackendError             Valkey failures (translated in results.py)
    │   └── BackendUnavailable   valkey-server cannot be reached
    ├── ResultTimeout            ``AsyncResult.get(timeout=...)`` ran out
    ├── TaskTimeout              a task ran past its ``timeout`` and was cancelled
    ├── TaskRevoked              the task was revoked before it produced a result
    ├── TaskError                the task raised; carries the remote type, message, traceback
    └── ServerStartError         an embedded nats-server or valkey-server did not start

nats-py, valkey and httpx exceptions never escape the public API untranslated.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "DecodeError",
    "DuplicateTaskError",
    "EncodeError",
    "HeddleError",
    "ResultTimeout",
    "ServerStartError",
    "TaskError",
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


class DecodeError(HeddleError):
    """Raised when bytes from the wire are not a valid Heddle message."""


class BrokerError(HeddleError):
    """Raised when a NATS or JetStream operation fails."""


class BrokerUnavailable(BrokerError):
    """Raised when nats-server cannot be reached."""


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


class ServerStartError(HeddleError):
    """Raised when an embedded nats-server or valkey-server fails to start."""


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
