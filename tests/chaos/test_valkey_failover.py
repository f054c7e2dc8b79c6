"""Chaos under Valkey Sentinel: kill -9 the primary mid-run, lose no acknowledged result (#20 item 3).

A primary, two replicas and three sentinels on loopback; two worker processes
find the primary through ``VALKEY_SENTINELS``. Mid-run both replicas are frozen
(SIGSTOP) and the link to them filled with a large write, so results stored
from then on exist on the primary alone; once some have been stored there the
primary is killed with SIGKILL and the replicas thawed: the sentinels promote
one, which never saw those results, and the workers carry on against it. (The
workers are paused while the link fills, so the tasks they run at that moment
are stored on the primary alone, whether or not their acks wait for a replica.)

An acknowledged task is never redelivered, so a result that was acknowledged
and then lost with the primary would leave its task unfinished for good. Bar,
once the task consumer has nothing pending or unacknowledged: every task
SUCCESS with the right value on the new primary (0 lost), no worker restarted.

The control run sets ``VALKEY_WAIT_REPLICAS=0`` (acknowledge once the primary
holds the result, as before #20): the same kill then loses acknowledged
results, which is what the ``WAIT`` before the ack is for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import types
from collections.abc import Iterator

import pytest

import heddle
from heddle import names
from heddle.broker import Broker
from heddle.messages import SUCCESS
from heddle.settings import Settings
from heddle.testing import EmbeddedNats
from heddle.testing.valkey_ha import EmbeddedValkeySentinel, valkey_command
from tests.apps.chaos import expected
from tests.chaos._support import CHAOS, TIMEOUT_S, Results, asubmit, emit, starts_per_task, wait_progress

pytestmark = pytest.mark.timeout(TIMEOUT_S)

WORK = f"{CHAOS}.work"
# More than the kernel buffers between the primary and a replica hold on loopback (a few MB each way).
_BALLAST_BYTES = 24 * 1024 * 1024


@pytest.fixture
def nats() -> Iterator[EmbeddedNats]:
    with EmbeddedNats("127.0.0.1", None, None) as n:
        yield n  # type: ignore[misc]


@pytest.fixture
def sentinel() -> Iterator[EmbeddedValkeySentinel]:
    with EmbeddedValkeySentinel(replicas=2, sentinels=3) as s:
        yield s


def _unsettled(nats_url: str) -> int:
    """Task messages not yet acknowledged: pending delivery or delivered and unacked, over every consumer."""
    async def ask() -> int:
        broker = Broker(Settings(nats_url=nats_url))
        await broker.connect()
        try:
            infos = await broker.consumers_info(names.TASKS_STREAM)
            return sum(int(i.num_pending or 0) + int(i.num_ack_pending or 0) for i in infos)
        finally:
            await broker.close()

    return asyncio.run(ask())


def _settle(nats_url: str, results: Results, ids: list[str], timeout_s: float) -> int:
    """Wait until every task is final, or no task message is left unacknowledged; return the final count."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = results.finished(ids) or 0
        if done == len(ids):
            return done
        if _unsettled(nats_url) == 0:
            # Every message is acked: no task will run again. Read once more (a store and its
            # ack are not one step seen from here) and report what is there.
            return results.finished(ids) or 0
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s: tasks neither finished nor all acknowledged")


def _submit(env: dict[str, str], count: int, task_s: float) -> list[str]:
    async def main() -> list[str]:
        app = heddle.Heddle(env["HEDDLE_TEST_APP"], nats_url=env["NATS_URL"], valkey_url=env["VALKEY_URL"],
                            valkey_sentinels=env["VALKEY_SENTINELS"],
                            valkey_sentinel_master=env["VALKEY_SENTINEL_MASTER"])
        try:
            return [tid for tid, _ in await asubmit(app, WORK, [(n, task_s) for n in range(count)])]
        finally:
            await app.aclose()

    return asyncio.run(main())


