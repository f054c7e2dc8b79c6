"""The Workshop shows what a task's model calls cost: the tiers tried, in order, and a pipeline run's cost."""

from __future__ import annotations

import html
import re
import textwrap
import uuid

import httpx

import heddle
from heddle.graphs.pipeline import load_pipeline
from heddle.llm import worker_app
from heddle.settings import LLMSettings
from heddle.testing import EmbeddedServers, running_worker
from heddle.testing.orchestrators import running_orchestrator
from heddle.workshop import Workshop
from tests.fake_providers import FakeProvider, Reply
from tests.test_llm_worker import write_config
from tests.workshop_support import client, ws

__all__ = ["client", "ws"]  # fixtures, imported for pytest


def cells(page: str, table_id: str) -> list[list[str]]:
    body = page.split(f'id="{table_id}"', 1)[1].split("</table>", 1)[0].split("<tbody>", 1)[1]
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def test_a_task_page_lists_the_tiers_tried_with_outcome_tokens_calls_and_cost(
    heddle_servers: EmbeddedServers, tmp_path, ws: Workshop, client: httpx.Client
) -> None:
    with FakeProvider("openai") as local, FakeProvider("anthropic") as cloud:
        settings = LLMSettings(lm_studio_url=local.url, lm_studio_model="small-1b", anthropic_api_key=cloud.api_key,
                               anthropic_base_url=cloud.url, standard_model="claude-sonnet-4-6")
        path, name = write_config(tmp_path, escalation=["standard"], retries=0)
        app = worker_app(path, "local", llm_settings=settings, nats_url=heddle_servers.nats_url,
                         valkey_url=heddle_servers.valkey_url)
        local.add(Reply(text='{"label": "glad"}', input_tokens=100, output_tokens=10),
                  Reply(text='{"label": "gladder"}', input_tokens=150, output_tokens=10))
        cloud.add(Reply(text='{"label": "positive"}', input_tokens=1000, output_tokens=100))
        with running_worker(app):
            r = app.send_task(name, {"text": "What a day!"}, budget_usd=0.5, tier="local")
            assert r.get(timeout=30) == {"label": "positive"}
        app.close()
        assert (len(local.requests), len(cloud.requests)) == (2, 1)
    page = client.get(f"/tasks/{r.id}").text
    assert cells(page, "tiers-tried") == [
        ["1", "local", "lmstudio", "small-1b", "invalid", "250", "20", "2", "$0",
         cells(page, "tiers-tried")[0][9]],
        ["2", "standard", "anthropic", "claude-sonnet-4-6", "ok", "1000", "100", "1", "$0.0045", ""],
    ]
    assert "it does not match the schema (the first broken field is $.label, rule enum)" in cells(
        page, "tiers-tried")[0][9]
    usage = html.unescape(re.sub(r"<[^>]+>", " ", page.split('id="llm-usage"', 1)[1].split("</dl>", 1)[0]))
    assert "claude-sonnet-4-6 (anthropic, tier standard)" in usage
    assert re.search(r"calls\s+3\b", usage) and "1250 in / 120 out" in usage
    assert "$0.0045 of budget_usd $0.5" in usage


PIPELINE = """
name: costly
budget_usd: 0.25
stages:
  - name: first
    worker_type: {name}
    input_mapping: {{text: goal.context.text}}
"""


def test_a_pipeline_run_shows_each_stages_cost_and_the_goals_cost_of_its_budget(
    heddle_servers: EmbeddedServers, tmp_path, ws: Workshop, client: httpx.Client
) -> None:
    with FakeProvider("anthropic") as cloud:
        settings = LLMSettings(anthropic_api_key=cloud.api_key, anthropic_base_url=cloud.url,
                               standard_model="claude-sonnet-4-6")
        path, name = write_config(tmp_path, default_model_tier="standard", retries=0)
        app = worker_app(path, "standard", llm_settings=settings, nats_url=heddle_servers.nats_url,
                         valkey_url=heddle_servers.valkey_url)
        file = tmp_path / "costly.yaml"
        file.write_text(textwrap.dedent(PIPELINE.format(name=name)))
        client_app = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                                   valkey_url=heddle_servers.valkey_url)
        cloud.add(Reply(text='{"label": "positive"}', input_tokens=1000, output_tokens=100))
        with running_worker(app), running_orchestrator(client_app):
            g = load_pipeline(file).apply_async({"text": "Great."}, app=client_app)
            assert g.get(timeout=30) == {"first": {"label": "positive"}}
        app.close()
        client_app.close()
    page = client.get(f"/pipelines/runs/{g.id}").text
    assert '<span id="pipeline-cost">cost $0.0045 of budget_usd $0.25</span>' in page
    (row,) = cells(page, "stage-timings")
    assert row[0] == "first" and row[7] == "$0.0045"
