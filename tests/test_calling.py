"""Calling tasks end to end against real servers: delay, apply_async, get, states."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

import heddle
from heddle.testing import running_worker


def test_delay_and_get_return_the_result_from_a_sync_caller(heddle_app, heddle_worker):
    @heddle_app.task
    def add(x: int, y: int) -> int:
        return x + y

    r = add.delay(2, 3)
    assert r.get(timeout=10) == 5
    assert r.state == heddle.SUCCESS
    assert r.ready() and r.successful() and not r.failed()
    assert r.result == 5
    assert r.traceback is None


async def test_apply_async_and_aget_work_from_an_async_caller(heddle_app, heddle_worker):
    @heddle_app.task
    async def mul(x: int, y: int) -> int:
        await asyncio.sleep(0)
        return x * y

    r = mul.apply_async((6, 7))
    assert await r.aget(timeout=10) == 42
    assert await r.astate() == heddle.SUCCESS
    await heddle_app.aclose()


def test_a_result_handle_made_from_an_id_sees_the_result(heddle_app, heddle_worker):
    @heddle_app.task
    def double(x: int) -> int:
        return 2 * x

    r = double.delay(21)
    assert r.get(timeout=10) == 42
    again = heddle_app.AsyncResult(r.id)
    assert again.get(timeout=5) == 42
    assert again.record.worker == heddle_worker.name


def test_an_unknown_id_is_pending(heddle_app, heddle_servers):
    r = heddle_app.AsyncResult("no-such-task")
    assert r.state == heddle.PENDING
    assert not r.ready()
    with pytest.raises(heddle.ResultTimeout, match="no-such-task"):
        r.get(timeout=0.3)


def test_a_remote_exception_comes_back_as_task_error_with_type_message_and_traceback(
    heddle_app, heddle_worker
):
    @heddle_app.task
    def boom(x: int) -> int:
        raise ValueError(f"bad value {x}")

    r = boom.delay(7)
    with pytest.raises(heddle.TaskError) as info:
        r.get(timeout=10)
    err = info.value
    assert err.type_name == "builtins.ValueError"
    assert err.remote_message == "bad value 7"
    assert "raise ValueError" in err.remote_traceback
    # It starts at the task's own code, not in the worker that called it (#21 item 13).
    frames = [line.strip() for line in err.remote_traceback.splitlines() if line.strip().startswith("File ")]
    assert "test_calling.py" in frames[0], frames
    assert not any("heddle/worker.py" in f or "concurrent/futures" in f for f in frames), frames
    assert r.state == heddle.FAILURE
    assert isinstance(r.result, heddle.TaskError)
    assert "bad value 7" in r.traceback
    assert isinstance(r.get(timeout=1, propagate=False), heddle.TaskError)


def test_a_state_is_started_while_the_task_runs(heddle_app, heddle_worker):
    release = threading.Event()
    running = threading.Event()

    @heddle_app.task
    def gated() -> str:
        running.set()
        release.wait(10)
        return "done"

    r = gated.delay()
    assert running.wait(10)
    assert r.state == heddle.STARTED
    release.set()
    assert r.get(timeout=10) == "done"


def test_countdown_delays_the_start(heddle_app, heddle_worker):
    @heddle_app.task
    def stamp() -> float:
        return time.time()

    sent = time.time()
    r = stamp.apply_async(countdown=1.0)
    assert r.get(timeout=15) >= sent + 1.0


def test_eta_accepts_an_aware_datetime(heddle_app, heddle_worker):
    @heddle_app.task
    def stamp() -> float:
        return time.time()

    eta = datetime.now(UTC) + timedelta(seconds=0.5)
    r = stamp.apply_async(eta=eta)
    assert r.get(timeout=15) >= eta.timestamp()
    with pytest.raises(TypeError, match="timezone-aware"):
        stamp.apply_async(eta=datetime.now())


def test_a_delayed_task_does_not_hold_a_worker_slot(heddle_app, heddle_servers):
    @heddle_app.task
    def stamp(label: str) -> float:
        return time.time()

    with running_worker(heddle_app, concurrency=1):
        later = stamp.apply_async(("later",), countdown=2.0)
        now = stamp.delay("now")
        t_now = now.get(timeout=10)
        t_later = later.get(timeout=15)
    # With the only slot held by the waiting task, "now" could not finish first.
    assert t_now < t_later
    assert t_later - t_now > 1.0


def test_a_200_task_burst_completes_with_every_result_retrievable(heddle_app, heddle_worker):
    @heddle_app.task
    def square(x: int) -> int:
        return x * x

    results = [square.delay(i) for i in range(200)]
    assert [r.get(timeout=30) for r in results] == [i * i for i in range(200)]
    assert all(heddle_app.AsyncResult(r.id).state == heddle.SUCCESS for r in results)


def test_results_whose_watch_was_evicted_are_still_read_promptly(heddle_app, heddle_worker, monkeypatch):
    # Past the cap on open result watches, the oldest are dropped; their get() must not
    # wait for a notice that can no longer come.
    import heddle.connections

    monkeypatch.setattr(heddle.connections, "MAX_WATCHES", 5)

    @heddle_app.task
    def triple(x: int) -> int:
        return 3 * x

    results = [triple.delay(i) for i in range(12)]
    assert [r.get(timeout=5) for r in results] == [3 * i for i in range(12)]


def test_the_worker_never_runs_more_than_its_concurrency(heddle_app, heddle_servers):
    lock = threading.Lock()
    active = [0]
    peak = [0]

    @heddle_app.task
    def busy() -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1

    @heddle_app.task
    async def abusy() -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        await asyncio.sleep(0.05)
        with lock:
            active[0] -= 1

    with running_worker(heddle_app, concurrency=3):
        rs = [busy.delay() for _ in range(15)] + [abusy.delay() for _ in range(15)]
        for r in rs:
            r.get(timeout=30)
    assert peak[0] == 3


def test_results_expire_after_the_configured_ttl(heddle_app, heddle_servers):
    import valkey

    heddle_app.configure(result_ttl_s=120)

    @heddle_app.task
    def one() -> int:
        return 1

    with running_worker(heddle_app):
        r = one.delay()
        assert r.get(timeout=10) == 1
    client = valkey.Valkey.from_url(heddle_servers.valkey_url)
    ttl = client.ttl(f"heddle:result:{r.id}")
    client.close()
    assert 0 < ttl <= 120


def test_a_task_sees_its_context_and_adds_metadata_to_its_result(heddle_app, heddle_worker):
    @heddle_app.task(tier="local")
    async def introspect() -> str:
        ctx = heddle.current_task()
        ctx.meta["tokens"] = {"input": 3, "output": 5}
        return f"{ctx.name}|{ctx.tier}|{ctx.headers.get('trace')}|{ctx.retries}"

    @heddle_app.task
    def sync_introspect() -> str:
        ctx = heddle.current_task()
        ctx.meta["seen"] = True
        return ctx.id

    r = introspect.apply_async(headers={"trace": "t-1"})
    assert r.get(timeout=10) == f"{introspect.name}|local|t-1|0"
    assert r.record.meta["tokens"] == {"input": 3, "output": 5}
    assert r.record.meta["route"] == {"tier": "local", "reason": "requested by task"}
    assert r.record.tier == "local"
    s = sync_introspect.delay()
    assert s.get(timeout=10) == s.id
    assert s.record.meta["seen"] is True
    assert s.record.meta["route"] == {"tier": "standard", "reason": "worker default"}
    with pytest.raises(heddle.HeddleError, match="only available inside a task"):
        heddle.current_task()


def test_send_task_by_a_bare_name_goes_to_that_worker_type(heddle_app, heddle_servers):
    other = heddle.Heddle(
        f"{heddle_app.name}x", nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url
    )

    @other.task(name="summarizer")
    def summarize(text: str) -> str:
        return text[:3]

    with running_worker(other, concurrency=2):
        r = heddle_app.send_task("summarizer", ("abcdef",), worker_type=other.name)
        assert r.get(timeout=10) == "abc"
    other.close()


async def test_a_per_tier_worker_takes_only_its_tier(heddle_app, heddle_servers):
    from heddle.testing import aworker
    from heddle.worker import Worker

    @heddle_app.task
    def where() -> str:
        return heddle.current_task().tier

    async with aworker(heddle_app, tier="local"):
        local = where.apply_async(tier="local")
        standard = where.apply_async(tier="standard")
        assert await local.aget(timeout=10) == "local"
        with pytest.raises(heddle.ResultTimeout):
            await standard.aget(timeout=1.0)
    # The worker type is now served per tier: an all-tier worker is refused.
    with pytest.raises(heddle.HeddleError, match="not both"):
        await Worker(heddle_app).run()
    await heddle_app.aclose()
