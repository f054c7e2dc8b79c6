"""Memoized stages (cache: true) and reruns of a finished goal from one stage (heddle goals rerun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import heddle
from heddle.graphs.pipeline import load_pipeline, validate_pipeline_file
from heddle.llm import worker_app
from heddle.testing import aworker, running_worker
from heddle.testing.orchestrators import aorchestrator, running_orchestrator
from tests.conftest import ROOT
from tests.fake_providers import FakeProvider, Reply, settings_for
from tests.test_llm_worker import write_config

CACHED = """
name: cached
stages:
  - name: label
    worker_type: {name}
    input_mapping: {{text: goal.context.text}}
    cache: true
"""


def servers_of(s):
    return {"nats_url": s.nats_url, "valkey_url": s.valkey_url}


async def test_a_cached_stage_is_not_sent_again_for_the_same_input_config_and_model(tmp_path, heddle_servers):
    path, name = write_config(tmp_path)
    file = tmp_path / "cached.yaml"
    file.write_text(textwrap.dedent(CACHED.format(name=name)))
    pipeline = load_pipeline(file)
    assert pipeline.node.stages[0].cache_ttl_s == 86_400
    client = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", **servers_of(heddle_servers))
    with FakeProvider("ollama") as p:
        p.add(*(Reply(text='{"label": "positive"}') for _ in range(4)))

        async def run(app, text):
            async with aworker(app, tier="local"):
                g = pipeline.apply_async({"text": text}, app=client)
                assert await g.aget(timeout=30) == {"label": {"label": "positive"}}
                return client.AsyncResult(g.nodes()["label"].task_id)

        async with aorchestrator(client):
            app = worker_app(path, "local", llm_settings=settings_for(p, model="m1")[1], **servers_of(heddle_servers))
            first = await run(app, "Sunny.")
            await first.aget(timeout=5)
            assert first.record.meta["cache"] == "miss" and len(p.requests) == 1
            again = await run(app, "Sunny.")
            await again.aget(timeout=5)
            assert len(p.requests) == 1  # answered from Valkey
            meta = again.record.meta
            assert (meta["cache"], meta["cached_from"], meta["llm_calls"], meta["cost_usd"]) == (
                "hit", first.id, 0, 0.0)
            await run(app, "Rainy.")  # another input
            assert len(p.requests) == 2
            await app.aclose()
            write_config(tmp_path, name=name, system_prompt="Label the mood of the text.")
            changed = worker_app(path, "local", llm_settings=settings_for(p, model="m1")[1],
                                 **servers_of(heddle_servers))
            await run(changed, "Sunny.")  # another config
            assert len(p.requests) == 3
            await changed.aclose()
            other_model = worker_app(path, "local", llm_settings=settings_for(p, model="m2")[1],
                                     **servers_of(heddle_servers))
            await run(other_model, "Sunny.")  # another model
            assert len(p.requests) == 4
            await other_model.aclose()
    await client.aclose()
    assert [r.body["model"] for r in p.requests] == ["m1", "m1", "m1", "m2"]


def test_heddle_validate_takes_cache_on_worker_stages_and_names_a_misspelling(tmp_path):
    file = tmp_path / "p.yaml"
    file.write_text(textwrap.dedent("""
        name: p
        stages:
          - name: a
            worker_type: w
            cache: {ttl_seconds: 600}
          - name: b
            worker_type: w
            cache: sometimes
          - name: c
            task: t.c
            cache: true
          - name: d
            worker_type: w
            cahce: true
    """).lstrip())
    found = [(i.line, i.message) for i in validate_pipeline_file(file)]
    assert found[0] == (8, "stage 'b' cache must be true, false or {ttl_seconds: N} (1 to 31536000), got 'sometimes'")
    assert found[1][0] == 11 and found[1][1].startswith("stage 'c' cache applies to worker_type stages")
    assert found[2][0] == 14 and "unknown key 'cahce' (did you mean 'cache'?)" in found[2][1]
    assert len(found) == 3
    file.write_text("name: p\nstages:\n  - name: a\n    worker_type: w\n    cache: {ttl_seconds: 600}\n")
    assert load_pipeline(file).node.stages[0].cache_ttl_s == 600


RERUN = """
name: chain
stages:
  - name: first
    worker_type: {name}
    tier: local
    input_mapping: {{text: goal.context.text}}
  - name: side
    worker_type: {name}
    tier: local
    input_mapping: {{text: goal.context.text}}
  - name: second
    worker_type: {name}
    tier: local
    input_mapping: {{text: first.output.label}}
  - name: third
    worker_type: {name}
    tier: local
    input_mapping: {{text: second.output.label, note: goal.context.note}}
