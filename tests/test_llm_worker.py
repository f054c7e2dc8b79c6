"""YAML LLM workers end to end: real nats-server and valkey-server, fake providers on loopback."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

import heddle
from heddle import names
from heddle.errors import LLMInputError
from heddle.events import llm_event_decoder as event_decoder
from heddle.llm import handle, worker_app
from heddle.testing import aworker
from tests.fake_providers import FakeProvider, Reply, settings_for

LABELS = ["positive", "negative", "neutral"]


def write_config(tmp_path, **fields):
    name = fields.pop("name", f"cls{uuid.uuid4().hex[:8]}")
    config = {
        "name": name,
        "description": "sentiment",
        "system_prompt": "Label the sentiment of the text.",
        "input_schema": {
            "type": "object",
            "required": ["text"],
            "properties": {"text": {"type": "string", "minLength": 1}},
        },
        "output_schema": {
            "type": "object",
            "required": ["label"],
            "properties": {"label": {"type": "string", "enum": LABELS}},
        },
        "default_model_tier": "local",
        "max_output_tokens": 40,
        "timeout_seconds": 30,
        "retries": 1,
        **fields,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path, name


@pytest.fixture
def openai_provider():
    with FakeProvider("openai") as p:
        yield p


def make_app(path, provider, servers, **app_settings):
    tier, llm_settings = settings_for(provider, model="fake-8b", **app_settings.pop("llm", {}))
    return worker_app(
        path, tier, llm_settings=llm_settings, nats_url=servers.nats_url, valkey_url=servers.valkey_url, **app_settings
    )


async def test_a_yaml_worker_answers_send_task_by_name_with_usage_in_result_metadata_and_events(
    tmp_path, heddle_servers, openai_provider
):
    prices = tmp_path / "prices.yaml"
    prices.write_text("fake-8b: {input_per_mtok: 2.0, output_per_mtok: 10.0}\n")
    path, name = write_config(tmp_path)
    app = make_app(path, openai_provider, heddle_servers, llm={"prices_path": str(prices)})
    openai_provider.add(Reply(text='Sure! ```json\n{"label": "negative"}\n```', input_tokens=100, output_tokens=20))
    client = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                           valkey_url=heddle_servers.valkey_url)
    events: list[bytes] = []
    got_event = asyncio.Event()
    async with aworker(app, tier="local"):
        conns = await client.connections()

        async def on_event(msg):
            events.append(msg.data)
            got_event.set()

        await conns.broker.subscribe(names.llm_event_subject(name), cb=on_event)
        await conns.broker.flush()
        r = client.send_task(name, {"text": "The food was cold."})
        assert await r.aget(timeout=20) == {"label": "negative"}
        await asyncio.wait_for(got_event.wait(), 10)
    meta = r.record.meta
    assert (meta["input_tokens"], meta["output_tokens"], meta["llm_calls"]) == (100, 20, 1)
    assert (meta["model"], meta["backend"], meta["tier"]) == ("fake-8b", "lmstudio", "local")
    assert meta["latency_s"] >= 0
    assert meta["cost_usd"] == pytest.approx((100 * 2.0 + 20 * 10.0) / 1e6)
    assert r.record.tier == "local"
    event = event_decoder.decode(events[0])
    assert (event.task_id, event.ok, event.worker_type, event.tier) == (r.id, True, name, "local")
    assert (event.input_tokens, event.output_tokens, event.model) == (100, 20, "fake-8b")
    (seen,) = openai_provider.requests
    assert seen.body["messages"][0]["content"].startswith("Label the sentiment of the text.")
    assert json.loads(seen.body["messages"][1]["content"]) == {"text": "The food was cold."}
    assert seen.body["response_format"]["json_schema"]["schema"]["properties"]["label"]["enum"] == LABELS
    assert seen.body["max_tokens"] == 40
    await client.aclose()


async def test_invalid_input_fails_with_invalid_input_and_never_calls_the_model(
    tmp_path, heddle_servers, openai_provider
):
    path, name = write_config(tmp_path)
    app = make_app(path, openai_provider, heddle_servers)
    async with aworker(app, tier="local"):
        r = app.send_task(name, {"text": 5, "extra": True})
        with pytest.raises(heddle.TaskError) as info:
            await r.aget(timeout=20)
    assert info.value.type_name == "heddle.errors.LLMInputError"
    assert info.value.remote_message.startswith(f"invalid input for {name}:")
    assert "$.text: expected string, got integer 5" in info.value.remote_message
    assert openai_provider.requests == []
    await app.aclose()


async def test_output_still_invalid_after_the_repair_fails_with_the_validation_errors(
    tmp_path, heddle_servers, openai_provider
):
    path, name = write_config(tmp_path)
    app = make_app(path, openai_provider, heddle_servers)
    openai_provider.add(Reply(text='{"label": "happy"}'), Reply(text='{"label": "ecstatic"}'))
    async with aworker(app, tier="local"):
        r = app.send_task(name, {"text": "Great!"})
        with pytest.raises(heddle.TaskError) as info:
            await r.aget(timeout=20)
    assert info.value.type_name == "heddle.errors.LLMOutputError"
    assert "'ecstatic' is not one of ['positive', 'negative', 'neutral']" in info.value.remote_message
    # The repair call showed the model its reply and what was wrong with it.
    _, repair = openai_provider.requests
    assert repair.body["messages"][-2] == {"role": "assistant", "content": '{"label": "happy"}'}
    assert "'happy' is not one of" in repair.body["messages"][-1]["content"]
    assert r.record.meta["llm_calls"] == 2 and r.record.meta["input_tokens"] == 22
    await app.aclose()


async def test_a_model_call_longer_than_ack_wait_is_kept_alive_and_not_redelivered(
    tmp_path, heddle_servers, openai_provider
):
    path, name = write_config(tmp_path)
    app = make_app(path, openai_provider, heddle_servers, ack_wait_s=1.0)
    openai_provider.add(Reply(text='{"label": "neutral"}', delay_s=3.5))
    async with aworker(app, tier="local") as worker:
        r = app.send_task(name, {"text": "It is a chair."})
        assert await r.aget(timeout=30) == {"label": "neutral"}
        # Without in-progress acks JetStream would have redelivered it after 1 s.
        assert worker.stats["received"] == 1
    assert len(openai_provider.requests) == 1
    await app.aclose()


async def test_revoking_a_running_llm_task_cancels_its_http_request(tmp_path, heddle_servers, openai_provider):
    path, name = write_config(tmp_path)
    app = make_app(path, openai_provider, heddle_servers)
    openai_provider.add(Reply(hang=True))
    async with aworker(app, tier="local"):
        r = app.send_task(name, {"text": "slow"})
        await asyncio.to_thread(openai_provider.wait_for, lambda p: len(p.requests) == 1, 20, "the model call")
        await r.arevoke()
        await asyncio.to_thread(openai_provider.wait_for, lambda p: p.hangups == 1, 20, "the request to be closed")
        assert await r.astate() == heddle.REVOKED
    await app.aclose()


async def test_a_handle_checks_input_at_the_call_site_and_calls_the_worker(tmp_path, heddle_servers, openai_provider):
    path, _ = write_config(tmp_path)
    app = make_app(path, openai_provider, heddle_servers)
    client = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                           valkey_url=heddle_servers.valkey_url)
    summarizer = handle(client, path, tier="local")
    with pytest.raises(LLMInputError, match=r"\$: missing required property 'text'"):
        summarizer.delay(txt="typo")
    openai_provider.add(Reply(text='{"label": "positive"}'))
    async with aworker(app, tier="local"):
        assert await summarizer.delay(text="Lovely!").aget(timeout=20) == {"label": "positive"}
    await client.aclose()
    await app.aclose()


async def test_a_python_task_calls_a_model_with_complete_and_its_usage_lands_in_the_result(
    heddle_app, heddle_servers, openai_provider
):
    tier, settings = settings_for(openai_provider, model="fake-8b")
    openai_provider.add(Reply(text='{"n": 7}', input_tokens=5, output_tokens=3),
                        Reply(text="seven", input_tokens=4, output_tokens=1))

    @heddle_app.task
    async def ask() -> str:
        first = await heddle.llm.complete(
            "Pick a number", tier=tier, settings=settings,
            schema={"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}},
        )
        second = await heddle.llm.complete(f"Spell {first.data['n']}", tier=tier, settings=settings)
        return second.text

    async with aworker(heddle_app):
        r = ask.apply_async()
        assert await r.aget(timeout=20) == "seven"
    meta = r.record.meta
    assert (meta["input_tokens"], meta["output_tokens"], meta["llm_calls"], meta["backend"]) == (9, 4, 2, "lmstudio")
    await heddle_app.aclose()
