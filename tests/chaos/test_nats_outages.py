"""Chaos 3: nats-server frozen (SIGSTOP) and resumed, then restarted many times in
a row, under load. Workers and their routers must recover on their own (same
processes): completion resumes within AckWait + 10 s of each outage, and no task
is lost.

CI: a 10 s freeze and 20 restarts; HEDDLE_CHAOS_SOAK=1: 20 s and 40 restarts.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from heddle.messages import SUCCESS
from tests.apps.chaos import expected
from tests.chaos._support import CHAOS, TIMEOUT_S, Results, emit, size, submit, wait_progress
from tests.conftest import wait_for

pytestmark = pytest.mark.timeout(TIMEOUT_S)

WORK = f"{CHAOS}.work"


def test_workers_and_routers_recover_from_a_frozen_and_a_flapping_nats_server(
    fresh_servers, spawn_worker, test_env
):
    freeze_s = size("FREEZE_SECONDS", 10, 20)
    restarts = int(size("RESTARTS", 20, 40))
    batch = int(size("OUTAGE_TASKS", 1500, 3000))
    concurrency, n_workers, task_s, ack_wait = 8, 2, 0.1, 3.0
    bar_s = ack_wait + 10
    slots = concurrency * n_workers
    began = time.monotonic()
    env = test_env(fresh_servers, HEDDLE_TEST_ACK_WAIT=str(ack_wait))
    results = Results(env["VALKEY_URL"])
    try:
        workers = [spawn_worker(CHAOS, env, "-c", str(concurrency)) for _ in range(n_workers)]
        pids = [w.pid for w in workers]

        def reconnects(w: Any) -> int:
            return w.output().count("reconnected to nats-server")

        def none_died() -> None:
            for w in workers:
                if w.proc.poll() is not None:
                    raise AssertionError(f"worker {w.pid} exited:\n{w.output()[-3000:]}")

        first = submit(env, WORK, [(n, task_s) for n in range(batch)])
        ids = [tid for tid, _ in first]
        wait_progress(results, ids, batch // 10, 60, "work before the freeze", none_died)

        # -- freeze -------------------------------------------------------------------
        fresh_servers.nats.pause()
        time.sleep(freeze_s)  # the fault itself: the server stays frozen this long
        fresh_servers.nats.resume()
        resumed = time.monotonic()
        base = results.finished(ids) or 0
        # More than every slot's worth of new completions: fresh fetches, not leftovers.
        wait_progress(results, ids, min(batch, base + 2 * slots), bar_s, "completion after the freeze", none_died)
        freeze_resume_s = time.monotonic() - resumed

        # -- restarts -----------------------------------------------------------------
        second = submit(env, WORK, [(n, task_s) for n in range(batch, 2 * batch)])
        ids += [tid for tid, _ in second]
        flap_began = time.monotonic()
        for i in range(restarts):
            before = [reconnects(w) for w in workers]
            fresh_servers.nats.restart(kill=bool(i % 2))  # alternately SIGTERM and SIGKILL
            # The next restart only once every worker is back: each one is a full cycle.
            wait_for(
                lambda b=before: all(reconnects(w) > n for w, n in zip(workers, b, strict=True)),
                bar_s,
                f"every worker to reconnect after restart {i + 1}",
            )
        restarted = time.monotonic()
        flap_s = restarted - flap_began
        base = results.finished(ids) or 0
        wait_progress(results, ids, min(len(ids), base + 2 * slots), bar_s, "completion after the restarts", none_died)
        restart_resume_s = time.monotonic() - restarted

        wait_progress(results, ids, len(ids), 180, "every task to finish", none_died)
        # Routers too: tasks sent only now go through the routers of the same processes.
        t0 = time.monotonic()
        third = submit(env, WORK, [(n, task_s) for n in range(2 * batch, 2 * batch + 100)])
        ids += [tid for tid, _ in third]
        wait_progress(results, [t for t, _ in third], 100, bar_s, "tasks sent after the restarts", none_died)
        routed_after_s = time.monotonic() - t0
        recs = results.records(ids)
        lost = sum(1 for st, _ in recs.values() if st != SUCCESS)
        wrong = sum(1 for n, tid in enumerate(ids) if recs[tid][1] is None or recs[tid][1].result != expected(n))
        emit(
            "nats_outages",
            submitted=len(ids),
            lost=lost,
            wrong_results=wrong,
            freeze_s=freeze_s,
            freeze_resume_s=round(freeze_resume_s, 2),
            restarts=restarts,
            restarts_took_s=round(flap_s, 1),
            restart_resume_s=round(restart_resume_s, 2),
            new_tasks_done_s=round(routed_after_s, 2),
            bar_s=bar_s,
            worker_reconnects=sum(reconnects(w) for w in workers),
            same_worker_processes=[w.pid for w in workers] == pids and all(w.proc.poll() is None for w in workers),
            runtime_s=round(time.monotonic() - began, 1),
        )
        assert lost == 0 and wrong == 0
        assert [w.pid for w in workers] == pids and all(w.proc.poll() is None for w in workers)
        assert freeze_resume_s <= bar_s and restart_resume_s <= bar_s
    finally:
        results.close()
