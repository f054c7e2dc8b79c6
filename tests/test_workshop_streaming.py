"""The Workshop shows a task's token stream live: its SSE replay of the chunks, and the Try page in Chromium."""

from __future__ import annotations

import html
import json
import threading
from typing import Any

import httpx

from heddle.testing import EmbeddedServers, running_worker
from tests.conftest import wait_for
from tests.fake_providers import FakeProvider, Reply
from tests.test_llm_worker import make_app, write_config
from tests.workshop_support import ARTIFACTS, choose_target, needs_chromium, page, post, running_workshop

__all__ = ["page"]  # a fixture, imported for pytest

ANSWER = '{"label": "negative"}'


def sse(text: str) -> list[tuple[str, str]]:
    """(event, data) of each event in a server-sent events body."""
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(":"))
        if "event" in fields:
            out.append((fields["event"], fields.get("data", "")))
    return out


def test_the_try_form_of_a_yaml_worker_offers_streaming_and_a_task_stream_replays_as_events(
    tmp_path: Any, heddle_servers: EmbeddedServers
) -> None:
    with FakeProvider("openai") as provider:
        path, name = write_config(tmp_path, stream=False)
        app = make_app(path, provider, heddle_servers)
        provider.add(Reply(text=ANSWER))
        key = f"yaml:{name}:{name}"
        with running_worker(app), running_workshop(heddle_servers, config_dirs=[tmp_path]) as ws, \
                httpx.Client(base_url=ws.url, timeout=30) as client:
            form = client.get("/fragments/try-form", params={"target": key}).text
            assert 'name="stream"' in form and "checked" not in form.split('name="stream"', 1)[1].split(">", 1)[0]
            r = post(client, ws, "/try", {"target": key, "field_text": "The food was cold.", "stream": "1",
                                           "tier": "local"})
            assert r.status_code == 200, r.text
            task_id = html.unescape(r.text.split('data-task-id="', 1)[1].split('"', 1)[0])
            assert f'data-stream-task="{task_id}"' in r.text
            events = sse(client.get(f"/tasks/{task_id}/stream").text)
        app.close()
    assert provider.requests, events
    assert provider.requests[0].body["stream"] is True  # the box asked the worker to stream
    assert events[-1][0] == "end"
    chunks = [json.loads(data) for kind, data in events if kind == "chunk"]
    assert "".join(c["text"] for c in chunks) == ANSWER and len(chunks) > 1
    assert not any(c["new_reply"] for c in chunks)


@needs_chromium
def test_a_person_sees_the_reply_being_written_on_the_try_page_and_replayed_on_the_task_page(
    tmp_path: Any, heddle_servers: EmbeddedServers, page: Any
) -> None:
    from playwright.sync_api import expect

    held = threading.Event()
    reply = Reply(text='{"label": "negative", "why": "cold food"}', hold=held, hold_after=2)
    pieces = reply.split()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    with FakeProvider("ollama") as provider:
        path, name = write_config(tmp_path, stream=True, output_schema={
            "type": "object", "required": ["label"],
            "properties": {"label": {"type": "string"}, "why": {"type": "string"}}})
        app = make_app(path, provider, heddle_servers)
        provider.add(reply)
        try:
            with running_worker(app), running_workshop(heddle_servers, config_dirs=[tmp_path]) as ws:
                page.goto(ws.url + "/try")
                choose_target(page, f"yaml:{name}:{name}")
                expect(page.locator("#run-form input[name=stream]")).to_be_checked()
                page.fill("#run-form [name=field_text]", "The food was cold.")
                page.select_option("#run-form select[name=tier]", "local")
                page.click("#run")
                stream = page.locator("#submitted pre.stream").first
                # The first two pieces are on the page while the provider still holds the rest.
                expect(stream).to_have_text("".join(pieces[:2]))
                wait_for(lambda: provider.pieces_sent == 2, 10, "the provider to hold")
                assert page.locator("#submitted .result").first.get_attribute("data-state") != "SUCCESS"
                page.screenshot(path=str(ARTIFACTS / "try-streaming.png"), full_page=True)
                held.set()
                expect(stream).to_have_text(reply.text)
                expect(stream).to_have_attribute("data-streaming", "done")
                expect(page.locator("#submitted .result").first).to_have_attribute("data-state", "SUCCESS")
                assert page.locator("script:not([src])").count() == 0
                # The task's page replays the stream from its first chunk, after the task ended.
                page.click("#submitted a.task-link")
                expect(page.locator("#stream")).to_have_text(reply.text)
                expect(page.locator("#stream")).to_have_attribute("data-streaming", "done")
        finally:
            held.set()
            app.close()
    assert errors == []
