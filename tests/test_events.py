"""Lifecycle events on heddle.events.>: what the router, the worker and heartbeats announce."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest

from heddle import Heddle, events, names
from heddle.testing import EmbeddedServers, aworker


class Recorder:
    """Every event on heddle.events.>, described, as it arrives."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._changed = asyncio.Event()

    async def cb(self, msg: Any) -> None:
        ev = events.describe(msg.subject, msg.data)
        assert ev is not None, f"undecodable event on {msg.subject}"
        ev["subject"] = msg.subject
        self.seen.append(ev)
        self._changed.set()

    async def wait(self, pred: Any, timeout_s: float = 40.0) -> list[dict[str, Any]]:
        async def loop() -> list[dict[str, Any]]:
            while True:
                found = [e for e in self.seen if pred(e)]
                if found:
                    return found
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(loop(), timeout_s)


@pytest.fixture
async def recorder(heddle_servers: EmbeddedServers) -> AsyncIterator[Recorder]:
    nc = await nats.connect(heddle_servers.nats_url)
    rec = Recorder()
    await nc.subscribe(names.EVENTS_ALL, cb=rec.cb)
    await nc.flush()
    yield rec
    await nc.close()


def new_app(servers: EmbeddedServers) -> Heddle:
    app = Heddle(f"e{uuid.uuid4().hex[:10]}", nats_url=servers.nats_url, valkey_url=servers.valkey_url)

    @app.task
    async def add(x: int, y: int) -> int:
        return x + y

    @app.task(retries=1, retry_backoff=False)
    async def flaky(n: int) -> int:
        raise RuntimeError(f"nope {n}")

    return app


async def test_a_task_announces_received_started_and_succeeded_with_its_arguments(
    heddle_servers: EmbeddedServers, recorder: Recorder
) -> None:
    app = new_app(heddle_servers)
    add = next(t for n, t in app.tasks.items() if n.endswith("add"))
    async with aworker(app) as worker:
        r = await add.aapply_async((2, 3))
        assert await r.aget(timeout=10) == 5
        done = await recorder.wait(lambda e: e.get("id") == r.id and e["state"] == "succeeded")
        # A router announces `received` after it has forwarded the task, so it may come in last.
        await recorder.wait(lambda e: e.get("id") == r.id and e["state"] == "received")
    mine = {e["state"]: e for e in recorder.seen if e.get("id") == r.id}
    assert set(mine) == {"received", "started", "succeeded"}
    # Announced by the router, or by the worker when the task was sent to it directly (heddle.routes).
    assert mine["received"]["args"] == [2, 3] and mine["received"]["worker"] in ("router", worker.name)
    assert [e["state"] for e in recorder.seen if e.get("id") == r.id].count("received") == 1
    assert mine["received"]["subject"] == "heddle.events.task.received"
    ok = done[0]
    assert ok["task"] == add.name and ok["worker_type"] == app.name and ok["worker"] == worker.name
    assert ok["tier"] == "standard" and ok["duration_s"] > 0
    await app.aclose()


async def test_a_quick_tasks_events_come_in_order_and_a_long_tasks_start_is_seen_while_it_runs(
    heddle_servers: EmbeddedServers, recorder: Recorder
) -> None:
    # The worker holds received and started to send them with the outcome (heddle.events.Held),
    # at most EVENT_HOLD_S: a task still running by then is seen to start.
    app = new_app(heddle_servers)
    release = asyncio.Event()

    @app.task
    async def long_one() -> str:
        await release.wait()
        return "done"

    add = next(t for n, t in app.tasks.items() if n.endswith("add"))
    async with aworker(app):
        quick = [await add.aapply_async((i, i)) for i in range(20)]
        for r in quick:
            await r.aget(timeout=10)
        for r in quick:
            await recorder.wait(lambda e, r=r: e.get("id") == r.id and e["state"] == "succeeded")
            states = [e["state"] for e in recorder.seen if e.get("id") == r.id and e["state"] != "received"]
            assert states == ["started", "succeeded"]
        r = await long_one.aapply_async()
        await recorder.wait(lambda e: e.get("id") == r.id and e["state"] == "started", timeout_s=10)
        assert await r.astate() == "STARTED"
        release.set()
        assert await r.aget(timeout=10) == "done"
    await app.aclose()


async def test_a_failing_task_announces_its_retry_its_failure_and_the_error(
    heddle_servers: EmbeddedServers, recorder: Recorder
) -> None:
    app = new_app(heddle_servers)
    flaky = next(t for n, t in app.tasks.items() if n.endswith("flaky"))
    async with aworker(app):
        r = await flaky.aapply_async((7,))
        await recorder.wait(lambda e: e.get("id") == r.id and e["state"] == "failed")
    states = [e["state"] for e in recorder.seen if e.get("id") == r.id and e["kind"] == "task"]
    assert "retried" in states and states.count("failed") == 1
    failed = next(e for e in recorder.seen if e.get("id") == r.id and e["state"] == "failed")
    assert failed["error"] == "builtins.RuntimeError: nope 7" and failed["retries"] == 1
    await app.aclose()


async def test_a_message_the_worker_cannot_run_is_announced_dead_lettered(
    heddle_servers: EmbeddedServers, recorder: Recorder
) -> None:
    app = new_app(heddle_servers)
    async with aworker(app):
        r = app.send_task("no_such_task", (1,), worker_type=app.name)
        await r.sent()
        dead = await recorder.wait(lambda e: e.get("id") == r.id and e["state"] == "dead_lettered")
    assert "unknown task 'no_such_task'" in dead[0]["error"]
    await app.aclose()


async def test_workers_announce_themselves_online_with_heartbeats_and_offline(
    heddle_servers: EmbeddedServers, recorder: Recorder
) -> None:
    app = new_app(heddle_servers)
    async with aworker(app, router=False):
        online = await recorder.wait(lambda e: e["kind"] == "worker" and e["worker_type"] == app.name)
        assert online[0]["state"] == "online" and online[0]["tiers"] == ["*"]
        assert sorted(app.tasks) == sorted(online[0]["tasks"]) and online[0]["concurrency"] == 8
        assert any(t.endswith(".add") for t in online[0]["tasks"])
        await recorder.wait(lambda e: e["kind"] == "worker" and e["worker_type"] == app.name
                            and e["state"] == "heartbeat")
    await recorder.wait(lambda e: e["kind"] == "worker" and e["worker_type"] == app.name and e["state"] == "offline")
    await app.aclose()


def test_events_are_small_versioned_msgpack_and_garbage_is_ignored() -> None:
    ev = events.task_event(events.STARTED, "abc", task="t", worker_type="w", tier="local", worker="me")
    data = events.encoder.encode(ev)
    assert len(data) < 100
    assert msgspec.msgpack.decode(data)["state"] == "started"
    described = events.describe("heddle.events.task.started", data)
    assert described is not None and described["id"] == "abc" and described["v"] == 1
    assert events.describe("heddle.events.task.started", b"\xc1garbage") is None
    big = events.payload_of(b"x" * (events.MAX_PAYLOAD_BYTES + 1))
    assert len(big) == 0  # too big to ride along: not attached
    assert events.TASK_SUBJECTS[events.DEAD_LETTERED] == "heddle.events.task.dead_lettered"
