"""Cost budgets: prices per model, budget_usd per worker config, per task call and per pipeline goal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

import heddle
from heddle.errors import BudgetExceeded, LLMConfigError, TaskOptionError
from heddle.graphs.pipeline import load_pipeline
from heddle.llm import complete, worker_app
from heddle.llm.prices import price_for
from heddle.settings import LLMSettings
from heddle.testing import aworker
from heddle.testing.orchestrators import aorchestrator
from heddle.validate import validate_file
from tests.conftest import ROOT
from tests.fake_providers import FakeProvider, Reply, settings_for
from tests.test_llm_worker import write_config

SCHEMA = {"type": "object", "required": ["n"], "properties": {"n": {"type": "integer", "minimum": 0}}}
SONNET = "claude-sonnet-4-6"  # built-in price: $3 / $15 per million tokens


def sonnet_cost(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * 3 + output_tokens * 15) / 1e6


def test_a_price_comes_from_the_table_then_the_built_in_family_price_and_local_models_are_free(tmp_path):
    table = tmp_path / "prices.yaml"
    table.write_text("claude-sonnet-4-6: {input_per_mtok: 2.5, output_per_mtok: 12}\nmy-model: "
                     "{input_per_mtok: 1, output_per_mtok: 2}\n")
    s = LLMSettings(prices_path=str(table))
    assert price_for("claude-sonnet-4-6", s).input_per_mtok == 2.5  # the table beats the built-in price
    assert (price_for("claude-sonnet-4-20250514", s).input_per_mtok,
            price_for("claude-sonnet-4-20250514", s).output_per_mtok) == (3.0, 15.0)
    assert price_for("claude-opus-4-1-20250805", s).output_per_mtok == 75.0
    assert price_for("claude-3-5-haiku-20241022", s).input_per_mtok == 0.8
    assert price_for("my-model", s, "anthropic").output_per_mtok == 2.0
    assert price_for("qwen3:0.6b", s, "ollama").cost_usd(10**6, 10**6) == 0.0
    assert price_for("some-model", s, "anthropic") is None


async def test_complete_records_the_built_in_cost_without_a_price_table():
    with FakeProvider("anthropic") as p:
        tier, settings = settings_for(p, model=SONNET)
        p.add(Reply(text='{"n": 1}', input_tokens=1000, output_tokens=100))
        c = await complete("Count", tier=tier, schema=SCHEMA, settings=settings)
    assert c.cost_usd == pytest.approx(sonnet_cost(1000, 100))


async def test_an_escalation_the_budget_cannot_pay_for_is_not_sent_and_recorded_as_over_budget():
    with FakeProvider("openai") as local, FakeProvider("anthropic") as cloud:
        settings = LLMSettings(lm_studio_url=local.url, lm_studio_model="small-1b", anthropic_api_key=cloud.api_key,
                               anthropic_base_url=cloud.url, standard_model=SONNET)
        local.add(Reply(text='{"n": -1}'), Reply(text='{"n": -2}'))
        with pytest.raises(BudgetExceeded) as info:
            await complete("Count", tier="local", schema=SCHEMA, escalation=["standard"], settings=settings,
                           budget_usd=0.00001)
        assert len(local.requests) == 2  # the local tier is free: its call and its repair were made
        assert cloud.requests == []
    message = str(info.value)
    assert message.startswith("budget exceeded: spent $0 of budget_usd $0.00001; the next call (tier standard, "
                              f"anthropic model {SONNET}, about ")
    assert message.endswith(") would pass it, so it was not made")
    assert (info.value.spent_usd, info.value.budget_usd) == (0.0, 0.00001)


async def test_a_budget_needs_a_price_for_the_model_and_says_where_to_add_one():
    with FakeProvider("anthropic") as p:
        tier, settings = settings_for(p, model="house-model")
        with pytest.raises(LLMConfigError, match=r"cannot keep to budget_usd \$0.5: anthropic model house-model has "
                                                 r"no price; add `house-model: \{input_per_mtok: N, output_per_mtok: "
                                                 r"N\}` to the price table \(HEDDLE_PRICES\)"):
            await complete("hi", tier=tier, settings=settings, budget_usd=0.5)
        assert p.requests == []


def _anthropic_worker(tmp_path, cloud, servers, **fields):
    path, name = write_config(tmp_path, default_model_tier="standard", retries=0, **fields)
    _, settings = settings_for(cloud, model=SONNET)
    app = worker_app(path, "standard", llm_settings=settings, nats_url=servers.nats_url,
                     valkey_url=servers.valkey_url)
    return app, name


async def test_a_worker_config_budget_stops_the_repair_call_that_would_pass_it(tmp_path, heddle_servers):
    with FakeProvider("anthropic") as cloud:
        app, name = _anthropic_worker(tmp_path, cloud, heddle_servers, budget_usd=0.0046)
        cloud.add(Reply(text='{"label": "glad"}', input_tokens=1000, output_tokens=100),
                  Reply(text='{"label": "positive"}', input_tokens=1200, output_tokens=10))
        async with aworker(app, tier="standard"):
            r = app.send_task(name, {"text": "What a day!"})
            with pytest.raises(heddle.TaskError) as info:
                await r.aget(timeout=30)
        await app.aclose()
        assert len(cloud.requests) == 1  # the repair was never sent
    assert info.value.type_name == "heddle.errors.BudgetExceeded"
    assert info.value.remote_message.startswith(
        "budget exceeded: spent $0.0045 of budget_usd $0.0046; the next repair call (tier standard, "
        f"anthropic model {SONNET}, about ")
    meta = r.record.meta
    assert meta["cost_usd"] == pytest.approx(sonnet_cost(1000, 100))
    assert (meta["budget_usd"], meta["llm_calls"], meta["input_tokens"]) == (0.0046, 1, 1000)


async def test_send_task_budget_usd_caps_one_task_below_the_workers_own(tmp_path, heddle_servers):
    with FakeProvider("anthropic") as cloud:
        app, name = _anthropic_worker(tmp_path, cloud, heddle_servers, budget_usd=1.0)
        cloud.add(Reply(text='{"label": "positive"}', input_tokens=400, output_tokens=20))
        async with aworker(app, tier="standard"):
            ok = app.send_task(name, {"text": "Lovely."})
            assert await ok.aget(timeout=30) == {"label": "positive"}
            poor = app.send_task(name, {"text": "Lovely."}, budget_usd=0.000001)
            with pytest.raises(heddle.TaskError) as info:
                await poor.aget(timeout=30)
        await app.aclose()
        assert len(cloud.requests) == 1  # the poor task made no call at all
    assert (ok.record.meta["cost_usd"], ok.record.meta["budget_usd"]) == (pytest.approx(sonnet_cost(400, 20)), 1.0)
    assert info.value.remote_message.startswith(
        "budget exceeded: spent $0 of the task's budget_usd $0.000001; the next call (tier standard")
    assert poor.record.meta["budget_usd"] == 0.000001
    with pytest.raises(TypeError, match=r"budget_usd for task .* must be US dollars > 0 \(e.g. 0.25\), got -1"):
        app.send_task(name, {"text": "x"}, budget_usd=-1)
    with pytest.raises(TaskOptionError, match="'budget_uds' \\(did you mean 'budget_usd'\\?\\)"):
        app.send_task(name, {"text": "x"}, budget_uds=1)
    app.close()


def test_heddle_validate_takes_budget_usd_and_names_a_misspelling(tmp_path):
    good, _ = write_config(tmp_path, budget_usd=0.25)
    assert validate_file(good).issues == []
    bad, _ = write_config(tmp_path, budget_usd=0, budgt_usd=1)
    found = " | ".join(str(i) for i in validate_file(bad).issues)
    assert "budget_usd: must be > 0 and <= 1e+06, got 0" in found
    assert "unknown key 'budgt_usd' (did you mean 'budget_usd'?)" in found
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("name: p\nbudget_usd: -2\nbudget_usdd: 1\nstages:\n  - name: a\n    task: t.a\n")
    out = subprocess.run([sys.executable, "-m", "heddle", "validate", str(pipeline)], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 1
    assert f"{pipeline}:2: budget_usd must be US dollars > 0 (e.g. 0.50), got -2" in out.stdout
    assert f"{pipeline}:3: unknown key 'budget_usdd' (did you mean 'budget_usd'?)" in out.stdout
    pipeline.write_text("name: p\nbudget_usd: 0.5\nstages:\n  - name: a\n    task: t.a\n")
    assert load_pipeline(pipeline).node.budget_usd == 0.5


PIPELINE = """
name: twice
budget_usd: {budget}
stages:
  - name: first
    worker_type: {name}
    input_mapping: {{text: goal.context.text}}
  - name: second
    worker_type: {name}
    input_mapping: {{text: first.output.label}}
