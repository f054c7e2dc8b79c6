"""The live view of workers and routing rules every router and direct-routing client keeps."""

from __future__ import annotations

import asyncio
import uuid

import msgspec

import heddle
from heddle import names
from heddle.registry import ALIVE_TTL_S, Registry, RoutingRules, WorkerInfo
from heddle.rules import RouterRules


def _info(worker_type: str, n: int, tier: str) -> WorkerInfo:
    return WorkerInfo(id=f"host-1-{n}", worker_type=worker_type, tiers=[tier], default_tier=tier,
                      concurrency=1, host="host", pid=1, version="0", started_at=0.0)


async def test_a_registry_started_while_other_workers_heartbeat_sees_every_entry(fresh_servers):
    """Loading the bucket misses no entry while others are put meanwhile.

    nats-py's ``kv.keys()`` lists keys through an ordered consumer and, with puts
    arriving meanwhile (heartbeats every 2 s in a live system), sometimes ends its
    listing early and answers "no keys": a router or client then thinks no worker is
    alive and the rules unknown until the next heartbeat. The entries checked here are
    put once, before the loop, so only the load can find them.
    """
    servers = fresh_servers
    app = heddle.Heddle(f"r{uuid.uuid4().hex[:8]}", nats_url=servers.nats_url, valkey_url=servers.valkey_url)
    conns = await app.connections()
    kv = await conns.broker.key_value(names.WORKERS_BUCKET, ttl_s=ALIVE_TTL_S * 2)
    wt = app.name
    steady = {f"{wt}.host-1-{n}": _info(wt, n, tier) for n, tier in enumerate(names.TIERS)}
    for key, info in steady.items():
        await kv.put(key, msgspec.msgpack.encode(info))
    await kv.put(names.ROUTING_RULES_PREFIX + wt, msgspec.msgpack.encode(RoutingRules.of(RouterRules())))
    stop, started = asyncio.Event(), asyncio.Event()

    async def heartbeats(host: int) -> None:
        """Other workers' heartbeats, each host on a connection of its own, a put every millisecond."""
        other = heddle.Heddle(app.name, nats_url=servers.nats_url, valkey_url=servers.valkey_url)
        try:
            busy_kv = await (await other.connections()).broker.key_value(names.WORKERS_BUCKET, ttl_s=ALIVE_TTL_S * 2)
            n = 0
            while not stop.is_set():
                n += 1
                info = _info("beating", n % 3, "local")
                await busy_kv.put(f"beating.host-{host}-{n % 3}", msgspec.msgpack.encode(info))
                started.set()
                await asyncio.sleep(0.001)
        finally:
            await other.aclose()

    beating = asyncio.gather(heartbeats(2), heartbeats(3))
    try:
        await asyncio.wait_for(started.wait(), 10)
        missed = []
        for attempt in range(600):
            registry = Registry(conns.broker)
            await registry.start()
            seen = {f"{w.worker_type}.{w.id}" for w in registry.workers()} & set(steady)
            if seen != set(steady) or registry.rules is None:
                missed.append((attempt, sorted(set(steady) - seen), registry.rules))
            await registry.stop()
        assert not missed, f"{len(missed)} of 600 loads missed entries, the first: {missed[:3]}"
    finally:
        stop.set()
        await beating
        await app.aclose()
