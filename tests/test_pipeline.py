"""YAML pipelines: validation with every error and its line, running stages as a DAG, `heddle submit`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import heddle
from heddle.graphs.model import PipelineNode, StageSpec
from heddle.graphs.pipeline import Pipeline, PipelineError, load_pipeline, validate_pipeline_file
from heddle.testing import EmbeddedServers, running_worker
from heddle.testing.orchestrators import running_orchestrator
from tests.apps.graphs import define
from tests.conftest import ROOT

T = 20


def write(tmp_path: Path, text: str, name: str = "pipeline.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


# -- validation ------------------------------------------------------------------------------

INVALID = """
name: claims
stages:
  - name: extract
    task: graphs.extract
    worker_type: extractor
    input_mapping:
      text: goal.context.text
  - name: verify
    worker_type: verifier
    tier: huge
    input_mapping:
      claims: extrct.output.claims
      note: just words
    condition: "__import__('os')"
  - name: a
    task: graphs.count
    input_mapping: {claims: b.output.claims}
  - name: b
    task: graphs.count
    input_mapping: {claims: a.output.claims}
    timeout_seconds: -1
    retries: two
    colour: red
  - worker_type: nameless
  - name: a
    task: graphs.count
output_mapping:
  nope: missing.output
"""


def test_an_invalid_pipeline_file_reports_every_error_with_its_line(tmp_path):
    path = write(tmp_path, INVALID)
    issues = validate_pipeline_file(path)
    found = {(i.line, i.message.split(";")[0]) for i in issues}
    expected = {
        (3, "stage 'extract' has both worker_type and task"),
        (10, "stage 'verify' tier must be one of local, standard, frontier, got 'huge'"),
        (12, "stage 'verify' input_mapping.claims refers to unknown stage 'extrct' (did you mean 'extract'?)"),
        (13, "stage 'verify' input_mapping.note: 'just words' is not a path"),
        (14, "stage 'verify' condition \"__import__('os')\": Call is not allowed"),
        (15, "stages form a cycle: a -> b -> a"),
        (21, "stage 'b' timeout_seconds must be a number of seconds > 0, got -1"),
        (22, "stage 'b' retries must be a whole number from 0 to 20, got 'two'"),
        (23, "stage 'b': unknown key 'colour'"),
        (24, "stages[4] has no name"),
        (25, "stage name 'a' is used twice (first at stages[2])"),
        (28, "output_mapping.nope refers to unknown stage 'missing'"),
    }
    assert found == expected, "\n".join(map(str, issues))
    assert all(i.file == str(path) for i in issues)
    with pytest.raises(PipelineError) as info:
        load_pipeline(path)
    assert len(info.value.issues) == len(expected)


def test_heddle_validate_prints_every_error_with_file_and_line_and_exits_non_zero(tmp_path):
    bad = write(tmp_path, INVALID, "bad.yaml")
    good = write(tmp_path, """
        name: ok
        stages:
          - name: one
            task: graphs.extract
            input_mapping: {text: goal.context.text}
    """, "good.yaml")
    broken = write(tmp_path, "name: x\nstages: [\n", "broken.yaml")
    out = subprocess.run(
        [sys.executable, "-m", "heddle", "validate", str(bad), str(good), str(broken)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert sum(line.startswith(f"{bad}:") for line in lines) == 12
    assert f"{bad}:15: stages form a cycle: a -> b -> a" in lines
    assert any(line.startswith(f"{broken}:") and "invalid YAML" in line for line in lines)
    assert f"ok      {good}: pipeline 'ok'" in lines
    ok = subprocess.run([sys.executable, "-m", "heddle", "validate", str(good)],
                        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_a_pipeline_built_in_code_is_checked_too():
    with pytest.raises(PipelineError, match="stages form a cycle: x -> x"):
        Pipeline(PipelineNode(name="p", stages=[StageSpec(name="x", task="t", input_mapping={"v": "x.output"})]))


# -- running -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def p(heddle_servers: EmbeddedServers) -> Iterator[SimpleNamespace]:
    """The graph test tasks and a one-dict "LLM-like" worker type, with worker, router and orchestrator."""
    url = {"nats_url": heddle_servers.nats_url, "valkey_url": heddle_servers.valkey_url}
    app = heddle.Heddle(f"p{uuid.uuid4().hex[:10]}", **url)
    tasks = define(app)
    # Shaped like a YAML LLM worker: worker type = task name, one dict in, one dict out.
    llm = heddle.Heddle(f"summ{uuid.uuid4().hex[:8]}", **url)

    @llm.task(name=llm.name)
    def summarize(payload: dict) -> dict:
        return {"summary": " ".join(str(payload["text"]).split()[:3]), "given": sorted(payload)}

    with running_worker(app, concurrency=16), running_worker(llm, concurrency=4), running_orchestrator(app):
        yield SimpleNamespace(app=app, llm=llm, **vars(tasks))
    llm.close()
    app.close()


PARALLEL = """
name: parallel
stages:
  - name: extract
    task: graphs.extract
    input_mapping:
      text: goal.context.text
  - name: left
    task: graphs.pause
    input_mapping: {label: "'left'", seconds: 0.6}
    depends_on: [extract]
  - name: right
    task: graphs.pause
    input_mapping: {label: "'right'", seconds: 0.6}
    depends_on: [extract]
  - name: summary
    worker_type: {llm}
    tier: local
    input_mapping:
      text: goal.context.text
      claims: extract.output.claims
  - name: count
    task: graphs.count
    input_mapping:
      claims: extract.output.claims
      note: "'counted'"
    condition: "len(extract.output.claims) > 1 and goal.context.lang == 'en'"
  - name: never
    task: graphs.count
    input_mapping: {claims: extract.output.claims}
    condition: "extract.output.words > 1000"
  - name: after_never
    task: graphs.count
    input_mapping: {claims: never.output.claims}
