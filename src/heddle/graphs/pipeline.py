"""Config-driven pipelines: YAML stages run as one goal by an orchestrator.

A pipeline file::

    name: claims
    stages:
      - name: extract
        worker_type: extractor          # a YAML LLM worker: called with one dict
        tier: local
        input_mapping:
          text: goal.context.text       # the input given to `heddle submit --input`
      - name: verify
        task: shop.tasks.verify         # a Python task: called with keyword arguments
        input_mapping:
          claims: extract.output.claims
        condition: "len(extract.output.claims) > 0"
        timeout_seconds: 60
        retries: 2
      - name: summary
        worker_type: summarizer
        input_mapping: {text: goal.context.text}
        cache: true                     # the same input, config and model: answered from Valkey, no call
    output_mapping:
      verified: verify.output
    budget_usd: 0.50                    # most the goal's model calls may cost in all

Dependencies are inferred from the paths a stage reads (``input_mapping`` and
``condition``), plus ``depends_on``; stages with no path between them run in
parallel. A stage whose condition is false is skipped, and so is every stage
that reads a skipped stage's output (``depends_on`` alone only orders). The
goal's result is the ``output_mapping`` (default: every finished stage's
output, by name). See :mod:`heddle.graphs.paths` for paths and conditions.

Validation walks the YAML node tree, so every problem carries its file and
line, and all of them are reported at once (``heddle validate FILE...``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

from heddle import names
from heddle.configfile import ConfigIssue, line_of, load_yaml, unknown_key_message
from heddle.errors import ConfigError, ConfigFileError
from heddle.graphs.model import PipelineNode, StageSpec
from heddle.graphs.paths import (
    RESERVED_NAMES,
    Condition,
    Mapped,
    PathError,
    Ref,
    compile_condition,
    did_you_mean,
    is_identifier,
    parse_mapped,
)

if TYPE_CHECKING:
    from heddle.connections import Client
    from heddle.graphs.canvas import GraphResult

__all__ = [
    "ConfigIssue",
    "Pipeline",
    "PipelineError",
    "Plan",
    "build_plan",
    "check_pipeline",
    "load_pipeline",
    "looks_like_pipeline",
    "validate_pipeline_file",
]

_TOP_KEYS = ("name", "description", "stages", "output_mapping", "budget_usd")
_STAGE_KEYS = (
    "name",
    "worker_type",
    "task",
    "tier",
    "input_mapping",
    "depends_on",
    "condition",
    "timeout_seconds",
    "retries",
    "description",
    "cache",
)
#: How long a ``cache: true`` stage's output is kept (one day); ``cache: {ttl_seconds: N}`` says otherwise.
DEFAULT_CACHE_TTL_S = 86_400
MAX_CACHE_TTL_S = 365 * 86_400
MAX_STAGE_RETRIES = 20
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class PipelineError(ConfigFileError):
    """Raised when a pipeline is invalid; ``issues`` holds every problem with file and line."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        super().__init__(f"{len(issues)} error(s) in the pipeline:\n" + "\n".join(f"  {i}" for i in issues), issues)


# -- the plan: what the orchestrator runs -----------------------------------------------


@dataclass
class StagePlan:
    """A stage with its paths parsed and its dependencies known."""

    spec: StageSpec
    inputs: dict[str, Mapped]
    condition: Condition | None
    reads: set[str]  # stages whose outputs it reads: if one is skipped, so is this one
    deps: set[str]  # reads plus depends_on: all of them end before this one starts


@dataclass
class Plan:
    """A validated pipeline: stages in file order, a topological order, the output mapping."""

    name: str
    stages: dict[str, StagePlan]
    order: list[str]
    output: dict[str, Mapped] | None = None


@dataclass
class _Problem:
    message: str
    stage: int | None = None  # index in the stage list
    where: tuple[Any, ...] = ()  # keys inside the stage (or from the top) to point the line at


