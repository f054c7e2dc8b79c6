"""Priorities 0-9: high ones overtake queued default and low ones, low ones still progress (#18 item 3).

The worker is a real ``heddle worker -A tests.apps.prioritized --concurrency 1``
process; every run logs when it started, so the order runs began in is read back.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

import heddle
from tests.conftest import wait_for

STEP = "tests.apps.prioritized.step"
URGENT = "tests.apps.prioritized.urgent"


def _env(servers, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "NATS_URL": servers.nats_url,
        "VALKEY_URL": servers.valkey_url,
        "HEDDLE_TEST_APP": f"p{uuid.uuid4().hex[:10]}",
        "HEDDLE_TEST_LOG": str(tmp_path / "starts.log"),
        **extra,
    }


def _starts(env: dict[str, str]) -> list[tuple[float, int]]:
    path = Path(env["HEDDLE_TEST_LOG"])
    if not path.exists():
        return []
    rows = [line.split(" ") for line in path.read_text().splitlines()]
    return sorted((float(at), int(n)) for at, _, _, n in rows)


def _client(env: dict[str, str]) -> heddle.Heddle:
    return heddle.Heddle(env["HEDDLE_TEST_APP"], nats_url=env["NATS_URL"], valkey_url=env["VALKEY_URL"])


def _overtaken(env: dict[str, str], n: int, sent_at: float, low: range) -> int:
    """How many of the ``low`` tasks started after task ``n`` was sent and before it started."""
    starts = _starts(env)
    began = next(at for at, m in starts if m == n)
    return sum(1 for at, m in starts if m in low and sent_at <= at < began)


def test_a_high_and_a_default_priority_task_overtake_300_queued_low_ones(fresh_servers, spawn_worker, tmp_path):
    env = _env(fresh_servers, tmp_path)
    spawn_worker("tests.apps.prioritized", env, "--concurrency", "1")
    client = _client(env)
    low = range(300)
    try:
        queued = [client.send_task(STEP, args=(n,), priority=0) for n in low]
        high_sent = time.time()
        high = client.send_task(STEP, args=(1000,), priority=9)
        default_sent = time.time()
        default = client.send_task(STEP, args=(2000,))  # no priority: the default, 5
        assert high.get(timeout=60) == 1000 and default.get(timeout=60) == 2000
        assert sorted(r.get(timeout=120) for r in queued) == list(low)
    finally:
        client.close()
    # Each started before at most a few of the low tasks queued ahead of it (one held, one running).
    assert _overtaken(env, 1000, high_sent, low) <= 3
    assert _overtaken(env, 2000, default_sent, low) <= 3


def test_through_the_router_a_high_priority_task_queued_last_starts_first(fresh_servers, spawn_worker, tmp_path):
    # Sent before any worker (and so any router) runs: the router routes them all when it starts.
    env = _env(fresh_servers, tmp_path)
    client = _client(env)
    try:
        queued = [client.send_task(STEP, args=(n,)) for n in range(20)]
        first = client.send_task(URGENT, args=(99,), priority=8)
        spawn_worker("tests.apps.prioritized", env, "--concurrency", "1")
        assert first.get(timeout=60) == 99
        assert sorted(r.get(timeout=60) for r in queued) == list(range(20))
    finally:
        client.close()
    order = [n for _, n in _starts(env)]
    # The worker may have started one default task before the router routed the urgent one.
    assert order.index(99) <= 1, order


def test_a_low_priority_task_still_starts_while_default_ones_keep_coming(fresh_servers, spawn_worker, tmp_path):
    env = _env(fresh_servers, tmp_path, HEDDLE_TEST_LOW_AGING="1.0")
    spawn_worker("tests.apps.prioritized", env, "--concurrency", "1")
    client = _client(env)
    try:
        busy = [client.send_task(STEP, args=(n,), kwargs={"hold_s": 0.1}) for n in range(60)]  # ~6 s of work
        low = client.send_task(STEP, args=(500,), priority=1)
        assert low.get(timeout=30) == 500
        wait_for(lambda: len(_starts(env)) >= 2, 10, "some runs")
        order = [n for _, n in _starts(env)]
        # It ran within about one aging period (1 s here, ~10 tasks), long before the 60 default ones ended.
        assert order.index(500) < 40, order
        for r in busy:
            r.get(timeout=60)
    finally:
        client.close()


def test_a_tasks_own_priority_applies_to_its_sends_and_inspect_shows_it(heddle_app):
    from heddle.status import inspect_task

    @heddle_app.task(priority=8)
    def urgent() -> None: ...

    r = urgent.delay()  # no worker serves this app: it stays queued
    try:
        view = heddle_app.run_sync(inspect_task(heddle_app, r.id))
        assert view.priority == 8
        assert view.queued is not None
        lowered = urgent.apply_async(priority=2)
        assert heddle_app.run_sync(inspect_task(heddle_app, lowered.id)).priority == 2
        lowered.revoke()
    finally:
        r.revoke()


def test_a_priority_outside_0_to_9_is_refused_where_it_is_given(heddle_app):
    @heddle_app.task
    def noop() -> None: ...

    with pytest.raises(TypeError, match=r"priority for task .* must be an int from 0 \(lowest\) to 9"):
        noop.apply_async(priority=10)
    with pytest.raises(TypeError, match="must be an int from 0"):
        noop.apply_async(priority=True)
    with pytest.raises(heddle.TaskOptionError, match="priority for task"):
        heddle_app.task(priority="high")(lambda: None)
