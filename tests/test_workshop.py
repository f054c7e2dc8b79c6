"""The Workshop's pages and endpoints, server side, against real servers and a real worker."""

from __future__ import annotations

import html
import uuid

import httpx
import pytest

from heddle import Heddle
from heddle.errors import ConfigError
from heddle.testing import EmbeddedServers
from heddle.workshop import Workshop
from heddle.workshop.web import CSP
from tests.conftest import wait_for
from tests.workshop_support import XSS, client, post, running_workshop, shop, submit, task_name, ws

__all__ = ["client", "shop", "ws"]  # fixtures, imported for pytest


def test_every_page_sends_a_content_security_policy_and_no_inline_script(client: httpx.Client) -> None:
    for path in ("/", "/tasks", "/try", "/dlq", "/audit", "/pipelines", "/pipelines/review", "/fragments/overview",
                 "/fragments/tasks", "/static/htmx.min.js", "/static/pipelines.css"):
        r = client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-security-policy"] == CSP
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
        assert r.headers["x-frame-options"] == "DENY"
        if r.headers["content-type"].startswith("text/html"):
            assert "<script>" not in r.text  # only <script src=...> from the package
    assert client.get("/static/htmx.min.js").text.startswith("/*! htmx.org 2.")


def test_the_overview_shows_a_running_worker_and_its_queue(shop: Heddle, client: httpx.Client) -> None:
    wait_for(lambda: shop.name in client.get("/fragments/overview").text, 10, "the worker in the overview")
    page = client.get("/").text
    assert "workers online" in page and 'data-watch="tick"' in page
    assert f"heddle-{shop.name}" in page  # its consumer in the queue table
    assert "<svg" in page and "<polyline" in page


def test_a_task_tried_from_the_page_runs_and_its_result_and_args_are_shown(
    shop: Heddle, ws: Workshop, client: httpx.Client
) -> None:
    tid = submit(client, ws, shop, "add", "[2, 3]")
    wait_for(lambda: "SUCCESS" in client.get(f"/fragments/result/{tid}").text, 15, "the result")
    result = client.get(f"/fragments/result/{tid}").text
    assert ">5</pre>" in result and "hx-trigger" not in result  # final: stops refreshing
    wait_for(lambda: ws.recent.get(tid) is not None and ws.recent.get(tid).state == "SUCCESS", 10, "events")  # type: ignore[union-attr]
    page = client.get(f"/tasks/{tid}").text
    assert '<pre id="args">[\n  2,\n  3\n]</pre>' in page
    for state in ("received", "started", "succeeded"):
        assert f"<td>{state}</td>" in page
    tasks = client.get("/tasks", params={"state": "SUCCESS", "q": tid}).text
    assert tid in tasks
    assert tid not in client.get("/fragments/tasks", params={"state": "FAILURE", "q": tid}).text


def test_a_result_and_an_error_with_markup_render_as_text(shop: Heddle, ws: Workshop, client: httpx.Client) -> None:
    import json

    ok = submit(client, ws, shop, "echo", json.dumps([XSS]))
    bad = submit(client, ws, shop, "boom", json.dumps([XSS]))
    for tid in (ok, bad):
        wait_for(lambda t=tid: "hx-trigger" not in client.get(f"/fragments/result/{t}").text, 15, "a final result")
    for tid in (ok, bad):
        page = client.get(f"/tasks/{tid}").text
        assert XSS not in page
        assert "&lt;script&gt;window.__heddle_xss = 1&lt;/script&gt;" in page
    failed = client.get(f"/tasks/{bad}").text
    assert "builtins.ValueError" in failed and "Traceback (most recent call last)" in failed
    assert "dead letter" in failed.lower()


