"""Chaos 1: many tasks through worker SIGKILLs, a nats-server kill -9 and a
valkey-server kill -9, each at a random moment (a random point of progress).

Figures: submitted, completed, lost, duplicate executions (counted from the
tasks' own execution log) and the bound: the sum, over the kills, of the tasks
in flight at that moment (for a worker, the tasks it started whose final state
was not stored yet; for a server, the total concurrency of the live workers).
Bar: lost = 0, duplicates <= bound, every result retrievable and correct.

CI runs 10,000 tasks; HEDDLE_CHAOS_SOAK=1 runs 30,000 (HEDDLE_CHAOS_TASKS overrides).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from typing import Any

import pytest

from heddle.messages import SUCCESS
from tests.apps.chaos import expected
from tests.chaos._support import (
    CHAOS,
    TIMEOUT_S,
    Results,
    client_app,
    emit,
    size,
    starts_per_task,
    submit,
    wait_progress,
)
from tests.conftest import executions

pytestmark = pytest.mark.timeout(TIMEOUT_S)

WORK = f"{CHAOS}.work"


def test_no_task_is_lost_through_worker_nats_and_valkey_kills(fresh_servers, spawn_worker, test_env):
    total = int(size("TASKS", 10000, 30000))
    task_s = size("TASK_SECONDS", 0.2, 0.2)
    concurrency = int(size("CONCURRENCY", 8, 8))
    n_workers = 3
    seed = int(os.environ.get("HEDDLE_CHAOS_SEED") or random.randrange(1 << 30))
    rng = random.Random(seed)
    began = time.monotonic()
    env = test_env(fresh_servers, HEDDLE_TEST_ACK_WAIT="3")
    results = Results(env["VALKEY_URL"])
    try:
        workers = [spawn_worker(CHAOS, env, "-c", str(concurrency)) for _ in range(n_workers)]
        sent = submit(env, WORK, [(n, task_s) for n in range(total)])
        ids = [tid for tid, _ in sent]

        faults = ["worker"] * 5 + ["nats", "valkey"]
        rng.shuffle(faults)
        marks = sorted(rng.uniform(0.05, 0.75) for _ in faults)
        killed: set[int] = set()

        def none_died() -> None:
            for w in workers:
                if w.pid not in killed and w.proc.poll() is not None:
                    raise AssertionError(f"worker {w.pid} died on its own:\n{w.output()[-3000:]}")

        log: list[dict[str, Any]] = []
        bound = 0
        for fault, mark in zip(faults, marks, strict=True):
            at = wait_progress(results, ids, int(mark * total), 300, f"progress before the {fault} kill", none_died)
            if fault == "worker":
                victim = rng.choice([w for w in workers if w.pid not in killed])
                victim.signal(signal.SIGKILL)
                victim.wait(10)
                killed.add(victim.pid)
                mine = {int(v) for p, k, v in executions(env) if p == victim.pid and k == "start"}
                mine_ids = [ids[n] for n in sorted(mine)]
                states = results.states(mine_ids)
                in_flight = sum(1 for s in states if s != SUCCESS)
                workers.append(spawn_worker(CHAOS, env, "-c", str(concurrency)))
            else:
                server = fresh_servers.nats if fault == "nats" else fresh_servers.valkey
                in_flight = concurrency * n_workers  # the upper bound: every slot busy
                server.restart(kill=True)
            bound += in_flight
            log.append({"fault": fault, "at_completed": at, "in_flight": in_flight})

        completed = wait_progress(results, ids, total, 120 + total * task_s / 5, "every task to finish", none_died)
        recs = results.records(ids)

        async def retrieve() -> list[Any]:
            app = client_app(env)
            try:
                out: list[Any] = []
                for i in range(0, total, 500):
                    out += await asyncio.gather(
                        *(app.AsyncResult(t).aget(timeout=30, propagate=False) for t in ids[i : i + 500])
                    )
                return out
            finally:
                await app.aclose()

        got = asyncio.run(retrieve())
        wrong = sum(1 for n, value in enumerate(got) if value != expected(n))
        lost = sum(1 for st, _ in recs.values() if st != SUCCESS)
        starts = starts_per_task(env)
        duplicates = sum(c - 1 for c in starts.values() if c > 1)
        never_ran = total - len(starts)
        emit(
            "kills",
            submitted=len(sent),
            completed=completed,
            lost=lost,
            wrong_results=wrong,
            never_ran=never_ran,
            duplicate_executions=duplicates,
            bound=bound,
            faults=log,
            seed=seed,
            workers=n_workers,
            concurrency=concurrency,
            task_s=task_s,
            runtime_s=round(time.monotonic() - began, 1),
        )
        assert len(sent) == total
        assert lost == 0 and never_ran == 0
        assert wrong == 0
        assert duplicates <= bound, f"{duplicates} duplicate executions > bound {bound} (seed {seed})"
    finally:
        results.close()
