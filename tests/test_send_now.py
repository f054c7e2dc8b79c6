"""Sends made in the caller's own step (heddle.connections.Connections.send_now): a loop
of ``apply_async`` calls that never yields reaches nats-server while it runs, the
connection still publishes in the order of the calls, and closing the app waits for
every ack. Each test has servers of its own; the tasks go to a worker type nobody runs,
so they stay in the stream (the router is not running either)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import nats
import pytest

import heddle
import heddle.broker
from heddle import names
from tests.test_result_notices import _app

T = 15.0


class _Observer:
    """A subscriber to ``heddle.tasks.>`` on a thread and loop of its own: it hears the server
    while the test's loop is busy in a loop that does not yield."""

    def __init__(self, nats_url: str) -> None:
        self.ids: list[str] = []
        self.first = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="observer", daemon=True)
        self._thread.start()
        self._nc: Any = asyncio.run_coroutine_threadsafe(self._start(nats_url), self._loop).result(T)

    async def _start(self, url: str) -> Any:
        nc = await nats.connect(url)

        async def heard(msg: Any) -> None:
            self.ids.append((msg.headers or {}).get(names.HDR_MSG_ID, ""))
            self.first.set()

        await nc.subscribe("heddle.tasks.>", cb=heard)
        await nc.flush()
        return nc

    def wait_for(self, n: int) -> list[str]:
        async def until() -> None:
            while len(self.ids) < n:
                await asyncio.sleep(0.01)

        asyncio.run_coroutine_threadsafe(asyncio.wait_for(until(), T), self._loop).result(T + 1)
        return list(self.ids)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._nc.close(), self._loop).result(T)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(T)


async def _connected(app: heddle.Heddle) -> None:
    """Open the connections and make one send, so that later ones need nothing set up."""
    await app.connect()
    await app.send_task("nobody.runs_this", worker_type="nobody").sent()


async def _heard_in_order(observer: _Observer, handles: list[Any]) -> None:
    """Every send is stored, and the server heard them in the order they were made (after _connected's)."""
    for r in handles:
        await asyncio.wait_for(r.sent(), T)
    assert observer.wait_for(len(handles) + 1)[1:] == [r.id for r in handles]


async def test_a_loop_of_sends_that_never_yields_reaches_the_server_while_it_runs(fresh_servers):
    app = _app(fresh_servers)
    observer = _Observer(fresh_servers.nats_url)
    try:
        await _connected(app)
        observer.wait_for(1)
        observer.first.clear()
        handles = []
        heard_at = None
        for i in range(20_000):  # no await in here: the event loop does not run
            handles.append(app.send_task("nobody.runs_this", (i,), worker_type="nobody"))
            if observer.first.is_set():
                heard_at = i
                break
        assert heard_at is not None, "nats-server heard nothing until the loop ended"
        await _heard_in_order(observer, handles)
    finally:
        observer.close()
        await app.aclose()


async def test_sends_leave_in_the_order_they_were_made_also_past_the_bound_on_pending_publishes(
    fresh_servers, monkeypatch
):
    monkeypatch.setattr(heddle.broker, "_MAX_PENDING_PUBLISHES", 64)
    app = _app(fresh_servers)
    observer = _Observer(fresh_servers.nats_url)
    try:
        await _connected(app)
        first = [app.send_task("nobody.runs_this", (i,), worker_type="nobody") for i in range(300)]
        await first[0].sent()  # acks come in, and sends that waited get their turns
        second = [app.send_task("nobody.runs_this", (i,), worker_type="nobody") for i in range(300)]
        handles = first + second
        # Past the 64 publishes awaiting their ack, sends are held in call order and queued by
        # one task as answers make room: no task of their own each.
        assert app._held[asyncio.get_running_loop()]
        assert not any(isinstance(r._sent, asyncio.Task) for r in handles)
        await _heard_in_order(observer, handles)
    finally:
        observer.close()
        await app.aclose()


async def test_held_sends_that_cannot_be_queued_for_another_reason_go_as_tasks_still_in_order(
    fresh_servers, monkeypatch
):
    # A held send is queued when answers make room; one declined for another reason (here:
    # more result watches open than the connection keeps without evicting) is sent the full
    # way as a task, and so is every send behind it.
    monkeypatch.setattr(heddle.broker, "_MAX_PENDING_PUBLISHES", 64)
    app = _app(fresh_servers)
    observer = _Observer(fresh_servers.nats_url)
    try:
        await _connected(app)
        conns = await app.connections()
        conns.watches.max_watches = 150
        as_tasks: list[Any] = []
        send_as_task = app.send_as_task
        monkeypatch.setattr(app, "send_as_task", lambda send: as_tasks.append(send) or send_as_task(send))
        handles = [app.send_task("nobody.runs_this", (i,), worker_type="nobody") for i in range(400)]
        await _heard_in_order(observer, handles)
        assert 0 < len(as_tasks) < 400  # some were queued when room came, then the rest went as tasks
    finally:
        observer.close()
        await app.aclose()


@pytest.mark.parametrize("bound", [8192, 64], ids=["within the bound", "past the bound: held"])
async def test_closing_the_app_right_after_a_burst_of_sends_waits_for_every_ack(fresh_servers, monkeypatch, bound):
    monkeypatch.setattr(heddle.broker, "_MAX_PENDING_PUBLISHES", bound)
    app = _app(fresh_servers)
    try:
        await _connected(app)
        handles = [app.send_task("nobody.runs_this", (i,), worker_type="nobody") for i in range(2_000)]
        assert not any(isinstance(r._sent, asyncio.Task) for r in handles)  # no task per send
    finally:
        await app.aclose()
    assert all(r._sent.done() and r._sent.exception() is None for r in handles)
    nc = await nats.connect(fresh_servers.nats_url)
    try:
        info = await nc.jetstream().stream_info(names.TASKS_STREAM)
        assert info.state.messages == 2_001
    finally:
        await nc.close()


