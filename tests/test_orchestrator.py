"""Orchestrators: resuming after SIGKILL, bounded concurrency, Valkey durability, hosting.

Crash tests run real processes on servers of their own: a worker process
(``heddle worker --no-orchestrator``) runs the nodes and records each run in
an executions log with its task id, and ``heddle orchestrator`` processes
run the goal, so killing one kills the orchestrator and nothing else.
"""

from __future__ import annotations

import re
import signal
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import valkey

import heddle
from heddle.graphs.canvas import chain
from heddle.graphs.model import node_task_id
from heddle.testing import EmbeddedServers, aworker, running_worker
from heddle.testing.orchestrators import aorchestrator, running_orchestrator
from tests.apps.graphs import define
from tests.conftest import executions, wait_for

GRAPHS = "tests.apps.graphs"


@pytest.fixture
def graph_env(tmp_path: Path) -> Callable[..., dict[str, str]]:
    def make(servers: EmbeddedServers, **extra: str) -> dict[str, str]:
        return {
            "NATS_URL": servers.nats_url,
            "VALKEY_URL": servers.valkey_url,
            "HEDDLE_TEST_APP": f"o{uuid.uuid4().hex[:10]}",
            "HEDDLE_TEST_LOG": str(tmp_path / "executions.log"),
            **extra,
        }

    return make


def client(env: dict[str, str]) -> tuple[heddle.Heddle, object]:
    app = heddle.Heddle(env["HEDDLE_TEST_APP"], nats_url=env["NATS_URL"], valkey_url=env["VALKEY_URL"])
    return app, define(app)


def runs_per_node(env: dict[str, str], kind: str) -> Counter[str]:
    return Counter(task_id for _, k, task_id in executions(env) if k == kind)


# -- resuming -------------------------------------------------------------------------------


def test_an_orchestrator_killed_mid_graph_is_resumed_by_a_new_process_and_no_node_runs_twice(
    fresh_servers, spawn_worker, spawn_orchestrator, graph_env
):
    # AckWait 2 s: a dead orchestrator's goal comes back quickly; in-progress acks keep a live one's.
    env = graph_env(fresh_servers, HEDDLE_TEST_ACK_WAIT="2", HEDDLE_TEST_STEP_S="0.3")
    worker = spawn_worker(GRAPHS, env, "--no-orchestrator")
    assert "taking goals" not in worker.output()
    a = spawn_orchestrator(env)
    app, t = client(env)
    steps = 8
    r = chain(t.step.s(0), *[t.step.s() for _ in range(steps - 1)]).delay()
    node_ids = [node_task_id(r.id, str(i)) for i in range(steps)]

    def checkpointed() -> int:
        return sum(s.state == "succeeded" for s in r.nodes().values())

    wait_for(lambda: checkpointed() >= 3, 30, "three steps to be checkpointed")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    assert r.state == heddle.STARTED, "the goal ended before its orchestrator was killed"
    assert checkpointed() < steps

    b = spawn_orchestrator(env)
    assert r.get(timeout=60) == steps
    # Every node ran exactly once, across both orchestrators: the finished ones were not
    # sent again, the one in flight at the kill was waited for, not re-sent.
    assert runs_per_node(env, "start") == dict.fromkeys(node_ids, 1)
    assert runs_per_node(env, "done") == dict.fromkeys(node_ids, 1)
    resumed = re.search(r"resuming goal \S+ from its checkpoint \(run 2\): (\d+) node\(s\) already ended", b.output())
    assert resumed is not None, b.output()
    assert int(resumed.group(1)) >= 3
    record = r.record
    assert record.meta["runs"] == 2
    assert record.worker.endswith(f":{b.proc.pid}")
    assert [row["state"] for row in record.meta["timeline"]] == ["succeeded"] * steps
    app.close()


