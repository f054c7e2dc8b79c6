"""Command line for goals: ``heddle orchestrator``, ``heddle submit``, ``heddle goals rerun``, and the worker's
orchestrator flags.

``heddle.cli`` wires these in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from heddle import names
from heddle.errors import ConfigError
from heddle.graphs.model import DISPATCHED, NodeState
from heddle.messages import STARTED, SUCCESS
from heddle.orchestrator import DEFAULT_MAX_CONCURRENT_GOALS, Orchestrator
from heddle.redact import redact
from heddle.send import usd
from heddle.settings import max_concurrent_goals_from_env

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.graphs.canvas import GraphResult
    from heddle.graphs.pipeline import Pipeline

__all__ = ["add_graph_commands", "add_orchestrator_args", "make_orchestrator", "max_concurrent_goals",
           "run_graph_command"]

err_console = Console(stderr=True)

_GOALS_DEFAULT = f"default $HEDDLE_MAX_CONCURRENT_GOALS, else {DEFAULT_MAX_CONCURRENT_GOALS}"


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def _positive_usd(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be US dollars > 0, e.g. 0.50; got {text!r}")
    return value


def add_orchestrator_args(p: argparse.ArgumentParser) -> None:
    """The worker command's flags for the orchestrator it hosts."""
    p.add_argument("--no-orchestrator", action="store_true", help="do not host an orchestrator loop in this process")
    p.add_argument(
        "--max-concurrent-goals",
        type=_positive_int,
        default=None,
        help=f"most goals the hosted orchestrator runs at once; the rest wait ({_GOALS_DEFAULT})",
    )


def max_concurrent_goals(args: argparse.Namespace) -> int:
    """``--max-concurrent-goals``, else ``$HEDDLE_MAX_CONCURRENT_GOALS``, else the orchestrator's default.

    Raises:
        ConfigError: The environment variable is set to something that is not a whole number >= 1.
    """
    flag: int | None = getattr(args, "max_concurrent_goals", None)
    if flag is not None:
        return flag
    from_env = max_concurrent_goals_from_env()
    return DEFAULT_MAX_CONCURRENT_GOALS if from_env is None else from_env


def make_orchestrator(app: Heddle, args: argparse.Namespace) -> Orchestrator | None:
    """The orchestrator a worker process hosts, unless ``--no-orchestrator``."""
    if getattr(args, "no_orchestrator", False):
        return None
    return Orchestrator(app, max_concurrent_goals=max_concurrent_goals(args))


def add_graph_commands(sub: Any) -> None:
    """``heddle orchestrator`` and ``heddle submit``."""
    from heddle.cli.common import add_actor_args

    o = sub.add_parser("orchestrator", help="run an orchestrator: task graphs and pipelines from heddle.goals.incoming")
    o.add_argument("-A", "--app", default=None,
                   help="module[:attribute] of an app whose settings to use (default: NATS_URL, VALKEY_URL)")
    o.add_argument("--max-concurrent-goals", type=_positive_int, default=None,
                   help=f"most goals run at once; the rest wait in the stream ({_GOALS_DEFAULT})")
    o.add_argument("--loglevel", default="INFO")
    add_actor_args(o)
    s = sub.add_parser("submit", help="run a pipeline file, showing live per-stage progress and a timeline")
    s.add_argument("pipeline", help="pipeline YAML file")
    s.add_argument("--input", default="{}", help="the goal context as a JSON object, or @FILE holding one")
    s.add_argument("-A", "--app", default=None,
                   help="module[:attribute] of the app whose workers run the `task:` stages")
    s.add_argument("--timeout", type=float, default=None, help="seconds to wait for the result (default: no limit)")
    s.add_argument("--task-id", default=None, help="the goal id (a repeat within the dedup window is dropped)")
    s.add_argument("--budget-usd", type=_positive_usd, default=None,
                   help="most the goal's model calls may cost in all, in US dollars (below the file's budget_usd)")
    s.add_argument("--json", action="store_true", help="print the outcome and timeline as JSON on stdout")
    s.add_argument("--quiet", action="store_true", help="no live progress")
    g = sub.add_parser("goals", help="act on goals: rerun a finished pipeline goal from one stage")
    gsub = g.add_subparsers(dest="goals_command", required=True)
    r = gsub.add_parser("rerun", help="rerun a finished pipeline goal from STAGE: the stages before it are not "
                                      "sent again (their stored outputs are reused), it and those after it are")
    r.add_argument("goal_id", help="the finished goal")
    r.add_argument("--from", dest="from_stage", required=True, metavar="STAGE", help="the first stage to send again")
    r.add_argument("--input", default=None, metavar="FILE",
                   help="new goal input: a JSON file (or a JSON object); default: the original goal's")
    r.add_argument("-A", "--app", default=None, help="module[:attribute] of an app whose settings to use")
    r.add_argument("--timeout", type=float, default=None, help="seconds to wait for the result (default: no limit)")
    r.add_argument("--task-id", default=None, help="the new goal's id")
    r.add_argument("--budget-usd", type=_positive_usd, default=None,
                   help="most the rerun's model calls may cost, in US dollars (default: the original goal's)")
    r.add_argument("--json", action="store_true", help="print the outcome and timeline as JSON on stdout")
    r.add_argument("--quiet", action="store_true", help="no live progress")


