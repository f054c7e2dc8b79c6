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
# rate, burst and cost per bucket (cost 1 for a request, the estimated model
# tokens for a token bucket). Returns "0" to pass now, "-1" if over the limit
# and not reserving, else the seconds to wait (as a string: Lua numbers
# returned to Valkey are truncated to integers). Each bucket keeps its rate and
# burst beside its tokens, for SETTLE_LUA.
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
  local rate = tonumber(ARGV[3 * i - 4])
  local burst = tonumber(ARGV[3 * i - 3])
  local cost = tonumber(ARGV[3 * i - 2])
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tk = tonumber(v[1]) or burst
  local ts = tonumber(v[2]) or now
  tk = math.min(burst, tk + math.max(0, now - ts) * rate)
  tokens[i] = tk
  if tk < cost then
    wait = math.max(wait, (cost - tk) / rate)
  end
end
if wait > 0 and not reserve then
  return '-1'
end
for i = 2, #KEYS do
  local rate = tonumber(ARGV[3 * i - 4])
  local burst = tonumber(ARGV[3 * i - 3])
  local cost = tonumber(ARGV[3 * i - 2])
  redis.call('HSET', KEYS[i], 'tokens', tokens[i] - cost, 'ts', now, 'rate', rate, 'burst', burst)
  redis.call('EXPIRE', KEYS[i], math.ceil(burst / rate + wait) + 60)
end
if wait > 0 then
  redis.call('SET', KEYS[1], tostring(now + wait), 'EX', math.ceil(wait) + 3600)
  return tostring(wait)
end
return '0'
"""

# KEYS: token buckets a task was charged from. ARGV: tokens to take back out
# (negative: to give back), seconds the provider asked to wait (0: none).
# Settles a model-token charge with the usage the provider reported; a 429's
# wait empties the bucket for that long. A bucket that no longer exists is left alone.
SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local delta = tonumber(ARGV[1])
local block = tonumber(ARGV[2])
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts', 'rate', 'burst')
  local rate = tonumber(v[3])
  local burst = tonumber(v[4])
  if rate and burst then
    local tk = math.min(burst, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate)
    tk = math.min(burst, tk - delta)
    if block > 0 then
      tk = math.min(tk, -rate * block)
    end
    redis.call('HSET', KEYS[i], 'tokens', tk, 'ts', now)
  end
end
return 1
"""


@dataclass(frozen=True)
class Ask:
    """One message's claim on the buckets that apply to it."""

    task_id: str
    buckets: tuple[tuple[str, RateLimit, float], ...]  # (bucket key, limit, cost)
    reserve: bool  # False when the rule says on_limit: dead_letter


def bucket_key(kind: str, name: str) -> str:
    """Valkey key of the bucket for a tier or a worker type (kinds ``tier``, ``worker``, ``tokens-tier``...)."""
    return f"{names.RATE_KEY_PREFIX}{kind}:{name}"


def reservation_key(task_id: str) -> str:
    """Valkey key of a delayed message's reserved turn."""
    return f"{names.RATE_KEY_PREFIX}reservation:{task_id}"


class RateLimiter:
    """Checks many messages against their buckets in one round trip."""

    def __init__(self, backend: ResultBackend) -> None:
        self.backend = backend
        backend.register_script("take_tokens", TAKE_LUA)
        backend.register_script("settle_tokens", SETTLE_LUA)

    async def take(self, asks: Sequence[Ask]) -> list[float]:
        """Per ask: 0 = pass now, > 0 = seconds to wait (reserved), < 0 = over limit, rejected."""
        calls = []
        for a in asks:
            keys = [reservation_key(a.task_id), *(k for k, _, _ in a.buckets)]
            args: list[str] = ["1" if a.reserve else "0"]
            for _, lim, cost in a.buckets:
                args += [repr(lim.rate_per_s), str(lim.burst), repr(float(cost))]
            calls.append((keys, args))
        out = await self.backend.run_script_many("take_tokens", calls)
        return [float(x) for x in out]

    async def settle(self, charges: Sequence[tuple[Sequence[str], float, float]]) -> None:
        """Settle model-token charges: per ``(bucket keys, tokens over the estimate, seconds a 429 asked)``."""
        calls = [(list(keys), [repr(float(delta)), repr(float(block_s))]) for keys, delta, block_s in charges if keys]
        if calls:
            await self.backend.run_script_many("settle_tokens", calls)