output_mapping:
  claims: extract.output.claims
  count: count.output.n
  summary: summary.output.summary
  never: never.output
  sides: ["'constant'", 2]
"""


def test_independent_stages_run_concurrently_and_conditions_skip_stages(p, tmp_path):
    path = write(tmp_path, PARALLEL.replace("{llm}", p.llm.name))
    pipeline = load_pipeline(path)
    assert pipeline.plan.stages["left"].deps == {"extract"}
    r = pipeline.apply_async({"text": "One claim here. Another claim there.", "lang": "en"}, app=p.app)
    out = r.get(timeout=T)
    assert out == {
        "claims": ["One claim here", "Another claim there"],
        "count": 2,
        "summary": "One claim here.",
        "never": None,
        "sides": ["'constant'", 2],
    }
    timeline = {row["name"]: row for row in r.timeline()}
    assert set(timeline) == {"extract", "left", "right", "summary", "count", "never", "after_never"}
    left, right = timeline["left"], timeline["right"]
    # Both waited 0.6 s; they overlapped rather than ran one after the other.
    assert left["started"] < right["ended"] and right["started"] < left["ended"]
    assert left["started"] >= timeline["extract"]["ended"]
    assert timeline["never"]["state"] == "skipped" and "is false" in timeline["never"]["reason"]
    assert timeline["after_never"]["state"] == "skipped" and "never" in timeline["after_never"]["reason"]
    assert timeline["count"]["state"] == "succeeded"
    assert timeline["summary"]["tier"] == "local"
    assert all(timeline[n]["worker"] for n in ("extract", "left", "right", "summary", "count"))
    assert all(timeline[n]["wall_s"] >= 0.5 for n in ("left", "right"))
    # Each stage's own result is inspectable; a skipped one resolves to None.
    assert r.node("summary").get(timeout=1) == {"summary": "One claim here.", "given": ["claims", "text"]}
    assert r.node("never").get(timeout=1) is None
    assert r.children[0].get(timeout=1)["words"] == 6


def test_a_failing_stage_fails_the_pipeline_naming_the_stage(p, tmp_path):
    path = write(tmp_path, """
        name: failing
        stages:
          - name: extract
            task: graphs.extract
            input_mapping: {text: goal.context.text}
          - name: explode
            task: graphs.fail
            input_mapping: {reason: extract.output.lang}
          - name: later
            task: graphs.count
            input_mapping: {claims: extract.output.claims}
            depends_on: [explode]
    """)
    r = load_pipeline(path).apply_async({"text": "a. b."}, app=p.app)
    with pytest.raises(heddle.TaskError) as info:
        r.get(timeout=T)
    assert "stage 'explode' failed" in info.value.remote_message
    assert info.value.type_name == "builtins.TypeError"  # fail() takes no keyword 'reason'
    assert "later" not in r.nodes()


def test_a_missing_input_path_fails_the_stage_with_what_is_there(p, tmp_path):
    path = write(tmp_path, """
        name: missing
        stages:
          - name: extract
            task: graphs.extract
            input_mapping: {text: goal.context.body}
    """)
    r = load_pipeline(path).apply_async({"text": "x"}, app=p.app)
    expected = r"stage 'extract' failed: goal\.context\.body: .* no key 'body' \(keys: text\)"
    with pytest.raises(heddle.TaskError, match=expected):
        r.get(timeout=T)


def test_stage_retries_run_again_under_a_new_task_id(p, tmp_path, monkeypatch):
    path = write(tmp_path, f"""
        name: retrying
        stages:
          - name: flaky
            task: graphs.flaky
            retries: 1
            input_mapping: {{key: "'{uuid.uuid4().hex}'"}}
    """)
    monkeypatch.setenv("HEDDLE_TEST_LOG", str(tmp_path / "log"))  # flaky keeps its marker next to it
    r = load_pipeline(path).apply_async({}, app=p.app)
    assert r.get(timeout=T)["flaky"].startswith("ok ")
    state = r.nodes()["flaky"]
    assert state.attempt == 1 and state.task_id.endswith(":flaky~1")
    assert r.node("flaky").get(timeout=1).startswith("ok ")


def test_a_stage_that_times_out_is_revoked_and_fails(p, tmp_path):
    path = write(tmp_path, """
        name: slowpoke
        stages:
          - name: sleepy
            task: graphs.pause
            input_mapping: {label: "'z'", seconds: 30}
            timeout_seconds: 0.5
    """)
    r = load_pipeline(path).apply_async({}, app=p.app)
    with pytest.raises(heddle.TaskError, match=r"stage 'sleepy' failed: no result within 0.5s"):
        r.get(timeout=T)
    assert p.app.AsyncResult(r.nodes()["sleepy"].task_id).state == heddle.REVOKED


# -- heddle submit -------------------------------------------------------------------------------


def test_heddle_submit_runs_a_pipeline_and_prints_its_timeline(p, tmp_path, heddle_servers):
    path = write(tmp_path, PARALLEL.replace("{llm}", p.llm.name))
    module = tmp_path / "submitapp.py"
    module.write_text(f"import heddle\napp = heddle.Heddle({p.app.name!r})\n")
    env = {**os.environ, "NATS_URL": heddle_servers.nats_url, "VALKEY_URL": heddle_servers.valkey_url,
           "PYTHONPATH": f"{tmp_path}:{ROOT}", "COLUMNS": "200"}
    cmd = [sys.executable, "-m", "heddle", "submit", str(path), "-A", "submitapp", "--timeout", "30",
           "--input", json.dumps({"text": "First. Second.", "lang": "en"})]
    out = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["state"] == "SUCCESS"
    assert doc["output"]["count"] == 2
    rows = {row["name"]: row for row in doc["timeline"]}
    assert rows["never"]["state"] == "skipped"
    assert {"started", "ended", "wall_s", "tier", "worker"} <= set(rows["left"])
    assert "submitted goal" in out.stderr and "extract" in out.stderr  # the live stage table
    table = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert table.returncode == 0, table.stdout + table.stderr
    assert "timeline parallel" in table.stdout
    for word in ("stage", "started", "ended", "wall", "tier", "worker", "left", "skipped"):
        assert word in table.stdout
    bad = subprocess.run([*cmd[:-2], "--input", "[1, 2]"], capture_output=True, text=True, timeout=60, env=env)
    assert bad.returncode == 2
    assert "must be a JSON object" in bad.stderr


def test_heddle_submit_without_dash_a_sends_python_stages_to_the_live_workers_that_run_them(
    p, tmp_path, heddle_servers
):
    # #21 item 4: the running workers announce their tasks; -A is an option, not a requirement.
    path = write(tmp_path, PARALLEL.replace("{llm}", p.llm.name))
    env = {**os.environ, "NATS_URL": heddle_servers.nats_url, "VALKEY_URL": heddle_servers.valkey_url,
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "heddle", "submit", str(path), "--timeout", "30", "--json",
           "--input", json.dumps({"text": "First. Second.", "lang": "en"})]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout)["output"]["count"] == 2
    nowhere = write(tmp_path, "name: nowhere\nstages:\n  - name: a\n    task: nobody.tasks.nothing\n", "nowhere.yaml")
    bad = subprocess.run([sys.executable, "-m", "heddle", "submit", str(nowhere), "--timeout", "5"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path)
    assert bad.returncode == 2
    assert "no live worker offers task 'nobody.tasks.nothing' (start one: heddle-worker -A nobody.tasks)" in bad.stderr