"""


async def test_a_goal_sends_no_stage_once_its_budget_is_spent_and_each_stage_gets_what_is_left(
    tmp_path, heddle_servers
):
    with FakeProvider("anthropic") as cloud:
        app, name = _anthropic_worker(tmp_path, cloud, heddle_servers)
        path = tmp_path / "twice.yaml"
        path.write_text(textwrap.dedent(PIPELINE.format(budget=0.01, name=name)))
        client = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                               valkey_url=heddle_servers.valkey_url)
        cloud.add(Reply(text='{"label": "positive"}', input_tokens=1000, output_tokens=100),
                  Reply(text='{"label": "neutral"}', input_tokens=500, output_tokens=50))
        async with aworker(app, tier="standard"), aorchestrator(client):
            rich = load_pipeline(path).apply_async({"text": "Great."}, app=client)
            assert await rich.aget(timeout=30) == {"first": {"label": "positive"}, "second": {"label": "neutral"}}
            # A tighter budget at submit time wins over the file's: the first stage spends it all.
            cloud.add(Reply(text='{"label": "positive"}', input_tokens=1000, output_tokens=100))
            poor = load_pipeline(path).apply_async({"text": "Great."}, app=client, budget_usd=0.004)
            with pytest.raises(heddle.TaskError) as info:
                await poor.aget(timeout=30)
            first = await client.AsyncResult(poor.nodes()["first"].task_id).aget(timeout=5)
        await app.aclose()
        await client.aclose()
        assert len(cloud.requests) == 3  # two for the rich goal, one for the poor one
    spent = sonnet_cost(1000, 100)
    assert rich.record.meta["cost_usd"] == pytest.approx(spent + sonnet_cost(500, 50))
    assert rich.record.meta["budget_usd"] == 0.01
    costs = {row["name"]: row["cost_usd"] for row in rich.record.meta["timeline"]}
    assert costs == {"first": pytest.approx(spent), "second": pytest.approx(sonnet_cost(500, 50))}
    assert first == {"label": "positive"}
    assert info.value.type_name == "heddle.errors.BudgetExceeded"
    assert info.value.remote_message == (
        "stage 'second' failed: budget exceeded: the goal's model calls have spent $0.0045 of its budget_usd "
        "$0.004; stage 'second' was not sent")
    assert (poor.record.meta["cost_usd"], poor.record.meta["budget_usd"]) == (pytest.approx(spent), 0.004)
    # The first stage was sent with the goal's whole budget as its own.
    assert client.AsyncResult(poor.nodes()["first"].task_id).record.meta["budget_usd"] == 0.004


def test_heddle_submit_takes_budget_usd_and_prints_the_goals_cost(tmp_path, heddle_servers):
    with FakeProvider("anthropic") as cloud:
        app, name = _anthropic_worker(tmp_path, cloud, heddle_servers)
        path = tmp_path / "twice.yaml"
        path.write_text(textwrap.dedent(PIPELINE.format(budget=1, name=name)))
        cloud.add(Reply(text='{"label": "positive"}', input_tokens=1000, output_tokens=100))
        env = {**os.environ, "NATS_URL": heddle_servers.nats_url, "VALKEY_URL": heddle_servers.valkey_url,
               "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
        from heddle.testing import running_worker
        from heddle.testing.orchestrators import running_orchestrator

        with running_worker(app), running_orchestrator(app):
            out = subprocess.run(
                [sys.executable, "-m", "heddle", "submit", str(path), "--timeout", "30", "--quiet",
                 "--budget-usd", "0.004", "--input", json.dumps({"text": "Great."})],
                capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path)
        app.close()
        assert len(cloud.requests) == 1
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cost $0.0045 of budget_usd $0.004" in out.stdout
    assert "cost" in out.stdout.split("timeline", 1)[1].splitlines()[2]  # the table's cost column
    assert "$0.0045" in out.stdout
    assert "stage 'second' failed: budget exceeded: the goal's model calls have spent $0.0045" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "heddle", "submit", str(path), "--budget-usd", "-1"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2 and "must be US dollars > 0" in bad.stderr


async def test_a_python_tasks_budget_from_apply_async_holds_across_its_model_calls(heddle_servers):
    with FakeProvider("anthropic") as cloud:
        _, settings = settings_for(cloud, model=SONNET)
        app = heddle.Heddle(f"py{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                            valkey_url=heddle_servers.valkey_url)

        @app.task
        async def ask_twice(question: str) -> list[str]:
            first = await complete(question, tier="standard", settings=settings)
            second = await complete(question + " Again.", tier="standard", settings=settings)
            return [first.text, second.text]

        cloud.add(Reply(text="Yes.", input_tokens=1000, output_tokens=100), Reply(text="Still yes."))
        async with aworker(app):
            r = ask_twice.apply_async(("Is 7 prime?",), budget_usd=0.004)
            with pytest.raises(heddle.TaskError) as info:
                await r.aget(timeout=30)
        await app.aclose()
        assert len(cloud.requests) == 1  # the first call spent $0.0045: the second was not made
    assert info.value.type_name == "heddle.errors.BudgetExceeded"
    assert info.value.remote_message.startswith(
        "budget exceeded: spent $0.0045 of the task's budget_usd $0.004; the next call (tier standard")
    assert (r.record.meta["cost_usd"], r.record.meta["llm_calls"]) == (pytest.approx(sonnet_cost(1000, 100)), 1)


async def test_a_stage_stopped_by_what_is_left_of_the_goals_budget_names_the_goals_spending_too(
    tmp_path, heddle_servers
):
    with FakeProvider("anthropic") as cloud:
        app, name = _anthropic_worker(tmp_path, cloud, heddle_servers)
        path = tmp_path / "twice.yaml"
        path.write_text(textwrap.dedent(PIPELINE.format(budget=0.0046, name=name)))
        client = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                               valkey_url=heddle_servers.valkey_url)
        # The first stage's reply is invalid; its repair would pass what is left of the goal's budget.
        cloud.add(Reply(text='{"label": "glad"}', input_tokens=1000, output_tokens=100))
        async with aworker(app, tier="standard"), aorchestrator(client):
            g = load_pipeline(path).apply_async({"text": "Great."}, app=client)
            with pytest.raises(heddle.TaskError) as info:
                await g.aget(timeout=30)
        await app.aclose()
        await client.aclose()
        assert len(cloud.requests) == 1
    message = info.value.remote_message
    assert message.startswith("stage 'first' failed: budget exceeded: spent $0.0045 of the task's budget_usd "
                              "$0.0046; the next repair call (tier standard")
    assert message.endswith("(the goal has spent $0.0045 of its budget_usd $0.0046)")
    assert g.record.meta["cost_usd"] == pytest.approx(sonnet_cost(1000, 100))
