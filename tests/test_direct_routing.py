"""Direct routing: a client sends a task straight to its worker subject when no router rule needs the router.

Each test runs on servers of its own, so no other test's router announces rules
of its own into the workers bucket meanwhile.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import nats

import heddle
from heddle import names
from heddle.connections import ROUTES_RETRY_S
from heddle.registry import HEARTBEAT_S, RoutingRules
from heddle.router import Router
from heddle.rules import RateLimit, RouterRules
from heddle.testing import start_actors
from heddle.worker import Worker

T = 20


async def until(predicate: Any, timeout_s: float, what: str) -> None:
    """Wait on the loop (actors run on it) until ``predicate()`` holds."""
    async def poll() -> None:
        while not predicate():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}") from None


def _app(servers: Any, **settings: Any) -> heddle.Heddle:
    app = heddle.Heddle(f"d{uuid.uuid4().hex[:8]}", nats_url=servers.nats_url, valkey_url=servers.valkey_url,
                        **settings)

    @app.task(name="where")
    def where() -> str:
        return heddle.current_task().tier

    return app


@asynccontextmanager
async def _running(*actors: Any) -> AsyncIterator[None]:
    runners = await start_actors(list(actors))
    try:
        yield
    finally:
        for a in actors:
            a.request_stop()
        await asyncio.gather(*runners, return_exceptions=True)


async def _route(r: Any) -> dict[str, str]:
    _, record = await r._fetch()
    return record.meta["route"]


async def test_a_task_goes_straight_to_its_worker_when_no_rule_needs_the_router(fresh_servers):
    app = _app(fresh_servers)
    router = Router(app, rules=RouterRules())
    async with _running(Worker(app, tier="standard"), router):
        r = app.send_task("where")
        assert await r.aget(timeout=T) == "standard"
        assert await _route(r) == {"tier": "standard", "reason": "worker default"}
        assert router.stats["routed"] == 0
    await app.aclose()


async def test_a_tier_override_applies_to_a_task_sent_directly(fresh_servers):
    app = _app(fresh_servers)
    router = Router(app, rules=RouterRules(tier_overrides={app.name: "local"}))
    async with _running(Worker(app, tier="local"), Worker(app, tier="standard"), router):
        r = app.send_task("where", tier="standard")
        assert await r.aget(timeout=T) == "local"
        assert await _route(r) == {"tier": "local", "reason": "rule override"}
        assert router.stats["routed"] == 0
    await app.aclose()


async def test_a_rate_limited_worker_type_or_tier_goes_through_the_router(fresh_servers):
    app = _app(fresh_servers)
    limit = RateLimit(rate_per_s=1000.0, burst=1000)
    router = Router(app, rules=RouterRules(worker_limits={app.name: limit}))
    async with _running(Worker(app), router):
        assert await app.send_task("where").aget(timeout=T) == "standard"
        assert router.stats["routed"] == 1
    await app.aclose()
    app = _app(fresh_servers)
    router = Router(app, rules=RouterRules(tier_limits={"local": limit}))
    async with _running(Worker(app), router):
        assert await app.send_task("where").aget(timeout=T) == "standard"  # no limit on standard: direct
        assert await app.send_task("where", tier="local").aget(timeout=T) == "local"
        assert router.stats["routed"] == 1
    await app.aclose()


async def test_a_task_with_no_live_worker_for_its_tier_waits_at_the_router_until_one_comes(fresh_servers):
    app = _app(fresh_servers)
    router = Router(app, rules=RouterRules(unknown_worker_grace_s=60.0))
    async with _running(Worker(app, tier="standard"), router):
        r = app.send_task("where", tier="frontier")
        await until(lambda: router.stats["waiting"] > 0, T, "the router to hold the task")
        async with _running(Worker(app, tier="frontier")):
            assert await r.aget(timeout=T) == "frontier"
        assert router.stats["routed"] == 1
    await app.aclose()


async def test_without_direct_routing_or_when_routers_disagree_every_task_goes_through_the_router(fresh_servers):
    app = _app(fresh_servers, direct_routing=False)
    router = Router(app, rules=RouterRules())
    async with _running(Worker(app), router):
        assert await app.send_task("where").aget(timeout=T) == "standard"
        assert router.stats["routed"] == 1
    await app.aclose()
    app = _app(fresh_servers)
    # Rules that differ (a fallback), though not for this task: a client cannot know which replica decides.
    one, other = Router(app, rules=RouterRules()), Router(app, rules=RouterRules(fallback={"frontier": ("local",)}))
    async with _running(Worker(app), one, other):
        assert await app.send_task("where").aget(timeout=T) == "standard"
        assert one.stats["routed"] + other.stats["routed"] == 1
    await app.aclose()


async def test_a_rules_reload_reaches_clients_at_once(fresh_servers, tmp_path):
    app = _app(fresh_servers)
    path = tmp_path / "router_rules.yaml"
    path.write_text("{}\n")
    router = Router(app, rules_path=path, watch_rules=False)
    async with _running(Worker(app), router):
        assert await app.send_task("where").aget(timeout=T) == "standard"
        path.write_text(f"tier_overrides:\n  {app.name}: frontier\n")
        assert router.reload()
        conns = await app.connections()
        await conns.route("heddle.tasks.incoming", {"Heddle-Worker-Type": app.name, "Nats-Msg-Id": "x"})
        routes = conns._routes.result()
        want = RoutingRules(tier_overrides={app.name: "frontier"})
        await until(lambda: routes.registry.rules == want, T, "the client to see the new rules")
        assert await app.send_task("where").aget(timeout=T) == "frontier"
        assert router.stats["routed"] == 0
    await app.aclose()


async def test_a_task_sent_again_through_the_router_after_a_direct_send_runs_once(fresh_servers):
    runs: list[str] = []
    app = _app(fresh_servers)

    @app.task(name="count")
    def count() -> int:
        runs.append(heddle.current_task().id)
        return len(runs)

    via_router = heddle.Heddle(app.name, nats_url=fresh_servers.nats_url, valkey_url=fresh_servers.valkey_url,
                               direct_routing=False)
    router = Router(app, rules=RouterRules())
    async with _running(Worker(app), router):
        tid = uuid.uuid4().hex
        assert await app.send_task("count", task_id=tid).aget(timeout=T) == 1
        again = via_router.send_task("count", task_id=tid, worker_type=app.name)
        await again.sent()
        assert await again.aget(timeout=T) == 1
        await until(lambda: router.stats["routed"] == 1, T, "the router to pass the copy on")
        assert await app.send_task("count").aget(timeout=T) == 2  # the worker went on; the copy never ran
    assert runs[0] == tid and len(runs) == 2
    await app.aclose()
    await via_router.aclose()


async def test_a_client_that_could_not_read_the_workers_bucket_routes_directly_once_it_can(fresh_servers):
    """A bucket that cannot be read at the first send costs direct routing for a while, not for good."""
    app = _app(fresh_servers)
    client = heddle.Heddle(app.name, nats_url=fresh_servers.nats_url, valkey_url=fresh_servers.valkey_url)
    nc = await nats.connect(fresh_servers.nats_url)
    js = nc.jetstream()
    bucket_stream = f"KV_{names.WORKERS_BUCKET}"
    router = Router(app, rules=RouterRules())
    try:
        async with _running(Worker(app), router):
            # A stream in the bucket's place that is no key-value bucket: the client cannot follow it.
            await js.delete_stream(bucket_stream)
            await js.add_stream(name=bucket_stream, subjects=["not.a.bucket"])
            assert await client.send_task("where", worker_type=app.name).aget(timeout=T) == "standard"
            assert router.stats["routed"] == 1
            await js.delete_stream(bucket_stream)  # gone: the next look creates the bucket anew

            async def sent_directly() -> bool:
                before = router.stats["routed"]
                assert await client.send_task("where", worker_type=app.name).aget(timeout=T) == "standard"
                return router.stats["routed"] == before

            deadline = asyncio.get_running_loop().time() + ROUTES_RETRY_S + 4 * HEARTBEAT_S + T
            while not await sent_directly():
                assert asyncio.get_running_loop().time() < deadline, "every task still goes through the router"
                await asyncio.sleep(0.1)
    finally:
        await nc.close()
        await client.aclose()
        await app.aclose()
