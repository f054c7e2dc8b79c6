"""``heddle inspect`` of a task that is still queued: where it waits, and for what (#21 item 9)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from heddle import Heddle
from heddle.testing import EmbeddedServers, running_worker

ROOT = Path(__file__).resolve().parent.parent


def heddle(servers: EmbeddedServers, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": servers.nats_url, "VALKEY_URL": servers.valkey_url, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "heddle", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def lonely(heddle_servers: EmbeddedServers) -> Iterator[Heddle]:
    """An app whose worker type nobody serves."""
    app = Heddle(f"nobody{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                 valkey_url=heddle_servers.valkey_url)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    yield app
    app.close()


def test_inspect_of_a_task_no_worker_serves_says_where_it_is_queued(
    lonely: Heddle, heddle_servers: EmbeddedServers
) -> None:
    add = next(iter(lonely.tasks.values()))
    r = add.delay(2, 3)
    try:
        out = heddle(heddle_servers, "inspect", r.id)
        assert out.returncode == 0, out.stdout + out.stderr
        text = " ".join(out.stdout.split())
        assert "no task" not in text and "PENDING" in text
        # No router runs here, so the task waits on the router's subject.
        assert "queued on stream HEDDLE_TASKS, subject heddle.tasks.incoming (seq " in text
        assert f"no worker of type {lonely.name!r} is alive" in text and "router" in text
        assert "args [2, 3]" in text  # read from the queued message itself
        doc = json.loads(heddle(heddle_servers, "inspect", r.id, "--json").stdout)
        assert doc["queued"]["stream"] == "HEDDLE_TASKS" and doc["queued"]["worker_type"] == lonely.name
        assert doc["queued"]["seq"] > 0 and doc["sent_at"] > 0
    finally:
        r.revoke()


def test_inspect_of_a_task_with_a_countdown_says_when_it_is_scheduled(heddle_servers: EmbeddedServers) -> None:
    app = Heddle(f"later{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                 valkey_url=heddle_servers.valkey_url)

    @app.task
    def ping() -> str:
        return "pong"

    try:
        with running_worker(app):
            assert ping.delay().get(timeout=10) == "pong"  # the router knows the live worker: sends go direct
            r = ping.apply_async(countdown=3600)
            out = heddle(heddle_servers, "inspect", r.id)
            r.revoke()
    finally:
        app.close()
    assert out.returncode == 0, out.stdout + out.stderr
    text = " ".join(out.stdout.split())
    assert f"queued on stream HEDDLE_TASKS, subject heddle.tasks.{app.name}." in text
    assert re.search(r"scheduled to run at \d\d:\d\d:\d\d UTC, 3[56]\d\ds from now", text), text


def test_find_queued_reads_past_other_tasks_and_knows_a_task_that_is_not_there(
    lonely: Heddle, heddle_servers: EmbeddedServers
) -> None:
    from heddle.status import find_queued, inspect_task

    add = next(iter(lonely.tasks.values()))
    first, *others = [add.delay(i, i) for i in range(300)]
    try:
        view = lonely.run_sync(inspect_task(lonely, first.id))
        assert view.queued is not None and view.queued.subject == "heddle.tasks.incoming"
        assert view.args == [0, 0]
        missing, note, _ = lonely.run_sync(find_queued(lonely, "never-sent"))
        assert missing is None and "not among" in note
    finally:
        for r in (first, *others):
            r.revoke()


def test_inspect_of_an_unknown_task_still_says_no_task_is_known(heddle_servers: EmbeddedServers) -> None:
    out = heddle(heddle_servers, "inspect", f"unknown-{uuid.uuid4().hex}")
    assert out.returncode == 1 and "is known" in out.stderr


def test_inspect_of_a_queued_task_shows_when_it_expires(lonely: Heddle, heddle_servers: EmbeddedServers) -> None:
    add = next(iter(lonely.tasks.values()))
    r = add.apply_async((1, 2), expires=3600)  # #18 item 6
    try:
        out = heddle(heddle_servers, "inspect", r.id)
        assert out.returncode == 0, out.stdout + out.stderr
        text = " ".join(out.stdout.split())
        assert re.search(r"expires \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(in 3[56]\d\ds; not started by then", text), text
    finally:
        r.revoke()
