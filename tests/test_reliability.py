"""Retries, timeouts, revocation, dead letters and duplicates, against real servers."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import msgspec
import pytest

import heddle
from heddle import names
from heddle.messages import TaskMessage, encoder
from heddle.testing import running_worker
from tests.conftest import dead_letters, publish_raw, wait_for


def _dlq_entry(nats_url: str, task_id: str) -> tuple[dict[str, str], bytes] | None:
    for headers, data in asyncio.run(dead_letters(nats_url)):
        if headers.get(names.HDR_TASK_ID) == task_id:
            return headers, data
    return None


def test_retries_with_backoff_end_in_failure_with_the_reason_and_a_dead_letter(
    heddle_app, heddle_worker, heddle_servers
):
    attempts: list[float] = []

    @heddle_app.task(retries=2, retry_backoff=0.2, retry_jitter=False)
    def flaky() -> None:
        attempts.append(time.monotonic())
        raise ConnectionError(f"attempt {len(attempts)} failed")

    r = flaky.delay()
    with pytest.raises(heddle.TaskError, match="attempt 3 failed") as info:
        r.get(timeout=20)
    assert info.value.type_name == "builtins.ConnectionError"
    assert len(attempts) == 3
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4  # exponential: 0.2 s then 0.4 s
    assert r.record.retries == 2
    headers, payload = wait_for(lambda: _dlq_entry(heddle_servers.nats_url, r.id), what="dead letter")
    assert "failed after 3 attempt(s)" in headers[names.HDR_REASON]
    assert "attempt 3 failed" in headers[names.HDR_REASON]
    assert msgspec.msgpack.decode(payload, type=TaskMessage).id == r.id


def test_a_retried_task_that_then_succeeds_is_a_success(heddle_app, heddle_worker):
    calls = []

    @heddle_app.task(retries=3, retry_delay=0.05)
    def second_time_lucky() -> str:
        calls.append(1)
        if len(calls) < 2:
            raise RuntimeError("not yet")
        return "ok"

    r = second_time_lucky.delay()
    assert r.get(timeout=15) == "ok"
    assert len(calls) == 2
    assert r.record.retries == 1


def test_autoretry_for_limits_which_errors_are_retried(heddle_app, heddle_worker):
    calls = []

    @heddle_app.task(retries=3, retry_delay=0.05, autoretry_for=(ConnectionError,))
    def picky() -> None:
        calls.append(1)
        raise KeyError("not retryable")

    with pytest.raises(heddle.TaskError, match="KeyError"):
        picky.delay().get(timeout=15)
    assert len(calls) == 1


def test_an_async_task_past_its_timeout_is_cancelled_and_fails_with_task_timeout(
    heddle_app, heddle_worker
):
    cancelled = threading.Event()

    @heddle_app.task(timeout=0.3)
    async def forever() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    r = forever.delay()
    with pytest.raises(heddle.TaskError) as info:
        r.get(timeout=15)
    assert info.value.type_name == "heddle.errors.TaskTimeout"
    assert "exceeded its timeout of 0.3s" in info.value.remote_message
    assert cancelled.is_set()


def test_a_sync_task_past_its_timeout_fails_with_task_timeout(heddle_app, heddle_worker):
    release = threading.Event()

    @heddle_app.task(timeout=0.3)
    def stuck() -> str:
        release.wait(20)
        return "late"

    r = stuck.delay()
    try:
        with pytest.raises(heddle.TaskError, match="TaskTimeout"):
            r.get(timeout=15)
    finally:
        release.set()
    assert r.state == heddle.FAILURE


def test_a_revoked_pending_task_never_runs(heddle_app, heddle_servers):
    ran = []

    @heddle_app.task
    def work() -> None:
        ran.append(1)

    r = work.delay()  # no worker yet: it waits in the stream
    r.revoke()
    assert r.state == heddle.REVOKED
    with running_worker(heddle_app) as worker:
        marker = work.delay()
        marker.get(timeout=10)  # the worker has got past the revoked message
        wait_for(lambda: worker.stats["received"] >= 2, what="both messages")
    assert ran == [1]
    with pytest.raises(heddle.TaskRevoked):
        r.get(timeout=5)


def test_a_revoked_delayed_task_never_runs(heddle_app, heddle_worker):
    ran = []

    @heddle_app.task
    def later() -> None:
        ran.append(1)

    r = later.apply_async(countdown=1.0)
    r.revoke()
    with pytest.raises(heddle.TaskRevoked):
        r.get(timeout=5)
    wait_for(lambda: heddle_worker.stats["received"] >= 2, what="the deferred delivery")
    assert ran == []


def test_a_running_async_task_is_cancelled_by_revoke(heddle_app, heddle_worker):
    started = threading.Event()
    cancelled = threading.Event()

    @heddle_app.task
    async def long_job() -> str:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return "finished"

    r = long_job.delay()
    assert started.wait(10)
    r.revoke()
    with pytest.raises(heddle.TaskRevoked):
        r.get(timeout=10)
    assert cancelled.wait(10)
    assert r.state == heddle.REVOKED
    wait_for(lambda: not heddle_worker.inflight, what="the slot to be freed")


def test_a_running_sync_task_is_marked_revoked_and_its_result_discarded(heddle_app, heddle_worker):
    started = threading.Event()
    release = threading.Event()

    @heddle_app.task
    def sync_job() -> str:
        started.set()
        release.wait(20)
        return "finished"

    r = sync_job.delay()
    assert started.wait(10)
    r.revoke()
    release.set()
    wait_for(lambda: not heddle_worker.inflight, what="the sync task to end")
    assert r.state == heddle.REVOKED
    with pytest.raises(heddle.TaskRevoked):
        r.get(timeout=5)


def test_a_repeated_task_id_runs_once(heddle_app, heddle_worker):
    runs = []

    @heddle_app.task
    def charge(order: str) -> str:
        runs.append(order)
        return f"charged {order}"

    first = charge.apply_async(("o-17",), task_id="order-17-" + heddle_app.name)
    second = charge.apply_async(("o-17",), task_id="order-17-" + heddle_app.name)
    assert first.get(timeout=10) == second.get(timeout=10) == "charged o-17"
    third = charge.apply_async(("o-17",), task_id="order-17-" + heddle_app.name)
    assert third.get(timeout=10) == "charged o-17"
    assert runs == ["o-17"]


def test_a_redelivered_task_whose_result_is_stored_is_acked_without_running(
    heddle_app, heddle_worker, heddle_servers
):
    runs = []

    @heddle_app.task
    def once() -> int:
        runs.append(1)
        return len(runs)

    r = once.delay()
    assert r.get(timeout=10) == 1
    # The same task again under a new message id (past the dedup window, say).
    payload = encoder.encode(TaskMessage(id=r.id, task=once.name))
    subject = names.task_subject(heddle_app.worker_type, "standard")
    asyncio.run(publish_raw(heddle_servers.nats_url, subject, payload, {names.HDR_MSG_ID: "other"}))
    wait_for(lambda: heddle_worker.stats["received"] >= 2, what="the second delivery")
    marker = once.delay()
    assert marker.get(timeout=10) == 2
    assert runs == [1, 1]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (lambda tid: b"\xc1 not msgpack at all", "undecodable task message"),
        (lambda tid: encoder.encode({"id": tid}), "undecodable task message"),
        (lambda tid: encoder.encode(TaskMessage(v=99, id=tid, task="t")), "unsupported message version 99"),
        (lambda tid: encoder.encode(TaskMessage(id=tid, task="no.such.task")), "unknown task 'no.such.task'"),
    ],
    ids=["garbage", "missing-fields", "future-version", "unknown-task"],
)
def test_a_bad_message_is_dead_lettered_and_the_loop_keeps_serving(
    heddle_app, heddle_worker, heddle_servers, payload, reason
):
    @heddle_app.task
    def fine(x: int) -> int:
        return x

    task_id = f"bad-{heddle_app.name}"
    payload = payload(task_id)
    subject = names.task_subject(heddle_app.worker_type, "standard")
    asyncio.run(publish_raw(heddle_servers.nats_url, subject, payload, {names.HDR_MSG_ID: task_id}))
    assert [fine.delay(i).get(timeout=10) for i in range(5)] == list(range(5))
    headers, data = wait_for(lambda: _dlq_entry(heddle_servers.nats_url, task_id), what="dead letter")
    assert reason in headers[names.HDR_REASON]
    assert data == payload
    assert headers[names.HDR_ORIGINAL_SUBJECT] == subject
    assert heddle_app.AsyncResult(task_id).state == heddle.FAILURE
    with pytest.raises(heddle.TaskError, match=reason.split("'")[0]):
        heddle_app.AsyncResult(task_id).get(timeout=5)


def test_an_unencodable_result_fails_with_encode_error(heddle_app, heddle_worker):
    @heddle_app.task
    def opaque() -> object:
        return object()

    with pytest.raises(heddle.TaskError) as info:
        opaque.delay().get(timeout=10)
    assert info.value.type_name == "heddle.errors.EncodeError"
    assert "cannot be encoded" in info.value.remote_message


def test_a_task_can_send_another_task(heddle_app, heddle_worker):
    @heddle_app.task
    def inner(x: int) -> int:
        return x + 1

    @heddle_app.task
    async def outer_async(x: int) -> int:
        return await inner.delay(x).aget(timeout=10)

    @heddle_app.task
    def outer_sync(x: int) -> int:
        return inner.delay(x).get(timeout=10)

    assert outer_async.delay(1).get(timeout=20) == 2
    assert outer_sync.delay(2).get(timeout=20) == 3


def test_a_task_longer_than_ack_wait_is_kept_alive_by_in_progress_acks(heddle_app, heddle_servers):
    heddle_app.configure(ack_wait_s=1.0)
    runs = []

    @heddle_app.task
    async def long_async() -> str:
        runs.append("async")
        await asyncio.sleep(3.5)
        return "a"

    @heddle_app.task
    def long_sync() -> str:
        runs.append("sync")
        time.sleep(3.5)
        return "s"

    with running_worker(heddle_app, concurrency=4) as worker:
        ra, rs = long_async.delay(), long_sync.delay()
        assert ra.get(timeout=20) == "a"
        assert rs.get(timeout=20) == "s"
        # Without in-progress acks JetStream would have redelivered both after 1 s.
        assert worker.stats["received"] == 2
    assert sorted(runs) == ["async", "sync"]
