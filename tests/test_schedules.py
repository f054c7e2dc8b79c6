"""Periodic schedules (``app.periodic``) run once per tick across worker processes, survive a killed
worker, run missed ticks once, and are listed by ``heddle schedules -A`` (#18 items 1, 2).

Workers are ``heddle worker -A tests.apps.periodic`` processes against real nats-server and
valkey-server; every run of the ``heartbeat`` schedule's task appends its pid, task id and
``Heddle-Schedule`` header to a log, so runs are counted per tick.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

import heddle
from heddle import names
from heddle.errors import ConfigError, EncodeError
from heddle.schedules import schedule_of
from tests.conftest import ROOT, wait_for

APP = "tests.apps.periodic"


def runs(env: dict[str, str]) -> list[tuple[int, str, str]]:
    """(pid, task id, Heddle-Schedule header) of every run of the heartbeat task, in order."""
    path = Path(env["HEDDLE_TEST_LOG"])
    if not path.exists():
        return []
    return [(int(p), tid, hdr) for p, tid, hdr in (line.split(" ") for line in path.read_text().splitlines())]


def tick_ms(task_id: str) -> int:
    return int(task_id.rpartition(":")[2])


def ticks(env: dict[str, str]) -> list[int]:
    """Tick times (epoch ms) of the runs, in order."""
    return [tick_ms(tid) for _, tid, _ in runs(env)]


def assert_each_tick_ran_once(env: dict[str, str], every_s: float = 1.0) -> None:
    ids = [tid for _, tid, _ in runs(env)]
    assert len(ids) == len(set(ids)), f"a tick ran twice: {ids}"
    # One run per interval, not one per worker: successive ticks are an interval apart.
    times = sorted(tick_ms(t) for t in ids)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g >= every_s * 1000 - 100 for g in gaps), f"ticks closer than {every_s}s: {gaps}"
    assert all(hdr == "heartbeat" for _, _, hdr in runs(env))


def senders(workers: list) -> dict[int, str]:
    """pid -> the last periodic task id that worker's scheduler sent (from its log)."""
    out = {}
    for w in workers:
        sent = [line for line in w.output().splitlines() if "schedule heartbeat: sent" in line]
        if sent:
            out[w.pid] = sent[-1].rpartition("[")[2].rstrip("]")
    return out


def heddle_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heddle", *args], env={**os.environ, **env, "PYTHONPATH": str(ROOT), "COLUMNS": "220"},
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


async def last_tick_time(nats_url: str, app: str) -> float:
    """When nats-server last published a tick of the heartbeat schedule (epoch s; 0 if none)."""
    import nats

    nc = await nats.connect(nats_url)
    try:
        msg = await nc.jetstream().get_last_msg(names.SCHEDULES_STREAM, names.tick_subject(app, "heartbeat"))
        return msg.time.timestamp() if msg.time else 0.0
    except Exception:
        return 0.0
    finally:
        await nc.close()


def test_three_workers_run_each_tick_of_an_every_1s_schedule_exactly_once(fresh_servers, spawn_worker, test_env):
    env = test_env(fresh_servers)
    for _ in range(3):
        spawn_worker(APP, env)
    wait_for(lambda: len(runs(env)) >= 6, 30, "six ticks of the heartbeat schedule")
    assert_each_tick_ran_once(env)
    # The tick ids are the task ids: periodic:{app}:{schedule}:{tick ms}.
    _, tid, _ = runs(env)[0]
    assert tid.startswith(f"periodic:{env['HEDDLE_TEST_APP']}:heartbeat:")
    assert schedule_of(tid) == "heartbeat"


def test_sigkilling_the_worker_that_sent_the_last_tick_neither_stops_nor_doubles_the_schedule(
    fresh_servers, spawn_worker, test_env
):
    env = test_env(fresh_servers)
    workers = [spawn_worker(APP, env) for _ in range(3)]
    wait_for(lambda: len(runs(env)) >= 3, 30, "three ticks")
    # Kill mid-interval (ticks fall on whole seconds), so no task is half run at that moment.
    wait_for(lambda: 0.3 < time.time() % 1 < 0.6, 5, "the middle of a second")
    last = max(ticks(env))
    sent_by = {pid for pid, tid in senders(workers).items() if tick_ms(tid) == last}
    assert len(sent_by) == 1, f"tick {last} was sent by {sent_by}"
    (victim,) = [w for w in workers if w.pid in sent_by]
    victim.kill()
    before = len(runs(env))
    wait_for(lambda: len(runs(env)) >= before + 4, 30, "four more ticks after the SIGKILL")
    assert_each_tick_ran_once(env)
    after_kill = [pid for pid, tid in senders(workers).items() if tick_ms(tid) > last]
    assert after_kill and victim.pid not in after_kill


