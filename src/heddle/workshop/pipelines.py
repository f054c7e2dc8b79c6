"""The Workshop's Pipelines pages: YAML pipelines as stage graphs, run with input, watched live.

Pipelines are the YAML files under the Workshop's config directories (``*.yaml``
and ``pipelines/*.yaml``) that have ``stages``; a file that does not validate
is listed with every problem and its line, and cannot be run.

A run is a goal like any other (``heddle submit`` sends the same message): the
page resolves each ``task`` stage to the worker type of a live worker that
offers it, refuses to send when a stage has no live worker, and follows the
goal's checkpoint in Valkey. The orchestrator announces every node transition
on ``heddle.events.goals.{id}``; the Workshop turns each into an SSE ``goal``
message, and the run's fragment (``data-watch-goal``) refreshes.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from heddle.configfile import ConfigIssue, load_yaml
from heddle.errors import ConfigError, HeddleError
from heddle.graphs.model import DISPATCHED, NODE_FINAL_STATES, SUCCEEDED, PipelineNode, StageSpec
from heddle.graphs.pipeline import Pipeline, PipelineError, Plan, build_plan, load_pipeline, looks_like_pipeline
from heddle.messages import READY_STATES
from heddle.send import usd
from heddle.workshop.web import Pages

if TYPE_CHECKING:
    from heddle.connections import Connections
    from heddle.messages import ResultRecord
    from heddle.registry import WorkerInfo
    from heddle.workshop.server import Workshop

_CONTEXT_REF = re.compile(r"\bgoal\.context\.([A-Za-z_][A-Za-z0-9_]*)")
_MAX_RUNS = 200  # runs started from this Workshop that it remembers (their checkpoints live in Valkey)


# -- finding pipelines -----------------------------------------------------------------------------


@dataclass
class FoundPipeline:
    """A pipeline file under the config directories: valid (``pipeline``) or not (``issues``)."""

    name: str
    path: Path
    pipeline: Pipeline | None = None
    issues: list[ConfigIssue] = field(default_factory=list)
    description: str = ""
    shadowed_by: Path | None = None  # another file of the same name came first


def find_pipelines(dirs: list[Path]) -> list[FoundPipeline]:
    """Every pipeline file in ``dirs`` (``*.yaml`` that have ``stages``, and all of ``pipelines/*.yaml``).

    A broken file under ``pipelines/`` is listed with its problems even when it
    does not parse; elsewhere only files that look like pipelines are.
    """
    found: dict[str, FoundPipeline] = {}
    extra: list[FoundPipeline] = []
    for base in dirs:
        top = sorted([*base.glob("*.yaml"), *base.glob("*.yml")])
        nested = sorted([*base.glob("pipelines/*.yaml"), *base.glob("pipelines/*.yml")])
        for path in [*top, *nested]:
            data, _ = load_yaml(path)
            if data is None and path not in nested:
                continue
            if data is not None and not looks_like_pipeline(data):
                continue
            name = str(data.get("name") or path.stem) if isinstance(data, dict) else path.stem
            about = data.get("description") if isinstance(data, dict) else None
            entry = FoundPipeline(name, path, description=about if isinstance(about, str) else "")
            try:
                entry.pipeline = load_pipeline(path)
            except PipelineError as exc:
                entry.issues = exc.issues
            if name in found:
                entry.shadowed_by = found[name].path
                extra.append(entry)
            else:
                found[name] = entry
    return sorted(found.values(), key=lambda f: f.name) + extra


def _context_reads(stage: StageSpec) -> list[str]:
    """The ``goal.context`` keys one stage reads (its input mapping and condition)."""
    texts = [json.dumps(v) for v in stage.input_mapping.values()] + [stage.condition or ""]
    return [key for text in texts for key in _CONTEXT_REF.findall(text)]


def context_keys(node: PipelineNode) -> list[str]:
    """The ``goal.context`` keys the stages read, in the order they first appear."""
    return list(dict.fromkeys(key for s in node.stages for key in _context_reads(s)))


def input_template(node: PipelineNode) -> str:
    """A JSON object with an empty string for every context key, to start the input from."""
    return json.dumps({k: "" for k in context_keys(node)}, indent=2)


class RunProblem(HeddleError):
    """Raised when a pipeline run cannot be sent: bad input, or a stage nobody can run."""


def parse_input(text: str, node: PipelineNode) -> dict[str, Any]:
    """The goal context from the page's JSON, with every missing key the stages read named."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as exc:
        raise RunProblem(
            f"the input is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}; "
            f'write an object such as {{"text": "..."}}'
        ) from None
    if not isinstance(value, dict):
        raise RunProblem(f"the input must be a JSON object (read as goal.context), got {type(value).__name__}")
    missing = [k for k in context_keys(node) if k not in value]
    if missing:
        readers = {k: [s.name for s in node.stages if k in _context_reads(s)] for k in missing}
        said = "; ".join(f"{k!r} (read by {', '.join(v)})" for k, v in readers.items())
        raise RunProblem(f"the input lacks {said}; add {'it' if len(missing) == 1 else 'them'} to the JSON object")
    return value


def resolve_stages(node: PipelineNode, workers: list[WorkerInfo]) -> PipelineNode:
    """The node with each ``task`` stage bound to a live worker's type (``Pipeline.resolved_by_workers``)."""
    try:
        return Pipeline(node).resolved_by_workers(workers)
    except ConfigError as exc:
        raise RunProblem(str(exc)) from None


# -- the stage graph --------------------------------------------------------------------------------

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 190, 56, 70, 22, 12


@dataclass
class Box:
    """A stage drawn as a box in the graph."""

    name: str
    x: int
    y: int
    kind: str
    status: str = ""
    elapsed: str = ""


@dataclass
class Edge:
    """An arrow from a stage to one that waits for it (dashed for ``depends_on`` only)."""

    d: str
    ordering_only: bool


@dataclass
class Graph:
    """Boxes in columns by depth: a stage's column is one past the deepest stage it waits for."""

    boxes: list[Box]
    edges: list[Edge]
    width: int
    height: int


def _kind(s: StageSpec) -> str:
    what = f"LLM worker {s.worker_type}" if s.worker_type is not None else f"task {s.task}"
    return what + (f" · {s.tier}" if s.tier else "")


def layout(plan: Plan) -> Graph:
    """Place every stage of ``plan``; the same plan always gives the same picture."""
    depth: dict[str, int] = {}
    for name in plan.order:
        deps = plan.stages[name].deps
        depth[name] = 1 + max((depth[d] for d in deps), default=-1)
    columns: dict[int, list[str]] = {}
    for name in plan.stages:  # file order within a column
        columns.setdefault(depth[name], []).append(name)
    boxes: dict[str, Box] = {}
    for col, members in columns.items():
        for row, name in enumerate(members):
            x = PAD + col * (BOX_W + GAP_X)
            y = PAD + row * (BOX_H + GAP_Y)
            boxes[name] = Box(name, x, y, _kind(plan.stages[name].spec))
    edges = []
    for name, sp in plan.stages.items():
        b = boxes[name]
        for dep in sorted(sp.deps):
            a = boxes[dep]
            x1, y1, x2, y2 = a.x + BOX_W, a.y + BOX_H // 2, b.x - 6, b.y + BOX_H // 2
            mid = (x1 + x2) // 2
            edges.append(Edge(f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}", dep not in sp.reads))
    width = PAD * 2 + (max(columns) + 1) * BOX_W + max(columns) * GAP_X if columns else 0
    height = PAD * 2 + max(len(m) for m in columns.values()) * (BOX_H + GAP_Y) - GAP_Y if columns else 0
    return Graph(list(boxes.values()), edges, width, height)


# -- a run -------------------------------------------------------------------------------------------


@dataclass
class Submitted:
    """A run this Workshop started (its checkpoint may not exist yet)."""

    goal_id: str
    pipeline: str
    node: PipelineNode
    context: dict[str, Any]
    at: float


def _seconds(begin: float, end: float) -> str:
    if not (begin and end and end >= begin):
        return ""
    took = end - begin
    return f"{took:.3f} s" if took < 10 else f"{took:.1f} s"


def _short(value: Any, limit: int = 600) -> str:
    text = json.dumps(value, ensure_ascii=False, default=repr, indent=2)
    return text if len(text) <= limit else text[:limit] + " …"


async def run_view(
    ws: Workshop, conns: Connections, goal_id: str, submitted: Submitted | None
) -> dict[str, Any] | None:
    """Everything the run page shows, read from the goal's checkpoint and stored results."""
    from heddle.graphs.store import GoalStore

    cp = await GoalStore(conns.backend, ws.app.settings.result_ttl_s).load(goal_id)
    message = cp.goal_message
    if message is not None and isinstance(message.graph, PipelineNode):
        node, context, name = message.graph, message.context, message.name or message.graph.name
    elif submitted is not None:
        node, context, name = submitted.node, submitted.context, submitted.pipeline
    else:
        return None
    plan = build_plan(node)
    goal_state, goal_record = await conns.backend.read(goal_id)
    states = cp.nodes
    ids = [st.task_id for st in (states.get(s.name) for s in node.stages) if st is not None and st.task_id]
    reads = await asyncio.gather(*(conns.backend.read(t) for t in ids))
    records: dict[str, tuple[str, ResultRecord | None]] = dict(zip(ids, reads, strict=True))
    now = time.time()
    rows = []
    for s in node.stages:
        st = states.get(s.name)
        row: dict[str, Any] = {"name": s.name, "kind": _kind(s), "status": "waiting", "started": 0.0,
                               "ended": 0.0, "wall": "", "tier": "", "worker": "", "output": None,
                               "error": "", "reason": "", "attempt": 0, "cost": ""}
        if st is not None:
            task_state, record = records.get(st.task_id, ("PENDING", None))
            status = st.state
            if st.state == DISPATCHED:
                status = "running" if task_state == "STARTED" else "queued"
            started = st.started_at or (record.started_at if record is not None else 0.0)
            ended = st.ended_at
            row.update(
                status=status, started=started, ended=ended, tier=st.tier, worker=st.worker,
                attempt=st.attempt, reason=st.reason, cost=usd(st.cost_usd) if st.cost_usd is not None else "",
                wall=_seconds(started, ended) if ended else (_seconds(started, now) if status == "running" else ""),
                error=f"{st.error.type}: {st.error.message}" if st.error is not None else "",
            )
            if st.state == SUCCEEDED and record is not None and record.state == "SUCCESS":
                row["output"] = _short(record.result)
        rows.append(row)
    graph = layout(plan)
    by_name = {r["name"]: r for r in rows}
    for box in graph.boxes:
        box.status = by_name[box.name]["status"]
        box.elapsed = by_name[box.name]["wall"]
    final = goal_state in READY_STATES and goal_record is not None
    gs = cp.goal
    begin = (gs.started_at if gs is not None else 0.0) or (goal_record.started_at if goal_record else 0.0)
    end = goal_record.finished_at if final and goal_record is not None else 0.0
    costs = [st.cost_usd for st in states.values() if st.cost_usd is not None and not st.composite]
    budget = [b for b in (message.budget_usd if message is not None else None, node.budget_usd) if b is not None]
    return {
        "goal_id": goal_id,
        "pipeline": name,
        "context": _short(context, 2000),
        "rows": rows,
        "graph": graph,
        "box_w": BOX_W,
        "box_h": BOX_H,
        "state": goal_state if final else ("STARTED" if gs is not None else "PENDING"),
        "accepted": gs is not None,
        "final": final,
        "record": goal_record if final else None,
        "output": _short(goal_record.result, 4000) if final and goal_record and goal_state == "SUCCESS" else None,
        "wall": _seconds(begin, end or now) if begin else "",
        "runs": gs.runs if gs is not None else 0,
        "done": sum(r["status"] in NODE_FINAL_STATES for r in rows),
        "cost": usd(sum(costs)) if costs else "",
        "budget": usd(min(budget)) if budget else "",
    }


# -- routes ------------------------------------------------------------------------------------------


def routes(pages: Pages) -> list[BaseRoute]:
    """The Pipelines pages' routes."""
    ws = pages.ws
    started: OrderedDict[str, Submitted] = OrderedDict()  # newest last

    def lookup(name: str) -> FoundPipeline | None:
        return next((f for f in find_pipelines(ws.config_dirs) if f.name == name and f.shadowed_by is None), None)

    def runs_of(name: str) -> list[Submitted]:
        return [s for s in reversed(started.values()) if s.pipeline == name]

    async def index(request: Request) -> Response:
        found = find_pipelines(ws.config_dirs)
        return pages.render(request, "pipelines.html", found=found, dirs=ws.config_dirs,
                            recent=list(reversed(started.values()))[:20])

    async def one(request: Request) -> Response:
        name = request.path_params["name"]
        found = lookup(name)
        if found is None:
            return pages.render(request, "missing.html", status_code=404, what=f"pipeline {name}",
                                hint=f"no pipeline of that name under {', '.join(map(str, ws.config_dirs))}")
        if found.pipeline is None:
            said = "; ".join(f"line {i.line}: {i.message}" for i in found.issues)
            return pages.render(request, "missing.html", status_code=404, what=f"valid pipeline {name}",
                                hint=f"{found.path} has problems to fix first: {said}")
        node = found.pipeline.node
        return pages.render(
            request, "pipeline.html", found=found, graph=layout(found.pipeline.plan), box_w=BOX_W, box_h=BOX_H,
            template=input_template(node), keys=context_keys(node), runs=runs_of(name)[:20],
        )

    async def run(request: Request) -> Response:
        try:
            form = await pages.csrf_form(request)
        except PermissionError as exc:
            return pages.refused(exc)
        name = request.path_params["name"]
        found = lookup(name)
        if found is None or found.pipeline is None:
            return pages.problem(request, f"no valid pipeline named {name!r}; reload the page", 404)
        node = found.pipeline.node
        try:
            context = parse_input(str(form.get("input") or ""), node)
            resolved = resolve_stages(node, ws.registry.workers() if ws.registry is not None else [])
            from heddle.graphs.canvas import submit_goal

            result = submit_goal(ws.app, resolved, context=context, name=node.name)
            await result.sent()
            (await pages.conns()).release_watch(result.id)  # the page follows events, not the notice
        except RunProblem as exc:
            return pages.problem(request, str(exc))
        except TypeError as exc:  # an input value msgspec cannot encode
            return pages.problem(request, str(exc))
        except HeddleError as exc:
            return pages.problem(request, f"could not send: {exc}", 502)
        started[result.id] = Submitted(result.id, node.name, resolved, context, time.time())
        while len(started) > _MAX_RUNS:
            started.popitem(last=False)
        where = f"/pipelines/runs/{result.id}"
        if request.headers.get("hx-request"):
            return Response(status_code=204, headers={"HX-Redirect": where})
        return RedirectResponse(where, status_code=303)

    async def run_page(request: Request) -> Response:
        goal_id = request.path_params["goal_id"]
        view = await run_view(ws, await pages.conns(), goal_id, started.get(goal_id))
        if view is None:
            return pages.render(request, "missing.html", status_code=404, what=f"pipeline run {goal_id}",
                                hint="no checkpoint of a pipeline goal with that id (checkpoints expire with results)")
        return pages.render(request, "pipeline_run.html", **view)

    async def run_fragment(request: Request) -> Response:
        goal_id = request.path_params["goal_id"]
        view = await run_view(ws, await pages.conns(), goal_id, started.get(goal_id))
        if view is None:
            return pages.problem(request, f"no pipeline run {goal_id}", 404)
        return pages.render(request, "_pipeline_run.html", **view)

    return [
        Route("/pipelines", index),
        Route("/pipelines/runs/{goal_id}", run_page),
        Route("/fragments/pipeline-run/{goal_id}", run_fragment),
        Route("/pipelines/{name}", one),
        Route("/pipelines/{name}/runs", run, methods=["POST"]),
    ]


__all__ = ["FoundPipeline", "find_pipelines", "layout", "parse_input", "resolve_stages", "routes"]
