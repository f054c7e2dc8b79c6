"""Workshop "Evaluate" page: run a worker against a JSON test suite, keep the runs, compare two.

Suites come from ``evals/*.json`` under the Workshop's config directories or
are pasted into the page (format and scoring: :mod:`.evalsuite`). Starting a
run checks everything first (the suite, the target and its live workers, each
case's input against a YAML worker's ``input_schema``, the tier, the timeout,
the servers) and creates nothing unless all is well. The run then goes on in
the background on the Workshop's loop: every case through the real queue
(``app.send_task``, a few at a time), each result scored and stored in SQLite
(:mod:`.evalstore`) the moment it arrives, and an SSE ``eval`` message with
the run id after each one, so the run's page fills in live. When the Workshop
stops, running runs are cancelled and marked interrupted; the cases done stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from heddle import names
from heddle.errors import HeddleError, ResultTimeout
from heddle.messages import SUCCESS
from heddle.redact import redact
from heddle.workshop.evalstore import FINISHED, INTERRUPTED, CaseResult, EvalStore, Run
from heddle.workshop.evalsuite import (
    Case,
    Score,
    Suite,
    SuiteFile,
    failed_score,
    find_suites,
    input_issues,
    parse_suite,
    score_output,
)
from heddle.workshop.web import Pages, Target, targets

if TYPE_CHECKING:
    from heddle.workshop.server import Workshop

log = logging.getLogger("heddle.workshop.evaluate")

CONCURRENCY = 4  # cases in flight at once per run
DEFAULT_TIMEOUT_S = 120.0
MAX_TIMEOUT_S = 3600.0
_PASTED = "pasted suite"


@dataclass(frozen=True)
class Plan:
    """A checked run, ready to go: what is sent, to whom, how long each case may take."""

    run_id: int
    suite: Suite
    target: Target
    tier: str | None
    timeout_s: float


class Evaluations:
    """Runs in progress on the Workshop's loop, and the store they write to.

    The background tasks are kept here (the event loop holds only weak
    references to tasks) and cancelled by :meth:`stop`, one of the Workshop's
    stop hooks.
    """

    def __init__(self, ws: Workshop) -> None:
        self.ws = ws
        self.store = EvalStore(ws.eval_db)
        self.active: dict[int, asyncio.Task[None]] = {}

    def start(self, plan: Plan) -> None:
        """Run the plan in the background."""
        task = asyncio.get_running_loop().create_task(self._run(plan), name=f"heddle-eval-{plan.run_id}")
        self.active[plan.run_id] = task
        task.add_done_callback(lambda _: self.active.pop(plan.run_id, None))

    async def stop(self) -> None:
        """Cancel every running run; each marks itself interrupted, keeping its finished cases."""
        tasks = list(self.active.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, plan: Plan) -> None:
        state, note = INTERRUPTED, "interrupted: the Workshop stopped before the run finished"
        pending = iter(plan.suite.cases)

        async def lane() -> None:
            # Each lane takes the next case when it is free: at most CONCURRENCY in flight.
            for case in pending:
                result = await self._case(plan, case)
                await asyncio.to_thread(self.store.add_case, plan.run_id, result)
                self.ws.broadcast("eval", str(plan.run_id))

        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(min(CONCURRENCY, len(plan.suite.cases))):
                    tg.create_task(lane())
            state, note = FINISHED, ""
        except Exception as exc:  # a bug or a broken database: say so on the run, keep the rest
            log.exception("evaluation run %s failed", plan.run_id)
            note = f"interrupted by an error: {exc!r}"
        finally:
            # Also on cancellation (the Workshop stopping): a tiny synchronous write, so it
            # is done before the loop closes.
            try:
                self.store.finish_run(plan.run_id, state, note)
            except Exception:
                log.exception("cannot mark evaluation run %s %s", plan.run_id, state)
            self.ws.broadcast("eval", str(plan.run_id))

    async def _case(self, plan: Plan, case: Case) -> CaseResult:
        """Send one case through the queue, wait for its result, score it."""
        ws, target = self.ws, plan.target

        def outcome(score: Score, **kw: Any) -> CaseResult:
            return CaseResult(index=case.index, name=case.name, match=case.match, input=case.input,
                              expected=case.expected, checks=[asdict(c) for c in score.checks], score=score.value,
                              finished_at=time.time(), **kw)

        started = time.monotonic()
        try:
            if target.kind == "yaml" or isinstance(case.input, list):
                result = ws.app.send_task(target.task, case.input, worker_type=target.worker_type, tier=plan.tier)
            else:
                result = ws.app.send_task(target.task, (), case.input, worker_type=target.worker_type,
                                          tier=plan.tier)
            await result.sent()
        except (HeddleError, TypeError) as exc:
            return outcome(failed_score(case.match, case.expected), output=None, error=f"could not send: {exc}")
        conns = ws.conns
        try:
            await result.aget(timeout=plan.timeout_s, propagate=False)
            latency = time.monotonic() - started
            if conns is None:
                raise HeddleError("the Workshop lost its connections")
            state, record = await conns.backend.read(result.id)
        except ResultTimeout:
            if conns is not None:
                conns.release_watch(result.id)
            # Revoked, so a task still queued or running does not run for nothing.
            with contextlib.suppress(HeddleError):
                await result.arevoke()
            return outcome(failed_score(case.match, case.expected), output=None, task_id=result.id,
                           error=f"no result within {plan.timeout_s:g} s (the task was revoked); is a worker "
                                 f"of type {target.worker_type} running and keeping up?")
        except HeddleError as exc:
            return outcome(failed_score(case.match, case.expected), output=None, task_id=result.id,
                           error=f"could not read the result: {exc}")
        meta = record.meta if record is not None else {}
        usage = {"input_tokens": meta.get("input_tokens"), "output_tokens": meta.get("output_tokens")}
        common = {"task_id": result.id, "latency_s": latency, **usage}
        if record is not None and state == SUCCESS:
            output = record.result
            return outcome(score_output(case.match, case.expected, output), output=output, **common)
        if record is not None and record.error is not None:
            error = f"{record.error.type}: {record.error.message}"
        else:
            error = f"the task ended in {state}"
        return outcome(failed_score(case.match, case.expected), output=None, error=error, **common)


# -- checking a run before it starts -------------------------------------------------------------


def resolve_target(name: str, ts: list[Target]) -> tuple[Target | None, str]:
    """The target a suite names: a YAML worker type, a task name, or the unique last part of one."""
    for t in ts:
        if (t.kind == "yaml" and t.worker_type == name) or t.task == name:
            return t, ""
    ends = [t for t in ts if t.kind == "task" and t.task.endswith(f".{name}")]
    if len(ends) == 1:
        return ends[0], ""
    if ends:
        return None, (f"target {name!r} could be any of {', '.join(t.task for t in ends)}; "
                      f"write the full task name or choose one on the page")
    return None, (f"no live worker offers task {name!r}: start one with heddle-worker -A yourmodule "
                  f"(or, for a YAML worker, put its config under configs/workers/)")


def _live_problem(ws: Workshop, target: Target, tier: str | None) -> str:
    """Why no live worker would take the target's tasks ('' when one would)."""
    if target.kind != "yaml":
        return ""  # tasks are offered only while a worker that has them is alive
    workers = [w for w in (ws.registry.workers() if ws.registry is not None else [])
               if w.worker_type == target.worker_type]
    start = f"heddle worker --config configs/workers/{target.worker_type}.yaml --tier TIER"
    if not workers:
        return f"no live worker of type {target.worker_type}: start one with {start}"
    if tier and not any("*" in w.tiers or tier in w.tiers for w in workers):
        served = sorted({t for w in workers for t in w.tiers})
        return (f"no live {target.worker_type} worker serves tier {tier} (live ones serve "
                f"{', '.join(served)}): choose one of those or start one with {start.replace('TIER', tier)}")
    return ""