def _analyze(node: PipelineNode) -> tuple[Plan | None, list[_Problem]]:
    """Check references and cycles; build the plan. Problems carry stage indexes, not lines."""
    problems: list[_Problem] = []
    stage_names = list(dict.fromkeys(s.name for s in node.stages if not s.name.startswith("__invalid_")))
    known = {s.name for s in node.stages}
    stages: dict[str, StagePlan] = {}
    for i, s in enumerate(node.stages):
        inputs: dict[str, Mapped] = {}
        reads: set[str] = set()
        for key, raw in s.input_mapping.items():
            try:
                m = parse_mapped(raw)
            except PathError as exc:
                problems.append(_Problem(f"stage {s.name!r} input_mapping.{key}: {exc}", i, ("input_mapping", key)))
                continue
            if isinstance(m, Ref) and m.stage is not None:
                if m.stage not in known:
                    problems.append(_Problem(
                        f"stage {s.name!r} input_mapping.{key} refers to unknown stage {m.stage!r}"
                        f"{did_you_mean(m.stage, known)}; known stages: {', '.join(stage_names)}",
                        i, ("input_mapping", key),
                    ))
                reads.add(m.stage)
            inputs[key] = m
        cond = None
        if s.condition is not None:
            try:
                cond = compile_condition(s.condition)
            except PathError as exc:
                problems.append(_Problem(f"stage {s.name!r} {exc}", i, ("condition",)))
            else:
                for st in sorted(cond.stages - known):
                    problems.append(_Problem(
                        f"stage {s.name!r} condition refers to unknown stage {st!r}{did_you_mean(st, known)}",
                        i, ("condition",),
                    ))
                reads |= cond.stages
        deps = set(reads)
        for j, d in enumerate(s.depends_on):
            if d not in known:
                problems.append(_Problem(
                    f"stage {s.name!r} depends_on unknown stage {d!r}{did_you_mean(d, known)}",
                    i, ("depends_on", j),
                ))
            deps.add(d)
        stages.setdefault(s.name, StagePlan(s, inputs, cond, reads & known, deps & known))
    output: dict[str, Mapped] | None = None
    if node.output_mapping is not None:
        output = {}
        for key, raw in node.output_mapping.items():
            try:
                m = parse_mapped(raw)
            except PathError as exc:
                problems.append(_Problem(f"output_mapping.{key}: {exc}", None, ("output_mapping", key)))
                continue
            if isinstance(m, Ref) and m.stage is not None and m.stage not in known:
                problems.append(_Problem(
                    f"output_mapping.{key} refers to unknown stage {m.stage!r}{did_you_mean(m.stage, known)}",
                    None, ("output_mapping", key),
                ))
            output[key] = m
    order, cycles = _toposort(stages)
    index: dict[str, int] = {}
    for i, stage_spec in enumerate(node.stages):
        index.setdefault(stage_spec.name, i)
    for cycle in cycles:
        problems.append(_Problem(f"stages form a cycle: {' -> '.join(cycle)}", index[cycle[0]], ("name",)))
    if problems:
        return None, problems
    return Plan(node.name, stages, order, output), []


def _toposort(stages: dict[str, StagePlan]) -> tuple[list[str], list[list[str]]]:
    """Depth-first order (dependencies first) and every cycle found, each reported once."""
    WHITE, GREY, BLACK = 0, 1, 2
    color = dict.fromkeys(stages, WHITE)
    order: list[str] = []
    cycles: list[list[str]] = []
    seen_cycles: set[frozenset[str]] = set()
    for start in stages:
        if color[start] != WHITE:
            continue
        # Iterative DFS, so a long pipeline cannot hit the recursion limit.
        stack: list[tuple[str, list[str]]] = [(start, sorted(stages[start].deps))]
        path = [start]
        color[start] = GREY
        while stack:
            name, todo = stack[-1]
            if todo:
                d = todo.pop(0)
                if color[d] == GREY:
                    cyc = [*path[path.index(d):], d]
                    key = frozenset(cyc)
                    if key not in seen_cycles:
                        seen_cycles.add(key)
                        cycles.append(cyc)
                elif color[d] == WHITE:
                    color[d] = GREY
                    path.append(d)
                    stack.append((d, sorted(stages[d].deps)))
                continue
            stack.pop()
            path.pop()
            color[name] = BLACK
            order.append(name)
    return order, cycles


