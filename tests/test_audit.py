"""The audit: a task sent and never finished is listed, whatever happened to its message."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import nats

from heddle import Heddle
from heddle.testing import EmbeddedServers, running_worker

ROOT = Path(__file__).resolve().parent.parent


def heddle(servers: EmbeddedServers, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NATS_URL": servers.nats_url, "VALKEY_URL": servers.valkey_url, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "heddle", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


def audit(servers: EmbeddedServers, *extra: str) -> tuple[int, dict]:
    out = heddle(servers, "status", "--audit", "--older-than", "0", "--json", *extra)
    assert out.returncode in (0, 1), out.stderr
    return out.returncode, json.loads(out.stdout)


def test_a_task_whose_message_was_lost_stays_in_the_audit_until_it_is_final(fresh_servers: EmbeddedServers) -> None:
    app = Heddle(f"a{uuid.uuid4().hex[:10]}", nats_url=fresh_servers.nats_url, valkey_url=fresh_servers.valkey_url)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    try:
        with running_worker(app):
            assert add.delay(1, 2).get(timeout=10) == 3
        lost = add.delay(2, 3)  # no worker now: it waits in the stream

        async def purge() -> None:
            # What a loss looks like from outside: the message is gone, no result is stored.
            nc = await nats.connect(fresh_servers.nats_url)
            try:
                await nc.jetstream().purge_stream("HEDDLE_TASKS")
            finally:
                await nc.close()

        asyncio.run(purge())
        code, report = audit(fresh_servers)
        assert code == 1
        assert report["total"] == 1
        assert [(t["id"], t["state"]) for t in report["tasks"]] == [(lost.id, "PENDING")]

        text = heddle(fresh_servers, "status", "--audit", "--older-than", "0")
        assert text.returncode == 1 and lost.id in text.stdout and "without a final state" in text.stdout
        # Not listed before its deadline.
        assert audit(fresh_servers, "--older-than", "3600") == (0, {"older_than_s": 3600.0, "total": 0, "tasks": []})

        lost.revoke()  # a final state takes it out
        assert audit(fresh_servers)[0] == 0
        plain = heddle(fresh_servers, "status", "--sample", "0")
        assert plain.returncode == 0 and "every task sent more than 300s ago has a final state" in plain.stdout
    finally:
        app.close()


def test_bad_audit_arguments_are_refused_with_the_fix(fresh_servers: EmbeddedServers) -> None:
    out = heddle(fresh_servers, "status", "--audit", "--older-than", "-1")
    assert out.returncode == 2 and "--older-than must be seconds >= 0" in out.stderr
    out = heddle(fresh_servers, "status", "--audit", "--limit", "0")
    assert out.returncode == 2 and "--limit must be >= 1" in out.stderr


def test_the_workshop_audit_page_lists_an_unfinished_task_and_refuses_a_bad_deadline(
    fresh_servers: EmbeddedServers,
) -> None:
    import httpx

    from tests.workshop_support import running_workshop

    app = Heddle(f"a{uuid.uuid4().hex[:10]}", nats_url=fresh_servers.nats_url, valkey_url=fresh_servers.valkey_url)
    try:
        waiting = app.send_task("nobody.serves_this", (1,), worker_type="nobody")
        with running_workshop(fresh_servers) as ws, httpx.Client(base_url=ws.url, timeout=10) as client:
            page = client.get("/audit", params={"older_than": "0"})
            assert page.status_code == 200
            assert waiting.id in page.text and "1 task(s) sent more than 0s ago without a final state" in page.text
            assert waiting.id not in client.get("/audit").text  # the default deadline is 300 s
            bad = client.get("/audit", params={"older_than": "soon"})
            assert bad.status_code == 422 and "older_than must be seconds &gt;= 0" in bad.text
            waiting.revoke()
            assert "every task sent more than 0s ago has a final state" in client.get(
                "/audit", params={"older_than": "0"}).text
    finally:
        app.close()


def test_sending_a_finished_task_id_again_does_not_leave_it_in_the_audit(fresh_servers: EmbeddedServers) -> None:
    app = Heddle(f"a{uuid.uuid4().hex[:10]}", nats_url=fresh_servers.nats_url, valkey_url=fresh_servers.valkey_url)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    try:
        with running_worker(app):
            assert add.apply_async((1, 2), task_id="order-17").get(timeout=10) == 3
            # Past the dedup window or not, the worker finds the stored result and skips it.
            assert add.apply_async((1, 2), task_id="order-17").get(timeout=10) == 3
        assert audit(fresh_servers) == (0, {"older_than_s": 0.0, "total": 0, "tasks": []})
    finally:
        app.close()
