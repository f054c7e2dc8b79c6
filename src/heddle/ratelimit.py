"""Token buckets in Valkey, shared by every router replica.

A bucket refills at ``rate_per_s`` up to ``burst``. A message that finds no
token *reserves* the next free one: the bucket goes into debt and the message
is told how long to wait, and its reservation is remembered under its task id,
so when it comes back it passes without competing again. Every message is
therefore delayed about once, in arrival order, and the total rate across
replicas never exceeds the limit (plus the initial burst).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from heddle import names
from heddle.rules import RateLimit
from heddle.store import ResultBackend

# KEYS: reservation key, then one key per bucket. ARGV: reserve (1/0), then
# rate and burst per bucket. Returns "0" to pass now, "-1" if over the limit
# and not reserving, else the seconds to wait (as a string: Lua numbers
# returned to Valkey are truncated to integers).
TAKE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local reserved = redis.call('GET', KEYS[1])
if reserved then
  local at = tonumber(reserved)
  if now >= at then
    redis.call('DEL', KEYS[1])
    return '0'
  end
  return tostring(at - now)
end
local reserve = ARGV[1] == '1'
local tokens = {}
local wait = 0
for i = 2, #KEYS do
  local rate = tonumber(ARGV[2 * i - 2])
  local burst = tonumber(ARGV[2 * i - 1])
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tk = tonumber(v[1]) or burst
  local ts = tonumber(v[2]) or now
  tk = math.min(burst, tk + math.max(0, now - ts) * rate)
  tokens[i] = tk
  if tk < 1 then
    wait = math.max(wait, (1 - tk) / rate)
  end
end
if wait > 0 and not reserve then
  return '-1'
end
for i = 2, #KEYS do
  local rate = tonumber(ARGV[2 * i - 2])
  local burst = tonumber(ARGV[2 * i - 1])
  redis.call('HSET', KEYS[i], 'tokens', tokens[i] - 1, 'ts', now)
  redis.call('EXPIRE', KEYS[i], math.ceil(burst / rate + wait) + 60)
end
if wait > 0 then
  redis.call('SET', KEYS[1], tostring(now + wait), 'EX', math.ceil(wait) + 3600)
  return tostring(wait)
end
return '0'
"""


@dataclass(frozen=True)
class Ask:
    """One message's claim on the buckets that apply to it."""

    task_id: str
    buckets: tuple[tuple[str, RateLimit], ...]  # (bucket key, limit)
    reserve: bool  # False when the rule says on_limit: dead_letter


def bucket_key(kind: str, name: str) -> str:
    """Valkey key of the bucket for a tier or a worker type."""
    return f"{names.RATE_KEY_PREFIX}{kind}:{name}"


class RateLimiter:
    """Checks many messages against their buckets in one round trip."""

    def __init__(self, backend: ResultBackend) -> None:
        self.backend = backend
        backend.register_script("take_tokens", TAKE_LUA)

    async def take(self, asks: Sequence[Ask]) -> list[float]:
        """Per ask: 0 = pass now, > 0 = seconds to wait (reserved), < 0 = over limit, rejected."""
        calls = []
        for a in asks:
            keys = [f"{names.RATE_KEY_PREFIX}reservation:{a.task_id}", *(k for k, _ in a.buckets)]
            args: list[str] = ["1" if a.reserve else "0"]
            for _, lim in a.buckets:
                args += [repr(lim.rate_per_s), str(lim.burst)]
            calls.append((keys, args))
        out = await self.backend.run_script_many("take_tokens", calls)
        return [float(x) for x in out]