def test_ticks_missed_while_no_worker_ran_run_once_when_a_worker_comes_back(fresh_servers, spawn_worker, test_env):
    env = test_env(fresh_servers)
    w = spawn_worker(APP, env)
    wait_for(lambda: len(runs(env)) >= 2, 30, "two ticks")
    w.signal(signal.SIGTERM)
    assert w.wait(30) == 0
    exited_at, ran = time.time(), len(runs(env))
    # nats-server goes on ticking with no worker: wait until it has fired three more.
    wait_for(lambda: asyncio.run(last_tick_time(fresh_servers.nats_url, env["HEDDLE_TEST_APP"])) >= exited_at + 3,
             20, "three ticks while no worker ran")
    assert len(runs(env)) == ran  # nothing ran meanwhile
    restarted_at = time.time()
    spawn_worker(APP, env)
    wait_for(lambda: any(t / 1000 > restarted_at for t in ticks(env)), 30, "a tick after the restart")
    missed = [t for t in ticks(env) if exited_at < t / 1000 < restarted_at]
    assert len(missed) == 1, f"the ticks missed while no worker ran should run once, ran {len(missed)} times"
    assert_each_tick_ran_once(env)


def test_heddle_schedules_lists_name_task_interval_or_cron_last_and_next_run(fresh_servers, spawn_worker, test_env):
    env = test_env(fresh_servers)
    before = heddle_cli(env, "schedules", "-A", APP)
    assert before.returncode == 0, before.stderr
    assert "heartbeat" in before.stdout and "tests.apps.periodic.beat" in before.stdout
    assert "every 1s" in before.stdout and "cron */5 * * * * (Europe/Berlin)" in before.stdout
    assert "not installed: no worker of the app has started" in before.stdout

    spawn_worker(APP, env)
    wait_for(lambda: runs(env), 30, "a tick")
    listed = heddle_cli(env, "schedules", "-A", APP, "--json")
    assert listed.returncode == 0, listed.stderr
    now = time.time()
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    beat, report = rows["heartbeat"], rows["weekly-report"]
    assert beat["task"] == "tests.apps.periodic.beat" and beat["every_s"] == 1 and beat["args"] == ["tick"]
    assert beat["installed"] and beat["last_task_id"].startswith(f"periodic:{env['HEDDLE_TEST_APP']}:heartbeat:")
    assert now - 5 < beat["last_run"] <= now and now - 1 <= beat["next_run"] <= now + 2
    assert report["cron"] == "*/5 * * * *" and report["tz"] == "Europe/Berlin" and report["last_run"] is None
    # The next run of */5 in Berlin: the next whole five minutes (Berlin is a whole-hour offset).
    assert report["next_run"] % 300 == 0 and now < report["next_run"] <= now + 300
    table = heddle_cli(env, "schedules", "-A", APP)
    assert "last run" in table.stdout and "next run" in table.stdout
    assert "UTC (" in table.stdout.split("heartbeat", 1)[1].splitlines()[0]

    inspected = heddle_cli(env, "inspect", beat["last_task_id"])
    assert "schedule heartbeat" in inspected.stdout, inspected.stdout


def test_the_workshop_lists_installed_schedules_and_a_task_page_names_its_schedule(
    fresh_servers, spawn_worker, test_env
):
    import httpx

    from tests.workshop_support import running_workshop

    env = test_env(fresh_servers)
    spawn_worker(APP, env)
    wait_for(lambda: runs(env), 30, "a tick")
    app = env["HEDDLE_TEST_APP"]
    with running_workshop(fresh_servers) as ws, httpx.Client(base_url=ws.url, timeout=10) as client:
        page = client.get("/schedules")
        assert page.status_code == 200
        lines = [line for line in page.text.splitlines() if line.startswith(f"<tr><td>{app}<")]
        rows = {line.split("</td><td>")[1]: line for line in lines}
        assert set(rows) == {"heartbeat", "weekly-report"}
        assert "tests.apps.periodic.beat" in rows["heartbeat"] and "every 1s" in rows["heartbeat"]
        assert "cron */5 * * * * (Europe/Berlin)" in rows["weekly-report"]
        assert f'href="/tasks/periodic%3A{app}%3Aheartbeat%3A' in page.text  # the last run links to its task
        _, tid, _ = runs(env)[0]
        task = client.get(f"/tasks/{tid}")
        assert task.status_code == 200 and 'id="schedule"' in task.text and ">heartbeat</a>" in task.text


def test_a_schedule_no_longer_declared_is_removed_from_nats_server(fresh_servers, spawn_worker, test_env):
    env = test_env(fresh_servers)
    with_extra = spawn_worker(APP, {**env, "HEDDLE_TEST_EXTRA": "1"})
    wait_for(lambda: json.loads(heddle_cli({**env, "HEDDLE_TEST_EXTRA": "1"}, "schedules", "-A", APP,
                                           "--json").stdout)[1]["installed"], 20, "nightly installed")
    with_extra.signal(signal.SIGTERM)
    with_extra.wait(30)
    w = spawn_worker(APP, env)
    wait_for(lambda: "nightly of app" in w.output() and "removed" in w.output(), 20, "nightly removed")
    rows = json.loads(heddle_cli({**env, "HEDDLE_TEST_EXTRA": "1"}, "schedules", "-A", APP, "--json").stdout)
    assert {r["name"]: r["installed"] for r in rows} == {"heartbeat": True, "nightly": False, "weekly-report": True}