def run_graph_command(args: argparse.Namespace) -> int:
    """Run ``heddle orchestrator``, ``heddle submit`` or ``heddle goals rerun``."""
    if args.command == "orchestrator":
        return _run_orchestrator(args)
    if args.command == "goals":
        return _run_rerun(args)
    return _run_submit(args)


# -- heddle orchestrator -------------------------------------------------------------------


def _run_orchestrator(args: argparse.Namespace) -> int:
    from heddle.app import Heddle
    from heddle.cli.common import preflight
    from heddle.runtime import load_app, run_actor_process

    logging.basicConfig(level=args.loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = load_app(args.app) if args.app else Heddle("orchestrator")
    limit = max_concurrent_goals(args)  # a bad HEDDLE_MAX_CONCURRENT_GOALS fails before any connection
    preflight(args, app)
    orch = Orchestrator(app, max_concurrent_goals=limit)
    err_console.print(
        f"[bold]heddle orchestrator[/]  nats {escape(redact(app.settings.nats_url))}  "
        f"valkey {escape(redact(app.settings.valkey_url))}  "
        f"max_concurrent_goals={limit}"
    )

    run_actor_process(app, orch, args.health_port)
    return 0


# -- heddle goals rerun --------------------------------------------------------------------


def _run_rerun(args: argparse.Namespace) -> int:
    from heddle.graphs.pipeline import Pipeline
    from heddle.graphs.rerun import arerun

    text = args.input
    context = None
    if text is not None:
        context = _parse_input(text if text.lstrip().startswith("{") or text.startswith("@") else "@" + text)
    app = _submit_app(args)

    async def run() -> dict[str, Any]:
        try:
            rerun = await arerun(app, args.goal_id, args.from_stage, context, budget_usd=args.budget_usd,
                                 task_id=args.task_id)
        except BaseException:
            await app.aclose()
            raise
        if not args.quiet:
            err_console.print(
                f"rerun of goal [cyan]{rerun.rerun_of}[/] from stage {escape(rerun.from_stage)} as goal "
                f"[cyan]{rerun.result.id}[/]: reusing {escape(', '.join(rerun.reused) or 'nothing')}; "
                f"sending {escape(', '.join(rerun.sent))}")
        outcome = await _follow(app, rerun.result, Pipeline(rerun.node), args)
        return {**outcome, "rerun_of": rerun.rerun_of, "from_stage": rerun.from_stage, "reused": rerun.reused,
                "sent": rerun.sent}

    try:
        outcome = asyncio.run(run())
    finally:
        app.close()
    return _print_outcome(outcome, outcome["pipeline"], args)


# -- heddle submit -------------------------------------------------------------------------


def _parse_input(text: str) -> dict[str, Any]:
    source = "--input"
    if text.startswith("@"):
        source = text[1:]
        try:
            text = Path(source).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read the input file {source}: {exc.strerror}") from None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ConfigError(
            f"{source} is not valid JSON ({exc}); pass an object such as '{{\"text\": \"...\"}}'"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{source} must be a JSON object (it becomes goal.context), got {type(value).__name__}")
    return value


def _submit_app(args: argparse.Namespace) -> Heddle:
    from heddle.app import Heddle
    from heddle.runtime import load_app

    return load_app(args.app) if args.app else Heddle("submit")


def _run_submit(args: argparse.Namespace) -> int:
    from heddle.graphs.pipeline import load_pipeline

    pipeline = load_pipeline(args.pipeline)
    context = _parse_input(args.input)
    app = _submit_app(args)
    try:
        outcome = asyncio.run(_submit(app, pipeline, context, args))
    finally:
        app.close()
    return _print_outcome(outcome, pipeline.name, args)


def _print_outcome(outcome: dict[str, Any], name: str, args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(outcome, indent=2, default=str))
    else:
        out = Console(soft_wrap=True)
        out.print(_timeline_table(outcome["timeline"], title=f"{name} {outcome['goal_id']}"))
        if outcome["cost_usd"] is not None:
            budget = f" of budget_usd {usd(outcome['budget_usd'])}" if outcome["budget_usd"] is not None else ""
            out.print(f"cost {usd(outcome['cost_usd'])}{budget}")
        if outcome["state"] == SUCCESS:
            out.print_json(json.dumps(outcome["output"], default=str))
        else:
            out.print(f"[bold red]{outcome['state']}[/]: {escape(redact(str(outcome['error'])))}")
    return 0 if outcome["state"] == SUCCESS else 1


async def _submit(app: Heddle, pipeline: Pipeline, context: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    if args.app:
        node = pipeline.resolved(app)  # the tasks of -A's app
    else:
        # The live workers announce their tasks: each stage goes to a worker type that runs it.
        from heddle.status import list_workers

        node = pipeline.resolved_by_workers([row.info for row in await list_workers(app)])
    result = pipeline.submit(app, node, context, args.task_id, budget_usd=getattr(args, "budget_usd", None))
    await result.sent()
    if not args.quiet:
        err_console.print(f"submitted goal [cyan]{result.id}[/] ({pipeline.name}, {len(pipeline.node.stages)} stages)")
    return await _follow(app, result, pipeline, args)


async def _follow(app: Heddle, result: GraphResult, pipeline: Pipeline, args: argparse.Namespace) -> dict[str, Any]:
    waiter = asyncio.ensure_future(result.aget(timeout=args.timeout, propagate=False))
    if not args.quiet:
        await _show_progress(app, result, pipeline, waiter)
    try:
        await waiter
    finally:
        await app.aclose()
    record = result.final_record
    assert record is not None
    return {
        "goal_id": result.id,
        "pipeline": pipeline.name,
        "state": record.state,
        "output": record.result,
        "error": f"{record.error.type}: {record.error.message}" if record.error else None,
        "started": record.started_at,
        "ended": record.finished_at,
        "wall_s": round(record.finished_at - record.started_at, 6),
        "timeline": record.meta.get("timeline", []),
        "cost_usd": record.meta.get("cost_usd"),
        "budget_usd": record.meta.get("budget_usd"),
    }


async def _show_progress(app: Heddle, result: GraphResult, pipeline: Pipeline, waiter: asyncio.Future[Any]) -> None:
    """Redraw the stage table on every node transition the orchestrator announces."""
    conns = await app.connections()
    changed = asyncio.Event()

    async def on_event(_msg: Any) -> None:
        changed.set()

    sub = await conns.broker.subscribe(names.goal_event_subject(result.id), cb=on_event)
    stage_names = [s.name for s in pipeline.node.stages]
    try:
        with Live(console=err_console, refresh_per_second=8, transient=False) as live:
            while True:
                states = await result.anodes()
                running = {
                    p for p, st in states.items()
                    if st.state == DISPATCHED and await app.AsyncResult(st.task_id).astate() == STARTED
                }
                live.update(_progress_table(stage_names, states, running))
                if waiter.done():
                    break
                changed.clear()
                # Events make redraws prompt; the timeout only refreshes the elapsed column.
                ping = asyncio.ensure_future(changed.wait())
                await asyncio.wait({waiter, ping}, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                ping.cancel()
    finally:
        await sub.unsubscribe()


def _progress_table(stage_names: list[str], states: dict[str, NodeState], running: set[str]) -> Table:
    table = Table(title="stages", title_justify="left")
    for col in ("stage", "state", "elapsed", "tier", "worker"):
        table.add_column(col)
    now = time.time()
    style = {"succeeded": "green", "failed": "red", "skipped": "dim", "revoked": "yellow", "recovered": "yellow"}
    for name in stage_names:
        st = states.get(name)
        if st is None:
            table.add_row(name, "[dim]waiting[/]", "", "", "")
            continue
        state = "running" if name in running else ("queued" if st.state == DISPATCHED else st.state)
        begin = st.started_at or st.sent_at
        end = st.ended_at or now
        elapsed = f"{end - begin:.2f}s" if begin else ""
        colour = style.get(state, "cyan")
        table.add_row(name, f"[{colour}]{state}[/]", elapsed, st.tier, st.worker)
    return table


def _clock(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int((t % 1) * 1000):03d}"


def _timeline_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=f"timeline {title}", title_justify="left")
    costs = any(r.get("cost_usd") is not None for r in rows)
    for col in ("stage", "state", "started", "ended", "wall", "tier", "worker", *(("cost",) if costs else ())):
        table.add_column(col)
    for r in rows:
        wall = f"{r['wall_s']:.3f}s" if r.get("wall_s") is not None else "-"
        state = r["state"] + (f" ({r['reason']})" if r.get("reason") else "")
        cost = (usd(r["cost_usd"]) if r.get("cost_usd") is not None else "-",) if costs else ()
        table.add_row(r["name"], state, _clock(r.get("started")), _clock(r.get("ended")), wall,
                      r.get("tier") or "-", r.get("worker") or "-", *cost)
    return table

