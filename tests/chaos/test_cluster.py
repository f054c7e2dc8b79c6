"""Chaos on a 3-node nats-server cluster with R3 streams (#20 items 1, 2).

Workers and the client get ``NATS_URL`` as the cluster's server list and
``HEDDLE_STREAM_REPLICAS=3``. Mid-run, one node is killed with SIGKILL (the
task stream's leader, or a node that is not its leader) and restarted later.
Bar: every task SUCCESS with the right value, 0 lost, duplicate executions
within the tasks in flight at the kill, no worker restarted.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Iterator
from typing import Any

import pytest

import heddle
from heddle.broker import Broker
from heddle.messages import SUCCESS
from heddle.settings import Settings
from heddle.testing import EmbeddedValkey
from heddle.testing.cluster import EmbeddedNatsCluster
from tests.apps.chaos import expected
from tests.chaos._support import CHAOS, TIMEOUT_S, Results, emit, starts_per_task, submit, wait_progress

pytestmark = pytest.mark.timeout(TIMEOUT_S)

WORK = f"{CHAOS}.work"


@pytest.fixture
def cluster() -> Iterator[EmbeddedNatsCluster]:
    with EmbeddedNatsCluster(3) as c:
        yield c


@pytest.fixture
def valkey_server() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey("127.0.0.1", None, None) as v:
        yield v  # type: ignore[misc]


def _leader(url: str, stream: str) -> str:
    async def ask() -> str:
        broker = Broker(Settings(nats_url=url))
        await broker.connect()
        try:
            info = await broker.stream_info(stream)
            assert info.cluster is not None and info.cluster.leader, info
            assert info.config.num_replicas == 3, info.config
            return str(info.cluster.leader)
        finally:
            await broker.close()

    return asyncio.run(ask())


@pytest.mark.parametrize("victim", ["leader", "follower"])
def test_killing_a_node_of_the_task_streams_raft_group_loses_no_task(
    cluster, valkey_server, spawn_worker, test_env, victim
):
    servers = types.SimpleNamespace(nats_url=cluster.url, valkey_url=valkey_server.url)
    env = test_env(servers, HEDDLE_TEST_ACK_WAIT="3", HEDDLE_STREAM_REPLICAS="3")
    total, task_s, concurrency = 3000, 0.05, 8
    workers = [spawn_worker(CHAOS, env, "-c", str(concurrency)) for _ in range(2)]
    results = Results(env["VALKEY_URL"])
    try:
        sent = submit({**env}, WORK, [(n, task_s) for n in range(total)])
        ids = [tid for tid, _ in sent]
        wait_progress(results, ids, total // 4, 120, "a quarter of the tasks")
        leader = _leader(cluster.url, "HEDDLE_TASKS")
        name = leader if victim == "leader" else next(
            f"heddle-{n.port}" for n in cluster.nodes if f"heddle-{n.port}" != leader)
        node = cluster.node(name)
        node.stop(kill=True)
        at_kill = wait_progress(results, ids, total // 2, 180, "half the tasks with a node down")
        node.start()
        wait_progress(results, ids, total, 240, "every task")
        for w in workers:
            assert w.proc.poll() is None, f"worker {w.pid} died:\n{w.output()[-3000:]}"
        recs = results.records(ids)

        async def retrieve() -> list[Any]:
            app = heddle.Heddle(env["HEDDLE_TEST_APP"], nats_url=cluster.url, valkey_url=valkey_server.url)
            try:
                return list(await asyncio.gather(*(app.AsyncResult(t).aget(timeout=30, propagate=False)
                                                   for t in ids)))
            finally:
                await app.aclose()

        got = asyncio.run(retrieve())
    finally:
        results.close()
    lost = sum(1 for st, _ in recs.values() if st != SUCCESS)
    wrong = sum(1 for n, value in enumerate(got) if value != expected(n))
    starts = starts_per_task(env)
    duplicates = sum(c - 1 for c in starts.values() if c > 1)
    bound = concurrency * len(workers)  # every slot busy at the kill
    emit("cluster", victim=victim, submitted=total, lost=lost, wrong_results=wrong,
         duplicate_executions=duplicates, bound=bound, finished_while_down=at_kill)
    assert lost == 0 and wrong == 0
    assert duplicates <= bound


def test_more_replicas_than_the_cluster_has_servers_is_a_clear_error(cluster):
    async def ensure() -> None:
        broker = Broker(Settings(nats_url=cluster.url, stream_replicas=5))
        await broker.connect()
        try:
            await broker.ensure_streams()
        finally:
            await broker.close()

    with pytest.raises(heddle.BrokerError, match=r"with 5 replicas failed: .* has 3 JetStream server\(s\).*"
                       r"HEDDLE_STREAM_REPLICAS"):
        asyncio.run(ensure())


def test_a_process_with_fewer_replicas_never_shrinks_a_streams_replicas(cluster):
    async def ensure(replicas: int) -> int:
        broker = Broker(Settings(nats_url=cluster.url, stream_replicas=replicas))
        await broker.connect()
        try:
            await broker.ensure_streams()
            return int((await broker.stream_info("HEDDLE_TASKS")).config.num_replicas or 1)
        finally:
            await broker.close()

    assert asyncio.run(ensure(1)) == 1
    assert asyncio.run(ensure(3)) == 3  # raised in place
    assert asyncio.run(ensure(1)) == 3  # a default client leaves it at 3