def test_bad_form_input_gets_a_clear_error_and_sends_nothing(shop: Heddle, ws: Workshop, client: httpx.Client) -> None:
    key = f"task:{shop.name}:{task_name(shop, 'add')}"
    wait_for(lambda: html.escape(key) in client.get("/try").text, 10, "add to be offered")
    r = post(client, ws, "/try", {"target": key, "args": "[2,", "kwargs": "{}"})
    assert r.status_code == 422 and "arguments must be a JSON list" in r.text
    r = post(client, ws, "/try", {"target": key, "args": "{}", "kwargs": "{}"})
    assert r.status_code == 422 and "got dict" in r.text
    r = post(client, ws, "/try", {"target": "task:nope:nope", "args": "[]"})
    assert r.status_code == 422 and "no such worker or task" in r.text
    r = post(client, ws, "/try", {"target": key, "args": "[]", "tier": "huge"})
    assert r.status_code == 422 and "tier must be one of" in r.text


def test_a_yaml_worker_gets_a_form_from_its_input_schema_which_is_checked(ws: Workshop, client: httpx.Client) -> None:
    form = client.get("/fragments/try-form", params={"target": "yaml:summarizer:summarizer"})
    assert form.status_code == 200
    assert 'name="field_text"' in form.text and "<textarea" in form.text
    r = post(client, ws, "/try", {"target": "yaml:summarizer:summarizer", "field_text": ""})
    assert r.status_code == 422 and "$" in r.text  # the schema's own message, with its JSON path
    assert client.get("/fragments/try-form", params={"target": "yaml:nope:nope"}).status_code == 404