async def _servers_problem(pages: Pages) -> str:
    """Why the queue cannot be used right now ('' when NATS and Valkey answer)."""
    try:
        conns = await pages.conns()
        if not conns.broker.connected:
            return (f"NATS at {redact(conns.broker.url)} is not connected; the Workshop keeps reconnecting, "
                    f"try again soon")
        await asyncio.wait_for(conns.backend.ping(), 3.0)
    except (HeddleError, TimeoutError) as exc:
        return f"cannot reach the servers: {exc or 'no answer from Valkey within 3 s'}"
    return ""


def _date(t: float | None) -> str:
    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=repr)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def case_rows(run: Run, results: list[CaseResult]) -> list[dict[str, Any]]:
    """Every case of a run's suite, with its result once it has one."""
    done = {r.index: r for r in results}
    rows = []
    cases = run.suite.get("cases") or []
    for i, raw in enumerate(cases):
        raw = raw if isinstance(raw, dict) else {}
        rows.append({"index": i, "name": raw.get("name", f"case {i + 1}"), "input": raw.get("input"),
                     "expected": raw.get("expected"), "result": done.pop(i, None)})
    rows.extend({"index": r.index, "name": r.name, "input": r.input, "expected": r.expected, "result": r}
                for r in done.values())
    return rows


