"""Escalation on invalid output: a tier whose answer is still invalid after its repair hands the task to the next."""

from __future__ import annotations

import logging

import pytest

import heddle
from heddle.errors import LLMOutputError
from heddle.llm import complete, load_worker_config, worker_app
from heddle.llm.complete import escalation_chain
from heddle.llm.worker import structured_output_notes
from heddle.settings import LLMSettings
from heddle.testing import aworker
from tests.fake_providers import FakeProvider, Reply
from tests.test_llm_worker import write_config

SCHEMA = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 0}}}


@pytest.fixture
def local_and_anthropic():
    with FakeProvider("openai") as local, FakeProvider("anthropic") as cloud:
        yield local, cloud


def three_tiers(local, cloud, **extra):
    return LLMSettings(lm_studio_url=local.url, lm_studio_model="small-1b", anthropic_api_key=cloud.api_key,
                       anthropic_base_url=cloud.url, standard_model="claude-sonnet-4-6",
                       frontier_model="claude-opus-4-8", **extra)


@pytest.mark.parametrize(
    ("tier", "escalation", "chain"),
    [("local", ["standard", "frontier"], ["local", "standard", "frontier"]),
     ("standard", ["standard", "frontier"], ["standard", "frontier"]),
     ("frontier", ["standard", "frontier"], ["frontier"]),
     ("standard", ["local", "frontier"], ["standard", "local", "frontier"])],
)
def test_the_tiers_tried_are_the_workers_own_then_those_after_it(tier, escalation, chain):
    assert escalation_chain(tier, escalation) == chain


async def test_output_invalid_after_the_repair_is_rerun_on_the_next_tier(local_and_anthropic):
    local, cloud = local_and_anthropic
    local.add(Reply(text='{"n": -1}', input_tokens=10, output_tokens=3),
              Reply(text='{"n": "one"}', input_tokens=20, output_tokens=4))
    cloud.add(Reply(text='{"n": 1}', input_tokens=30, output_tokens=5))
    c = await complete("Count", tier="local", schema=SCHEMA, escalation=["standard", "frontier"],
                       settings=three_tiers(local, cloud))
    assert (c.data, c.tier, c.model) == ({"n": 1}, "standard", "claude-sonnet-4-6")
    assert [(t["tier"], t["outcome"], t["input_tokens"], t["output_tokens"], t["llm_calls"]) for t in c.tiers] == [
        ("local", "invalid", 30, 7, 2), ("standard", "ok", 30, 5, 1)]
    assert "$.n: expected integer, got string 'one'" in c.tiers[0]["error"]
    # The next tier gets the task afresh: the original prompt, not the failed conversation.
    (sent,) = cloud.requests
    assert sent.body["messages"] == [{"role": "user", "content": "Count"}]
    assert "output_config" in sent.body and cloud.violations == []
    assert len(local.requests) == 2


async def test_a_yaml_worker_records_every_tier_tried_with_outcome_tokens_and_cost(
    tmp_path, heddle_servers, local_and_anthropic, caplog
):
    local, cloud = local_and_anthropic
    prices = tmp_path / "prices.yaml"
    prices.write_text("small-1b: {input_per_mtok: 0, output_per_mtok: 0}\n"
                      "claude-sonnet-4-6: {input_per_mtok: 3, output_per_mtok: 15}\n"
                      "claude-opus-4-8: {input_per_mtok: 5, output_per_mtok: 25}\n")
    path, name = write_config(tmp_path, escalation=["standard", "frontier"], retries=0)
    app = worker_app(path, "local", llm_settings=three_tiers(local, cloud, prices_path=str(prices)),
                     nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url)
    local.add(Reply(text='{"label": "glad"}', input_tokens=100, output_tokens=10),
              Reply(text='{"label": "gladder"}', input_tokens=150, output_tokens=10))
    cloud.add(Reply(text="I would say positive.", input_tokens=200, output_tokens=20),
              Reply(text='{"label": "upbeat"}', input_tokens=250, output_tokens=20),
              Reply(text='{"label": "positive"}', input_tokens=300, output_tokens=30))
    with caplog.at_level(logging.WARNING, logger="heddle.llm"):
        async with aworker(app, tier="local"):
            r = app.send_task(name, {"text": "What a day!"})
            assert await r.aget(timeout=30) == {"label": "positive"}
    await app.aclose()
    tried = r.record.meta["tiers_tried"]
    assert [(t["tier"], t["model"], t["outcome"], t["input_tokens"], t["output_tokens"]) for t in tried] == [
        ("local", "small-1b", "invalid", 250, 20),
        ("standard", "claude-sonnet-4-6", "invalid", 450, 40),
        ("frontier", "claude-opus-4-8", "ok", 300, 30),
    ]
    assert [t["cost_usd"] for t in tried] == pytest.approx([0.0, (450 * 3 + 40 * 15) / 1e6, (300 * 5 + 30 * 25) / 1e6])
    meta = r.record.meta
    assert (meta["input_tokens"], meta["output_tokens"], meta["llm_calls"]) == (1000, 90, 5)
    assert (meta["tier"], meta["model"]) == ("frontier", "claude-opus-4-8")
    assert meta["cost_usd"] == pytest.approx(sum(t["cost_usd"] for t in tried))
    assert [b.body["model"] for b in (x for x in cloud.requests)] == ["claude-sonnet-4-6"] * 2 + ["claude-opus-4-8"]
    assert "still invalid after its repair; escalating to tier standard" in caplog.text
    assert "escalating to tier frontier" in caplog.text