def build_plan(node: PipelineNode) -> Plan:
    """The plan of a pipeline node; raise PipelineError (lines unknown: 0) if it is invalid."""
    problems = _struct_problems(node)
    plan, more = _analyze(node)
    problems += more
    if problems or plan is None:
        raise PipelineError([ConfigIssue(f"pipeline {node.name!r}", 0, p.message) for p in problems])
    return plan


def _struct_problems(node: PipelineNode) -> list[_Problem]:
    """Checks the YAML walk makes too, for pipelines built in code."""
    out: list[_Problem] = []
    if not node.stages:
        out.append(_Problem("a pipeline needs at least one stage"))
    seen: set[str] = set()
    for i, s in enumerate(node.stages):
        if not is_identifier(s.name):
            out.append(_Problem(f"stage name {s.name!r} must be letters, digits and '_' (not a reserved word)", i))
        if s.name in seen:
            out.append(_Problem(f"stage name {s.name!r} is used twice", i))
        seen.add(s.name)
        if (s.worker_type is None) == (s.task is None):
            out.append(_Problem(f"stage {s.name!r} needs exactly one of worker_type or task", i))
    return out


# -- YAML --------------------------------------------------------------------------------


def _cache_ttl(value: Any) -> int | None:
    """A stage's ``cache`` as a TTL in seconds (0: not cached), or None if it is not valid."""
    if value is True:
        return DEFAULT_CACHE_TTL_S
    if value is False:
        return 0
    if isinstance(value, dict) and set(value) == {"ttl_seconds"}:
        ttl = value["ttl_seconds"]
        if isinstance(ttl, int) and not isinstance(ttl, bool) and 1 <= ttl <= MAX_CACHE_TTL_S:
            return ttl
    return None


def _is_str(value: Any) -> TypeGuard[str]:
    return isinstance(value, str) and bool(value)


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


