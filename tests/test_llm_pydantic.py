"""Pydantic models as worker schemas: named by import path, sent as JSON Schema, validated by the model."""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid

import pytest
from pydantic import BaseModel, Field, field_validator

import heddle
from heddle.errors import ConfigError
from heddle.llm import complete, load_worker_config, worker_app
from heddle.llm.models import import_model
from heddle.testing import aworker
from heddle.validate import validate_file
from tests.fake_providers import FakeProvider, Reply, settings_for


class Article(BaseModel):
    """The input: a text, stripped, and when it was written."""

    text: str = Field(min_length=1)
    written: dt.date | None = None

    @field_validator("text")
    @classmethod
    def strip(cls, v: str) -> str:
        return v.strip()


class Point(BaseModel):
    label: str = Field(max_length=12)
    weight: float = Field(ge=0, le=1)


class Summary(BaseModel):
    """The output: a summary in lower case and its key points."""

    summary: str
    points: list[Point] = Field(min_length=1)
    checked: bool = False

    @field_validator("summary")
    @classmethod
    def lower_case(cls, v: str) -> str:
        if v != v.lower():
            raise ValueError("the summary must be in lower case")
        return v


NotAModel = {"type": "object"}


def write(tmp_path, **fields):
    name = f"pyd{uuid.uuid4().hex[:8]}"
    config = {"name": name, "system_prompt": "Summarise.", "input_schema": "tests.test_llm_pydantic:Article",
              "output_schema": "tests.test_llm_pydantic:Summary", "default_model_tier": "local",
              "retries": 0, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path, name


def test_a_config_names_models_by_import_path_and_heddle_validate_accepts_it(tmp_path):
    path, _ = write(tmp_path)
    assert validate_file(path).issues == []
    cfg = load_worker_config(path)
    assert (cfg.input_model, cfg.output_model) == ("tests.test_llm_pydantic:Article", "tests.test_llm_pydantic:Summary")
    assert cfg.output_schema == Summary.model_json_schema() and "$defs" in cfg.output_schema
    assert cfg.output_validator().parse({"summary": "ok", "points": [{"label": "a", "weight": 1}]}) == (
        {"summary": "ok", "points": [{"label": "a", "weight": 1.0}], "checked": False}, [])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("tests.test_llm_pydantic:Summry", "module 'tests.test_llm_pydantic' has no 'Summry'"),
        ("tests.test_llm_pydantic:NotAModel", "is dict {'type': 'object'}, not a Pydantic model"),
        ("tests.nowhere:Summary", "cannot import 'tests.nowhere'"),
    ],
)
def test_a_model_path_that_does_not_lead_to_a_model_is_reported_with_its_line(tmp_path, value, message):
    path, _ = write(tmp_path, output_schema=value)
    (issue,) = validate_file(path).issues
    assert (issue.line, issue.path) == (1, "output_schema") and message in issue.message


def test_a_config_naming_a_model_without_pydantic_installed_says_which_extra_to_install(tmp_path, monkeypatch):
    path, _ = write(tmp_path)
    monkeypatch.setitem(sys.modules, "pydantic", None)  # what `import pydantic` sees when it is not installed
    issues = validate_file(path).issues
    assert [i.path for i in issues] == ["input_schema", "output_schema"]
    assert "names a Pydantic model, but pydantic is not installed; install it with pip install " \
           "'heddle[pydantic]'" in issues[1].message
    with pytest.raises(ConfigError, match=r"heddle\[pydantic\]"):
        import_model("tests.test_llm_pydantic:Summary")


async def test_a_worker_validates_with_the_models_and_returns_the_validated_data_as_a_plain_dict(
    tmp_path, heddle_servers
):
    path, name = write(tmp_path)
    with FakeProvider("openai") as p:
        tier, settings = settings_for(p, model="fake-8b")
        app = worker_app(path, tier, llm_settings=settings, nats_url=heddle_servers.nats_url,
                         valkey_url=heddle_servers.valkey_url)
        p.add(Reply(text='{"summary": "Cats Sleep", "points": [{"label": "naps", "weight": 0.5}]}'),
              Reply(text='{"summary": "cats sleep", "points": [{"label": "naps", "weight": "0.5"}]}'))
        async with aworker(app, tier="local"):
            r = app.send_task(name, {"text": "  Cats sleep a lot.  ", "written": "2026-12-01"})
            result = await r.aget(timeout=20)
            bad = app.send_task(name, {"text": "", "written": "yesterday"})
            with pytest.raises(heddle.TaskError) as info:
                await bad.aget(timeout=20)
        await app.aclose()
    # The model's validator ran on the reply, its defaults filled in, its types coerced the JSON way.
    assert result == {"summary": "cats sleep", "points": [{"label": "naps", "weight": 0.5}], "checked": False}
    first, repair = p.requests
    assert first.body["response_format"]["json_schema"]["schema"] == Summary.model_json_schema()
    assert json.dumps(Summary.model_json_schema()) in first.body["messages"][0]["content"]
    # The input went through its model too: stripped, the date checked.
    assert json.loads(first.body["messages"][1]["content"]) == {"text": "Cats sleep a lot.", "written": "2026-12-01"}
    told = repair.body["messages"][-1]["content"]
    assert "the first broken field is $.summary, rule value_error" in told
    assert "Value error, the summary must be in lower case" in told
    # Input the model rejects fails without a model call, naming each field.
    assert info.value.type_name == "heddle.errors.LLMInputError"
    assert "$.text: String should have at least 1 character" in info.value.remote_message
    assert "$.written: Input should be a valid date" in info.value.remote_message
    assert len(p.requests) == 2


async def test_complete_takes_a_model_class_and_names_the_broken_field_after_the_repair():
    with FakeProvider("ollama") as p:
        tier, settings = settings_for(p)
        p.add(Reply(text='{"summary": "x", "points": [{"label": "a", "weight": 0.1}, {"label": "b", "weight": 2}]}'),
              Reply(text='{"summary": "x", "points": [{"label": "a", "weight": 0.1}, {"label": "b", "weight": 3}]}'))
        with pytest.raises(heddle.errors.LLMOutputError) as info:
            await complete("Summarise", tier=tier, schema=Summary, settings=settings)
        assert p.requests[0].body["format"] == Summary.model_json_schema()
        p.add(Reply(text='{"summary": "x", "points": [{"label": "a", "weight": 1}]}'))
        c = await complete("Summarise", tier=tier, schema=Summary, settings=settings)
    assert "the first broken field is $.points[1].weight, rule less_than_equal" in str(info.value)
    assert "$.points[1].weight: Input should be less than or equal to 1" in str(info.value)
    assert c.data == {"summary": "x", "points": [{"label": "a", "weight": 1.0}], "checked": False}
    assert type(c.data) is dict