"""


def label(word):
    return Reply(text=json.dumps({"label": word}))


def test_heddle_goals_rerun_reuses_the_stages_before_and_sends_only_the_stage_and_those_after(
    tmp_path, heddle_servers
):
    path, name = write_config(tmp_path)
    file = tmp_path / "chain.yaml"
    file.write_text(textwrap.dedent(RERUN.format(name=name)))
    client = heddle.Heddle(f"c{uuid.uuid4().hex[:8]}", **servers_of(heddle_servers))
    env = {**os.environ, "NATS_URL": heddle_servers.nats_url, "VALKEY_URL": heddle_servers.valkey_url,
           "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    rerun = [sys.executable, "-m", "heddle", "goals", "rerun"]
    with FakeProvider("ollama") as p:
        app = worker_app(path, "local", llm_settings=settings_for(p, model="m1")[1], **servers_of(heddle_servers))
        # first and side run at once with the same input, so either may ask first: both get
        # the same answer. Then second (after first) and third (after second).
        p.add(label("positive"), label("positive"), label("negative"), label("neutral"))
        with running_worker(app), running_orchestrator(client):
            g = load_pipeline(file).apply_async({"text": "Sunny.", "note": "old"}, app=client)
            assert g.get(timeout=30)["third"] == {"label": "neutral"}
            assert len(p.requests) == 4
            sent_before = {json.loads(r.body["messages"][-1]["content"])["text"] for r in p.requests}
            assert sent_before == {"Sunny.", "positive", "negative"}
            p.add(label("negative"), label("positive"))
            new_input = tmp_path / "input.json"
            new_input.write_text(json.dumps({"text": "Ignored: first is reused.", "note": "new"}))
            out = subprocess.run([*rerun, g.id, "--from", "second", "--input", str(new_input), "--timeout", "30",
                                  "--json"], capture_output=True, text=True, timeout=90, env=env, cwd=tmp_path)
            assert out.returncode == 0, out.stdout + out.stderr
            doc = json.loads(out.stdout)
            # Only second and third reached the provider, with first's stored output and the new note.
            assert len(p.requests) == 6
            second, third = (json.loads(r.body["messages"][-1]["content"]) for r in p.requests[4:])
            assert second == {"text": "positive"}
            assert third == {"text": "negative", "note": "new"}
            assert (doc["rerun_of"], doc["from_stage"], doc["reused"], doc["sent"]) == (
                g.id, "second", ["first", "side"], ["second", "third"])
            assert doc["state"] == "SUCCESS" and doc["goal_id"] != g.id
            assert doc["output"] == {"first": {"label": "positive"}, "side": {"label": "positive"},
                                     "second": {"label": "negative"}, "third": {"label": "positive"}}
            rows = {r["name"]: r for r in doc["timeline"]}
            assert rows["first"]["reason"] == f"reused from {g.id}:first"
            assert rows["side"]["reason"] == f"reused from {g.id}:side"
            assert "reason" not in rows["second"] and "reason" not in rows["third"]
            new = client.AsyncResult(f"{doc['goal_id']}:first")
            assert new.get(timeout=5) == {"label": "positive"} and new.record.meta["reused_from"] == f"{g.id}:first"
            p.add(label("neutral"))
            table = subprocess.run([*rerun, g.id, "--from", "third", "--quiet"], capture_output=True, text=True,
                                   timeout=90, env=env, cwd=tmp_path)
            assert table.returncode == 0, table.stdout + table.stderr
            assert len(p.requests) == 7 and "timeline chain" in table.stdout
            assert f"reused from {g.id}:second" in table.stdout
            typo = subprocess.run([*rerun, g.id, "--from", "secnd"], capture_output=True, text=True, timeout=60,
                                  env=env, cwd=tmp_path)
            assert typo.returncode != 0
            assert ("pipeline 'chain' has no stage 'secnd' (did you mean 'second'?); its stages: first, side, "
                    "second, third") in typo.stderr
            nowhere = subprocess.run([*rerun, "no-such-goal", "--from", "second"], capture_output=True, text=True,
                                     timeout=60, env=env, cwd=tmp_path)
            assert nowhere.returncode != 0 and "no goal no-such-goal: it never ran" in nowhere.stderr
            assert len(p.requests) == 7
        app.close()
    client.close()
