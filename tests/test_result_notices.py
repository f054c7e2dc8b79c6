"""A waiting handle always gets a stored result: notices are wake-up calls, the
store is the truth (heddle.notices). And task ids that cannot be subject tokens
never enter."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest
import valkey.asyncio as valkey_async

import heddle
from heddle import names
from heddle.messages import SUCCESS, ResultRecord
from heddle.store import encode_record

T = 15.0


def _app(servers) -> heddle.Heddle:
    return heddle.Heddle(f"n{uuid.uuid4().hex[:10]}", nats_url=servers.nats_url, valkey_url=servers.valkey_url)


async def _store(servers, task_id: str, result: object) -> bytes:
    """What a worker stores for a finished task, without its notice."""
    record = encode_record(ResultRecord(id=task_id, state=SUCCESS, task="t", result=result))
    client = valkey_async.Valkey.from_url(servers.valkey_url)
    try:
        await client.hset(names.result_key(task_id), mapping={"state": SUCCESS, "record": record})
    finally:
        await client.aclose()
    return record


async def _publish(servers, subject: str, *payloads: bytes) -> None:
    nc = await nats.connect(servers.nats_url)
    try:
        for p in payloads:
            await nc.publish(subject, p)
        await nc.flush()
    finally:
        await nc.close()


async def test_a_result_stored_while_the_client_was_disconnected_reaches_its_waiting_handle(fresh_servers):
    app = _app(fresh_servers)
    try:
        r = app.send_task("nobody.runs_this", (1,), worker_type="nobody")
        await r.sent()
        fresh_servers.nats.stop(kill=True)
        # The worker finished while nats-server was down: its notice can never reach us.
        await _store(fresh_servers, r.id, 41)
        fresh_servers.nats.start()
        assert await r.aget(timeout=T) == 41
    finally:
        await app.aclose()


async def test_a_notice_lost_on_the_publishers_side_is_caught_while_the_handle_waits(fresh_servers):
    app = _app(fresh_servers)
    try:
        r = app.send_task("nobody.runs_this", (1,), worker_type="nobody")
        await r.sent()
        waiting = asyncio.ensure_future(r.aget(timeout=T))
        await _store(fresh_servers, r.id, 42)  # stored, never announced
        assert await waiting == 42
    finally:
        await app.aclose()


async def test_junk_and_another_tasks_record_on_a_result_subject_are_ignored(fresh_servers):
    app = _app(fresh_servers)
    try:
        r = app.send_task("nobody.runs_this", (1,), worker_type="nobody")
        await r.sent()
        waiting = asyncio.ensure_future(r.aget(timeout=T))
        forged = encode_record(ResultRecord(id="someone-else", state=SUCCESS, task="t", result=666))
        not_final = encode_record(ResultRecord(id=r.id, state="STARTED", task="t"))
        # On the subject the sender follows (its connection's notice token).
        subject = names.notice_subject((await app.connections()).notice_token, r.id)
        await _publish(fresh_servers, subject, b"\xc1junk", forged, not_final)
        real = await _store(fresh_servers, r.id, 43)
        await _publish(fresh_servers, subject, real)
        assert await waiting == 43
    finally:
        await app.aclose()


@pytest.mark.parametrize("bad", [">", "*", "a.>", "two words", "tab\there", "", "x" * 256, "a..b", ".a", "nul\x00"])
def test_task_ids_that_cannot_be_subject_tokens_are_refused_before_anything_is_sent(heddle_app, heddle_servers, bad):
    @heddle_app.task
    def noop() -> None:
        return None

    async def messages() -> int:
        nc = await nats.connect(heddle_servers.nats_url)
        try:
            info = await nc.jetstream().stream_info(names.TASKS_STREAM)
            return info.state.messages
        finally:
            await nc.close()

    noop.delay()  # creates the streams (no worker runs it)
    before = asyncio.run(messages())
    with pytest.raises(heddle.TaskIdError, match="task_id"):
        noop.apply_async(task_id=bad)
    with pytest.raises(heddle.TaskIdError, match="task_id"):
        heddle_app.AsyncResult(bad)
    assert asyncio.run(messages()) == before


def test_an_id_with_dots_between_tokens_is_a_valid_task_id(heddle_app):
    assert heddle_app.AsyncResult("goal-1:0.2~1").id == "goal-1:0.2~1"


async def test_a_watch_released_under_a_waiting_handle_does_not_end_its_wait(fresh_servers):
    app = _app(fresh_servers)
    try:
        r = app.send_task("nobody.runs_this", (1,), worker_type="nobody")
        await r.sent()
        waiting = asyncio.ensure_future(r.aget(timeout=T))
        conns = await app.connections()
        while (w := conns.watches.get(r.id)) is None or not w.waiting:
            await asyncio.sleep(0.01)  # until the handle waits on the watch
        conns.release_watch(r.id)  # what a Workshop page does with a task it follows by events
        await _store(fresh_servers, r.id, 44)
        assert await waiting == 44
    finally:
        await app.aclose()


async def test_a_task_id_with_dots_gets_its_notice_on_the_senders_subscription(fresh_servers):
    # Graph node ids hold dots ("{goal}:0.3"): several subject tokens after the sender's.
    app = _app(fresh_servers)
    try:
        tid = f"{uuid.uuid4().hex}:0.3"
        r = app.send_task("nobody.runs_this", (1,), worker_type="nobody", task_id=tid)
        await r.sent()
        waiting = asyncio.ensure_future(r.aget(timeout=T))
        # Announced, never stored: only the notice can end this wait.
        notice = encode_record(ResultRecord(id=tid, state=SUCCESS, task="t", result=44))
        await _publish(fresh_servers, names.notice_subject((await app.connections()).notice_token, tid), notice)
        assert await waiting == 44
    finally:
        await app.aclose()


async def test_a_timed_out_wait_says_whether_its_worker_type_is_alive_or_the_task_is_scheduled(fresh_servers):
    app = _app(fresh_servers)
    try:
        nobody = f"nobody{uuid.uuid4().hex[:6]}"
        r = app.send_task("t.run", (1,), worker_type=nobody)
        with pytest.raises(heddle.ResultTimeout, match=f"no worker of type '{nobody}' is alive: start one"):
            await r.aget(timeout=0.3)
        later = app.send_task("t.run", (1,), worker_type=nobody, countdown=600)
        with pytest.raises(heddle.ResultTimeout, match=r"it is scheduled to run at .* UTC, (599|600)s from now"):
            await later.aget(timeout=0.3)
    finally:
        await app.aclose()


def test_a_sync_get_whose_notice_is_lost_still_gets_the_stored_result(fresh_servers):
    # A sync caller waits for the notice in its own thread; the store is still the truth.
    app = _app(fresh_servers)
    try:
        r = app.send_task("nobody.runs_this", (1,), worker_type="nobody")
        asyncio.run(_store(fresh_servers, r.id, 45))  # stored, never announced
        assert r.get(timeout=T) == 45
        late = app.send_task("nobody.runs_this", (2,), worker_type="nobody")
        with pytest.raises(heddle.ResultTimeout, match=r"within 0\.3s \(state PENDING\)"):
            late.get(timeout=0.3)
    finally:
        app.close()


class _CountingApp(heddle.Heddle):
    """Counts what a sync caller hands to the app's loop thread: coroutines (each run as a task) and plain calls."""

    coroutines = 0
    plain_calls = 0

    def run_sync(self, coro, timeout_s=None):
        self.coroutines += 1
        return super().run_sync(coro, timeout_s)

    def count_plain_calls(self, monkeypatch) -> None:
        call_soon = self._portal.call_soon

        def counted(start, timeout_s=None):
            self.plain_calls += 1
            return call_soon(start, timeout_s)

        monkeypatch.setattr(self._portal, "call_soon", counted)


