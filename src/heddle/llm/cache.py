"""Memoized LLM stages: a content-addressed cache of YAML LLM workers' outputs in Valkey.

A pipeline stage with ``cache: true`` is sent with the ``heddle-cache`` task
header (its value: the entry's time to live, in seconds). The worker then
looks its answer up under ``heddle:llm-cache:{sha256}``, the hash of

* the worker config (every field but where it was loaded from: the system
  prompt, both schemas, token limits, temperature, escalation...),
* the backend and model of the tier it runs on, and
* the validated input object,

so the same input to the same config and model is answered from Valkey with
no provider call, and any change to one of them misses. Only a valid output
is stored, after the call; a hit's result metadata says ``cache: hit``, costs
nothing (``cost_usd: 0``, ``llm_calls: 0``) and names the task that paid for
it (``cached_from``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import TYPE_CHECKING, Any, Final

import msgspec

from heddle import names
from heddle.messages import encoder

if TYPE_CHECKING:
    from heddle.context import TaskContext
    from heddle.llm.config import WorkerConfig
    from heddle.store import ResultBackend

__all__ = ["DEFAULT_TTL_S", "Cached", "Memo", "StageCache", "cache_digest", "cache_ttl_s", "hit_meta", "new_entry"]

#: How long a cached output lives when the stage does not say (one day).
DEFAULT_TTL_S: Final = 86_400

GET_LUA = "return redis.call('GET', KEYS[1])"
PUT_LUA = "redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2]) return 1"


class Cached(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One cached output and where it came from."""

    output: Any
    model: str = ""
    backend: str = ""
    task_id: str = ""
    at: float = 0.0


_cached_decoder: Final = msgspec.msgpack.Decoder(Cached)


def cache_ttl_s(headers: dict[str, str]) -> int | None:
    """The TTL a task's ``heddle-cache`` header asks for; None when it asks for no caching."""
    value = headers.get(names.HDR_CACHE, "")
    if not value or value == "0":
        return None
    return int(value) if value.isdigit() else DEFAULT_TTL_S


def cache_digest(config: WorkerConfig, backend: str, model: str, payload: Any) -> str:
    """The content address of one call: config, backend, model and input, hashed together."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "source"}
    text = json.dumps({"config": fields, "backend": backend, "model": model, "input": payload},
                      sort_keys=True, ensure_ascii=False, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


class StageCache:
    """Reads and writes cached outputs through the result backend's seam.

    Args:
        backend: A connected result backend.
    """

    def __init__(self, backend: ResultBackend) -> None:
        self.backend = backend
        backend.register_script("llm_cache_get", GET_LUA)
        backend.register_script("llm_cache_put", PUT_LUA)

    async def get(self, digest: str) -> Cached | None:
        """The cached output under ``digest``, or None (also for an entry that does not decode)."""
        (raw,) = await self.backend.run_script_many("llm_cache_get", [((names.llm_cache_key(digest),), ())])
        if raw is None:
            return None
        try:
            return _cached_decoder.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None  # written by another version: a miss, then overwritten

    async def put(self, digest: str, entry: Cached, ttl_s: int) -> None:
        """Store ``entry`` under ``digest`` for ``ttl_s`` seconds."""
        await self.backend.run_script_many(
            "llm_cache_put", [((names.llm_cache_key(digest),), (encoder.encode(entry), str(max(1, ttl_s))))])


def hit_meta(entry: Cached, tier: str) -> dict[str, Any]:
    """The result metadata of a task answered from the cache."""
    return {"cache": "hit", "cached_from": entry.task_id, "model": entry.model, "backend": entry.backend,
            "tier": tier, "input_tokens": 0, "output_tokens": 0, "llm_calls": 0, "cost_usd": 0.0,
            "cached_at": entry.at}


def new_entry(output: Any, model: str, backend: str, task_id: str) -> Cached:
    """What a miss stores once its output is valid."""
    return Cached(output=output, model=model, backend=backend, task_id=task_id, at=time.time())


@dataclasses.dataclass
class Memo:
    """One task's cache lookup: its ``hit`` (or None), and how to store its output on a miss."""

    cache: StageCache
    digest: str
    ttl_s: int
    ctx: TaskContext
    backend: str
    hit: Cached | None = None

    @classmethod
    async def look_up(cls, cache: StageCache, digest: str, ttl_s: int, ctx: TaskContext, backend: str,
                      tier: str) -> Memo:
        """Look the call up; a hit's metadata goes in the task's (``cache: hit``), a miss says ``cache: miss``."""
        memo = cls(cache, digest, ttl_s, ctx, backend, await cache.get(digest))
        if memo.hit is not None:
            ctx.meta.update(hit_meta(memo.hit, tier))
        else:
            ctx.meta["cache"] = "miss"
        return memo

    async def store(self, output: Any, model: str) -> None:
        """Keep a miss's valid output for the next call with the same config, model and input."""
        await self.cache.put(self.digest, new_entry(output, model, self.backend, self.ctx.id), self.ttl_s)