def _run(nats: EmbeddedNats, sentinel: EmbeddedValkeySentinel, spawn_worker, test_env, wait_replicas: str
         ) -> dict[str, int]:
    servers = types.SimpleNamespace(nats_url=nats.url, valkey_url=sentinel.url)
    env = test_env(servers, HEDDLE_TEST_ACK_WAIT="3", VALKEY_SENTINELS=sentinel.sentinel_addresses,
                   VALKEY_SENTINEL_MASTER=sentinel.master_name, VALKEY_WAIT_REPLICAS=wait_replicas,
                   VALKEY_WAIT_TIMEOUT_S="0.5")
    total, task_s, concurrency = 600, 0.02, 8
    workers = [spawn_worker(CHAOS, env, "-c", str(concurrency)) for _ in range(2)]
    old = sentinel.primary()
    replicas = [n for n in sentinel.nodes if n is not old]
    on_old = Results(old.url)
    try:
        ids = _submit(env, total, task_s)
        wait_progress(on_old, ids, total // 5, 120, "a fifth of the tasks")
        # The workers pause while the replicas are cut off, so the tasks they are running
        # finish (and are stored) only once the link is full: on the primary alone.
        for p in [*workers, *replicas]:
            os.kill(p.pid, signal.SIGSTOP)  # type: ignore[arg-type]
        try:
            try:
                # A frozen replica still receives into its socket buffer (and reads it when thawed),
                # so first fill the buffers on the way to it: what follows stays in the primary's memory.
                valkey_command(old.host, old.port, "SET", "heddle-test:ballast", "x" * _BALLAST_BYTES, timeout_s=30)
                frozen_at = on_old.finished(ids) or 0
            finally:
                for w in workers:
                    os.kill(w.pid, signal.SIGCONT)
            # (With WAIT each worker then holds at most its concurrency of them, stored and unacked.)
            stored_alone = wait_progress(on_old, ids, frozen_at + 5, 60, "5 results stored on the primary alone")
            old.stop(kill=True)
        finally:
            for r in replicas:
                os.kill(r.pid, signal.SIGCONT)  # type: ignore[arg-type]
        new = sentinel.wait_failover(old.port)
        on_new = Results(new.url)
        try:
            at_failover = on_new.finished(ids) or 0
            finished = _settle(nats.url, on_new, ids, 180)
            recs = on_new.records(ids)
        finally:
            on_new.close()
        for w in workers:
            assert w.proc.poll() is None, f"worker {w.pid} died:\n{w.output()[-3000:]}"
    finally:
        on_old.close()
    lost = sum(1 for st, _ in recs.values() if st != SUCCESS)
    wrong = sum(1 for n, tid in enumerate(ids)
                if recs[tid][0] == SUCCESS and (recs[tid][1] is None or recs[tid][1].result != expected(n)))
    starts = starts_per_task(env)
    figures = {
        "submitted": total, "finished": finished, "lost": lost, "wrong_results": wrong,
        "stored_on_the_primary_alone": stored_alone - frozen_at, "final_on_the_promoted_replica": at_failover,
        "duplicate_executions": sum(c - 1 for c in starts.values() if c > 1),
    }
    emit("valkey_failover", wait_replicas=wait_replicas, **figures)
    return figures


def test_killing_the_valkey_primary_under_sentinel_loses_no_acknowledged_result(
    nats, sentinel, spawn_worker, test_env
):
    got = _run(nats, sentinel, spawn_worker, test_env, wait_replicas="1")
    # The promoted replica missed what the primary stored alone; none of it had been
    # acknowledged, so those tasks ran again (or their workers stored them again) there.
    assert got["final_on_the_promoted_replica"] < got["submitted"]
    assert got["lost"] == 0 and got["wrong_results"] == 0, got


def test_without_waiting_for_a_replica_the_same_kill_loses_acknowledged_results(
    nats, sentinel, spawn_worker, test_env
):
    got = _run(nats, sentinel, spawn_worker, test_env, wait_replicas="0")
    assert got["lost"] > 0, got  # acknowledged on the primary's word, gone with it
