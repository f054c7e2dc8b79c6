"""The embedded local model (SmolLM2-135M on llama.cpp via xllamacpp): real inference, end to end.

Needs ``xllamacpp`` (the ``dev`` and ``local-llm`` extras) and the model
(``heddle models pull``, which the README's test command and .ci/run run).
Prompts are tiny and outputs a few tokens, so each call takes about a second
on two cores.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import uuid

import pytest

from heddle.llm import complete, worker_app
from heddle.llm.config import load_worker_config
from heddle.llm.local_model import MODEL_ALIAS, LocalModelServer, find_model
from heddle.settings import LLMSettings
from heddle.testing import aworker
from tests.conftest import ROOT
from tests.test_llm_cli import clean_env

EXAMPLES = ROOT / "examples" / "llm"


@pytest.fixture(scope="module")
def local_model():
    if find_model() is None:
        pytest.fail("the embedded model is not installed: run `heddle models pull` (see README)")
    with LocalModelServer(n_ctx=2048) as server:
        yield server


async def test_a_yaml_worker_runs_end_to_end_on_the_real_embedded_model(local_model, heddle_servers):
    config = load_worker_config(EXAMPLES / "classifier.yaml")
    config = dataclasses.replace(config, name=f"cls{uuid.uuid4().hex[:8]}")
    settings = LLMSettings(lm_studio_url=local_model.url, lm_studio_model=local_model.model)
    app = worker_app(config, "local", llm_settings=settings, nats_url=heddle_servers.nats_url,
                     valkey_url=heddle_servers.valkey_url)
    async with aworker(app, tier="local"):
        r = app.send_task(config.name, {"text": "I love this phone. It works great and the battery lasts."})
        result = await r.aget(timeout=60)
    await app.aclose()
    assert result["label"] in ("positive", "negative", "neutral")
    meta = r.record.meta
    assert meta["model"] == MODEL_ALIAS and meta["backend"] == "lmstudio" and meta["tier"] == "local"
    assert meta["input_tokens"] > 20 and 0 < meta["output_tokens"] <= config.max_output_tokens * meta["llm_calls"]


async def test_the_anthropic_sdk_backend_talks_to_the_embedded_models_messages_endpoint(local_model):
    settings = LLMSettings(anthropic_api_key="unused", anthropic_base_url=local_model.url, standard_model=MODEL_ALIAS)
    c = await complete("Say hello.", tier="standard", max_tokens=8, settings=settings)
    assert c.backend == "anthropic" and c.text.strip()
    assert c.input_tokens > 0 and 0 < c.output_tokens <= 8


async def test_the_embedded_model_decodes_to_a_pydantic_models_schema_with_refs_bounds_and_a_pattern(local_model):
    from pydantic import BaseModel, Field

    from heddle.llm.backends import backend_for_tier

    class Tag(BaseModel):
        name: str = Field(max_length=10)

    class Review(BaseModel):
        sentiment: str = Field(pattern="^(good|bad)$")
        tags: list[Tag] = Field(min_length=1, max_length=2)

    assert "$defs" in Review.model_json_schema()
    settings = LLMSettings(lm_studio_url=local_model.url, lm_studio_model=local_model.model)
    c = await complete("Review: great phone, long battery.", tier="local", schema=Review, max_tokens=60,
                       settings=settings)
    # llama.cpp took the schema as response_format and constrained decoding to it: valid at the first call.
    assert c.calls == 1 and backend_for_tier("local", settings).native_refused == ""
    assert Review.model_validate(c.data).model_dump(mode="json") == c.data and type(c.data) is dict


def test_the_llm_example_runs_three_workers_and_a_pipeline_under_heddle_dev():
    out = subprocess.run([sys.executable, str(EXAMPLES / "run.py")], capture_output=True, text=True, timeout=240,
                         env=clean_env(PATH="/usr/bin:/bin"), cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "heddle dev is serving extractor, classifier, summarizer on the local tier" in out.stdout
    assert f"model: {MODEL_ALIAS}" in out.stdout
    assert out.stdout.count(" tok, ") == 6  # usage of 2 reviews x 3 workers, from result metadata
    assert "pipeline review: SUCCESS" in out.stdout and '"sentiment":' in out.stdout
    assert "llm example done" in out.stdout


def test_heddle_models_path_prints_the_gguf_file():
    out = subprocess.run([sys.executable, "-m", "heddle", "models", "path"], capture_output=True, text=True,
                         timeout=60, env=clean_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(".gguf") and out.stdout.strip() == str(find_model())
