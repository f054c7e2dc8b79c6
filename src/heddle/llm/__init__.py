"""LLM workers and model calls: YAML worker configs, backends per tier, ``complete()``.

Importing this package is cheap: backends (and the ``anthropic`` SDK) load on
first use.

Example:
    >>> import heddle
    >>> c = await heddle.llm.complete("Name a prime.", tier="local",
    ...     schema={"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}})
    >>> c.data, c.input_tokens, c.output_tokens, c.model
"""

from __future__ import annotations

from heddle.llm.complete import Completion, complete
from heddle.llm.config import WorkerConfig, load_worker_config
from heddle.llm.schema import Schema
from heddle.llm.worker import LLMCallEvent, LLMWorkerHandle, handle, worker_app

__all__ = [
    "Completion",
    "LLMCallEvent",
    "LLMWorkerHandle",
    "Schema",
    "WorkerConfig",
    "complete",
    "handle",
    "load_worker_config",
    "worker_app",
]
