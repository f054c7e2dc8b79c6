"""Reliability of real ``heddle worker`` processes: kills, SIGTERM, duplicates,
nats-server restarts, MaxDeliver and ``--reload``.

Every worker here is a subprocess running ``tests.apps.crashy`` (or a module
written to a temp dir), so crashes are real crashes. Tasks record their starts
and ends with the worker's pid in an executions log, which is how a test tells
which process ran what and how often.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import nats
import nats.js.errors
import pytest

import heddle
from heddle import names
from heddle.messages import TaskMessage, encoder, task_decoder
from tests.conftest import executions, wait_for

T = TypeVar("T")

CRASHY = "tests.apps.crashy"
SLEEPY = f"{CRASHY}.sleepy"
SYNC_SLEEPY = f"{CRASHY}.sync_sleepy"
ECHO = f"{CRASHY}.echo"
SUICIDE = f"{CRASHY}.suicide"


@pytest.fixture
def client() -> Iterator[Callable[[dict[str, str]], heddle.Heddle]]:
    """The sending side: an app named like the worker's, closed after the test."""
    apps: list[heddle.Heddle] = []

    def make(env: dict[str, str]) -> heddle.Heddle:
        app = heddle.Heddle(
            env["HEDDLE_TEST_APP"],
            nats_url=env["NATS_URL"],
            valkey_url=env["VALKEY_URL"],
            ack_wait_s=float(env.get("HEDDLE_TEST_ACK_WAIT", "30")),
        )
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