async def test_invalid_on_every_tier_fails_naming_each_and_the_metadata_keeps_them_all(
    tmp_path, heddle_servers, local_and_anthropic
):
    local, cloud = local_and_anthropic
    path, name = write_config(tmp_path, escalation=["standard"], retries=0)
    app = worker_app(path, "local", llm_settings=three_tiers(local, cloud), nats_url=heddle_servers.nats_url,
                     valkey_url=heddle_servers.valkey_url)
    local.add(Reply(text='{"label": "a"}'), Reply(text='{"label": "b"}'))
    cloud.add(Reply(text='{"label": "c"}'), Reply(text='{"label": "d"}'))
    async with aworker(app, tier="local"):
        r = app.send_task(name, {"text": "Meh."})
        with pytest.raises(heddle.TaskError) as info:
            await r.aget(timeout=30)
    await app.aclose()
    message = info.value.remote_message
    assert info.value.type_name == "heddle.errors.LLMOutputError"
    assert "invalid after a repair attempt on every tier tried (local, standard)" in message
    assert "local: lmstudio model small-1b: it does not match the schema" in message
    assert "standard: anthropic model claude-sonnet-4-6: it does not match the schema" in message
    assert "'d' is not one of" in message
    assert [(t["tier"], t["outcome"]) for t in r.record.meta["tiers_tried"]] == [
        ("local", "invalid"), ("standard", "invalid")]
    assert r.record.meta["llm_calls"] == 4


async def test_an_escalation_tier_without_a_backend_is_named_at_start_and_skipped(tmp_path, caplog):
    with FakeProvider("ollama") as local:
        settings = LLMSettings(ollama_url=local.url, ollama_model="qwen3:0.6b")
        path, name = write_config(tmp_path, escalation=["standard"])
        notes = structured_output_notes(load_worker_config(path), "local", settings)
        assert notes == [f"{name}: escalation tier standard is not available (the standard tier uses Anthropic but "
                         "ANTHROPIC_API_KEY is not set; set ANTHROPIC_API_KEY); an output still invalid before it "
                         "skips it"]
        local.add(Reply(text='{"n": -1}'), Reply(text='{"n": -2}'))
        with pytest.raises(LLMOutputError, match=r"every tier tried \(local\): .*; not available: standard") as info:
            await complete("Count", tier="local", schema=SCHEMA, escalation=["standard"], settings=settings)
    assert "$.n: -2 is less than minimum 0" in str(info.value)


async def test_a_provider_error_on_the_next_tier_fails_the_task_and_is_recorded_with_what_it_spent(
    tmp_path, heddle_servers, local_and_anthropic
):
    local, cloud = local_and_anthropic
    path, name = write_config(tmp_path, escalation=["standard", "frontier"], retries=0)
    app = worker_app(path, "local", llm_settings=three_tiers(local, cloud), nats_url=heddle_servers.nats_url,
                     valkey_url=heddle_servers.valkey_url)
    local.add(Reply(text='{"label": "a"}', input_tokens=5, output_tokens=1),
              Reply(text='{"label": "b"}', input_tokens=6, output_tokens=1))
    cloud.add(Reply(text='{"label": "c"}', input_tokens=40, output_tokens=4), Reply(status=500, error="down"))
    async with aworker(app, tier="local"):
        r = app.send_task(name, {"text": "Meh."})
        with pytest.raises(heddle.TaskError) as info:
            await r.aget(timeout=30)
    await app.aclose()
    assert info.value.type_name == "heddle.errors.LLMBackendError" and "HTTP 500" in info.value.remote_message
    tried = r.record.meta["tiers_tried"]
    assert [(t["tier"], t["outcome"], t["input_tokens"], t["llm_calls"]) for t in tried] == [
        ("local", "invalid", 11, 2), ("standard", "error", 40, 1)]
    assert "HTTP 500: api_error: down" in tried[1]["error"]
    assert len(cloud.requests) == 2  # no escalation to frontier on a provider error
