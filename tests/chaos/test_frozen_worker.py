"""Chaos 2: a worker frozen (SIGSTOP) past AckWait, then thawed (SIGCONT).

Its tasks are redelivered and completed by a second worker; when the frozen one
wakes up and finishes them late, its stale results must not replace the stored
ones, nor be announced: on NATS (``heddle.results.>``) nor on Valkey (the task's
channel, ``heddle:task-notices:{id}``, where the store announces a result whose
sender follows Valkey, instead of NATS).
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections import defaultdict
from typing import Any

import nats
import pytest
import valkey.asyncio as valkey_async

from heddle import names
from heddle.messages import SUCCESS, record_decoder
from tests.chaos._support import CHAOS, TIMEOUT_S, Results, emit, size, submit
from tests.conftest import executions, wait_for

pytestmark = pytest.mark.timeout(TIMEOUT_S)

STAMP = f"{CHAOS}.stamp"
SYNC_STAMP = f"{CHAOS}.sync_stamp"


class NoticeTap:
    """Every result notice, on ``heddle.results.>`` and on every task's Valkey channel, collected in a thread."""

    def __init__(self, url: str, valkey_url: str) -> None:
        self.notices: dict[str, list[Any]] = defaultdict(list)
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main(url, valkey_url)), daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the notice tap did not subscribe"

    def _heard(self, data: bytes) -> None:
        rec = record_decoder.decode(data)
        self.notices[rec.id].append(rec.result)

    async def _main(self, url: str, valkey_url: str) -> None:
        nc = await nats.connect(url)
        vk = valkey_async.Valkey.from_url(valkey_url)
        pubsub = vk.pubsub()
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()

        async def cb(msg: Any) -> None:
            self._heard(msg.data)

        await nc.subscribe(names.result_subject("*"), cb=cb)
        await nc.flush()
        await pubsub.psubscribe(f"{names.TASK_NOTICE_CHANNEL_PREFIX}*")
        while await pubsub.get_message(timeout=1.0) is None:  # the subscription's confirmation
            pass

        async def read_valkey() -> None:
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None:
                    self._heard(msg["data"])

        reading = asyncio.ensure_future(read_valkey())
        self._ready.set()
        await self._stop.wait()
        reading.cancel()
        await nc.drain()
        await pubsub.aclose()
        await vk.aclose()

    def close(self) -> None:
        if self._loop and self._stop:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_a_frozen_workers_late_results_never_overwrite_the_redelivered_ones(
    fresh_servers, spawn_worker, test_env
):
    tasks = int(size("FROZEN_TASKS", 8, 32))
    ack_wait = 2.0
    env = test_env(fresh_servers, HEDDLE_TEST_ACK_WAIT=str(ack_wait))
    tap = NoticeTap(env["NATS_URL"], env["VALKEY_URL"])
    results = Results(env["VALKEY_URL"])
    began = time.monotonic()
    try:
        # A runs every task for 3 s; it is frozen long before that.
        a = spawn_worker(CHAOS, {**env, "HEDDLE_TEST_SLEEP": "3"}, "-c", str(tasks))
        sent = submit(env, STAMP, [(n, 0.1) for n in range(0, tasks, 2)])
        sent += submit(env, SYNC_STAMP, [(n, 0.1) for n in range(1, tasks, 2)])
        ids = {}
        for n, (tid, _) in zip([*range(0, tasks, 2), *range(1, tasks, 2)], sent, strict=True):
            ids[n] = tid

        def started_by(pid: int) -> set[int]:
            return {int(v) for p, k, v in executions(env) if p == pid and k == "start"}

        wait_for(lambda: started_by(a.pid) == set(ids), 30, "worker A to start every task")
        a.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        assert not [1 for p, k, _ in executions(env) if k == "done"], "A finished a task before the freeze"

        b = spawn_worker(CHAOS, env, "-c", str(tasks))
        wait_for(lambda: results.finished(list(ids.values())) == tasks, 60, "worker B to finish every task")
        redelivered_after_s = time.monotonic() - frozen_at
        by_b = {n: rec for n, (st, rec) in zip(ids, results.records(list(ids.values())).values(), strict=True)}
        assert all(rec is not None and rec.result == f"{b.pid}:{n}" for n, rec in by_b.items()), by_b

        # Thaw A past AckWait: every task finishes there a second time, late.
        a.signal(signal.SIGCONT)
        wait_for(
            lambda: {int(v) for p, k, v in executions(env) if p == a.pid and k == "done"} == set(ids),
            30,
            "the thawed worker A to finish its stale copies",
        )
        # A clean SIGTERM exit means A's drain flushed (tried to store) every outcome it had.
        a.signal(signal.SIGTERM)
        assert a.wait(30) == 0, a.output()
        # B stays up and serves new work: the late finisher left nothing behind that blocks it.
        after = submit(env, STAMP, [(tasks + 1, 0.05)])
        wait_for(lambda: results.finished([after[0][0]]) == 1, 30, "a task sent after the thaw")

        final = results.records(list(ids.values()))
        conflicting = 0
        for n, tid in ids.items():
            state, rec = final[tid]
            expected = f"{b.pid}:{n}"
            if state != SUCCESS or rec is None or rec.result != expected:
                conflicting += 1
            # Each result is announced once, with the stored value.
            if tap.notices.get(tid, []) != [expected]:
                conflicting += 1
        stale_runs = sum(1 for p, k, _ in executions(env) if p == a.pid and k == "done")
        figures = emit(
            "frozen_worker",
            tasks=tasks,
            ack_wait_s=ack_wait,
            redelivered_and_completed_s=round(redelivered_after_s, 2),
            late_finishes=stale_runs,
            conflicting_results=conflicting,
            notices=sum(len(v) for k, v in tap.notices.items() if k in set(ids.values())),
            runtime_s=round(time.monotonic() - began, 1),
        )
        assert stale_runs == tasks, "the thawed worker did not finish its stale copies"
        assert figures["conflicting_results"] == 0, {t: tap.notices.get(t) for t in ids.values()}
    finally:
        tap.close()
        results.close()
