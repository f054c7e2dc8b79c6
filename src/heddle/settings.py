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
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_(self, **changes: Any) -> Settings:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)


def check_name(kind: str, value: str) -> str:
    """Validate a name that becomes a NATS subject token or consumer name."""
    if not _NAME_RE.match(value):
        raise ConfigError(
            f"{kind} {value!r} may only contain letters, digits, '_' and '-' "
            f"(it becomes a NATS subject token)"
        )
    return value
