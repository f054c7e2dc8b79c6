"""Provider-native structured output: the output schema in each provider's own field, Heddle's checks on top."""

from __future__ import annotations

import json
import logging

import pytest

from heddle.llm import complete, load_worker_config, worker_app
from heddle.llm.worker import structured_output_notes
from tests.fake_providers import KINDS, FakeProvider, Reply, settings_for
from tests.test_llm_worker import write_config

SCHEMA = {
    "type": "object",
    "required": ["label", "score"],
    "properties": {
        "label": {"type": "string", "enum": ["spam", "ham"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
    },
}


def system_of(kind, body):
    return body["system"] if kind == "anthropic" else body["messages"][0]["content"]


@pytest.fixture(params=KINDS)
def provider(request):
    with FakeProvider(request.param) as p:
        yield p


async def test_anthropic_gets_the_schema_as_output_config_in_the_subset_the_api_takes():
    with FakeProvider("anthropic") as p:
        tier, settings = settings_for(p, model="claude-sonnet-4-5")
        p.add(Reply(text='{"label": "ham", "score": 1}'))
        c = await complete("Hi mum", tier=tier, schema=SCHEMA, settings=settings)
        assert c.data == {"label": "ham", "score": 1}
        assert p.violations == []  # the fake rejects what the real API rejects (minimum, open objects...)
    fmt = p.requests[0].body["output_config"]["format"]
    assert fmt["type"] == "json_schema"
    sent = fmt["schema"]
    assert sent["additionalProperties"] is False and sent["required"] == ["label", "score"]
    assert sent["properties"]["label"]["enum"] == ["spam", "ham"]
    # Bounds the API cannot enforce travel as a description; Heddle still enforces them.
    score = sent["properties"]["score"]
    assert "minimum" not in score and "minimum: 0" in score["description"] and "maximum: 10" in score["description"]


async def test_each_provider_gets_the_schema_in_its_own_field_named_after_the_worker(provider):
    tier, settings = settings_for(provider, model="claude-haiku-4-5")
    provider.add(Reply(text='{"label": "spam", "score": 3}'))
    await complete("WIN", tier=tier, schema=SCHEMA, schema_name="spam-filter", settings=settings)
    body = provider.requests[0].body
    if provider.kind == "anthropic":
        assert body["output_config"]["format"]["schema"]["properties"]["label"]["enum"] == ["spam", "ham"]
    elif provider.kind == "openai":
        assert body["response_format"] == {"type": "json_schema", "json_schema": {
            "name": "spam-filter", "strict": True, "schema": SCHEMA}}
    else:
        assert body["format"] == SCHEMA
    assert provider.violations == []


async def test_heddles_validation_and_repair_still_apply_on_top_of_native_output():
    with FakeProvider("anthropic") as p:
        tier, settings = settings_for(p, model="claude-sonnet-4-6")
        # The API cannot enforce maximum: 10, so a constrained reply can still break it.
        p.add(Reply(text='{"label": "spam", "score": 99}'), Reply(text='{"label": "spam", "score": 9}'))
        c = await complete("WIN", tier=tier, schema=SCHEMA, settings=settings)
        assert (c.data, c.calls) == ({"label": "spam", "score": 9}, 2)
        first, repair = p.requests
        assert "$.score: 99 is greater than maximum 10" in repair.body["messages"][-1]["content"]
        assert repair.body["output_config"] == first.body["output_config"]
        assert p.violations == []


async def test_structured_output_prompt_keeps_the_schema_in_the_prompt_only(provider):
    tier, settings = settings_for(provider)
    provider.add(Reply(text='{"label": "ham", "score": 0}'))
    c = await complete("Hi", tier=tier, schema=SCHEMA, structured_output="prompt", settings=settings)
    assert c.data == {"label": "ham", "score": 0}
    body = provider.requests[0].body
    assert not {"output_config", "response_format", "format"} & set(body)
    assert json.dumps(SCHEMA) in system_of(provider.kind, body)


async def test_a_model_without_structured_outputs_gets_the_schema_in_the_prompt_and_the_worker_says_so_at_start(
    tmp_path, heddle_servers, caplog
):
    path, name = write_config(tmp_path, default_model_tier="standard")
    with FakeProvider("anthropic", refuse_schema=True) as p:
        tier, settings = settings_for(p, model="claude-3-5-haiku-20241022")
        with caplog.at_level(logging.WARNING, logger="heddle.llm"):
            app = worker_app(path, tier, llm_settings=settings, nats_url=heddle_servers.nats_url,
                             valkey_url=heddle_servers.valkey_url)
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"{name}: tier standard (anthropic, model claude-3-5-haiku-20241022) cannot take the output " \
               "schema in output_config: model claude-3-5-haiku-20241022 predates structured outputs" in said
        assert "it goes in the prompt instead" in said
        p.add(Reply(text='{"label": "neutral"}'))
        c = await complete("A chair.", tier=tier, schema=load_worker_config(path).output_schema, settings=settings)
        assert c.data == {"label": "neutral"}
        assert "output_config" not in p.requests[0].body and p.refusals == 0
        await app.aclose()


def test_a_recursive_schema_goes_to_anthropic_in_the_prompt_and_the_start_up_line_says_why(tmp_path):
    tree = {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array",
                                                                           "items": {"$ref": "#/$defs/node"}}}}},
            "type": "object", "required": ["root"], "properties": {"root": {"$ref": "#/$defs/node"}}}
    path, name = write_config(tmp_path, output_schema=tree)
    with FakeProvider("anthropic") as p:
        tier, settings = settings_for(p, model="claude-sonnet-4-5")
        (note,) = structured_output_notes(load_worker_config(path), tier, settings)
    assert note.startswith(f"{name}: tier standard (anthropic, model claude-sonnet-4-5) cannot take the output "
                           "schema in output_config: the schema is recursive")


@pytest.mark.parametrize("kind", ["openai", "ollama", "anthropic"])
async def test_a_provider_that_refuses_the_schema_field_gets_it_in_the_prompt_from_then_on(kind, caplog):
    with FakeProvider(kind, refuse_schema=True) as p:
        tier, settings = settings_for(p, model=f"old-{kind}")
        p.add(Reply(text='{"label": "ham", "score": 2}'), Reply(text='{"label": "spam", "score": 8}'))
        with caplog.at_level(logging.WARNING, logger="heddle.llm"):
            first = await complete("Hi", tier=tier, schema=SCHEMA, settings=settings, retries=0)
            second = await complete("WIN", tier=tier, schema=SCHEMA, settings=settings, retries=0)
        assert (first.data["label"], second.data["label"]) == ("ham", "spam")
        # One refused request, answered again at once without the field; the next call never sends it.
        assert p.refusals == 1 and len(p.requests) == 3
        assert not {"output_config", "response_format", "format"} & set(p.requests[2].body)
        assert "output schemas go in the prompt only from now on" in caplog.text
        assert json.dumps(SCHEMA) in system_of(p.kind, p.requests[2].body)


async def test_a_schema_name_openai_would_reject_is_made_one_it_takes():
    with FakeProvider("openai") as p:
        tier, settings = settings_for(p)
        p.add(Reply(text='{"label": "ham", "score": 0}'))
        await complete("Hi", tier=tier, schema=SCHEMA, schema_name="my worker.v2", settings=settings)
        assert p.requests[0].body["response_format"]["json_schema"]["name"] == "my_worker_v2"
        assert p.violations == []
