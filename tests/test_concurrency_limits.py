"""Concurrency limits per task and per key, across worker processes (#18 item 4).

Workers are real ``heddle worker -A tests.apps.limited`` processes; every run
logs its start and end from inside its slot, so the most runs at once per key
can be read back from the log.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict
from pathlib import Path

import pytest

import heddle
from tests.conftest import wait_for

PER_TENANT = "tests.apps.limited.per_tenant"
ONE_PER_TENANT = "tests.apps.limited.one_per_tenant"
ONE_AT_A_TIME = "tests.apps.limited.one_at_a_time"


def _env(servers, tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "NATS_URL": servers.nats_url,
        "VALKEY_URL": servers.valkey_url,
        "HEDDLE_TEST_APP": f"l{uuid.uuid4().hex[:10]}",
        "HEDDLE_TEST_LOG": str(tmp_path / "runs.log"),
        **extra,
    }


def _runs(env: dict[str, str]) -> list[tuple[float, int, str, str, int]]:
    path = Path(env["HEDDLE_TEST_LOG"])
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        at, pid, kind, key, n = line.split(" ")
        rows.append((float(at), int(pid), kind, key, int(n)))
    return rows


def _most_at_once(rows, ended_by: dict[int, float] | None = None) -> tuple[dict[str, int], int]:
    """Most runs at once per key, and overall. A killed pid's unfinished runs end at its kill time."""
    events = [(at, 1 if kind == "start" else -1, key) for at, _, kind, key, _ in rows]
    ended = {(pid, key, n) for _, pid, kind, key, n in rows if kind == "end"}
    for _, pid, kind, key, n in rows:
        if kind == "start" and (pid, key, n) not in ended and ended_by and pid in ended_by:
            events.append((ended_by[pid], -1, key))
    # At equal times an end comes before a start: a slot given back and taken again.
    events.sort(key=lambda e: (e[0], e[1]))
    now: dict[str, int] = defaultdict(int)
    most: dict[str, int] = defaultdict(int)
    total = most_total = 0
    for _, step, key in events:
        now[key] += step
        total += step
        most[key] = max(most[key], now[key])
        most_total = max(most_total, total)
    return dict(most), most_total


def _client(env: dict[str, str]) -> heddle.Heddle:
    return heddle.Heddle(env["HEDDLE_TEST_APP"], nats_url=env["NATS_URL"], valkey_url=env["VALKEY_URL"])


def test_at_most_the_limit_run_per_key_across_workers_while_other_keys_run_side_by_side(
    fresh_servers, spawn_worker, tmp_path
):
    env = _env(fresh_servers, tmp_path)
    spawn_worker("tests.apps.limited", env)
    spawn_worker("tests.apps.limited", env)
    client = _client(env)
    try:
        sent = [client.send_task(PER_TENANT, args=(tenant, n)) for n in range(8) for tenant in ("acme", "globex")]
        assert sorted(r.get(timeout=60) for r in sent) == sorted(list(range(8)) * 2)
        # The result says which slots it ran in (heddle inspect and the Workshop show the metadata).
        assert sent[0].record is not None and sent[0].record.meta["concurrency"] == 'tenant=acme (limit 2)'
    finally:
        client.close()
    most, overall = _most_at_once(_runs(env))
    assert most == {"acme": 2, "globex": 2}
    assert overall > 2  # the two tenants ran side by side
    assert len({pid for _, pid, _, _, _ in _runs(env)}) == 2  # across both workers