class _Checker:
    """Walks a parsed pipeline document (``heddle.configfile`` keeps its line numbers)."""

    def __init__(self, data: Any, file: str) -> None:
        self.data = data
        self.file = file
        self.issues: list[ConfigIssue] = []

    def err(self, where: tuple[Any, ...], message: str) -> None:
        self.issues.append(ConfigIssue(self.file, line_of(self.data, where), message))

    def stage(self, i: int, raw: Any) -> tuple[StageSpec | None, bool]:
        """The stage as far as it parsed (None if it is not a mapping), and whether it is valid."""
        at: tuple[Any, ...] = ("stages", i)
        if not isinstance(raw, dict):
            self.err(at, f"stages[{i}] must be a mapping with name and worker_type or task, got {_show(raw)}")
            return None, False
        ok = True
        name = raw.get("name")
        if "name" not in raw:
            self.err(at, f"stages[{i}] has no name; add `name: some_stage` (letters, digits, '_')")
            ok, name = False, None
        elif not _is_str(name) or not is_identifier(name):
            reserved = f" and not one of {', '.join(sorted(RESERVED_NAMES))}" if name in RESERVED_NAMES else ""
            self.err((*at, "name"), f"stage name {name!r} must be letters, digits and '_', starting with a "
                                    f"letter{reserved} (it is the root of paths like NAME.output.x)")
            ok, name = False, None
        label = f"stage {name!r}" if name else f"stages[{i}]"
        fields: dict[str, Any] = {}
        for key, value in raw.items():
            where = (*at, key)
            if key in ("name", "description"):
                continue
            if key == "worker_type":
                if not _is_str(value) or not _NAME_RE.match(value):
                    self.err(where, f"{label} worker_type must be a worker type name (letters, digits, "
                                    f"'_' and '-'), got {_show(value)}")
                    ok = False
                else:
                    fields["worker_type"] = value
            elif key == "task":
                if not _is_str(value):
                    self.err(where, f"{label} task must be a task name such as shop.tasks.verify, got {_show(value)}")
                    ok = False
                else:
                    fields["task"] = value
            elif key == "tier":
                if value not in names.TIERS:
                    self.err(where, f"{label} tier must be one of {', '.join(names.TIERS)}, got {_show(value)}")
                    ok = False
                else:
                    fields["tier"] = value
            elif key == "input_mapping":
                if not isinstance(value, dict):
                    self.err(where, f"{label} input_mapping must be a mapping of argument: path")
                    ok = False
                else:
                    fields["input_mapping"] = {str(k): v for k, v in value.items()}
            elif key == "depends_on":
                deps = [value] if isinstance(value, str) else value
                if not isinstance(deps, list) or not all(_is_str(d) for d in deps):
                    self.err(where, f"{label} depends_on must be a list of stage names, e.g. [extract]")
                    ok = False
                else:
                    fields["depends_on"] = list(deps)
            elif key == "condition":
                if not _is_str(value) or not value.strip():
                    self.err(where, f"{label} condition must be an expression string, e.g. "
                                    f"\"classify.output.category == 'invoice'\"")
                    ok = False
                else:
                    fields["condition"] = value
            elif key == "timeout_seconds":
                if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                    self.err(where, f"{label} timeout_seconds must be a number of seconds > 0, got {_show(value)}")
                    ok = False
                else:
                    fields["timeout_s"] = float(value)
            elif key == "retries":
                if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_STAGE_RETRIES:
                    self.err(where, f"{label} retries must be a whole number from 0 to {MAX_STAGE_RETRIES}, "
                                    f"got {_show(value)}")
                    ok = False
                else:
                    fields["retries"] = value
            elif key == "cache":
                ttl = _cache_ttl(value)
                if ttl is None:
                    self.err(where, f"{label} cache must be true, false or {{ttl_seconds: N}} (1 to "
                                    f"{MAX_CACHE_TTL_S}), got {_show(value)}")
                    ok = False
                elif "task" in raw:
                    self.err(where, f"{label} cache applies to worker_type stages (YAML LLM workers, whose "
                                    f"answers depend only on their config, model and input); remove it here")
                    ok = False
                elif ttl:
                    fields["cache_ttl_s"] = ttl
            else:
                self.err(where, f"{label}: {unknown_key_message(key, _STAGE_KEYS)}")
                ok = False
        has_wt, has_task = "worker_type" in raw, "task" in raw
        if has_wt == has_task:
            what = "both worker_type and task" if has_wt else "neither worker_type nor task"
            self.err(at, f"{label} has {what}; give exactly one: worker_type (a YAML worker, called "
                         f"with one dict) or task (a Python task, called with keyword arguments)")
            ok = False
        # A stage with errors still takes part in the reference and cycle checks, so one
        # run reports every problem.
        if ("worker_type" in fields) == ("task" in fields):
            fields.pop("task", None)
            fields["worker_type"] = fields.get("worker_type", "invalid")
        return StageSpec(name=name or f"__invalid_{i}", **fields), ok and name is not None

    def check(self) -> PipelineNode | None:
        data = self.data
        if not isinstance(data, dict):
            self.err((), f"a pipeline file must be a mapping with name and stages, got {_show(data)}")
            return None
        name = data.get("name")
        if "name" not in data:
            self.err((), "the pipeline has no name; add `name: my_pipeline`")
        elif not _is_str(name) or not _NAME_RE.match(name):
            self.err(("name",), f"name must be letters, digits, '_' and '-', got {_show(name)}")
            name = None
        raw_stages = data.get("stages")
        if "stages" not in data:
            self.err((), "the pipeline has no stages; add `stages:` with a list of stages")
            raw_stages = []
        elif not isinstance(raw_stages, list) or not raw_stages:
            self.err(("stages",), "stages must be a non-empty list of stages (`- name: ...`)")
            raw_stages = []
        output = data.get("output_mapping")
        if output is not None and not isinstance(output, dict):
            self.err(("output_mapping",), "output_mapping must be a mapping of key: path")
            output = None
        for key in data:
            if key not in _TOP_KEYS:
                self.err((key,), unknown_key_message(key, _TOP_KEYS))
        budget = data.get("budget_usd")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int | float)
                                   or not 0 < budget < float("inf")):
            self.err(("budget_usd",), f"budget_usd must be US dollars > 0 (e.g. 0.50), got {_show(budget)}")
            budget = None
        parsed = [self.stage(i, raw) for i, raw in enumerate(raw_stages)]
        first: dict[str, int] = {}
        for i, (spec, _) in enumerate(parsed):
            if spec is None or spec.name.startswith("__invalid_"):
                continue
            if spec.name in first:
                self.err(("stages", i, "name"), f"stage name {spec.name!r} is used twice "
                                                f"(first at stages[{first[spec.name]}])")
            else:
                first[spec.name] = i
        kept = [(i, s) for i, (s, _) in enumerate(parsed) if s is not None]
        if kept:
            whole = PipelineNode(name=name or "pipeline", stages=[s for _, s in kept],
                                 output_mapping={str(k): v for k, v in output.items()} if output else None)
            for p in _analyze(whole)[1]:
                where = p.where if p.stage is None else ("stages", kept[p.stage][0], *p.where)
                self.err(where, p.message)
        self.issues.sort(key=lambda i: i.line)
        if self.issues or not isinstance(name, str) or not all(ok for _, ok in parsed):
            return None
        return PipelineNode(
            name=name,
            stages=[s for s, _ in parsed if s is not None],
            output_mapping={str(k): v for k, v in output.items()} if output is not None else None,
            budget_usd=float(budget) if budget is not None else None,
        )