def test_a_sync_delay_then_get_hands_one_plain_call_to_the_loop_thread_and_no_coroutine(
    heddle_app, heddle_worker, monkeypatch
):
    @heddle_app.task
    def add(x: int, y: int) -> int:
        return x + y

    app = _CountingApp(heddle_app.name, settings=heddle_app.settings)
    app.count_plain_calls(monkeypatch)
    try:
        assert app.send_task(add.name, (2, 3)).get(timeout=T) == 5  # the first call connects
        app.coroutines = app.plain_calls = 0
        r = app.send_task(add.name, (4, 5))
        assert r.get(timeout=T) == 9
        # The send is one plain call on the loop (no task made for it); the wait needed
        # no hop to the loop and back.
        assert (app.plain_calls, app.coroutines) == (1, 0)
    finally:
        app.close()


async def _cap_task_messages(nats_url: str, max_bytes: int) -> None:
    """Make the tasks stream refuse any message over ``max_bytes`` (as a stream its operator capped would)."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        config = (await js.stream_info(names.TASKS_STREAM)).config
        config.max_msg_size = max_bytes
        await js.update_stream(config)
    finally:
        await nc.close()


def test_a_sync_send_the_stream_refuses_raises_in_the_callers_thread(fresh_servers):
    # The send is handed to the loop thread once the connections are open; what the
    # stream answered comes back to the caller as it would to an async caller.
    app = _app(fresh_servers)
    try:
        app.send_task("nobody.runs_this", (1,), worker_type="nobody")  # connects, and is stored
        asyncio.run(_cap_task_messages(fresh_servers.nats_url, 1024))
        with pytest.raises(heddle.BrokerError, match="JetStream refused the message: message size exceeds maximum"):
            app.send_task("nobody.runs_this", ("x" * 2048,), worker_type="nobody")
        assert app.send_task("nobody.runs_this", (2,), worker_type="nobody").id  # small ones are still stored
    finally:
        app.close()
