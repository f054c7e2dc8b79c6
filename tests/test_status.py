"""``heddle status``, ``heddle events`` and ``heddle inspect`` against real servers and a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from heddle import Heddle
from heddle.status import gather_status, inspect_task, print_status, print_task
from heddle.testing import EmbeddedServers, running_worker
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def shop(heddle_servers: EmbeddedServers) -> Iterator[Heddle]:
    app = Heddle(f"s{uuid.uuid4().hex[:10]}", nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    @app.task
    def boom(why: str) -> None:
        raise KeyError(why)

    with running_worker(app):
        yield app
    app.close()


def task(app: Heddle, short: str):  # type: ignore[no-untyped-def]
    return next(t for n, t in app.tasks.items() if n.endswith(short))


def heddle(servers: EmbeddedServers, *args: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": servers.nats_url, "VALKEY_URL": servers.valkey_url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "heddle", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def test_status_shows_streams_consumers_the_live_worker_and_dead_letters(
    shop: Heddle, heddle_servers: EmbeddedServers
) -> None:
    assert task(shop, "add").delay(1, 2).get(timeout=10) == 3
    status_app = Heddle("status", nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url)
    try:
        st = status_app.run_sync(gather_status(status_app, sample_s=0))
    finally:
        status_app.close()
    assert {s.name for s in st.streams} >= {"HEDDLE_TASKS", "HEDDLE_DLQ", "HEDDLE_GOALS"}
    mine = [c for c in st.consumers if c.name == f"heddle-{shop.name}"]
    assert mine and mine[0].pending == 0 and mine[0].ack_pending == 0
    worker = next(w for w in st.workers if w.info.worker_type == shop.name)
    assert worker.info.concurrency == 8 and worker.last_seen > 0
    console = Console(record=True, width=200)
    print_status(console, st)
    text = console.export_text()
    assert f"heddle-{shop.name}" in text and "workers online" in text and "dead letters:" in text


def test_the_status_command_prints_tables_and_measures_throughput(
    shop: Heddle, heddle_servers: EmbeddedServers
) -> None:
    out = heddle(heddle_servers, "status", "--sample", "0.5")
    assert out.returncode == 0, out.stderr
    assert "streams" in out.stdout and shop.name in out.stdout and "throughput over 0.5s" in out.stdout
    bad = heddle(heddle_servers, "status", "--sample", "-1")
    assert bad.returncode == 2 and "--sample must be >= 0" in bad.stderr


def test_inspect_shows_a_failed_tasks_error_args_and_timeline(shop: Heddle, heddle_servers: EmbeddedServers) -> None:
    r = task(shop, "boom").delay("why-not")
    wait_for(lambda: r.state == "FAILURE", 10, "the failure")
    app = Heddle("inspect", nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url)
    try:
        view = wait_for(lambda: (v := app.run_sync(inspect_task(app, r.id))).dead_letter_id and v, 10,
                        "the dead letter")
    finally:
        app.close()
    assert view.state == "FAILURE" and view.args == ["why-not"]  # type: ignore[union-attr]
    console = Console(record=True, width=200)
    print_task(console, view)  # type: ignore[arg-type]
    text = console.export_text()
    assert "builtins.KeyError" in text and "Traceback" in text and "timeline" in text and "dead letter" in text
    out = heddle(heddle_servers, "inspect", r.id, "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["state"] == "FAILURE" and doc["args"] == ["why-not"] and doc["record"]["error"]["type"].endswith(
        "KeyError")


def test_inspect_of_an_unknown_task_says_so(heddle_servers: EmbeddedServers) -> None:
    out = heddle(heddle_servers, "inspect", "no-such-task")
    assert out.returncode == 1 and "no task no-such-task is known" in out.stderr


def test_events_tails_live_events_filtered_by_task_and_state(shop: Heddle, heddle_servers: EmbeddedServers) -> None:
    env = {**os.environ, "NATS_URL": heddle_servers.nats_url, "VALKEY_URL": heddle_servers.valkey_url}
    tid = uuid.uuid4().hex
    proc = subprocess.Popen(
        [sys.executable, "-m", "heddle", "events", "--task", tid, "--state", "succeeded", "--json", "--count", "1",
         "--timeout", "30"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        assert "following heddle.events.>" in proc.stderr.readline()  # subscribed
        add = task(shop, "add")
        other = add.delay(5, 5)  # not ours: filtered out
        ours = add.apply_async((20, 22), task_id=tid)
        assert ours.get(timeout=10) == 42 and other.get(timeout=10) == 10
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert proc.returncode == 0, err
    assert len(lines) == 1 and lines[0]["id"] == tid and lines[0]["state"] == "succeeded"


def test_events_rejects_an_unknown_state(heddle_servers: EmbeddedServers) -> None:
    out = heddle(heddle_servers, "events", "--state", "exploded", "--count", "1")
    assert out.returncode == 2 and "unknown --state exploded" in out.stderr


def test_heddle_events_shows_worker_heartbeats_only_when_asked():
    from heddle.status import matches

    beat = {"kind": "worker", "state": "heartbeat", "id": "w1"}
    online = {"kind": "worker", "state": "online", "id": "w1"}
    done = {"kind": "task", "state": "succeeded", "id": "t1"}
    assert not matches(beat, None, None, None) and not matches(beat, None, None, ["worker"])
    assert matches(online, None, None, None) and matches(done, None, None, None)
    assert matches(beat, None, ["heartbeat"], None) and matches(beat, None, ["online", "heartbeat"], ["worker"])
