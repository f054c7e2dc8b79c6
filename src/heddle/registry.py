"""Which workers are alive: heartbeats in a JetStream KV bucket with a TTL.

Every worker puts a :class:`WorkerInfo` under ``{worker_type}.{worker_id}`` in
the ``heddle_workers`` bucket every ``HEARTBEAT_S`` and deletes it when it stops.
Routers load the bucket once, then follow it live with a core-NATS
subscription to the bucket's subjects (``$KV.heddle_workers.>``), so a route
decision is a dictionary lookup, never a round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

import msgspec

from heddle import events, names
from heddle.errors import DecodeError
from heddle.messages import decode as bounded_decode

if TYPE_CHECKING:
    from heddle.broker import Broker
    from heddle.broker import Message as Msg

log = logging.getLogger("heddle.registry")

HEARTBEAT_S = 2.0
# A worker not heard from for this long is taken for dead.
ALIVE_TTL_S = 3 * HEARTBEAT_S


class WorkerInfo(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A worker's announcement of itself."""

    v: int = 1
    id: str
    worker_type: str
    tiers: list[str]  # ["*"] for a worker that takes every tier
    default_tier: str
    concurrency: int
    host: str
    pid: int
    version: str
    started_at: float
    tasks: list[str] = []


_info_decoder = msgspec.msgpack.Decoder(WorkerInfo)
_encoder = msgspec.msgpack.Encoder()


_worker_numbers = itertools.count(1)


def worker_id() -> str:
    """A new worker id, ``host-pid-n``: unique per Worker, a valid KV key token."""
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"{host}-{os.getpid()}-{next(_worker_numbers)}"


async def _bucket(broker: Broker) -> Any:
    return await broker.key_value(names.WORKERS_BUCKET, ttl_s=ALIVE_TTL_S * 2, description="heddle workers")


class Heartbeat:
    """Announces one worker until stopped."""

    def __init__(self, broker: Broker, info: WorkerInfo) -> None:
        self.broker = broker
        self.info = info
        self.key = f"{info.worker_type}.{info.id}"
        self._task: asyncio.Task[None] | None = None
        self._kv: Any = None

    async def start(self) -> None:
        """Announce now (before the worker reports ready) and keep announcing."""
        self._kv = await _bucket(self.broker)
        await self._kv.put(self.key, _encoder.encode(self.info))
        await self._announce(events.ONLINE)  # heddle.events hook
        self._task = asyncio.get_running_loop().create_task(self._beat())

    async def _announce(self, state: str) -> None:
        i = self.info
        await events.publish(self.broker, events.WorkerEvent(
            state=state, id=i.id, worker_type=i.worker_type, tiers=i.tiers, concurrency=i.concurrency,
            host=i.host, pid=i.pid, tasks=i.tasks, at=time.time(),
        ))

    async def _beat(self) -> None:
        payload = _encoder.encode(self.info)
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._kv.put(self.key, payload)
                await self._announce(events.HEARTBEAT)  # heddle.events hook
            except Exception as exc:  # disconnected: the next beat tries again
                log.debug("heartbeat failed: %r", exc)

    async def stop(self) -> None:
        """Stop announcing and withdraw the entry."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._kv.delete(self.key), 2)
            await self._announce(events.OFFLINE)  # heddle.events hook


class Registry:
    """A router's live view of the workers that are alive."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._seen: dict[str, tuple[float, WorkerInfo]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None
        # worker_type -> set of tiers served ("*" = all); rebuilt on every change.
        self.tiers: dict[str, frozenset[str]] = {}
        self.default_tier: dict[str, str] = {}

    async def start(self) -> None:
        """Subscribe first, then load the bucket, so no announcement falls in between."""
        prefix = f"$KV.{names.WORKERS_BUCKET}."
        self._prefix_len = len(prefix)
        self._sub = await self.broker.subscribe(prefix + ">", cb=self._on_update)
        kv = await _bucket(self.broker)
        try:
            keys = await kv.keys()
        except Exception:  # an empty bucket answers "no keys found"
            keys = []
        now = time.monotonic()
        for key in keys:
            with contextlib.suppress(Exception):
                entry = await kv.get(key)
                if entry.value:
                    self._seen[key] = (now, bounded_decode(_info_decoder, entry.value))
        self._rebuild()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def stop(self) -> None:
        """Stop following the bucket."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    async def _on_update(self, msg: Msg) -> None:
        key = msg.subject[self._prefix_len :]
        op = (msg.headers or {}).get("KV-Operation")
        if op in ("DEL", "PURGE") or not msg.data:
            self._seen.pop(key, None)
        else:
            try:
                self._seen[key] = (time.monotonic(), bounded_decode(_info_decoder, msg.data))
            except DecodeError:
                return
        self._rebuild()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S / 2)
            cutoff = time.monotonic() - ALIVE_TTL_S
            stale = [k for k, (seen, _) in self._seen.items() if seen < cutoff]
            for k in stale:
                del self._seen[k]
            if stale:
                self._rebuild()

    def _rebuild(self) -> None:
        tiers: dict[str, set[str]] = {}
        defaults: dict[str, str] = {}
        for _, info in sorted(self._seen.values(), key=lambda x: x[1].id):
            tiers.setdefault(info.worker_type, set()).update(info.tiers)
            defaults.setdefault(info.worker_type, info.default_tier)
        self.tiers = {k: frozenset(v) for k, v in tiers.items()}
        self.default_tier = defaults

    def workers(self) -> list[WorkerInfo]:
        """Every worker alive now."""
        return [info for _, info in self._seen.values()]

    def serves(self, worker_type: str, tier: str) -> bool:
        """True if a live worker takes ``worker_type`` tasks at ``tier``."""
        t = self.tiers.get(worker_type)
        return t is not None and (tier in t or "*" in t)