def test_state_changing_requests_need_the_csrf_token_and_the_same_origin(
    shop: Heddle, ws: Workshop, client: httpx.Client
) -> None:
    key = f"task:{shop.name}:{task_name(shop, 'add')}"
    r = client.post("/try", data={"target": key, "args": "[1, 2]"})
    assert r.status_code == 403 and "CSRF" in r.text
    r = client.post("/try", data={"target": key, "args": "[1, 2]", "csrf_token": "forged"})
    assert r.status_code == 403
    r = client.post("/try", data={"target": key, "args": "[1, 2]", "csrf_token": ws.csrf_token},
                    headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.text
    assert client.post("/dlq/1/replay", data={}).status_code == 403


def test_a_loopback_workshop_refuses_foreign_host_names(client: httpx.Client) -> None:
    r = client.get("/", headers={"Host": "evil.example"})
    assert r.status_code == 400


def test_beyond_loopback_the_workshop_refuses_a_short_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without any token it makes one and logs the login URL (tests/test_workshop_token.py).
    monkeypatch.delenv("HEDDLE_WORKSHOP_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="too short"):
        Workshop(Heddle("workshop"), host="0.0.0.0", token="short")
    Workshop(Heddle("workshop"), host="0.0.0.0", token="x" * 24)  # fine with one


def test_with_a_token_every_page_needs_it(heddle_servers: EmbeddedServers) -> None:
    token = "t0ken-" + uuid.uuid4().hex
    with (
        running_workshop(heddle_servers, token=token) as ws,
        httpx.Client(base_url=ws.url, timeout=10, follow_redirects=True) as c,
    ):
        assert c.get("/").status_code == 401
        assert c.get("/events/stream").status_code == 401
        assert c.get("/?token=wrong").status_code == 401
        assert c.get("/", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        r = c.get(f"/tasks?token={token}")
        assert r.status_code == 200 and r.url.path == "/tasks" and "token" not in str(r.url)
        cookie = r.history[0].headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert token not in cookie, "the browser holds a signed session, not the token (test_workshop_session)"
        assert c.get("/dlq").status_code == 200  # the cookie now


def test_dead_letters_are_listed_shown_and_replayed(shop: Heddle, ws: Workshop, client: httpx.Client) -> None:
    tid = submit(client, ws, shop, "boom", '["x"]')
    wait_for(lambda: tid in client.get("/dlq").text, 15, "the dead letter")
    page = client.get("/dlq").text
    seq = page.split(f'href="/tasks/{tid}"', 1)[0].rsplit('href="/dlq/', 1)[1].split('"', 1)[0]
    one = client.get(f"/dlq/{seq}").text
    assert "bad input x" in one and "&#34;task&#34;: " in one
    assert client.get("/dlq/999999").status_code == 404
    r = post(client, ws, f"/dlq/{seq}/replay", {})
    assert r.status_code == 200 and f"replayed dead letter {seq}" in r.text
    again = post(client, ws, f"/dlq/{seq}/replay", {})
    assert "already replayed" in again.text
    # Marked as replayed, with a readable time, and no Replay button any more (#21 item 10).
    one = client.get(f"/dlq/{seq}").text
    assert "replayed by workshop@" in one and 'id="replay"' not in one and " UTC)" in one
    listed = client.get("/dlq").text.split(f'href="/dlq/{seq}"', 1)[1].split("</tr>", 1)[0]
    assert "replayed by workshop@" in listed and "<button>replay</button>" not in listed


def test_a_dead_letter_whose_task_succeeded_since_is_not_offered_for_replay(shop, ws, client) -> None:
    import asyncio

    from heddle.dlq import clip, get_dead_letter, replay
    from heddle.messages import SUCCESS, ResultRecord
    from heddle.store import StoreRequest, encode_record

    tid = submit(client, ws, shop, "boom", '["y"]')
    wait_for(lambda: tid in client.get("/dlq").text, 15, "the dead letter")
    page = client.get("/dlq").text
    seq = int(page.split(f'href="/tasks/{tid}"', 1)[0].rsplit('href="/dlq/', 1)[1].split('"', 1)[0])

    async def succeed_later() -> str:
        conns = await shop.connections()
        await conns.backend.forget(tid)  # as a replay does, then a later run succeeds
        await conns.backend.store(StoreRequest(tid, SUCCESS, encode_record(ResultRecord(id=tid, state=SUCCESS,
                                                                                       task="boom"))))
        assert (await get_dead_letter(shop, seq)).task_state == SUCCESS
        said = await replay(shop, seq)
        await shop.aclose()
        return said

    assert "has succeeded since; not sending it again" in asyncio.run(succeed_later())
    one = client.get(f"/dlq/{seq}").text
    assert "its task has succeeded since" in one and 'id="replay"' not in one
    assert clip("one two three four", 12) == "one two…" and clip("short", 12) == "short"


def test_the_event_stream_announces_a_task_as_it_happens(shop: Heddle, ws: Workshop, client: httpx.Client) -> None:
    seen: list[str] = []
    with client.stream("GET", "/events/stream") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        tid = ""
        for line in r.iter_lines():
            if line.startswith("retry:") and not tid:
                tid = shop.tasks[task_name(shop, "add")].delay(1, 1).id
            if line.startswith("data: "):
                seen.append(line[6:])
                if tid and tid in seen:
                    break
    assert tid in seen


def test_unknown_tasks_get_a_404_page(client: httpx.Client) -> None:
    r = client.get("/tasks/" + uuid.uuid4().hex)
    assert r.status_code == 404 and "No task" in r.text


def test_heddle_workshop_serves_until_sigterm_and_then_exits_cleanly(heddle_servers: EmbeddedServers, tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    from heddle.testing import free_port

    port = free_port()
    env = {**os.environ, "NATS_URL": heddle_servers.nats_url, "VALKEY_URL": heddle_servers.valkey_url,
           "HEDDLE_HEALTH_PORT": "0"}
    with open(tmp_path / "workshop.log", "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "heddle", "workshop", "--port", str(port), "--eval-db", str(tmp_path / "e.db")],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        def answers() -> bool:
            assert proc.poll() is None, (tmp_path / "workshop.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/pipelines", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, 30, "heddle workshop to serve")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, (tmp_path / "workshop.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_taken_port_is_traded_for_a_free_one_or_named_with_the_flag_that_sets_it(caplog) -> None:
    import socket

    from heddle.errors import HeddleError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        dev = Workshop(port=busy, port_flag="--workshop-port", fallback_port=True)
        sock = dev.bind()
        try:
            assert dev.port != busy and sock.getsockname()[1] == dev.port and dev.url.endswith(f":{dev.port}")
            assert f"port {busy} is taken" in caplog.text and "--workshop-port" in caplog.text
        finally:
            sock.close()
        with pytest.raises(HeddleError, match=f"127.0.0.1:{busy}.*choose another port with --workshop-port"):
            Workshop(port=busy, port_flag="--workshop-port").bind()
        with pytest.raises(HeddleError, match="choose another port with --port"):
            Workshop(port=busy).bind()


def test_the_overview_chart_has_axes_with_their_units(shop: Heddle, client: httpx.Client) -> None:
    import re

    fragment = client.get("/fragments/overview").text
    chart = fragment[fragment.index('<svg class="chart"'):fragment.index("</svg>")]
    x_axis = chart[chart.index('<g class="axis x">'):]
    y_axis = chart[chart.index('<g class="axis y">'):chart.index('<g class="axis x">')]
    # Time runs along x, a tick a minute, in minutes before now.
    labels = re.findall(r"<text[^>]*>([^<]+)</text>", x_axis)
    assert labels[:6] == ["now", "-1 min", "-2 min", "-3 min", "-4 min", "-5 min"], labels
    assert labels[-1] == "time (minutes ago)"
    # Tasks finished per 10 s bin go up y, from 0 to a round top.
    ticks = re.findall(r"<text[^>]*>([^<]+)</text>", y_axis)
    assert ticks[0] == "0" and ticks[-1] == "tasks / 10 s" and all(t.isdigit() for t in ticks[:-1]), ticks
    assert "tasks finished per 10 s" in fragment


def test_the_queues_table_lists_every_consumer_the_orchestrators_included(
    shop: Heddle, client: httpx.Client
) -> None:
    from heddle.testing.orchestrators import running_orchestrator

    def rows() -> list[list[str]]:
        import re

        page = client.get("/fragments/overview").text
        table = page[page.index('<table id="queues">'):]
        table = table[:table.index("</table>")]
        return [re.findall(r"<td>([^<]*)</td>", row) for row in table.split("<tr>")[2:]]

    with running_orchestrator(shop):
        wait_for(lambda: any(r[:2] == ["HEDDLE_GOALS", "heddle-orchestrator"] for r in rows()), 10,
                 "the orchestrator's consumer in the queues table")
    found = {tuple(r[:2]) for r in rows()}
    assert ("HEDDLE_TASKS", f"heddle-{shop.name}") in found  # the worker's
    assert ("HEDDLE_TASKS", "heddle-router") in found  # the router's (running_worker hosts one)
    assert all(len(r) == 6 for r in rows())  # stream, consumer, pending, ack pending, redelivered, waiting pulls


def test_a_task_that_expired_shows_its_expiry_and_ends_revoked(heddle_servers: EmbeddedServers, ws: Workshop,
                                                                client: httpx.Client) -> None:
    import time
    from datetime import UTC, datetime, timedelta

    from heddle.testing import running_worker

    late = Heddle(f"late{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                  valkey_url=heddle_servers.valkey_url)

    @late.task
    def remind(user: str) -> str:
        return user

    try:
        deadline = datetime.now(UTC) + timedelta(milliseconds=300)
        r = remind.apply_async(("ada",), expires=deadline, priority=8)  # no worker nor router yet (#18 items 3, 6)
        wait_for(lambda: time.time() > deadline.timestamp() + 0.05, 10, "the expiry to pass")
        with running_worker(late):
            wait_for(lambda: (e := ws.recent.get(r.id)) is not None and e.state == "REVOKED", 15, "its events")
    finally:
        late.close()
    page = client.get(f"/tasks/{r.id}").text
    assert '<dd id="expires">' in page and "it never runs" in page
    assert '<dd id="priority">8 (0 lowest, 9 highest)</dd>' in page
    assert "<td>expired</td>" in page and "TaskExpired" in page
