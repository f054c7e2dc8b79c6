"""``heddle.llm.complete``: JSON extraction, schema validation, one repair call; tier configuration."""

from __future__ import annotations

import json

import pytest

from heddle.errors import LLMConfigError, LLMInputError, LLMOutputError
from heddle.llm import complete
from heddle.llm.backends import backend_for_tier, check_tier
from heddle.settings import DEFAULT_STANDARD_MODEL, LLMSettings
from tests.fake_providers import KINDS, FakeProvider, Reply, settings_for

SCHEMA = {
    "type": "object",
    "required": ["label", "score"],
    "additionalProperties": False,
    "properties": {
        "label": {"type": "string", "enum": ["spam", "ham"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
    },
}


@pytest.fixture(params=KINDS)
def provider(request):
    with FakeProvider(request.param) as p:
        yield p


async def test_schema_invalid_output_is_repaired_on_the_second_try(provider):
    tier, settings = settings_for(provider)
    provider.add(Reply(text='{"label": "spam", "score": true}', input_tokens=30, output_tokens=9),
                 Reply(text='{"label": "spam", "score": 9}', input_tokens=50, output_tokens=8))
    c = await complete("Buy now!!!", tier=tier, schema=SCHEMA, settings=settings)
    assert c.data == {"label": "spam", "score": 9}
    assert (c.calls, c.input_tokens, c.output_tokens) == (2, 80, 17)
    _, repair = provider.requests
    assert repair.body["messages"][-2] == {"role": "assistant", "content": '{"label": "spam", "score": true}'}
    assert "$.score: expected integer, got boolean True" in repair.body["messages"][-1]["content"]
    assert provider.violations == []


async def test_the_schema_reaches_each_provider_the_way_it_can_use_it(provider):
    tier, settings = settings_for(provider)
    provider.add(Reply(text='{"label": "ham", "score": 1}'))
    await complete("Hi mum", tier=tier, schema=SCHEMA, system="Classify.", settings=settings)
    body = provider.requests[0].body
    system = body["system"] if provider.kind == "anthropic" else body["messages"][0]["content"]
    assert system.startswith("Classify.") and json.dumps(SCHEMA) in system
    if provider.kind == "openai":  # LM Studio / llama.cpp: constrained decoding
        assert body["response_format"]["json_schema"]["schema"] == SCHEMA
    elif provider.kind == "ollama":
        assert body["format"] == SCHEMA


async def test_fenced_json_after_a_preamble_is_extracted():
    with FakeProvider("anthropic") as p:
        tier, settings = settings_for(p)
        p.add(Reply(text='Here is the classification:\n```json\n{"label": "ham", "score": 2}\n```\nAnything else?'))
        c = await complete("Lunch at 1?", tier=tier, schema=SCHEMA, settings=settings)
    assert c.data == {"label": "ham", "score": 2} and c.calls == 1


async def test_a_reply_that_is_not_json_is_repaired_by_showing_the_model_the_problem():
    with FakeProvider("ollama") as p:
        tier, settings = settings_for(p)
        p.add(Reply(text="I think this one is spam, with a score of nine."),
              Reply(text='{"label": "spam", "score": 9}'))
        c = await complete("WIN A PRIZE", tier=tier, schema=SCHEMA, settings=settings)
        assert c.data == {"label": "spam", "score": 9}
        assert "it is not valid JSON" in p.requests[1].body["messages"][-1]["content"]


async def test_output_invalid_twice_fails_with_every_validation_error_and_the_reply():
    with FakeProvider("openai") as p:
        tier, settings = settings_for(p)
        p.add(Reply(text='{"label": "eggs"}'), Reply(text='{"label": "eggs", "score": 99, "why": "x"}'))
        with pytest.raises(LLMOutputError) as info:
            await complete("?", tier=tier, schema=SCHEMA, settings=settings)
        message = str(info.value)
        assert "after a repair attempt" in message
        assert "$.label: 'eggs' is not one of ['spam', 'ham']" in message
        assert "$.score: 99 is greater than maximum 10" in message
        assert "$: unexpected property 'why'" in message
        assert '"why": "x"' in message  # the last reply, for debugging
        assert len(p.requests) == 2


async def test_an_input_over_max_input_tokens_fails_before_any_call():
    with FakeProvider("openai") as p:
        tier, settings = settings_for(p)
        with pytest.raises(LLMInputError, match=r"input too long: about \d+ tokens .* max_input_tokens=10"):
            await complete("word " * 40, tier=tier, settings=settings, max_input_tokens=10)
        assert p.requests == []


async def test_a_price_table_turns_usage_into_cost(tmp_path):
    prices = tmp_path / "prices.yaml"
    prices.write_text("fake-model:\n  input_per_mtok: 3\n  output_per_mtok: 15\n")
    with FakeProvider("anthropic") as p:
        tier, settings = settings_for(p, prices_path=str(prices))
        p.add(Reply(text="ok", input_tokens=1000, output_tokens=200))
        c = await complete("hi", tier=tier, settings=settings)
    assert c.cost_usd == pytest.approx(0.003 + 0.003)
    assert c.usage()["cost_usd"] == c.cost_usd


@pytest.mark.parametrize(
    ("tier", "settings", "message"),
    [
        ("local", LLMSettings(), "set LM_STUDIO_URL and LM_STUDIO_MODEL .* or OLLAMA_URL and OLLAMA_MODEL"),
        ("local", LLMSettings(lm_studio_url="http://a", lm_studio_model="m", ollama_url="http://b", ollama_model="m"),
         "both LM_STUDIO_URL and OLLAMA_URL are set.*HEDDLE_LOCAL_BACKEND=lmstudio or HEDDLE_LOCAL_BACKEND=ollama"),
        ("local", LLMSettings(lm_studio_url="http://a", local_backend="vllm"), "HEDDLE_LOCAL_BACKEND='vllm'"),
        ("local", LLMSettings(lm_studio_url="http://a"), "uses lmstudio but LM_STUDIO_MODEL is not set"),
        ("local", LLMSettings(ollama_url="http://b", lm_studio_url="http://a", local_backend="ollama"),
         "uses ollama but OLLAMA_MODEL is not set"),
        ("standard", LLMSettings(), "standard tier uses Anthropic but ANTHROPIC_API_KEY is not set"),
        ("frontier", LLMSettings(anthropic_api_key="k"), "frontier tier uses Anthropic but FRONTIER_MODEL is not set"),
        ("frontier", LLMSettings(), "ANTHROPIC_API_KEY and FRONTIER_MODEL are not set"),
    ],
    ids=["local-none", "local-both", "local-bad-choice", "lmstudio-no-model", "ollama-no-model",
         "standard-no-key", "frontier-no-model", "frontier-nothing"],
)
def test_a_tier_without_backend_configuration_names_the_variables_to_set(tier, settings, message):
    with pytest.raises(LLMConfigError, match=message):
        check_tier(tier, settings)


def test_backends_come_from_the_environment(monkeypatch):
    for var in ("LM_STUDIO_URL", "OLLAMA_URL", "HEDDLE_STANDARD_MODEL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OLLAMA_URL", "http://127.0.0.1:11434")
    monkeypatch.setenv("OLLAMA_MODEL", "qwen3:4b")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.setenv("FRONTIER_MODEL", "claude-opus-5-5")
    s = LLMSettings.load()
    local, standard, frontier = (backend_for_tier(t, s) for t in ("local", "standard", "frontier"))
    assert (local.name, local.endpoint, local.model) == ("ollama", "http://127.0.0.1:11434/api/chat", "qwen3:4b")
    assert (standard.name, standard.model) == ("anthropic", DEFAULT_STANDARD_MODEL)
    assert standard.endpoint == "https://api.anthropic.com/v1/messages"
    assert frontier.model == "claude-opus-5-5"
    monkeypatch.setenv("HEDDLE_STANDARD_MODEL", "claude-haiku-4-5")
    assert backend_for_tier("standard", LLMSettings.load()).model == "claude-haiku-4-5"
    assert "sk-test" not in repr(s)  # the key never shows in logs


CHART = {
    "$defs": {"point": {"type": "object", "required": ["label"], "properties": {
        "label": {"type": "string", "maxLength": 5}, "y": {"type": "number"}}}},
    "type": "object",
    "required": ["points"],
    "properties": {"points": {"type": "array", "items": {"$ref": "#/$defs/point"}},
                   "unit": {"oneOf": [{"const": "cm"}, {"const": "in"}]}},
}


async def test_a_reply_still_invalid_after_the_repair_names_the_first_broken_field_and_its_rule():
    with FakeProvider("ollama") as p:
        tier, settings = settings_for(p)
        bad = {"points": [{"label": "ok", "y": 1}, {"label": "far too long"}], "unit": "mm"}
        p.add(Reply(text=json.dumps(bad)), Reply(text=json.dumps(bad)))
        with pytest.raises(LLMOutputError) as info:
            await complete("Chart it", tier=tier, schema=CHART, settings=settings)
    message = str(info.value)
    assert "the first broken field is $.points[1].label, rule maxLength" in message
    assert "$.points[1].label: is 12 characters, longer than maxLength 5" in message
    assert "$.unit: matches none of oneOf" in message
    assert message.index("$.points[1].label: is 12") < message.index("$.unit: matches none")
    # The repair call told the model the same, with the $ref'd schema in its own field.
    assert "the first broken field is $.points[1].label" in p.requests[1].body["messages"][-1]["content"]
    assert p.requests[1].body["format"] == CHART
