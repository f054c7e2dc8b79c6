"""Valkey Cluster, Sentinel, fencing tokens and WAIT, against real servers (#20 item 3).

* Under a 3-primary Valkey Cluster (``VALKEY_CLUSTER=1``) the normal paths run:
  batches of tasks whose keys fall on every node, retries, rate limits (one
  script on a reservation and several buckets), concurrency limits, an
  orchestrated chain and the audit. None hits CROSSSLOT.
* Fencing: a claim's token is stored with the state it writes; a RETRY from an
  older claim is refused, a final state is never overwritten, and a store
  retried with its own token counts as written.
* Under Sentinel a final result is not acknowledged until a replica holds it.
* Bad combinations of the settings are ConfigErrors that say what to change.

The failover itself (kill -9 of the primary mid-run) is tests/chaos/test_valkey_failover.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator

import pytest

import heddle
from heddle import names, store
from heddle.audit import unfinished
from heddle.errors import ConfigError
from heddle.graphs.canvas import chain
from heddle.messages import FAILURE, RETRY, SUCCESS
from heddle.preflight import check_valkey
from heddle.router import Router
from heddle.rules import RateLimit, RouterRules
from heddle.settings import Settings
from heddle.store import ResultBackend, StoreRequest
from heddle.testing import EmbeddedNats, EmbeddedValkey, aworker
from heddle.testing.orchestrators import aorchestrator
from heddle.testing.valkey_ha import EmbeddedValkeyCluster, EmbeddedValkeySentinel, valkey_command
from tests.chaos._support import emit


@pytest.fixture(scope="module")
def nats() -> Iterator[EmbeddedNats]:
    with EmbeddedNats("127.0.0.1", None, None) as n:
        yield n  # type: ignore[misc]


@pytest.fixture(scope="module")
def valkey_cluster() -> Iterator[EmbeddedValkeyCluster]:
    with EmbeddedValkeyCluster(3) as c:
        yield c


@pytest.fixture(scope="module")
def sentinel() -> Iterator[EmbeddedValkeySentinel]:
    with EmbeddedValkeySentinel(replicas=2, sentinels=3) as s:
        yield s


@pytest.fixture
def single() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey("127.0.0.1", None, None) as v:
        yield v  # type: ignore[misc]


def _cluster_app(nats: EmbeddedNats, cluster: EmbeddedValkeyCluster) -> heddle.Heddle:
    return heddle.Heddle(f"k{uuid.uuid4().hex[:8]}", nats_url=nats.url, valkey_url=cluster.url, valkey_cluster=True)


def _sentinel_settings(s: EmbeddedValkeySentinel, **extra: object) -> Settings:
    return Settings(valkey_url=s.url, valkey_sentinels=s.sentinel_addresses,
                    valkey_sentinel_master=s.master_name, **extra)  # type: ignore[arg-type]


# -- Valkey Cluster --------------------------------------------------------------------


async def test_under_a_valkey_cluster_batches_retries_chains_and_the_audit_work_on_every_node(nats, valkey_cluster):
    app = _cluster_app(nats, valkey_cluster)
    attempts: dict[int, int] = {}

    @app.task(name="square")
    def square(n: int) -> int:
        return n * n

    @app.task(name="flaky", retries=2, retry_backoff=False, autoretry_for=(ValueError,))
    def flaky(n: int) -> int:
        attempts[n] = attempts.get(n, 0) + 1
        if attempts[n] == 1:
            raise ValueError("first try fails")
        return n

    @app.task(name="add")
    def add(a: int, b: int) -> int:
        return a + b

    try:
        async with aworker(app, concurrency=32), aorchestrator(app):
            # 300 ids: their keys fall in every node's slots, so claim and store batches span nodes.
            squares = [square.apply_async((n,)) for n in range(300)]
            assert [await r.aget(timeout=60) for r in squares] == [n * n for n in range(300)]
            flakies = [flaky.apply_async((n,)) for n in range(20)]
            assert [await r.aget(timeout=60) for r in flakies] == list(range(20))
            assert all(r.record.retries == 1 for r in flakies)
            goal = chain(add.s(1, 2), add.s(3), add.s(4)).delay()
            assert await goal.aget(timeout=60) == 10
            conns = await app.connections()
            report = await unfinished(conns.backend, older_than_s=0)
            assert report.total == 0, report
        nodes = {valkey_command(n.host, n.port, "DBSIZE") for n in valkey_cluster.nodes}
        assert all(isinstance(k, int) and k > 0 for k in nodes), nodes  # results on every primary
    finally:
        await app.aclose()


async def test_under_a_valkey_cluster_rate_limits_and_concurrency_limits_hold(nats, valkey_cluster):
    app = _cluster_app(nats, valkey_cluster)
    running: list[int] = []
    most = 0

    @app.task(name="cheap")
    def cheap(i: int) -> int:
        return i

    @app.task(name="one_at_a_time", concurrency_limit=1)
    async def one_at_a_time(i: int) -> int:
        nonlocal most
        running.append(i)
        most = max(most, len(running))
        await asyncio.sleep(0.02)
        running.remove(i)
        return i

    # A reservation key and a bucket key in one script: the {rate} tag keeps them in one slot.
    rules = RouterRules(worker_limits={app.name: RateLimit(0.01, 3, "dead_letter")})
    router = Router(app, rules=rules)
    try:
        async with aworker(app, concurrency=16, router=False):
            runner = asyncio.ensure_future(router.run())
            await router.ready.wait()
            try:
                outcomes = []
                for r in [cheap.apply_async((i,)) for i in range(6)]:
                    try:
                        outcomes.append(await r.aget(timeout=30))
                    except heddle.TaskError as exc:
                        outcomes.append(exc.remote_message)
                assert sum(isinstance(o, int) for o in outcomes) == 3
                assert sum(isinstance(o, str) and "rate limit exceeded" in o for o in outcomes) == 3
            finally:
                router.request_stop()
                await runner
        async with aworker(app, concurrency=16):
            limited = [one_at_a_time.apply_async((i,)) for i in range(8)]
            assert sorted([await r.aget(timeout=60) for r in limited]) == list(range(8))
        assert most == 1
    finally:
        await app.aclose()


async def test_preflight_under_a_valkey_cluster_checks_every_primary_has_the_replicas_results_wait_for(
    valkey_cluster,
):
    ok = await check_valkey(Settings(valkey_url=valkey_cluster.url, valkey_cluster=True))
    assert ok.ok and ok.url.endswith("(cluster)"), ok
    short = await check_valkey(Settings(valkey_url=valkey_cluster.url, valkey_cluster=True, valkey_wait_replicas=1))
    assert not short.ok and "a primary has 0 connected replica(s)" in short.detail, short


async def test_a_plain_valkey_server_named_as_a_cluster_is_a_clear_error(single):
    backend = ResultBackend(Settings(valkey_url=single.url, valkey_cluster=True))
    with pytest.raises(heddle.BackendError, match=r"VALKEY_CLUSTER is set but valkey-server at .* is not in cluster"):
        await backend.connect()
    await backend.close()


async def test_under_a_valkey_cluster_with_replicas_results_wait_for_them_and_survive_a_primary_kill():
    with EmbeddedValkeyCluster(3, replicas=1) as cluster:
        backend = ResultBackend(Settings(valkey_url=cluster.url, valkey_cluster=True, valkey_wait_replicas=1,
                                         valkey_wait_timeout_s=0.5))
        await backend.connect()
        try:
            ready = await check_valkey(backend.settings)
            assert ready.ok and "1 replica(s) connected (results wait for 1)" in ready.detail, ready
            before = [f"b{uuid.uuid4().hex[:10]}" for _ in range(60)]
            await backend.claim_many(before, "w")
            # Keys on all three primaries: one WAIT goes to each, and each has its replica.
            assert all(await backend.store_many([StoreRequest(t, SUCCESS, b"before") for t in before]))
            victim = cluster.node_at(backend.client.get_node_from_key(names.result_key(before[0])).port)
            victim.stop(kill=True)
            after = [f"a{uuid.uuid4().hex[:10]}" for _ in range(60)]
            # Retried against the promoted replica once the cluster has failed over...
            await backend.claim_many(after, "w")
            stores = [StoreRequest(t, SUCCESS, b"after") for t in after]
            # ...which has no replica of its own: stored, but not to be acknowledged yet.
            with pytest.raises(store.NotReplicated, match="only 0 of 1 replica"):
                await backend.store_many(stores)
            victim.start()  # back as the replica of the node that replaced it
            cluster.wait_ready()
            assert all(await backend.store_many(stores))  # the same claims' writes: counted as written
            found = await backend.final_records(before + after)
            assert found == {**{t: b"before" for t in before}, **{t: b"after" for t in after}}
            promoted = backend.client.get_node_from_key(names.result_key(before[0])).port
            assert promoted != victim.port
        finally:
            await backend.close()


# -- fencing ---------------------------------------------------------------------------


async def test_a_retry_from_an_older_claim_is_refused_and_a_final_result_is_never_overwritten(single):
    a, b = ResultBackend(Settings(valkey_url=single.url)), ResultBackend(Settings(valkey_url=single.url))
    await a.connect()
    await b.connect()
    try:
        tid = f"t{uuid.uuid4().hex[:8]}"
        (first,) = await a.claim_many([tid], "worker-a")  # worker a claims, then freezes past AckWait
        (second,) = await b.claim_many([tid], "worker-b")  # the message is redelivered to worker b
        assert 0 < first.token < second.token
        assert await b.fencing_tokens(tid) == (second.token, 0)
        # b's attempt fails and schedules a retry (retries=1), stored with b's token
        assert await b.store(StoreRequest(tid, RETRY, b"b-retry", 1, token=second.token))
        # a wakes up and stores its own RETRY (retries=1 too, from its older view): fenced off
        assert not await a.store(StoreRequest(tid, RETRY, b"a-retry", 1, token=first.token))
        assert await a.progress_many([tid]) == [(RETRY, "worker-b", pytest.approx(time.time(), abs=60))]
        assert await b.fencing_tokens(tid) == (second.token, second.token)
        # b's next attempt stores SUCCESS; a stale FAILURE, with either token, cannot replace it
        (third,) = await b.claim_many([tid], "worker-b")
        assert third.token > second.token
        assert await b.store(StoreRequest(tid, SUCCESS, b"b-success", token=third.token))
        assert not await a.store(StoreRequest(tid, FAILURE, b"a-failure", token=first.token))
        assert not await a.store(StoreRequest(tid, FAILURE, b"a-failure"))
        assert await a.final_records([tid]) == {tid: b"b-success"}
        # the writer of the stored result retrying its store (a lost reply, a WAIT shortfall)
        # is told it wrote, so it announces its result; anyone else is not
        assert await b.store(StoreRequest(tid, SUCCESS, b"b-success", token=third.token))
        assert not await a.store(StoreRequest(tid, SUCCESS, b"a-success", token=second.token))
    finally:
        await a.close()
        await b.close()


async def test_a_claim_takes_a_token_above_the_last_one_even_when_the_clock_is_behind_it(single):
    backend = ResultBackend(Settings(valkey_url=single.url))
    await backend.connect()
    try:
        tid = f"t{uuid.uuid4().hex[:8]}"
        # A token from a primary whose clock ran ahead (or from far in the future): the next
        # claim still gets a larger one, so order survives a failover to a slower clock.
        ahead = (int(time.time()) + 3600) * 1_000_000
        valkey_command(single.host, single.port, "HSET", names.result_key(tid), "fence", ahead, "state", "STARTED")
        (claim,) = await backend.claim_many([tid], "w")
        assert claim.token == ahead + 1
        # The worker's store carries that token without being told (remembered from its claim).
        assert await backend.store(StoreRequest(tid, SUCCESS, b"done"))
        assert await backend.fencing_tokens(tid) == (ahead + 1, ahead + 1)
    finally:
        await backend.close()


# -- Sentinel and WAIT -----------------------------------------------------------------


async def test_under_sentinel_a_final_result_is_not_acknowledged_until_a_replica_holds_it(sentinel):
    backend = ResultBackend(_sentinel_settings(sentinel, valkey_wait_timeout_s=0.2))
    await backend.connect()
    replicas = [n for n in sentinel.nodes if n.port != sentinel.primary_port()]
    try:
        tid = f"t{uuid.uuid4().hex[:8]}"
        await backend.claim_many([tid], "w")
        for r in replicas:
            os.kill(r.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        try:
            with pytest.raises(store.NotReplicated, match=r"only 0 of 1 replica\(s\) confirmed it"):
                await backend.store(StoreRequest(tid, SUCCESS, b"done"))
        finally:
            for r in replicas:
                os.kill(r.pid, signal.SIGCONT)  # type: ignore[arg-type]
        # Retried (as the worker does before it acks): counted as this claim's own write.
        assert await backend.store(StoreRequest(tid, SUCCESS, b"done"))
        for r in replicas:
            assert valkey_command(r.host, r.port, "HGET", names.result_key(tid), "state") == SUCCESS
    finally:
        await backend.close()


async def test_waiting_for_a_replica_costs_about_one_replication_round_trip_per_batch(sentinel):
    """Figures only (emitted to tests/chaos/results.jsonl): the cost of WAIT 1 on loopback."""
    figures: dict[str, float] = {}
    for wait in (0, 1):
        backend = ResultBackend(_sentinel_settings(sentinel, valkey_wait_replicas=wait))
        await backend.connect()
        try:
            for batch in (1, 64):
                rounds = 200 // batch + 20
                took = []
                for _ in range(rounds):
                    ids = [f"c{uuid.uuid4().hex[:10]}" for _ in range(batch)]
                    await backend.claim_many(ids, "w")
                    t = time.perf_counter()
                    assert all(await backend.store_many([StoreRequest(i, SUCCESS, b"x" * 200) for i in ids]))
                    took.append(time.perf_counter() - t)
                took.sort()
                figures[f"store_batch{batch}_wait{wait}_p50_ms"] = round(took[len(took) // 2] * 1000, 3)
        finally:
            await backend.close()
    emit("valkey_wait_cost", **figures)


async def test_preflight_under_sentinel_names_the_primary_and_refuses_too_few_replicas(sentinel):
    ok = await check_valkey(_sentinel_settings(sentinel))
    assert ok.ok, ok
    assert f"primary {sentinel.master_name!r}" in ok.url and "2 replica(s) connected (results wait for 1)" in ok.detail
    short = await check_valkey(_sentinel_settings(sentinel, valkey_wait_replicas=3))
    assert not short.ok
    assert "has 2 connected replica(s), and final results must reach 3" in short.detail
    assert "VALKEY_WAIT_REPLICAS" in short.fix
    gone = await check_valkey(Settings(valkey_sentinels="127.0.0.1:1", valkey_sentinel_master="x"))
    assert not gone.ok and "no sentinel answered" in gone.detail and "VALKEY_SENTINELS" in gone.fix


async def test_a_wrong_sentinel_master_name_is_a_clear_error(sentinel):
    backend = ResultBackend(_sentinel_settings(sentinel).with_(valkey_sentinel_master="nope"))
    with pytest.raises(heddle.BackendUnavailable,
                       match=r"no sentinel of VALKEY_SENTINELS=.* names a primary 'nope' that is up.*SENTINEL_MASTER"):
        await backend.connect()
    await backend.close()


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(("env", "message"), [
    ({"VALKEY_SENTINELS": "10.0.0.1:26379"}, "VALKEY_SENTINELS is set without VALKEY_SENTINEL_MASTER"),
    ({"VALKEY_SENTINEL_MASTER": "heddle"}, "VALKEY_SENTINEL_MASTER is set without VALKEY_SENTINELS"),
    ({"VALKEY_SENTINELS": "10.0.0.1", "VALKEY_SENTINEL_MASTER": "m"}, "entry '10.0.0.1' is not host:port"),
    ({"VALKEY_SENTINELS": "a:1,b:x", "VALKEY_SENTINEL_MASTER": "m"}, "entry 'b:x' is not host:port"),
    ({"VALKEY_SENTINELS": "a:1", "VALKEY_SENTINEL_MASTER": "m", "VALKEY_CLUSTER": "1"},
     "VALKEY_SENTINELS and VALKEY_CLUSTER are both set"),
    ({"VALKEY_CLUSTER": "maybe"}, "VALKEY_CLUSTER must be 1 or 0"),
    ({"VALKEY_CLUSTER": "1", "VALKEY_URL": "valkey://127.0.0.1:7000/2"}, "a Valkey Cluster has only database 0"),
    ({"VALKEY_WAIT_REPLICAS": "one"}, "VALKEY_WAIT_REPLICAS must be a number"),
    ({"VALKEY_WAIT_TIMEOUT_S": "0"}, "valkey_wait_timeout_s must be > 0"),
])
def test_bad_valkey_mode_settings_are_config_errors_with_the_fix(monkeypatch, env, message):
    for var in ("VALKEY_SENTINELS", "VALKEY_SENTINEL_MASTER", "VALKEY_CLUSTER", "VALKEY_WAIT_REPLICAS",
                "VALKEY_WAIT_TIMEOUT_S"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=message):
        Settings.load(nats_url="nats://127.0.0.1:4222")


def test_the_valkey_modes_read_from_the_environment_and_as_keywords(monkeypatch):
    monkeypatch.setenv("VALKEY_SENTINELS", "10.0.0.1:26379, 10.0.0.2:26379")
    monkeypatch.setenv("VALKEY_SENTINEL_MASTER", "heddle")
    s = Settings.load(nats_url="nats://127.0.0.1:4222")
    assert (s.valkey_mode, s.valkey_sentinels, s.valkey_replicas_to_wait) == (
        "sentinel", ("10.0.0.1:26379", "10.0.0.2:26379"), 1)
    monkeypatch.setenv("VALKEY_WAIT_REPLICAS", "0")
    assert Settings.load(nats_url="nats://127.0.0.1:4222").valkey_replicas_to_wait == 0
    for var in ("VALKEY_SENTINELS", "VALKEY_SENTINEL_MASTER", "VALKEY_WAIT_REPLICAS"):
        monkeypatch.delenv(var)
    app = heddle.Heddle("modes", nats_url="nats://127.0.0.1:4222", valkey_cluster=True)
    assert (app.settings.valkey_mode, app.settings.valkey_replicas_to_wait) == ("cluster", 0)
    with pytest.raises(ConfigError, match="VALKEY_SENTINEL_MASTER is set without VALKEY_SENTINELS"):
        heddle.Heddle("modes", nats_url="nats://127.0.0.1:4222", valkey_sentinel_master="heddle")