async def test_a_burst_right_after_connect_is_sent_in_the_callers_step(fresh_servers):
    # connect() makes what a send in its caller's step needs (the streams, the routes, the
    # notice subscription): a script's first burst after it used to go as a task per send.
    app = _app(fresh_servers)
    try:
        await app.connect()
        handles = [app.send_task("nobody.runs_this", (i,), worker_type="nobody") for i in range(500)]
        assert not any(isinstance(r._sent, asyncio.Task) for r in handles)
        for r in handles:
            await asyncio.wait_for(r.sent(), T)
    finally:
        await app.aclose()


async def test_a_burst_of_sends_before_the_connection_opens_creates_the_streams_once(fresh_servers):
    # The first sends of a process each wait for the connection; they used to create the
    # streams one request each (5,000 sends: 20,000 stream requests, and nats-server's
    # JetStream API timed out under them).
    requests: list[str] = []
    nc = await nats.connect(fresh_servers.nats_url)

    async def heard(msg: Any) -> None:
        requests.append(msg.subject)

    await nc.subscribe("$JS.API.STREAM.CREATE.>", cb=heard)
    await nc.flush()
    app = _app(fresh_servers)
    try:
        handles = [app.send_task("nobody.runs_this", (i,), worker_type="nobody") for i in range(5_000)]
        assert all(isinstance(r._sent, asyncio.Task) for r in handles)  # each waits for the connection
        for r in handles:
            await asyncio.wait_for(r.sent(), T)
        await nc.flush()
        # The four streams, and the workers bucket the direct routes follow (heddle.routes).
        streams = [names.TASKS_STREAM, names.DLQ_STREAM, names.GOALS_STREAM, names.STREAMS_STREAM,
                   f"KV_{names.WORKERS_BUCKET}"]
        assert sorted(requests) == sorted(f"$JS.API.STREAM.CREATE.{s}" for s in streams)
    finally:
        await app.aclose()
        await nc.close()


async def test_streams_that_could_not_be_created_are_tried_again_by_the_next_send(fresh_servers):
    # A stream of someone else's holds the incoming subject, so HEDDLE_TASKS cannot be made;
    # once it is gone, the next send creates the streams (the failure is not kept).
    nc = await nats.connect(fresh_servers.nats_url)
    js = nc.jetstream()
    await js.add_stream(name="BLOCKER", subjects=[names.INCOMING_SUBJECT])
    app = _app(fresh_servers)
    try:
        refused = [app.send_task("nobody.runs_this", (i,), worker_type="nobody") for i in range(3)]
        why = "refused creating stream HEDDLE_TASKS: subjects overlap with an existing stream"  # the server's reason
        for r in refused:
            with pytest.raises(heddle.BrokerError, match=why):
                await asyncio.wait_for(r.sent(), T)
        await js.delete_stream("BLOCKER")
        await asyncio.wait_for(app.send_task("nobody.runs_this", (9,), worker_type="nobody").sent(), T)
        assert (await js.stream_info(names.TASKS_STREAM)).state.messages == 1
    finally:
        await app.aclose()
        await nc.close()


async def test_a_handle_sent_in_the_callers_step_gets_its_result(heddle_app, heddle_worker):
    @heddle_app.task
    async def square(x: int) -> int:
        return x * x

    await heddle_app.connect()
    await square.apply_async((1,)).aget(timeout=T)
    handles = [square.apply_async((i,)) for i in range(200)]
    assert not any(isinstance(r._sent, asyncio.Task) for r in handles)
    assert [await r.aget(timeout=T) for r in handles] == [i * i for i in range(200)]


def test_task_ids_are_random_hex_never_repeated_and_a_forked_child_draws_its_own():
    import os
    import re

    from heddle.send import new_task_id

    ids = [new_task_id() for _ in range(5_000)]  # many draws of the OS's random bytes
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send one id back, then leave at once
        os.write(write, new_task_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parents_next = [new_task_id() for _ in range(256)]
    assert re.fullmatch(r"[0-9a-f]{32}", child) and child not in parents_next and child not in ids


async def test_a_burst_of_handles_leaves_few_objects_for_the_garbage_collector(fresh_servers):
    # A client that sends a burst and then awaits every result has the collector walk each
    # handle again at every full collection (several per 20,000 sends). A handle without a
    # __dict__ and a watch without an empty callback list leave about four tracked objects
    # each (five before); a result record is not tracked at all.
    import gc
    import weakref

    from heddle.messages import ResultRecord

    app = _app(fresh_servers)
    try:
        await _connected(app)
        gc.collect()
        before = len(gc.get_objects())
        handles = [app.send_task("nobody.runs_this", worker_type="nobody") for _ in range(1_000)]
        for r in handles:
            await asyncio.wait_for(r.sent(), T)
        gc.collect()
        per_handle = (len(gc.get_objects()) - before) / len(handles)
        assert per_handle <= 4.2, f"{per_handle:.2f} tracked objects per pending handle"
        assert not gc.is_tracked(ResultRecord(id="t", state="SUCCESS"))
        assert weakref.ref(handles[0])() is handles[0]  # still weakly referable, as before __slots__
    finally:
        await app.aclose()