def test_a_worker_process_hosts_an_orchestrator_by_default(heddle_servers, spawn_worker, graph_env):
    env = graph_env(heddle_servers)
    worker = spawn_worker(GRAPHS, env, "--max-concurrent-goals", "3")
    wait_for(lambda: "taking goals from heddle.goals.incoming (at most 3 at once)" in worker.output(), 20,
             "the hosted orchestrator to start")
    app, t = client(env)
    assert (t.add.s(2, 3) | t.mul.s(4)).delay().get(timeout=30) == 20
    app.close()
    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0, worker.output()


# -- concurrency ----------------------------------------------------------------------------


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    peak = now = 0
    for _, delta in events:
        now += delta
        peak = max(peak, now)
    return peak


def test_twenty_goals_run_at_most_four_at_a_time_and_the_rest_wait_in_the_stream(fresh_servers):
    app = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=fresh_servers.nats_url,
                        valkey_url=fresh_servers.valkey_url)
    t = define(app)
    with running_worker(app, concurrency=32), running_orchestrator(app, max_concurrent_goals=4) as orch:
        assert orch.durability_warning is None  # the embedded valkey-server runs with AOF
        results = [(t.slow.s(i, 0.15) | t.slow.s(0.05)).delay() for i in range(20)]
        assert [r.get(timeout=60) for r in results] == list(range(20))
        assert orch.stats["peak_active"] == 4
        # A result is announced before its goal message is acked and counted.
        wait_for(lambda: orch.stats["succeeded"] == 20, 10, "every goal to be acked")
    spans = [(r.record.started_at, r.record.finished_at) for r in results]
    assert max_overlap(spans) <= 4
    app.close()


# -- durability -----------------------------------------------------------------------------


async def test_an_orchestrator_warns_loudly_when_valkey_has_no_append_only_file(fresh_servers, caplog):
    client = valkey.Valkey.from_url(fresh_servers.valkey_url)
    client.config_set("appendonly", "no")
    client.close()
    app = heddle.Heddle("durability", nats_url=fresh_servers.nats_url, valkey_url=fresh_servers.valkey_url)
    with caplog.at_level("WARNING", logger="heddle.orchestrator"):
        async with aorchestrator(app) as orch:
            assert orch.durability_warning is not None
    assert "appendonly=no" in orch.durability_warning
    assert "appendonly yes" in orch.durability_warning  # the fix
    loud = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("LOST if it restarts" in m for m in loud)
    assert any(m.startswith("!!!!") for m in loud)
    await app.aclose()


async def test_an_undecodable_goal_is_dead_lettered_and_fails_its_result(heddle_servers):
    from heddle import names
    from tests.conftest import dead_letters, publish_raw

    app = heddle.Heddle(f"u{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url)
    goal_id = f"junk-{uuid.uuid4().hex}"
    async with aworker(app), aorchestrator(app) as orch:
        await app.connect()
        await publish_raw(heddle_servers.nats_url, names.GOALS_SUBJECT, b"\xc1 not msgpack",
                          {names.HDR_MSG_ID: goal_id})
        with pytest.raises(heddle.TaskError) as info:
            await app.AsyncResult(goal_id).aget(timeout=15)
        assert info.value.type_name == "heddle.DeadLettered"
        assert "undecodable goal message" in info.value.remote_message
        # The loop goes on.
        t = define(app)
        assert await (t.add.s(1, 1) | t.add.s(1)).delay().aget(timeout=15) == 3
        assert orch.ready.is_set()
    dead = [h for h, _ in await dead_letters(heddle_servers.nats_url) if h.get(names.HDR_TASK_ID) == goal_id]
    assert len(dead) == 1
    await app.aclose()


# -- the pytest plugin ------------------------------------------------------------------------


def test_the_pytest_plugin_runs_graphs_with_the_orchestrator_fixture(heddle_app, heddle_worker, heddle_orchestrator):
    @heddle_app.task
    def inc(x: int) -> int:
        return x + 1

    r = (inc.s(1) | inc.s() | inc.s()).delay()
    assert r.get(timeout=30) == 4
    assert r.record.worker == heddle_orchestrator.name
