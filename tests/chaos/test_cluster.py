"""Chaos on a 3-node nats-server cluster with R3 streams (#20 items 1, 2).

Workers and the client get ``NATS_URL`` as the cluster's server list and
``HEDDLE_STREAM_REPLICAS=3``. Mid-run, one node is killed with SIGKILL and
restarted later: the task stream's leader, a node that is not its leader, the
goal stream's leader (goals run by an orchestrator), the leader of the workers
registry's key-value bucket, or the node a subscriber to lifecycle events is
connected to (events are core NATS, in no stream).
Bar: every task and goal SUCCESS with the right value, 0 lost, duplicate
executions within the tasks in flight at the kill, no process restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import types
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import heddle
from heddle import events, names
from heddle.broker import Broker
from heddle.graphs.canvas import chain
from heddle.messages import READY_STATES, SUCCESS
from heddle.settings import Settings
from heddle.status import STREAMS, WorkerRow, list_workers
from heddle.testing import EmbeddedValkey
from heddle.testing.cluster import EmbeddedNatsCluster
from tests.apps.chaos import expected
from tests.apps.graphs import define
from tests.chaos._support import CHAOS, TIMEOUT_S, Results, emit, starts_per_task, submit, wait_progress
from tests.conftest import executions, wait_for

pytestmark = pytest.mark.timeout(TIMEOUT_S)

WORK = f"{CHAOS}.work"
GRAPHS = "tests.apps.graphs"


@pytest.fixture
def cluster() -> Iterator[EmbeddedNatsCluster]:
    with EmbeddedNatsCluster(3) as c:
        yield c


@pytest.fixture
def valkey_server() -> Iterator[EmbeddedValkey]:
    with EmbeddedValkey("127.0.0.1", None, None) as v:
        yield v  # type: ignore[misc]


def _live_url(cluster: EmbeddedNatsCluster) -> str:
    """The server list of the nodes running now (a killed node would be tried, and refuse, first)."""
    return ",".join(n.url for n in cluster.nodes if n.proc is not None and n.proc.poll() is None)


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


def _kill_leader_of(cluster: EmbeddedNatsCluster, stream: str) -> tuple[str, float]:
    """SIGKILL the node leading ``stream`` (asserted R3); return its name and the kill time."""
    name = _leader(_live_url(cluster), stream)
    cluster.node(name).stop(kill=True)
    return name, time.time()


def test_killing_the_goal_streams_leader_loses_no_goal(
    cluster, valkey_server, spawn_worker, spawn_orchestrator, test_env
):
    """Chains run by an orchestrator through a SIGKILL of HEDDLE_GOALS's leader.

    Goals are sent before the kill and right after it (a send that fails while the
    stream elects a leader is sent again with the same id, as a client should);
    three quarters of them must finish while the node is down, which a goal stream
    with one replica on the killed node could not do.
    """
    servers = types.SimpleNamespace(nats_url=cluster.url, valkey_url=valkey_server.url)
    env = test_env(servers, HEDDLE_TEST_ACK_WAIT="3", HEDDLE_STREAM_REPLICAS="3", HEDDLE_TEST_STEP_S="0.2")
    before, after, steps, concurrent = 60, 30, 5, 8
    worker = spawn_worker(GRAPHS, env, "--no-orchestrator", "-c", "32")
    orch = spawn_orchestrator(env, "--max-concurrent-goals", str(concurrent))
    app = heddle.Heddle(env["HEDDLE_TEST_APP"], nats_url=cluster.url, valkey_url=valkey_server.url,
                        stream_replicas=3)
    t = define(app)
    results = Results(env["VALKEY_URL"])

    def graph(g: int) -> Any:
        return chain(t.step.s(g * 100), *[t.step.s() for _ in range(steps - 1)])

    try:
        sent = [graph(g).delay() for g in range(before)]
        wait_progress(results, [r.id for r in sent], before // 4, 120, "a quarter of the goals")
        in_flight = sum(1 for s in results.states([r.id for r in sent]) if s not in READY_STATES)
        killed, _ = _kill_leader_of(cluster, names.GOALS_STREAM)
        resent = 0
        refusals: Counter[str] = Counter()
        killed_at = refused_until = time.monotonic()
        for g in range(before, before + after):
            gid = f"goal-{uuid.uuid4().hex}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    sent.append(graph(g).apply_async(task_id=gid))
                    break
                except heddle.BrokerError as exc:
                    # No leader yet: nats-server answers "no responders" at once. Send again with
                    # the same id (it cannot run twice), paced, until the new leader takes it.
                    if time.monotonic() > deadline:
                        raise
                    refusals[str(exc)[:160]] += 1
                    refused_until = time.monotonic()
                    resent += 1
                    time.sleep(0.05)
        ids = [r.id for r in sent]
        new_leader = _leader(_live_url(cluster), names.GOALS_STREAM)
        down = wait_progress(results, ids, len(ids) * 3 // 4, 180, "three quarters of the goals with a node down")
        cluster.node(killed).start()
        wait_progress(results, ids, len(ids), 240, "every goal")
        values = [r.get(timeout=60) for r in sent]
        for proc in (worker, orch):
            assert proc.proc.poll() is None, f"{proc.what} {proc.pid} died:\n{proc.output()[-3000:]}"
    finally:
        results.close()
        app.close()
    wrong = sum(1 for g, v in enumerate(values) if v != g * 100 + steps)
    starts = Counter(tid for _, k, tid in executions(env) if k == "start")
    reruns = sum(c - 1 for c in starts.values() if c > 1)
    emit("cluster_goals", goals=len(ids), steps=steps, killed_leader=killed, new_leader=new_leader,
         goals_unfinished_at_kill=in_flight, sends_retried=resent,
         sends_refused_for_s=round(refused_until - killed_at, 2), refusals=dict(refusals),
         finished_while_down=down, wrong_results=wrong, re_executed_nodes=reruns, bound=concurrent)
    assert new_leader != killed
    assert wrong == 0
    assert len(starts) == len(ids) * steps  # every node ran
    assert reruns <= concurrent  # at most the node in flight of each running goal


def _live_workers(url: str, valkey_url: str, app_name: str) -> list[WorkerRow]:
    """The workers ``heddle status`` lists as alive now (heartbeat younger than the registry's TTL)."""

    async def ask() -> list[WorkerRow]:
        app = heddle.Heddle(app_name, nats_url=url, valkey_url=valkey_url)
        try:
            return await list_workers(app)
        except heddle.HeddleError:
            return []  # the bucket's stream does not answer yet
        finally:
            await app.aclose()

    return asyncio.run(ask())


def test_killing_the_workers_buckets_leader_keeps_workers_alive_and_tasks_flowing(
    cluster, valkey_server, spawn_worker, test_env
):
    """Heartbeats go on through a SIGKILL of KV_heddle_workers's leader, and tasks keep flowing.

    The worker must be listed with a heartbeat stored after the kill while the node is
    still down (only a new leader can have stored it): with the bucket on one replica on
    the killed node no heartbeat could land until the restart.
    """
    servers = types.SimpleNamespace(nats_url=cluster.url, valkey_url=valkey_server.url)
    env = test_env(servers, HEDDLE_TEST_ACK_WAIT="3", HEDDLE_STREAM_REPLICAS="3")
    total, task_s, concurrency = 2000, 0.05, 8
    worker = spawn_worker(CHAOS, env, "-c", str(concurrency))
    bucket = f"KV_{names.WORKERS_BUCKET}"
    results = Results(env["VALKEY_URL"])
    try:
        sent = submit({**env}, WORK, [(n, task_s) for n in range(total)])
        ids = [tid for tid, _ in sent]
        wait_progress(results, ids, total // 4, 120, "a quarter of the tasks")
        killed, killed_at = _kill_leader_of(cluster, bucket)

        def beat_after_kill() -> list[WorkerRow]:
            rows = _live_workers(_live_url(cluster), valkey_server.url, env["HEDDLE_TEST_APP"])
            return [r for r in rows if r.info.pid == worker.pid and r.last_seen > killed_at]

        wait_for(beat_after_kill, 60, "a heartbeat stored after the bucket's leader was killed")
        new_leader = _leader(_live_url(cluster), bucket)
        down = wait_progress(results, ids, total // 2, 180, "half the tasks with the node down")
        cluster.node(killed).start()
        wait_progress(results, ids, total, 240, "every task")
        # Still alive at the end, by a heartbeat newer than the restart.
        restarted_at = time.time()
        wait_for(lambda: [r for r in _live_workers(cluster.url, valkey_server.url, env["HEDDLE_TEST_APP"])
                          if r.info.pid == worker.pid and r.last_seen > restarted_at], 30,
                 "a heartbeat after the node came back")
        assert worker.proc.poll() is None, f"worker {worker.pid} died:\n{worker.output()[-3000:]}"
        recs = results.records(ids)
    finally:
        results.close()
    lost = sum(1 for st, _ in recs.values() if st != SUCCESS)
    wrong = sum(1 for n, (_, rec) in enumerate(recs[t] for t in ids)
                if rec is None or rec.result != expected(n))
    emit("cluster_workers_bucket", submitted=total, killed_leader=killed, new_leader=new_leader, lost=lost,
         wrong_results=wrong, finished_while_down=down)
    assert new_leader != killed
    assert lost == 0 and wrong == 0


class _EventTap:
    """A subscriber to ``heddle.events.>`` on a connection of its own, in a thread of its own.

    It connects through Heddle's broker (as ``heddle events`` and the Workshop do), so it
    reconnects as they would.
    """

    def __init__(self, url: str) -> None:
        self.succeeded: set[str] = set()
        self.reconnects = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._broker = Broker(Settings(nats_url=url), name="event-tap")

    def _run(self, coro: Any, timeout_s: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def start(self) -> None:
        self._thread.start()

        async def on_event(msg: Any) -> None:
            ev = events.describe(msg.subject, msg.data)
            if ev is not None and ev.get("kind") == "task" and ev.get("state") == "succeeded":
                self.succeeded.add(ev["id"])

        async def reconnected() -> None:
            self.reconnects += 1

        async def connect() -> None:
            await self._broker.connect()
            self._broker.on_reconnect(reconnected)
            await self._broker.subscribe(names.EVENTS_ALL, cb=on_event)
            await self._broker.flush()

        self._run(connect())

    @property
    def server(self) -> str:
        """The URL of the server it is connected to now ("" while it is not)."""
        nc = self._broker.nc
        if nc is None or not nc.is_connected or nc.connected_url is None:
            return ""
        u = nc.connected_url
        return f"nats://{u.hostname}:{u.port}"

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self._broker.close(), 10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def _leaders(url: str) -> bool:
    """True once every stream Heddle made, and the workers bucket, answers with a leader, and
    JetStream's meta leader answers the stream creation a starting client sends (stream info is
    answered by a stream's leader; creating or updating one needs the meta leader, elected apart)."""

    async def ask() -> bool:
        broker = Broker(Settings(nats_url=url, stream_replicas=3))
        try:
            await broker.connect()
            for stream in (*STREAMS, names.STREAMS_STREAM, f"KV_{names.WORKERS_BUCKET}"):
                info = await broker.stream_info(stream)
                if info.cluster is None or not info.cluster.leader:
                    return False
            await broker.ensure_streams()
            return True
        except heddle.HeddleError:
            return False
        finally:
            await broker.close()

    return asyncio.run(ask())


def test_an_event_subscriber_whose_node_is_killed_reconnects_and_events_resume(
    cluster, valkey_server, spawn_worker, test_env
):
    """Lifecycle events are core NATS: best effort, in no stream, so nothing replays them.

    A subscriber given only node A's URL learns the other nodes from the cluster; A is
    killed with SIGKILL mid-run. Events published while it reconnects may be missed
    (they are counted, not asserted). What is guaranteed and asserted: it reconnects to
    another node without being restarted, and gets the ``succeeded`` event of every task
    sent after that, before A is back; and every task succeeds.
    """
    servers = types.SimpleNamespace(nats_url=cluster.url, valkey_url=valkey_server.url)
    env = test_env(servers, HEDDLE_TEST_ACK_WAIT="3", HEDDLE_STREAM_REPLICAS="3")
    node_a = cluster.nodes[0]
    worker = spawn_worker(CHAOS, env, "-c", "8")
    tap = _EventTap(node_a.url)
    results = Results(env["VALKEY_URL"])
    try:
        tap.start()
        assert tap.server == node_a.url
        first = [tid for tid, _ in submit({**env}, WORK, [(n, 0.05) for n in range(600)])]
        wait_for(lambda: tap.succeeded & set(first), 60, "events before the kill")
        node_a.stop(kill=True)  # most of the first batch is still queued or running
        wait_for(lambda: tap.reconnects and tap.server not in ("", node_a.url), 30,
                 "the subscriber to reconnect to another node")
        moved_to = tap.server
        # A client that starts while a stream elects its leader cannot send yet (see the goal
        # test); this one starts once every stream node A led has a new one.
        wait_for(lambda: _leaders(_live_url(cluster)), 60, "every stream to have a leader")
        later = [tid for tid, _ in submit({**env, "NATS_URL": _live_url(cluster)}, WORK,
                                          [(n, 0.05) for n in range(600, 800)])]
        ids = first + later
        wait_progress(results, ids, len(ids), 180, "every task with node A down")
        wait_for(lambda: set(later) <= tap.succeeded, 30, "the events of every task sent after the reconnection")
        seen_first = len(set(first) & tap.succeeded)
        node_a.start()
        assert worker.proc.poll() is None, f"worker {worker.pid} died:\n{worker.output()[-3000:]}"
        recs = results.records(ids)
    finally:
        results.close()
        tap.close()
    lost = sum(1 for st, _ in recs.values() if st != SUCCESS)
    wrong = sum(1 for n, t in enumerate(ids) if recs[t][1] is None or recs[t][1].result != expected(n))
    emit("cluster_events", submitted=len(ids), reconnected_to=moved_to, reconnects=tap.reconnects,
         events_of_tasks_sent_before_the_kill=f"{seen_first}/{len(first)}",
         events_after=f"{len(set(later) & tap.succeeded)}/{len(later)}", lost=lost, wrong_results=wrong)
    assert lost == 0 and wrong == 0


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
    import nats

    async def ensure(replicas: int) -> tuple[int, int]:
        """The task stream's replicas after a process with ``replicas`` started, and the updates it sent."""
        watcher = await nats.connect(cluster.url.split(","))
        updates: list[str] = []

        async def seen(msg: Any) -> None:
            updates.append(msg.subject)

        await watcher.subscribe("$JS.API.STREAM.UPDATE.>", cb=seen)
        await watcher.flush()
        broker = Broker(Settings(nats_url=cluster.url, stream_replicas=replicas))
        await broker.connect()
        try:
            await broker.ensure_streams()
            await watcher.flush()
            return int((await broker.stream_info("HEDDLE_TASKS")).config.num_replicas or 1), len(updates)
        finally:
            await broker.close()
            await watcher.close()

    assert asyncio.run(ensure(1))[0] == 1
    assert asyncio.run(ensure(3)) == (3, 4)  # every stream raised in place
    # A default client leaves them at 3, and with nothing else to change sends no update
    # (each update is a round of the stream's Raft group, and fails during an election).
    assert asyncio.run(ensure(1)) == (3, 0)