# -- declaring: checked at once, with the fix in the message --------------------------------------------


@pytest.fixture
def app() -> heddle.Heddle:
    a = heddle.Heddle("declaring")

    @a.task(name="cleanup")
    def cleanup(days: int = 7) -> int:
        return days

    @a.task(name="report")
    def report(kind: str) -> str:
        return kind

    @a.task(name="keep")
    def keep(blob):  # type: ignore[no-untyped-def]  # no hints: anything goes but what cannot be sent
        return blob

    return a


def test_cron_is_parsed_at_declaration_and_read_in_its_time_zone(app):
    s = app.periodic("report", cron="0 9 * * mon-fri", tz="Europe/Berlin", args=("daily",))
    assert s.name == "report" and s.describe() == "cron 0 9 * * mon-fri (Europe/Berlin)"
    # nats-server's cron has a seconds field first; the zone travels in its own header.
    assert s.nats_pattern == "0 0 9 * * mon-fri"
    assert s.definition_headers("declaring")[names.HDR_NATS_SCHEDULE_TIME_ZONE] == "Europe/Berlin"
    friday_winter = datetime(2026, 12, 4, 10, 0, tzinfo=UTC).timestamp()
    assert s.next_cron_run(friday_winter) == datetime(2026, 12, 7, 8, 0, tzinfo=UTC).timestamp()  # UTC+1
    friday_summer = datetime(2026, 7, 3, 10, 0, tzinfo=UTC).timestamp()
    assert s.next_cron_run(friday_summer) == datetime(2026, 7, 6, 7, 0, tzinfo=UTC).timestamp()  # UTC+2
    hourly = app.periodic("cleanup", cron="@hourly", name="hourly")
    assert hourly.cron == "0 * * * *" and hourly.describe() == "cron 0 * * * * (UTC)"
    every = app.periodic("cleanup", every=timedelta(minutes=5), kwargs={"days": 1})
    assert every.every_s == 300 and every.nats_pattern == "@every 300s" and every.describe() == "every 5m"
    assert set(app.schedules) == {"report", "hourly", "cleanup"}


@pytest.mark.parametrize(
    ("options", "error", "says"),
    [
        ({"cron": "bogus"}, ConfigError, "has 1 fields; give five"),
        ({"cron": "61 * * * *"}, ConfigError, "is not a valid cron expression"),
        ({"cron": "0 0 */5 * * *"}, ConfigError, "has 6 fields"),
        ({"cron": "0 0 L * *"}, ConfigError, "does not read"),
        ({"cron": "0 0 * * 1#2"}, ConfigError, "without L, W or #"),
        ({"cron": 5}, ConfigError, "takes a string"),
        ({"every": 0}, ConfigError, "must be > 0 seconds"),
        ({"every": -3}, ConfigError, "must be > 0 seconds"),
        ({"every": 0.5}, ConfigError, "whole seconds >= 1"),
        ({"every": 1.5}, ConfigError, "whole seconds >= 1"),
        ({"every": "10"}, ConfigError, "takes seconds"),
        ({}, ConfigError, "exactly one of them"),
        ({"every": 5, "cron": "* * * * *"}, ConfigError, "exactly one of them"),
        ({"cron": "* * * * *", "tz": "Mars/Olympus_Mons"}, ConfigError, "unknown time zone 'Mars/Olympus_Mons'"),
        ({"every": 5, "tz": "Europe/Berlin"}, ConfigError, "tz= applies to cron schedules"),
        ({"every": 5, "name": "has space"}, ConfigError, "may only contain"),
        ({"every": 5, "args": (1, 2, 3)}, TypeError, "bad arguments for task"),
        ({"every": 5, "args": ("seven",)}, TypeError, "days"),
        ({"task": "keep", "every": 5, "args": (object(),)}, EncodeError, "cannot be sent"),
    ],
)
def test_a_bad_schedule_fails_at_declaration_with_a_clear_error(app, options, error, says):
    with pytest.raises(error) as info:
        app.periodic(options.pop("task", "cleanup"), **options)
    assert says in str(info.value)
    assert app.schedules == {}


def test_an_unknown_task_or_another_apps_task_or_a_taken_name_fails_at_declaration(app):
    with pytest.raises(ConfigError, match="unknown task 'nope' for a schedule of app 'declaring'; its tasks: "):
        app.periodic("nope", every=5)
    other = heddle.Heddle("other")

    @other.task
    def elsewhere() -> None: ...

    with pytest.raises(ConfigError, match="is not a task of app 'declaring'"):
        app.periodic(elsewhere, every=5)
    app.periodic("cleanup", every=5)
    with pytest.raises(ConfigError, match=r"schedule name 'cleanup' is already used .* pass name="):
        app.periodic("cleanup", every=10)
    app.periodic("cleanup", every=10, name="cleanup-often")
    with pytest.raises(ConfigError, match="choose another name="):
        app.periodic("report", every=10, args=("x",), name="cleanup-often")
