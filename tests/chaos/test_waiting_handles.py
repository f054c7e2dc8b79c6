"""Chaos 6: the client's own handles, waiting on their results while nats-server is
killed and workers are SIGKILLed (the report that opened issue 14).

2,000 sync tasks of 0.2 s on two workers (``-c 8``); worker A is SIGKILLed at 25 %
of executions, nats-server is killed -9 and restarted on the same port and data
dir at ~45 %, worker A's replacement is SIGKILLed at 65 %. The client sent every
task before the first kill and waits on the handles ``apply_async`` returned, as a
user's script does: every one must return the right value. A result notice is
core NATS and may be lost across a reconnect; the stored record is the truth.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from heddle.errors import ResultTimeout
from tests.apps.chaos import expected
from tests.chaos._support import CHAOS, TIMEOUT_S, Results, client_app, emit, size, starts_per_task, wait_progress
from tests.conftest import executions, wait_for

pytestmark = pytest.mark.timeout(TIMEOUT_S)

WORK = f"{CHAOS}.sync_work"


def test_handles_waiting_through_a_nats_kill_and_worker_kills_all_get_their_results(
    fresh_servers, spawn_worker, test_env
):
    total = int(size("HANDLE_TASKS", 2000, 6000))
    task_s, concurrency = 0.2, 8
    began = time.monotonic()
    env = test_env(fresh_servers, HEDDLE_TEST_ACK_WAIT="3")
    results = Results(env["VALKEY_URL"])
    try:
        a = spawn_worker(CHAOS, env, "-c", str(concurrency))
        spawn_worker(CHAOS, env, "-c", str(concurrency))  # worker B runs throughout

        def started() -> int:
            return len({v for _, kind, v in executions(env) if kind == "start"})

        def kill_worker_at(fraction: float) -> None:
            nonlocal a
            wait_for(lambda: started() >= fraction * total, 120, f"{fraction:.0%} of the tasks to start")
            a.signal(signal.SIGKILL)
            a.wait(10)
            a = spawn_worker(CHAOS, env, "-c", str(concurrency))

        def faults() -> None:
            kill_worker_at(0.25)
            wait_for(lambda: started() >= 0.45 * total, 120, "45% of the tasks to start")
            fresh_servers.nats.restart(kill=True)
            kill_worker_at(0.65)

        async def main() -> tuple[list[object], float]:
            app = client_app(env)
            try:
                handles = [app.send_task(WORK, (n, task_s)) for n in range(total)]
                await asyncio.gather(*(h.sent() for h in handles))
                await asyncio.to_thread(faults)
                # Every task is stored final before the handles are asked: a handle that
                # times out now missed a result that exists.
                await asyncio.to_thread(
                    wait_progress, results, [h.id for h in handles], total, 180, "every task to finish"
                )
                t0 = time.monotonic()
                got = await asyncio.gather(
                    *(h.aget(timeout=20, propagate=False) for h in handles), return_exceptions=True
                )
                return got, time.monotonic() - t0
            finally:
                await app.aclose()

        got, waited_s = asyncio.run(main())
        timed_out = sum(1 for g in got if isinstance(g, ResultTimeout))
        wrong = sum(1 for n, g in enumerate(got) if g != expected(n))
        starts = starts_per_task(env)
        emit(
            "waiting_handles",
            submitted=total,
            timed_out=timed_out,
            wrong_results=wrong,
            executions=sum(starts.values()),
            never_ran=total - len(starts),
            handles_answered_in_s=round(waited_s, 2),
            runtime_s=round(time.monotonic() - began, 1),
        )
        assert timed_out == 0, f"{timed_out} handles never got a result that is stored"
        assert wrong == 0
    finally:
        results.close()


def test_every_handle_gets_its_result_through_kills_at_every_step_of_the_path(fresh_servers, spawn_worker, test_env):
    """Wider: tasks are sent *while* workers, nats-server and valkey-server are killed, so
    kills land on publish, route, claim, run, store, ack and notice alike. A send that
    fails is retried with the same task id, as a careful caller does (JetStream drops the
    copy if the first one was stored after all). Every handle must return the right value.
    """
    import os
    import random

    total = int(size("PATH_TASKS", 10000, 30000))
    task_s, concurrency, n_workers = 0.05, 8, 3
    seed = int(os.environ.get("HEDDLE_CHAOS_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    began = time.monotonic()
    env = test_env(fresh_servers, HEDDLE_TEST_ACK_WAIT="3")
    results = Results(env["VALKEY_URL"])
    faults = ["worker"] * 4 + ["nats", "nats", "valkey"]
    rng.shuffle(faults)
    marks = sorted(rng.uniform(0.05, 0.9) for _ in faults)
    try:
        workers = [spawn_worker(CHAOS, env, "-c", str(concurrency)) for _ in range(n_workers)]
        killed: set[int] = set()
        bound = 0
        log: list[dict[str, object]] = []

        def started() -> int:
            return len({v for _, kind, v in executions(env) if kind == "start"})

        def inject() -> None:
            nonlocal bound
            for fault, mark in zip(faults, marks, strict=True):
                wait_for(lambda m=mark: started() >= m * total, 300, f"{mark:.0%} of the tasks to start")
                if fault == "worker":
                    victim = rng.choice([w for w in workers if w.pid not in killed])
                    victim.signal(signal.SIGKILL)
                    victim.wait(10)
                    killed.add(victim.pid)
                    workers.append(spawn_worker(CHAOS, env, "-c", str(concurrency)))
                    bound += concurrency
                else:
                    server = fresh_servers.nats if fault == "nats" else fresh_servers.valkey
                    server.restart(kill=True)
                    bound += concurrency * n_workers
                log.append({"fault": fault, "at_started": started()})

        async def main() -> tuple[list[object], int, float]:
            from heddle.errors import HeddleError

            app = client_app(env)
            handles: list[object] = []
            retried = 0
            faults_done = asyncio.ensure_future(asyncio.to_thread(inject))
            try:
                for i in range(0, total, 250):
                    chunk = []
                    for n in range(i, min(total, i + 250)):
                        tid = f"path-{seed}-{n}"
                        for attempt in range(100):
                            r = app.send_task(WORK, (n, task_s), task_id=tid)
                            try:
                                await r.sent()
                                break
                            except HeddleError:
                                retried += 1
                                await asyncio.sleep(0.1 * min(attempt + 1, 10))
                        chunk.append(r)
                    handles.extend(chunk)
                    # Spread the sends over the run, so kills land on publishes too.
                    while started() < i - 4 * concurrency * n_workers and not faults_done.done():
                        await asyncio.sleep(0.05)
                await faults_done
                t0 = time.monotonic()
                got = await asyncio.gather(
                    *(h.aget(timeout=300, propagate=False) for h in handles), return_exceptions=True
                )
                return got, retried, time.monotonic() - t0
            finally:
                if not faults_done.done():
                    await asyncio.gather(faults_done, return_exceptions=True)
                await app.aclose()

        got, retried, waited_s = asyncio.run(main())
        timed_out = sum(1 for g in got if isinstance(g, ResultTimeout))
        wrong = sum(1 for n, g in enumerate(got) if g != expected(n))
        starts = starts_per_task(env)
        duplicates = sum(c - 1 for c in starts.values() if c > 1)
        emit(
            "handles_through_kills",
            submitted=total,
            timed_out=timed_out,
            wrong_results=wrong,
            never_ran=total - len(starts),
            duplicate_executions=duplicates,
            bound=bound,
            send_retries=retried,
            faults=log,
            seed=seed,
            answered_in_s=round(waited_s, 2),
            runtime_s=round(time.monotonic() - began, 1),
        )
        assert timed_out == 0 and wrong == 0, f"{timed_out} timed out, {wrong} wrong (seed {seed})"
        assert duplicates <= bound, f"{duplicates} duplicate executions > bound {bound} (seed {seed})"
    finally:
        results.close()