def jetstream(url: str, fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(js)`` on a connection of its own, straight through nats-py."""

    async def main() -> T:
        nc = await nats.connect(url, allow_reconnect=False, connect_timeout=5)
        try:
            return await fn(nc.jetstream())
        finally:
            await nc.close()

    return asyncio.run(main())


def started_by(env: dict[str, str], pid: int) -> set[int]:
    return {int(v) for p, kind, v in executions(env) if p == pid and kind == "start"}


def runs(env: dict[str, str], kind: str = "done") -> list[tuple[int, int]]:
    """(pid, n) for every ``kind`` line in the executions log."""
    return [(p, int(v)) for p, k, v in executions(env) if k == kind]


def unsettled(env: dict[str, str]) -> tuple[int, int]:
    """(messages waiting, messages delivered but not acked) on the app's consumer."""

    async def info(js: Any) -> tuple[int, int]:
        ci = await js.consumer_info(names.TASKS_STREAM, names.consumer_name(env["HEDDLE_TEST_APP"]))
        return ci.num_pending, ci.num_ack_pending

    return jetstream(env["NATS_URL"], info)


# -- a killed worker ---------------------------------------------------------------


def test_a_killed_workers_in_flight_tasks_are_redelivered_and_completed_by_a_second_worker(
    heddle_servers, spawn_worker, test_env, client
):
    # AckWait 2 s: in-progress acks keep A's 3 s tasks alive, and a dead A's tasks come back quickly.
    env = test_env(heddle_servers, HEDDLE_TEST_ACK_WAIT="2")
    app = client(env)
    a = spawn_worker(CRASHY, env)
    sent = {n: app.send_task(SLEEPY if n % 2 else SYNC_SLEEPY, (n, 3.0)) for n in range(4)}

    wait_for(lambda: started_by(env, a.pid) == set(sent), 20, "worker A to start every task")
    a.signal(signal.SIGKILL)
    a.wait(10)
    assert runs(env, "done") == [], "worker A finished a task before it was killed"

    b = spawn_worker(CRASHY, env)
    assert {n: r.get(timeout=30) for n, r in sent.items()} == {n: n for n in sent}
    assert sorted(runs(env, "done")) == [(b.pid, n) for n in sorted(sent)]
    assert all(r.record.worker.endswith(f":{b.pid}") for r in sent.values())


# -- SIGTERM -------------------------------------------------------------------------


def test_sigterm_lets_in_flight_tasks_finish_and_exits_cleanly(heddle_servers, spawn_worker, test_env, client):
    env = test_env(heddle_servers)
    app = client(env)
    w = spawn_worker(CRASHY, env, "--grace", "30")
    sent = {1: app.send_task(SLEEPY, (1, 2.0)), 2: app.send_task(SYNC_SLEEPY, (2, 2.0))}

    wait_for(lambda: started_by(env, w.pid) == set(sent), 20, "both tasks to start")
    assert runs(env, "done") == [], "a task finished before the worker was told to stop"
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0, w.output()

    # The results were stored and the messages acked before the worker exited:
    # nothing else could have done it.
    assert {n: r.state for n, r in sent.items()} == {1: heddle.SUCCESS, 2: heddle.SUCCESS}
    assert {n: r.get(timeout=1) for n, r in sent.items()} == {1: 1, 2: 2}
    assert sorted(runs(env, "done")) == [(w.pid, 1), (w.pid, 2)]
    assert unsettled(env) == (0, 0)


def test_tasks_still_running_after_the_grace_period_are_nakd_for_prompt_redelivery(
    heddle_servers, spawn_worker, test_env, client
):
    # AckWait is 30 s: a message that comes back within a few seconds was nak'd.
    env = test_env(heddle_servers, HEDDLE_TEST_ACK_WAIT="30")
    app = client(env)
    # Worker A sleeps 60 s in every task, far past its 0.5 s grace period.
    a = spawn_worker(CRASHY, {**env, "HEDDLE_TEST_SLEEP": "60"}, "--grace", "0.5")
    sent = {1: app.send_task(SLEEPY, (1, 0.1)), 2: app.send_task(SYNC_SLEEPY, (2, 0.1))}

    wait_for(lambda: started_by(env, a.pid) == set(sent), 20, "worker A to start both tasks")
    stopped_at = time.monotonic()
    a.signal(signal.SIGTERM)
    # Even with a sync task still sleeping in one of its threads.
    assert a.wait(15) == 0, a.output()

    b = spawn_worker(CRASHY, env)
    deadline = stopped_at + 20  # well before AckWait would have brought them back
    results = {n: r.get(timeout=max(0.1, deadline - time.monotonic())) for n, r in sent.items()}
    assert results == {1: 1, 2: 2}
    assert sorted(runs(env, "done")) == [(b.pid, 1), (b.pid, 2)]


# -- duplicates ---------------------------------------------------------------------


def test_a_repeated_task_id_runs_once(heddle_servers, spawn_worker, test_env, client):
    env = test_env(heddle_servers)
    app = client(env)
    workers = [spawn_worker(CRASHY, env), spawn_worker(CRASHY, env)]
    tid = f"once-{uuid.uuid4().hex}"

    first = app.send_task(ECHO, (7,), task_id=tid)
    second = app.send_task(ECHO, (7,), task_id=tid)
    assert first.get(timeout=15) == 7
    assert second.get(timeout=15) == 7
    third = app.send_task(ECHO, (7,), task_id=tid)
    assert third.get(timeout=15) == 7

    # The same message again under another Nats-Msg-Id, as after the dedup window
    # or a crash between storing the result and acking: the stored result wins.
    payload = encoder.encode(TaskMessage(id=tid, task=ECHO, args=[8], submitted_at=time.time()))
    subject = names.task_subject(env["HEDDLE_TEST_APP"], "standard")
    durable = names.consumer_name(env["HEDDLE_TEST_APP"])

    async def republish(js: Any) -> int:
        ack = await js.publish(subject, payload, headers={names.HDR_MSG_ID: f"{tid}-again"})
        return ack.seq

    seq = jetstream(env["NATS_URL"], republish)

    async def ack_floor(js: Any) -> int:
        return (await js.consumer_info(names.TASKS_STREAM, durable)).ack_floor.stream_seq

    wait_for(lambda: jetstream(env["NATS_URL"], ack_floor) >= seq, 15, "the re-published copy to be acked")
    assert [v for _, v in runs(env)] == [7]
    assert {p for p, _ in runs(env)} <= {w.pid for w in workers}
    assert app.AsyncResult(tid).get(timeout=1) == 7


# -- nats-server restarts -----------------------------------------------------------


@pytest.mark.parametrize("kill", [False, True], ids=["sigterm", "sigkill"])
def test_the_worker_resumes_after_nats_server_restarts_mid_run(fresh_servers, spawn_worker, test_env, client, kill):
    env = test_env(fresh_servers)
    app = client(env)
    w = spawn_worker(CRASHY, env)
    assert [app.send_task(ECHO, (n,)).get(timeout=15) for n in range(3)] == [0, 1, 2]
    in_flight = {n: app.send_task(SLEEPY, (n, 1.5)) for n in (10, 11)}
    wait_for(lambda: started_by(env, w.pid) >= set(in_flight), 15, "the slow tasks to start")
    assert not set(in_flight) & {n for _, n in runs(env)}, "a slow task finished before the restart"

    # Same port and store dir: the stream and the durable consumer survive, the
    # connections and any pull request waiting on the server do not.
    fresh_servers.nats.restart(kill=kill)

    after = {n: app.send_task(ECHO, (n,)) for n in range(20, 25)}
    assert {n: r.get(timeout=30) for n, r in {**in_flight, **after}.items()} == {n: n for n in [*in_flight, *after]}
    # And it keeps consuming, not just the first batch after the restart.
    assert [app.send_task(ECHO, (n,)).get(timeout=15) for n in (30, 31)] == [30, 31]
    assert w.proc.poll() is None, "the worker exited"
    assert {p for p, _ in runs(env)} == {w.pid}


# -- MaxDeliver ----------------------------------------------------------------------


def test_a_message_past_max_deliver_is_dead_lettered_with_a_reason(heddle_servers, spawn_worker, test_env, client):
    env = test_env(heddle_servers, HEDDLE_TEST_ACK_WAIT="1", HEDDLE_TEST_MAX_DELIVER="2")
    app = client(env)
    r = app.send_task(SUICIDE, (5,))

    # Each delivery kills its worker; keep one running until the task gives up.
    for _ in range(6):
        w = spawn_worker(CRASHY, env, ready=False)
        wait_for(lambda w=w: r.ready() or w.proc.poll() is not None, 30, "the task to fail or kill its worker")
        if r.ready():
            break
    assert r.state == heddle.FAILURE
    with pytest.raises(heddle.TaskError) as info:
        r.get(timeout=1)
    assert info.value.type_name == "heddle.MaxDeliveriesExceeded"
    assert "MaxDeliver" in info.value.remote_message
    assert len(runs(env, "start")) == 2

    async def dead_letters(js: Any) -> list[Any]:
        dlq = await js.stream_info(names.DLQ_STREAM)
        out = []
        for seq in range(dlq.state.first_seq, dlq.state.last_seq + 1):
            try:
                msg = await js.get_msg(names.DLQ_STREAM, seq)
            except nats.js.errors.NotFoundError:
                continue
            if (msg.headers or {}).get(names.HDR_TASK_ID) == r.id:
                out.append(msg)
        return out

    dead = jetstream(env["NATS_URL"], dead_letters)
    assert len(dead) == 1
    assert dead[0].subject == names.DEAD_LETTER_SUBJECT
    assert "MaxDeliver" in dead[0].headers[names.HDR_REASON]
    assert task_decoder.decode(dead[0].data).task == SUICIDE  # the original message, kept whole

    async def left_in_tasks_stream(js: Any) -> Any:
        subject = names.task_subject(env["HEDDLE_TEST_APP"], "standard")
        try:
            return await js.get_msg(names.TASKS_STREAM, 1, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return None

    assert jetstream(env["NATS_URL"], left_in_tasks_stream) is None


# -- --reload -----------------------------------------------------------------------

RELOADABLE = """
import os

import heddle

app = heddle.Heddle(os.environ["HEDDLE_TEST_APP"])


@app.task
def version() -> str:
    return {value!r}
"""


@pytest.fixture
def reloading_worker(tmp_path: Path) -> Iterator[Callable[[dict[str, str]], subprocess.Popen[bytes]]]:
    """``heddle worker --reload`` in ``tmp_path``; its whole process group is killed after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(tmp_path / "reload.log", "wb")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "heddle", "worker", "-A", "reloadme", "--reload", "--quiet"],
                env={**os.environ, **env, "PYTHONDONTWRITEBYTECODE": "1"},
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the reloader and the worker it runs share a group
            )
        finally:
            log.close()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        # The group, not just the reloader: a worker it started may outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_reload_restarts_the_worker_when_code_changes(heddle_servers, test_env, client, reloading_worker, tmp_path):
    env = test_env(heddle_servers)
    module = tmp_path / "reloadme.py"
    module.write_text(textwrap.dedent(RELOADABLE.format(value="first")))
    app = client(env)
    proc = reloading_worker(env)

    assert app.send_task("reloadme.version").get(timeout=30) == "first"
    module.write_text(textwrap.dedent(RELOADABLE.format(value="second, reloaded")))

    def reloaded() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the reloader exited:\n{(tmp_path / 'reload.log').read_text()}")
        return app.send_task("reloadme.version").get(timeout=30) == "second, reloaded"

    wait_for(reloaded, 60, "the reloaded worker to return the new value")