def test_a_task_waiting_for_its_slot_holds_no_worker_slot(fresh_servers, spawn_worker, tmp_path):
    env = _env(fresh_servers, tmp_path)
    spawn_worker("tests.apps.limited", env, "--concurrency", "2")
    client = _client(env)
    try:
        queued = [client.send_task(ONE_PER_TENANT, args=("acme", n)) for n in range(6)]
        other = client.send_task(ONE_PER_TENANT, args=("globex", 99))
        assert other.get(timeout=60) == 99
        assert sorted(r.get(timeout=60) for r in queued) == list(range(6))
    finally:
        client.close()
    rows = _runs(env)
    acme_starts = sorted(at for at, _, kind, key, _ in rows if kind == "start" and key == "acme")
    globex_start = next(at for at, _, kind, key, _ in rows if kind == "start" and key == "globex")
    # Five acme tasks waited behind the first, yet globex took the worker's second slot at once.
    assert globex_start < acme_starts[2]
    assert _most_at_once(rows)[0]["acme"] == 1


def test_a_limit_without_a_key_counts_every_call_of_the_task(fresh_servers, spawn_worker, tmp_path):
    env = _env(fresh_servers, tmp_path)
    spawn_worker("tests.apps.limited", env)
    spawn_worker("tests.apps.limited", env)
    client = _client(env)
    try:
        assert sorted(r.get(timeout=60) for r in [client.send_task(ONE_AT_A_TIME, args=(n,)) for n in range(6)]) \
            == list(range(6))
    finally:
        client.close()
    assert _most_at_once(_runs(env)) == ({"*": 1}, 1)


def test_slots_held_by_a_sigkilled_worker_are_released_and_the_tenants_tasks_complete(
    fresh_servers, spawn_worker, tmp_path
):
    gate = tmp_path / "gate"
    # Leases last one AckWait: 3 s here.
    env = _env(fresh_servers, tmp_path, HEDDLE_TEST_ACK_WAIT="3")
    holder = spawn_worker("tests.apps.limited", env)
    client = _client(env)
    try:
        first = client.send_task(ONE_PER_TENANT, args=("acme", 0), kwargs={"gate": str(gate)})
        wait_for(lambda: any(kind == "start" for _, _, kind, _, _ in _runs(env)), 30, "the first task to start")
        rest = [client.send_task(ONE_PER_TENANT, args=("acme", n)) for n in range(1, 4)]
        spawn_worker("tests.apps.limited", env)
        holder.kill()
        killed_at = time.time()
        gate.touch()  # the redelivered first task may finish now
        assert sorted(r.get(timeout=60) for r in [first, *rest]) == [0, 1, 2, 3]
    finally:
        client.close()
    most, _ = _most_at_once(_runs(env), ended_by={holder.pid: killed_at})
    assert most == {"acme": 1}


def test_a_task_that_waits_longer_than_its_deliveries_allow_is_not_dead_lettered(
    fresh_servers, spawn_worker, tmp_path
):
    # Six deliveries per message; the last of eight one-at-a-time tasks waits far longer.
    env = _env(fresh_servers, tmp_path, HEDDLE_TEST_MAX_DELIVER="6")
    spawn_worker("tests.apps.limited", env)
    client = _client(env)
    try:
        sent = [client.send_task(ONE_PER_TENANT, args=("acme", n), kwargs={"hold_s": 0.4}) for n in range(8)]
        assert sorted(r.get(timeout=90) for r in sent) == list(range(8))
    finally:
        client.close()
    rows = _runs(env)
    ran = sorted(n for _, _, kind, _, n in rows if kind == "end")
    assert ran == list(range(8))  # each ran exactly once
    assert _most_at_once(rows)[0] == {"acme": 1}


def test_bad_limit_declarations_fail_at_declaration(heddle_app):
    with pytest.raises(heddle.TaskOptionError, match=r"concurrency_key 'tenant' .* is not one of its parameters"):
        heddle_app.task(concurrency_limit=2, concurrency_key="tenant")(lambda customer: None)
    with pytest.raises(heddle.TaskOptionError, match="needs concurrency_limit"):
        heddle_app.task(concurrency_key="tenant")(lambda tenant: None)
    with pytest.raises(heddle.TaskOptionError, match=r"concurrency_limit .* must be an int >= 1"):
        heddle_app.task(concurrency_limit=0)(lambda: None)