def compare_rows(a: list[CaseResult], b: list[CaseResult], order: list[str]) -> list[dict[str, Any]]:
    """Two runs' cases side by side, matched by name, each marked improved, regressed or same."""
    by_a = {c.name: c for c in a}
    by_b = {c.name: c for c in b}
    seen: list[str] = []
    for name in [*order, *by_a, *by_b]:
        if name not in seen and (name in by_a or name in by_b):
            seen.append(name)
    rows = []
    for name in seen:
        ca, cb = by_a.get(name), by_b.get(name)
        if ca is None or cb is None:
            verdict = "only in A" if cb is None else "only in B"
        elif cb.score > ca.score:
            verdict = "improved"
        elif cb.score < ca.score:
            verdict = "regressed"
        else:
            verdict = "same"
        rows.append({"name": name, "a": ca, "b": cb, "verdict": verdict})
    return rows


# -- routes -------------------------------------------------------------------------------------------


def routes(pages: Pages) -> list[BaseRoute]:
    """The Evaluate page's routes."""
    ws = pages.ws
    evals = Evaluations(ws)
    ws.stop_hooks.append(evals.stop)
    helpers: dict[str, Any] = {"date": _date, "compact": _compact, "score": _score}

    async def render_home(request: Request, status_code: int = 200, problems: list[str] | None = None,
                          form: dict[str, str] | None = None) -> Response:
        files = await asyncio.to_thread(find_suites, ws.config_dirs)
        runs = await asyncio.to_thread(evals.store.runs)
        values = {"suite": str(files[0].path) if files else "", "suite_json": "", "target": "", "tier": "",
                  "timeout_s": f"{DEFAULT_TIMEOUT_S:g}", **(form or {})}
        return pages.render(request, "evaluate.html", status_code=status_code, files=files, runs=runs,
                            targets=targets(ws), tiers=names.TIERS, problems=problems or [], form=values,
                            dirs=ws.config_dirs, **helpers)

    async def home(request: Request) -> Response:
        return await render_home(request)

    def suite_from(values: dict[str, str], files: list[SuiteFile]) -> tuple[Suite | None, list[str]]:
        if values["suite_json"].strip():
            suite, issues = parse_suite(values["suite_json"], _PASTED)
            return suite, [str(i) for i in issues]
        chosen = next((f for f in files if str(f.path) == values["suite"]), None)
        if chosen is None:
            return None, ["choose a suite file found under "
                          f"{', '.join(str(d / 'evals') for d in ws.config_dirs)}, or paste a suite"]
        return chosen.suite, [str(i) for i in chosen.issues]

    async def start_run(request: Request) -> Response:
        try:
            form = await pages.csrf_form(request)
        except PermissionError as exc:
            return pages.refused(exc)
        values = {k: str(form.get(k) or "") for k in ("suite", "suite_json", "target", "tier", "timeout_s")}
        problems: list[str] = []
        files = await asyncio.to_thread(find_suites, ws.config_dirs)
        suite, suite_problems = suite_from(values, files)
        problems += suite_problems
        tier = values["tier"] or None
        if tier is not None and tier not in names.TIERS:
            problems.append(f"tier must be one of {', '.join(names.TIERS)}, got {tier!r}")
            tier = None
        try:
            timeout_s = float(values["timeout_s"] or DEFAULT_TIMEOUT_S)
            if not 0 < timeout_s <= MAX_TIMEOUT_S:
                raise ValueError
        except ValueError:
            problems.append(f"the timeout is seconds per case, more than 0 and at most {MAX_TIMEOUT_S:g}; "
                            f"got {values['timeout_s']!r}")
            timeout_s = DEFAULT_TIMEOUT_S
        ts = targets(ws)
        target: Target | None = None
        if values["target"]:
            target = next((t for t in ts if t.key == values["target"]), None)
            if target is None:
                problems.append(f"no such worker or task: {values['target']!r} (has its worker stopped? "
                                "reload the page)")
        elif suite is not None and suite.target:
            target, why = resolve_target(suite.target, ts)
            if why:
                problems.append(why)
        elif suite is not None:
            problems.append('the suite names no "target"; choose the worker or task on the page')
        if target is not None:
            why = _live_problem(ws, target, tier)
            if why:
                problems.append(why)
            elif suite is not None:
                check = target.config.input_validator().errors if target.config is not None else None
                problems += [str(i) for i in input_issues(suite, target.task, check)]
        if problems:
            return await render_home(request, 422, problems, values)
        assert suite is not None and target is not None
        why = await _servers_problem(pages)
        if why:
            return await render_home(request, 503, [why], values)
        try:
            run_id = await asyncio.to_thread(
                evals.store.create_run, suite_name=suite.name, suite_json=suite.to_json(), source=suite.source,
                target=target.task, worker_type=target.worker_type, tier=tier or "", timeout_s=timeout_s,
                total=len(suite.cases),
            )
        except Exception as exc:  # sqlite3 and OS errors: a clear page, not a 500
            return await render_home(request, 500, [f"cannot store the run in {evals.store.path}: {exc}"], values)
        evals.start(Plan(run_id, suite, target, tier, timeout_s))
        return RedirectResponse(f"/evaluate/runs/{run_id}", status_code=303)

    async def run_context(request: Request) -> dict[str, Any] | None:
        try:
            run_id = int(request.path_params["run_id"])
        except ValueError:
            return None
        run = await asyncio.to_thread(evals.store.run, run_id)
        if run is None:
            return None
        results = await asyncio.to_thread(evals.store.cases, run_id)
        return {"run": run, "rows": case_rows(run, results), **helpers}

    def missing(request: Request, what: str) -> Response:
        return pages.render(request, "missing.html", status_code=404, what=what,
                            hint="runs are kept in " + str(evals.store.path))

    async def run_page(request: Request) -> Response:
        ctx = await run_context(request)
        if ctx is None:
            return missing(request, f"evaluation run {request.path_params['run_id']}")
        return pages.render(request, "evaluate_run.html", **ctx)

    async def run_fragment(request: Request) -> Response:
        ctx = await run_context(request)
        if ctx is None:
            return missing(request, f"evaluation run {request.path_params['run_id']}")
        return pages.render(request, "_eval_run.html", **ctx)

    async def compare(request: Request) -> Response:
        ids = []
        for side in ("a", "b"):
            raw = request.query_params.get(side, "")
            if not raw.isdigit():
                return await render_home(request, 422, ["choose two runs to compare: one as A and one as B"])
            ids.append(int(raw))
        runs = [await asyncio.to_thread(evals.store.run, i) for i in ids]
        for i, run in zip(ids, runs, strict=True):
            if run is None:
                return missing(request, f"evaluation run {i}")
        a, b = runs
        assert a is not None and b is not None
        ca = await asyncio.to_thread(evals.store.cases, a.id)
        cb = await asyncio.to_thread(evals.store.cases, b.id)
        order = [str(c.get("name", f"case {i + 1}")) if isinstance(c, dict) else f"case {i + 1}"
                 for i, c in enumerate(a.suite.get("cases") or [])]
        rows = compare_rows(ca, cb, order)
        counts = {v: sum(r["verdict"] == v for r in rows) for v in ("improved", "regressed", "same")}
        delta = None if a.score is None or b.score is None else b.score - a.score
        return pages.render(request, "evaluate_compare.html", a=a, b=b, rows=rows, counts=counts, delta=delta,
                            same_suite=a.suite_json == b.suite_json, **helpers)

    return [
        Route("/evaluate", home),
        Route("/evaluate/runs", start_run, methods=["POST"]),
        Route("/evaluate/runs/{run_id}", run_page),
        Route("/fragments/eval-run/{run_id}", run_fragment),
        Route("/evaluate/compare", compare),
    ]
