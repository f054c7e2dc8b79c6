"""Concurrency limits: at most N runs at once per task, or per value of one argument.

``@app.task(concurrency_limit=2, concurrency_key="tenant")`` lets at most two
runs of the task with the same ``tenant`` argument go on at once, across every
worker process; without ``concurrency_key`` the limit is global to the task.

A slot is a *lease*: a member of one Valkey sorted set per (task, key value),
named ``heddle:limit:{task}:{value}``, scored by the time its lease runs out
(Valkey's own clock, so workers' clocks do not matter). A worker takes a slot
before it claims the task, renews the leases of what it runs every third of the
lease time, and gives the slot back when the outcome is stored. A worker that
is SIGKILLed renews nothing: its slots free themselves within one lease time
(:attr:`~heddle.settings.Settings.ack_wait_s`, the same bound in which
JetStream redelivers its messages).

A task that finds no free slot holds no worker slot: it goes back to the stream
for a short, growing delay (up to :data:`MAX_WAIT_S`) and tries again, on any
worker. Each try is a JetStream delivery, so before a waiting message runs out
of deliveries the worker puts a fresh copy of it on the same subject and acks
the old one (header ``Heddle-Waited``); the task id is unchanged, and the claim
in Valkey keeps a copy left by a crash in between from running twice. Waiting
tasks of one key start in no particular order.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from heddle import names
from heddle.store import ResultBackend

__all__ = ["MAX_WAIT_S", "Lease", "Leases", "key_value", "wait_s"]

# Longest pause between two tries of a task waiting for a slot.
MAX_WAIT_S: Final = 2.0
_FIRST_WAIT_S: Final = 0.1
# Key values longer than this are hashed into the key name.
_MAX_VALUE_CHARS: Final = 120

# KEYS[1]: the slot set. ARGV: holder (task id), limit, lease seconds.
# Returns 1 when the holder has a slot (taken now, or already its own), else 0.
ACQUIRE_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 60)
  return 1
end
return 0
"""

# KEYS[1]: the slot set. ARGV: holder, lease seconds. Extends a lease still held.
RENEW_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local ttl = tonumber(ARGV[2])
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[1]) == 1 then
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 60)
  return 1
end
return 0
"""

# KEYS[1]: the slot set. ARGV: holder. Gives the slot back.
RELEASE_LUA: Final = """
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


@dataclass(frozen=True)
class Lease:
    """One task's claim on a slot: the slot set's key, the holder (task id), the limit, and what it counts.

    ``label`` is ``{concurrency_key}={value}``, or ``*`` for a limit on the whole task;
    the worker records it in the result's metadata (``concurrency``).
    """

    key: str
    holder: str
    limit: int
    label: str = "*"


def key_value(value: Any) -> str:
    """The text of a concurrency key's value, as it appears in the slot set's name."""
    text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
    if len(text) > _MAX_VALUE_CHARS:
        text = "sha1:" + hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()
    return text


def slot_key(task: str, value: str) -> str:
    """Valkey key of the slot set of ``task`` for one key value (``*`` for a global limit)."""
    return f"{names.LIMIT_KEY_PREFIX}{task}:{value}"


def wait_s(tries: int) -> float:
    """Pause before a waiting task's next try: growing with ``tries``, jittered, at most MAX_WAIT_S."""
    base: float = min(MAX_WAIT_S, _FIRST_WAIT_S * 2.0 ** min(tries, 8))
    return base / 2 + random.uniform(0, base / 2)


class Leases:
    """Takes, renews and gives back slots, many per round trip.

    Args:
        backend: The result store (Valkey stays behind its seam).
        ttl_s: How long a lease lasts unless renewed.
    """

    def __init__(self, backend: ResultBackend, ttl_s: float) -> None:
        self.backend = backend
        self.ttl_s = ttl_s
        backend.register_script("lease_acquire", ACQUIRE_LUA)
        backend.register_script("lease_renew", RENEW_LUA)
        backend.register_script("lease_release", RELEASE_LUA)

    async def acquire(self, leases: Sequence[Lease]) -> list[bool]:
        """Per lease: True if its holder now has a slot."""
        if not leases:
            return []
        ttl = repr(self.ttl_s)
        out = await self.backend.run_script_many(
            "lease_acquire", [([ls.key], [ls.holder, str(ls.limit), ttl]) for ls in leases])
        return [x == 1 for x in out]

    async def renew(self, leases: Sequence[Lease]) -> None:
        """Extend every lease still held."""
        if leases:
            ttl = repr(self.ttl_s)
            await self.backend.run_script_many("lease_renew", [([ls.key], [ls.holder, ttl]) for ls in leases])

    async def release(self, leases: Sequence[Lease]) -> None:
        """Give the slots back."""
        if leases:
            await self.backend.run_script_many("lease_release", [([ls.key], [ls.holder]) for ls in leases])