def check_pipeline(data: Any, file: str) -> list[ConfigIssue]:
    """Every problem in a parsed pipeline document (from ``heddle.configfile.load_yaml``)."""
    checker = _Checker(data, file)
    checker.check()
    return checker.issues


def validate_pipeline_file(path: str | os.PathLike[str]) -> list[ConfigIssue]:
    """Every problem in a pipeline file, with file and line; empty if it is valid."""
    data, issues = load_yaml(Path(path))
    if data is None:
        return issues or [ConfigIssue(str(path), 1, "the file is empty; a pipeline needs name and stages")]
    return sorted([*issues, *check_pipeline(data, str(path))], key=lambda i: i.line)


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and validate a pipeline file; raise PipelineError listing every problem."""
    data, issues = load_yaml(Path(path))
    if data is None:
        raise PipelineError(issues or [ConfigIssue(str(path), 1, "the file is empty")])
    checker = _Checker(data, str(path))
    node = checker.check()
    issues = sorted([*issues, *checker.issues], key=lambda i: i.line)
    if issues or node is None:
        raise PipelineError(issues)
    return Pipeline(node, str(path))


def looks_like_pipeline(data: Any) -> bool:
    """True if a parsed document is a pipeline: a mapping with ``stages`` (``heddle validate``)."""
    return isinstance(data, dict) and "stages" in data


class Pipeline:
    """A validated pipeline, ready to submit.

    Args:
        node: The pipeline's wire form.
        source: Where it came from (for messages).
    """

    def __init__(self, node: PipelineNode, source: str = "") -> None:
        self.node = node
        self.source = source
        self.plan = build_plan(node)

    def __repr__(self) -> str:
        return f"<Pipeline {self.node.name} stages={len(self.node.stages)}>"

    @property
    def name(self) -> str:
        """The pipeline's name."""
        return self.node.name

    def resolved(self, app: Client) -> PipelineNode:
        """The node with every ``task`` stage's worker type filled in for ``app``.

        As with ``send_task``: a task of the app, or a dotted name, runs on the
        app's workers; a bare name that is not one of its tasks names a worker type.
        """
        stages = []
        for s in self.node.stages:
            if s.task is not None and s.task_worker_type is None:
                wt = s.task if s.task not in app.tasks and "." not in s.task else app.worker_type
                s = StageSpec(**{**_fields(s), "task_worker_type": wt})
            stages.append(s)
        return PipelineNode(name=self.node.name, stages=stages, output_mapping=self.node.output_mapping,
                            budget_usd=self.node.budget_usd)

    def resolved_by_workers(self, workers: Sequence[Any]) -> PipelineNode:
        """The node with each ``task`` stage bound to a live worker's type; every unrunnable stage named.

        ``workers`` are the live workers' announcements (``heddle.registry.WorkerInfo``:
        their type and task names). :meth:`resolved` knows the tasks from an app instead.

        Raises:
            ConfigError: Some stage has no live worker to run it (each one is named).
        """
        offers: dict[str, set[str]] = {}
        types = {w.worker_type for w in workers}
        for w in workers:
            for t in w.tasks:
                offers.setdefault(t, set()).add(w.worker_type)
        problems: list[str] = []
        stages: list[StageSpec] = []
        for s in self.node.stages:
            if s.worker_type is not None:
                if s.worker_type not in types:
                    problems.append(
                        f"stage {s.name!r}: no live worker of type {s.worker_type!r} "
                        f"(start one: heddle worker --config configs/workers/{s.worker_type}.yaml)"
                    )
            elif (task := s.task) is not None and s.task_worker_type is None:
                if task in offers:
                    s = StageSpec(**{**_fields(s), "task_worker_type": sorted(offers[task])[0]})
                elif "." not in task and task in types:  # a bare name is a worker type, as with send_task
                    s = StageSpec(**{**_fields(s), "task_worker_type": task})
                else:
                    module = task.rsplit(".", 1)[0] if "." in task else "yourmodule"
                    problems.append(
                        f"stage {s.name!r}: no live worker offers task {task!r} (start one: heddle-worker -A {module})"
                    )
            stages.append(s)
        if problems:
            raise ConfigError("cannot run yet: " + "; ".join(problems))
        return PipelineNode(name=self.node.name, stages=stages, output_mapping=self.node.output_mapping,
                            budget_usd=self.node.budget_usd)

    def apply_async(
        self, context: dict[str, Any] | None = None, *, app: Client, task_id: str | None = None,
        budget_usd: float | None = None,
    ) -> GraphResult:
        """Submit the pipeline with ``context`` (read by ``goal.context.*`` paths).

        ``budget_usd`` caps what the goal's model calls may cost in all, below the
        pipeline file's own ``budget_usd`` if it has one (the lower one holds).

        Returns:
            A :class:`~heddle.graphs.canvas.GraphResult`; ``get()`` gives the output
            mapping, ``node(stage)`` a stage's own result, ``timeline()`` the
            per-stage timing once it has finished.
        """

        if context is not None and not isinstance(context, dict):
            raise TypeError(
                f"a pipeline's input must be a mapping (read as goal.context), got {type(context).__name__}"
            )
        return self.submit(app, self.resolved(app), context, task_id, budget_usd=budget_usd)

    def submit(
        self, app: Client, node: PipelineNode, context: dict[str, Any] | None = None, task_id: str | None = None,
        *, budget_usd: float | None = None,
    ) -> GraphResult:
        """Submit ``node`` (this pipeline, resolved by :meth:`resolved` or :meth:`resolved_by_workers`)."""
        from heddle.graphs.canvas import submit_goal

        return submit_goal(app, node, context=context or {}, name=self.node.name, goal_id=task_id,
                           budget_usd=budget_usd)

    def delay(self, context: dict[str, Any] | None = None, *, app: Client) -> GraphResult:
        """Shortcut for :meth:`apply_async`."""
        return self.apply_async(context, app=app)


def _fields(s: StageSpec) -> dict[str, Any]:
    return {f: getattr(s, f) for f in s.__struct_fields__}
