"""The Workshop's Pipelines pages: listing, the stage graph, running one and watching it, server side."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from heddle import Heddle
from heddle.graphs.model import PipelineNode, StageSpec
from heddle.graphs.pipeline import Pipeline, load_pipeline
from heddle.registry import WorkerInfo
from heddle.testing import EmbeddedServers, running_worker
from heddle.testing.orchestrators import running_orchestrator
from heddle.workshop.pipelines import RunProblem, find_pipelines, layout, parse_input, resolve_stages
from heddle.workshop.web import CSP
from tests.conftest import wait_for
from tests.workshop_support import XSS, post, running_workshop

PIPELINE = """
name: {name}
description: Claims are extracted, then counted while a pause runs beside it.
stages:
  - name: extract
    task: {prefix}.extract
    input_mapping:
      text: goal.context.text
  - name: count
    task: {prefix}.count
    input_mapping:
      claims: extract.output.claims
      note: goal.context.note
  - name: wait
    task: {prefix}.pause
    input_mapping:
      seconds: {seconds}
    depends_on: [extract]
  - name: never
    task: {prefix}.count
    input_mapping:
      claims: extract.output.claims
    condition: "extract.output.words > 1000"
output_mapping:
  n: count.output.n
  note: count.output.note
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def define(app: Heddle, prefix: str) -> None:
    """Pipeline stage tasks under names of their own, so no other test's worker offers them."""

    @app.task(name=f"{prefix}.extract")
    def extract(text: str) -> dict[str, Any]:
        claims = [s.strip() for s in text.split(".") if s.strip()]
        return {"claims": claims, "words": len(text.split())}

    @app.task(name=f"{prefix}.count")
    def count(claims: list[str], note: str = "") -> dict[str, Any]:
        return {"n": len(claims), "note": note}

    @app.task(name=f"{prefix}.pause")
    async def pause(seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds


def info(worker_type: str, tasks: list[str]) -> WorkerInfo:
    return WorkerInfo(id=f"{worker_type}-1", worker_type=worker_type, tiers=["*"], default_tier="local",
                      concurrency=1, host="h", pid=1, version="0", started_at=time.time(), tasks=tasks)


# -- finding, drawing, checking input: no servers needed ------------------------------------------


def test_pipelines_are_found_and_broken_files_are_listed_with_every_problem(tmp_path: Path) -> None:
    write(tmp_path / "pipelines" / "good.yaml", PIPELINE.format(seconds=0.2, name="good", prefix="p"))
    write(tmp_path / "pipelines" / "broken.yaml", "name: broken\nstages: [\n")
    write(tmp_path / "invalid.yaml", """
        name: invalid
        stages:
          - name: a
            task: p.count
            input_mapping: {claims: nope.output}
          - name: a
            task: p.count
    """)
    write(tmp_path / "pipelines" / "later.yaml", PIPELINE.format(seconds=0.2, name="good", prefix="q"))
    write(tmp_path / "worker.yaml", "name: not_a_pipeline\nsystem_prompt: hi\n")
    found = {(f.name, f.path.name): f for f in find_pipelines([tmp_path])}
    assert set(found) == {("good", "good.yaml"), ("broken", "broken.yaml"), ("invalid", "invalid.yaml"),
                          ("good", "later.yaml")}
    good = found["good", "good.yaml"]
    assert good.pipeline is not None and not good.issues and good.shadowed_by is None
    assert good.description.startswith("Claims are extracted")
    assert found["good", "later.yaml"].shadowed_by == good.path
    broken = found["broken", "broken.yaml"]
    assert broken.pipeline is None and any("invalid YAML" in i.message for i in broken.issues)
    invalid = found["invalid", "invalid.yaml"]
    messages = [i.message for i in invalid.issues]
    assert any("unknown stage 'nope'" in m for m in messages) and any("used twice" in m for m in messages)
    assert all(i.line > 0 for i in invalid.issues)


def test_the_stage_graph_puts_each_stage_one_column_past_what_it_waits_for(tmp_path: Path) -> None:
    pipeline = load_pipeline(write(tmp_path / "p.yaml", PIPELINE.format(seconds=0.2, name="g", prefix="p")))
    graph = layout(pipeline.plan)
    x = {b.name: b.x for b in graph.boxes}
    assert x["extract"] < x["count"] == x["wait"] == x["never"]
    assert len(graph.edges) == 3  # extract -> count, wait, never
    assert sum(e.ordering_only for e in graph.edges) == 1  # wait only depends_on extract
    assert max(b.x for b in graph.boxes) < graph.width and max(b.y for b in graph.boxes) < graph.height
    assert layout(pipeline.plan) == graph


def test_bad_input_is_refused_with_what_to_fix(tmp_path: Path) -> None:
    node = load_pipeline(write(tmp_path / "p.yaml", PIPELINE.format(seconds=0.2, name="g", prefix="p"))).node
    with pytest.raises(RunProblem, match=r"not JSON: .* line 1, column 10"):
        parse_input('{"text": ', node)
    with pytest.raises(RunProblem, match=r"must be a JSON object.*got list"):
        parse_input("[1]", node)
    with pytest.raises(RunProblem, match=r"lacks 'note' \(read by count\)"):
        parse_input('{"text": "a. b."}', node)
    assert parse_input('{"text": "a", "note": "n"}', node) == {"text": "a", "note": "n"}


def test_a_stage_no_live_worker_can_run_is_named_with_the_command_to_start_one() -> None:
    node = PipelineNode(name="p", stages=[
        StageSpec(name="a", task="shop.tasks.a"),
        StageSpec(name="b", worker_type="summarizer", input_mapping={"text": "a.output"}),
        StageSpec(name="c", task="shop.tasks.c"),
    ])
    Pipeline(node)  # valid as a file: only the live workers are missing
    with pytest.raises(RunProblem) as problem:
        resolve_stages(node, [info("shop", ["shop.tasks.a"])])
    said = str(problem.value)
    assert "stage 'b': no live worker of type 'summarizer'" in said
    assert "heddle worker --config configs/workers/summarizer.yaml" in said
    assert "stage 'c': no live worker offers task 'shop.tasks.c' (start one: heddle-worker -A shop.tasks)" in said
    resolved = resolve_stages(node, [info("shop", ["shop.tasks.a", "shop.tasks.c"]), info("summarizer", [])])
    assert [s.task_worker_type for s in resolved.stages] == ["shop", None, "shop"]


# -- the pages, with a real worker and orchestrator ---------------------------------------------------


@contextlib.contextmanager
def pipelines_running(servers: EmbeddedServers, tmp_path: Path, pause_s: float = 0.2) -> Iterator[SimpleNamespace]:
    """A Workshop whose config directory holds two pipelines, with a worker and an orchestrator.

    ``claims`` can run (its ``wait`` stage sleeps ``pause_s``); ``orphan`` names tasks no worker offers.
    """
    prefix = f"pl{uuid.uuid4().hex[:8]}"
    app = Heddle(prefix, nats_url=servers.nats_url, valkey_url=servers.valkey_url)
    define(app, prefix)
    write(tmp_path / "pipelines" / "claims.yaml", PIPELINE.format(seconds=pause_s, name="claims", prefix=prefix))
    write(tmp_path / "pipelines" / "orphan.yaml", PIPELINE.format(seconds=0.2, name="orphan", prefix=f"{prefix}x"))
    with (
        running_worker(app),
        running_orchestrator(app),
        running_workshop(servers, config_dirs=[tmp_path]) as ws,
        httpx.Client(base_url=ws.url, timeout=10) as client,
    ):
        wait_for(lambda: ws.registry is not None and any(w.worker_type == prefix for w in ws.registry.workers()),
                 10, "the worker to be registered")
        yield SimpleNamespace(app=app, ws=ws, client=client, prefix=prefix)
    app.close()


@pytest.fixture
def running(heddle_servers: EmbeddedServers, tmp_path: Path) -> Iterator[SimpleNamespace]:
    with pipelines_running(heddle_servers, tmp_path) as r:
        yield r


def test_the_list_and_the_pipeline_page_show_stages_as_a_graph(running: SimpleNamespace) -> None:
    c = running.client
    r = c.get("/pipelines")
    assert r.status_code == 200 and r.headers["content-security-policy"] == CSP
    assert 'href="/pipelines/claims"' in r.text and 'href="/pipelines/orphan"' in r.text
    page = c.get("/pipelines/claims")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    for stage in ("extract", "count", "wait", "never"):
        assert f'data-stage="{stage}"' in page.text
    assert page.text.count('class="edge') == 3 and "<svg" in page.text
    assert "extract.output.words &gt; 1000" in page.text  # conditions are shown, escaped
    assert "text, note" in page.text  # the input keys the stages read
    assert c.get("/pipelines/nope").status_code == 404
    assert c.get("/pipelines/runs/" + uuid.uuid4().hex).status_code == 404


def test_a_run_needs_the_csrf_token_good_input_and_a_live_worker_for_every_stage(running: SimpleNamespace) -> None:
    c, ws = running.client, running.ws
    r = c.post("/pipelines/claims/runs", data={"input": '{"text": "a", "note": "n"}'})
    assert r.status_code == 403 and "CSRF" in r.text
    r = post(c, ws, "/pipelines/claims/runs", {"input": '{"text": "a."}'})
    assert r.status_code == 422 and "lacks &#39;note&#39; (read by count)" in r.text
    r = post(c, ws, "/pipelines/orphan/runs", {"input": '{"text": "a", "note": "n"}'})
    assert r.status_code == 422 and "no live worker offers task" in r.text
    assert "heddle-worker -A " + html.escape(running.prefix) + "x" in r.text


def test_a_run_from_the_page_completes_with_each_stage_and_its_timing_shown(running: SimpleNamespace) -> None:
    c, ws = running.client, running.ws
    r = post(c, ws, "/pipelines/claims/runs", {"input": json.dumps({"text": "One. Two. Three.", "note": XSS})})
    assert r.status_code == 303, r.text
    where = r.headers["location"]
    assert where.startswith("/pipelines/runs/")
    goal_id = where.rsplit("/", 1)[1]
    fragment = f"/fragments/pipeline-run/{goal_id}"
    wait_for(lambda: 'data-state="SUCCESS"' in c.get(fragment).text, 20, "the run to succeed")
    page = c.get(where)
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    text = page.text
    for stage, status in (("extract", "succeeded"), ("count", "succeeded"), ("wait", "succeeded"),
                          ("never", "skipped")):
        assert f'data-stage="{stage}" data-status="{status}"' in text, stage
    assert "4 of 4 stages done" in text
    assert html.escape(XSS) in text and XSS not in text  # the note comes back in the output, as text
    assert '&#34;n&#34;: 3' in text or "&quot;n&quot;: 3" in text
    # Each finished stage has its start, end and wall time.
    row = text.split('<tr class="status-succeeded" data-stage="wait"', 1)[1].split("</tr>", 1)[0]
    assert row.count(" s</td>") == 1 and "0.2" in row
    # The list of runs started here links to it.
    assert f'href="/pipelines/runs/{goal_id}"' in c.get("/pipelines/claims").text


def test_an_htmx_run_is_sent_to_its_run_page_and_its_progress_is_announced(running: SimpleNamespace) -> None:
    c, ws = running.client, running.ws
    with c.stream("GET", "/events/stream") as stream:
        r = c.post("/pipelines/claims/runs", data={"input": '{"text": "x.", "note": ""}'},
                   headers={"X-CSRF-Token": ws.csrf_token, "HX-Request": "true"})
        assert r.status_code == 204, r.text
        goal_id = r.headers["hx-redirect"].rsplit("/", 1)[1]
        deadline = time.monotonic() + 20  # keepalives every second let the loop check it
        last = ""
        for line in stream.iter_lines():
            if line == f"data: {goal_id}" and last == "event: goal":
                break
            last = line
            assert time.monotonic() < deadline, "no goal event was announced for the run"
