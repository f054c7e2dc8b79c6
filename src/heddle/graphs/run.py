"""Running one goal: walk its graph, dispatch ready nodes, pass outputs along.

The walk is a recursive evaluation of the node tree (a pipeline is a DAG of
stages inside one node). A task node is sent under its deterministic id
(:func:`~heddle.graphs.model.node_task_id`) and its result awaited; chains pass each
value on, groups and maps run their members concurrently and collect the
results in order, a chord feeds the header's list to its body.

Every transition is checkpointed (``graph_store``) *after* it happened: a node
is marked dispatched once JetStream has stored its message, and ended once its
result is read. A resumed walk therefore does one of three things per task
node: nothing is known → send it (a duplicate of a message that did go out is
dropped by JetStream's dedup window, or acked unrun by a worker that finds its
result stored); dispatched → wait for its result, do not send again; ended →
read its stored result at once. No node whose result is stored runs again.

A goal with a ``budget_usd`` (its own, or its pipeline's; the lower holds)
sends no task once its nodes' costs (each result's ``cost_usd``, kept in the
checkpoint) have used it up, and gives each task it sends what is left as the
task's own budget, so the task stops before the model call that would pass it.
Stages running in parallel each get what was left when they were sent.

A failing node fails its parent unless the node has an error callback; the
first failure in a group cancels the wait on its siblings and revokes those
still dispatched, so a failed graph does not leave work running for nobody.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from heddle import names
from heddle.errors import ConfigError, EncodeError, ResultTimeout
from heddle.graphs.model import (
    DISPATCHED,
    FAILED,
    GOAL_RUNNING,
    RECOVERED,
    REVOKED_NODE,
    SKIPPED,
    SUCCEEDED,
    ChainNode,
    ChordNode,
    GoalMessage,
    GoalState,
    GroupNode,
    MapNode,
    Node,
    NodeState,
    PipelineNode,
    ReusedStage,
    TaskNode,
    child_path,
    node_label,
    node_task_id,
)
from heddle.graphs.paths import PathError, Ref, value_of
from heddle.graphs.pipeline import PipelineError, StagePlan, build_plan
from heddle.graphs.store import GoalStore
from heddle.messages import FAILURE, REVOKED, SUCCESS, ErrorInfo, ResultRecord, encoder
from heddle.results import AsyncResult
from heddle.send import usd

if TYPE_CHECKING:
    from heddle.connections import Client, Connections

log = logging.getLogger("heddle.orchestrator")

# The error type of a task or goal stopped by its budget, as result records name it.
BUDGET_ERROR = "heddle.errors.BudgetExceeded"


class NodeFailure(Exception):
    """A node of the graph failed; carries where, what, and the remote error."""

    def __init__(self, path: str, name: str, error: ErrorInfo, task_id: str = "", stage: bool = False) -> None:
        self.path = path
        self.name = name
        self.error = error
        self.task_id = task_id
        self.stage = stage
        super().__init__(self.describe())

    def where(self) -> str:
        """The node, as a person would name it."""
        if self.stage:
            return f"stage {self.name!r}"
        return f"node {self.name!r} at {self.path or 'the root'}"

    def describe(self) -> str:
        return f"{self.where()} failed: {self.error.type}: {self.error.message}"


def _cost(st: NodeState, record: ResultRecord | None) -> float | None:
    """A node's cost: its earlier attempts' plus what this attempt's result says it cost."""
    cost = record.meta.get("cost_usd") if record is not None else None
    if not isinstance(cost, int | float) or isinstance(cost, bool):
        return st.cost_usd
    return (st.cost_usd or 0.0) + float(cost)


def _graph_error(message: str) -> ErrorInfo:
    return ErrorInfo(type="heddle.GraphError", message=message)


class GoalRun:
    """The walk of one goal's graph, resumable from its checkpoint.

    Args:
        app: Sends node tasks and reads their results (on the running loop).
        conns: The loop's connections.
        goal: The goal message.
        store: Checkpoint store.
        orchestrator: This orchestrator's name (recorded in the goal's state).
    """

    def __init__(
        self, app: Client, conns: Connections, goal: GoalMessage, store: GoalStore, orchestrator: str
    ) -> None:
        self.app = app
        self.conns = conns
        self.goal = goal
        self.store = store
        self.orchestrator = orchestrator
        self.nodes: dict[str, NodeState] = {}
        self.runs = 1
        self.started_at = time.time()
        budgets = [b for b in (goal.budget_usd, getattr(goal.graph, "budget_usd", None)) if b is not None]
        self.budget_usd: float | None = min(budgets) if budgets else None

    # -- the goal ----------------------------------------------------------------------

    async def run(self) -> ResultRecord:
        """Walk the graph to its end and return the goal's result record (not yet stored)."""
        goal = self.goal
        cp = await self.store.load(goal.id)
        self.nodes = dict(cp.nodes)
        if cp.goal is not None:
            self.runs = cp.goal.runs + 1
            self.started_at = cp.goal.started_at or self.started_at
            ended = sum(1 for n in self.nodes.values() if n.state in (SUCCEEDED, SKIPPED) and not n.composite)
            waiting = sum(1 for n in self.nodes.values() if n.state == DISPATCHED)
            log.warning(
                "resuming goal %s from its checkpoint (run %d): %d node(s) already ended, %d dispatched",
                goal.id, self.runs, ended, waiting,
            )
        await self.store.put(
            goal.id,
            goal=self.goal_state(GOAL_RUNNING),
            message=encoder.encode(goal) if cp.goal_message is None else None,
        )
        meta: dict[str, Any] = {"runs": self.runs}
        try:
            value = await self.eval(goal.graph, "", tuple(goal.args), dict(goal.kwargs))
            state, error = SUCCESS, None
        except NodeFailure as f:
            value = None
            state = FAILURE
            message = f"{f.where()} failed: {f.error.message}"
            if self.budget_usd is not None and f.error.type == BUDGET_ERROR and "the goal's" not in message:
                message += f" (the goal has spent {usd(self.spent_usd())} of its budget_usd {usd(self.budget_usd)})"
            error = ErrorInfo(type=f.error.type, message=message, traceback=f.error.traceback)
            meta["failed_node"] = f.path
            meta["failed_name"] = f.name
        if self.budget_usd is not None:
            meta["budget_usd"] = self.budget_usd
        if self.budget_usd is not None or any(n.cost_usd is not None for n in self.nodes.values()):
            meta["cost_usd"] = self.spent_usd()
        meta["timeline"] = self.timeline()
        return ResultRecord(
            id=goal.id,
            state=state,
            task=goal.name or node_label(goal.graph),
            result=value,
            error=error,
            worker=self.orchestrator,
            started_at=self.started_at,
            finished_at=time.time(),
            meta=meta,
        )

    def goal_state(self, state: str, ended_at: float = 0.0) -> GoalState:
        """The goal's own checkpoint entry in ``state``."""
        return GoalState(
            id=self.goal.id,
            state=state,
            name=self.goal.name,
            orchestrator=self.orchestrator,
            started_at=self.started_at,
            ended_at=ended_at,
            runs=self.runs,
        )

    def spent_usd(self) -> float:
        """What the goal's task nodes have cost so far (every attempt's), from the checkpoint."""
        return sum(n.cost_usd or 0.0 for n in self.nodes.values() if not n.composite)

    def timeline(self) -> list[dict[str, Any]]:
        """Per task node / stage: path, name, state, started, ended, wall_s, tier, worker, attempt, cost_usd."""
        rows = []
        for n in self.nodes.values():
            if n.composite:
                continue
            wall = n.ended_at - n.started_at if n.started_at and n.ended_at else None
            rows.append({
                "path": n.path,
                "name": n.name,
                "state": n.state,
                "started": n.started_at or None,
                "ended": n.ended_at or None,
                "wall_s": round(wall, 6) if wall is not None else None,
                "tier": n.tier,
                "worker": n.worker,
                "attempt": n.attempt,
                **({"reason": n.reason} if n.reason else {}),
                **({"cost_usd": n.cost_usd} if n.cost_usd is not None else {}),
            })
        rows.sort(key=lambda r: (r["started"] or r["ended"] or float("inf"), r["path"]))
        return rows

    # -- checkpoints ---------------------------------------------------------------------

    async def mark(self, state: NodeState) -> None:
        """Record a node transition: in memory, in Valkey, then announce it (for live progress)."""
        self.nodes[state.path] = state
        await self.store.put(self.goal.id, [state])
        try:
            await self.conns.broker.publish_core(names.goal_event_subject(self.goal.id), encoder.encode(state))
        except Exception as exc:  # progress displays re-read the checkpoint anyway
            log.debug("could not announce a node transition: %r", exc)

    async def abandon(self, path: str, reason: str) -> None:
        """Revoke every node under ``path`` still dispatched (their results are no longer wanted)."""
        prefix = child_path(path, "")
        for st in list(self.nodes.values()):
            if st.state == DISPATCHED and not st.composite and (not path or st.path.startswith(prefix)):
                await self.conns.revoke(st.task_id, st.name)
                await self.mark(msgspec.structs.replace(st, state=REVOKED_NODE, reason=reason))

    # -- evaluation ----------------------------------------------------------------------

    async def eval(self, node: Node, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The value of ``node`` given what flows into it; raise NodeFailure if it fails."""
        composite = not isinstance(node, TaskNode) and path != ""
        started = time.time()
        try:
            if isinstance(node, TaskNode):
                value = await self._task_node(node, path, args, kwargs)
            elif isinstance(node, ChainNode):
                value = await self._chain(node, path, args, kwargs)
            elif isinstance(node, GroupNode):
                value = await self._all([self.eval(m, child_path(path, i), args, kwargs)
                                         for i, m in enumerate(node.members)], path)
            elif isinstance(node, ChordNode):
                header = await self.eval(node.header, child_path(path, 0), args, kwargs)
                value = await self.eval(node.body, child_path(path, 1), (header,), {})
            elif isinstance(node, MapNode):
                value = await self._map(node, path, args)
            elif isinstance(node, PipelineNode):
                value = await self._pipeline(node, path)
            else:  # pragma: no cover - the decoder accepts only the node types above
                raise NodeFailure(path, "?", _graph_error(f"unknown node type {type(node).__name__}"))
        except NodeFailure as failure:
            if node.on_error is None:
                if composite:
                    await self._composite_end(node, path, started, failure=failure)
                raise
            value = await self._recover(node, path, failure)
            if composite:
                await self._composite_end(node, path, started, value=value, recovered=failure)
            return value
        if composite:
            await self._composite_end(node, path, started, value=value)
        return value

    async def _recover(self, node: Node, path: str, failure: NodeFailure) -> Any:
        """Run the node's error callback with a failure dict; its value stands in for the node's."""
        assert node.on_error is not None
        info = {
            "node": failure.path,
            "name": failure.name,
            "task_id": failure.task_id,
            "type": failure.error.type,
            "message": failure.error.message,
            "traceback": failure.error.traceback,
        }
        value = await self.eval(node.on_error, child_path(path, "e"), (info,), {})
        st = self.nodes.get(path)
        if isinstance(node, TaskNode) and st is not None and st.state == FAILED:
            await self.mark(msgspec.structs.replace(st, state=RECOVERED))
        return value

    async def _composite_end(
        self,
        node: Node,
        path: str,
        started: float,
        *,
        value: Any = None,
        failure: NodeFailure | None = None,
        recovered: NodeFailure | None = None,
    ) -> None:
        """Store a composite node's result (so its handle's ``get()`` works) and checkpoint it."""
        tid = node_task_id(self.goal.id, path)
        name = node_label(node)
        now = time.time()
        if failure is not None:
            error: ErrorInfo | None = ErrorInfo(
                type=failure.error.type, message=failure.describe(), traceback=failure.error.traceback
            )
            record = ResultRecord(id=tid, state=FAILURE, task=name, error=error, worker=self.orchestrator,
                                  started_at=started, finished_at=now)
        else:
            error = None
            meta = {"recovered_from": recovered.describe()} if recovered is not None else {}
            record = ResultRecord(id=tid, state=SUCCESS, task=name, result=value, worker=self.orchestrator,
                                  started_at=started, finished_at=now, meta=meta)
        await self.conns.store_final(record)
        state = FAILED if failure is not None else (RECOVERED if recovered is not None else SUCCEEDED)
        await self.mark(NodeState(path=path, name=name, state=state, task_id=tid, started_at=started,
                                  ended_at=now, worker=self.orchestrator, error=error, composite=True))

    async def _all(self, aws: Sequence[Awaitable[Any]], path: str) -> list[Any]:
        """Run concurrently, results in order; on the first failure stop the rest and revoke them."""
        tasks = [asyncio.ensure_future(a) for a in aws]
        if not tasks:
            return []
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        except asyncio.CancelledError:
            # The goal is being stopped (shutdown): leave dispatched nodes alone, the
            # next orchestrator waits for them.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
        if not failed:
            return [t.result() for t in tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        exc = failed[0].exception()
        assert exc is not None
        if isinstance(exc, NodeFailure):
            await self.abandon(path, f"abandoned: {exc.where()} failed")
        raise exc

    async def _chain(self, node: ChainNode, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        value: Any = None
        for i, step in enumerate(node.steps):
            value = await self.eval(step, child_path(path, i), args, kwargs)
            args, kwargs = (value,), {}
        return value

    async def _map(self, node: MapNode, path: str, args: tuple[Any, ...]) -> list[Any]:
        label = node_label(node)
        items = node.items
        if items is None:
            if len(args) != 1 or not isinstance(args[0], list | tuple):
                got = "nothing" if not args else f"{len(args)} values" if len(args) > 1 else type(args[0]).__name__
                raise NodeFailure(path, label, _graph_error(
                    f"{label} without items maps over the previous result, which must be a list; got {got}"
                ))
            items = list(args[0])
        calls = []
        for i, item in enumerate(items):
            if node.star and not isinstance(item, list | tuple):
                raise NodeFailure(path, label, _graph_error(
                    f"element {i} of {label} must be a list of arguments, got {type(item).__name__}"
                ))
            item_args = tuple(item) if node.star else (item,)
            calls.append(self.eval(node.task, child_path(path, i), item_args, {}))
        return await self._all(calls, path)

    async def _task_node(self, node: TaskNode, path: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call_args = tuple(node.args) if node.immutable else (*args, *node.args)
        call_kwargs = dict(node.kwargs) if node.immutable else {**node.kwargs, **kwargs}
        return await self._task(
            path, node.task, node.task, call_args, call_kwargs,
            worker_type=node.worker_type, tier=node.tier, headers=node.headers, countdown=node.countdown_s,
        )

    async def _task(
        self,
        path: str,
        name: str,
        task: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        *,
        worker_type: str | None,
        tier: str | None,
        headers: dict[str, str] | None = None,
        countdown: float | None = None,
        timeout_s: float | None = None,
        retries: int = 0,
        stage: bool = False,
    ) -> Any:
        """Dispatch (unless the checkpoint says it was) and await one task node, with retries."""
        from heddle.send import send

        st = self.nodes.get(path)
        attempt = st.attempt if st is not None else 0
        while True:
            tid = node_task_id(self.goal.id, path, attempt)
            known = st is not None and st.task_id == tid
            if known and st is not None and st.state == REVOKED_NODE:
                # Abandoned in an earlier run because a sibling failed; that sibling fails
                # again in this run and cancels this wait.
                await asyncio.get_running_loop().create_future()
            if known and st is not None and st.state in (FAILED, RECOVERED):
                error = st.error or _graph_error("failed")
            else:
                if not known:
                    budget = self._budget_left(path, name, tid, stage)
                    try:
                        handle = send(self.app, task, args, kwargs, task_id=tid, tier=tier,
                                      worker_type=worker_type, headers=headers, countdown=countdown,
                                      budget_usd=budget)
                    except (TypeError, ValueError, EncodeError, ConfigError) as exc:
                        raise NodeFailure(path, name, ErrorInfo(type=f"heddle.{type(exc).__name__}",
                                                                message=str(exc)), tid, stage) from None
                    await handle.sent()
                    st = NodeState(path=path, name=name, state=DISPATCHED, task_id=tid, attempt=attempt,
                                   sent_at=time.time(), cost_usd=st.cost_usd if st is not None else None)
                    await self.mark(st)
                else:
                    handle = AsyncResult(tid, self.app, task)
                assert st is not None
                record = await self._wait(handle, timeout_s)
                if record is not None and record.state == SUCCESS:
                    if st.state != SUCCEEDED:
                        st = msgspec.structs.replace(
                            st, state=SUCCEEDED, started_at=record.started_at, ended_at=record.finished_at,
                            worker=record.worker, tier=record.tier, cost_usd=_cost(st, record),
                        )
                        await self.mark(st)
                    return record.result
                if record is None:
                    await self.conns.revoke(tid, task)
                    error = ErrorInfo(type="heddle.TaskTimeout",
                                      message=f"no result within {timeout_s:g}s; the task was revoked")
                elif record.state == REVOKED:
                    error = ErrorInfo(type="heddle.TaskRevoked", message=f"task {tid} was revoked")
                else:
                    error = record.error or ErrorInfo(type="heddle.UnknownError", message=f"ended in {record.state}")
                st = msgspec.structs.replace(
                    st, state=FAILED, error=error,
                    started_at=record.started_at if record else st.sent_at,
                    ended_at=record.finished_at if record else time.time(),
                    worker=record.worker if record else "", tier=record.tier if record else "",
                    cost_usd=_cost(st, record),
                )
                await self.mark(st)
            if attempt < retries:
                attempt += 1
                log.info("goal %s: %s failed (%s); attempt %d of %d", self.goal.id, name, error.type,
                         attempt + 1, retries + 1)
                continue
            raise NodeFailure(path, name, error, tid, stage)

    def _budget_left(self, path: str, name: str, tid: str, stage: bool) -> float | None:
        """What the goal's budget leaves for the next task; a NodeFailure when nothing is left."""
        if self.budget_usd is None:
            return None
        spent = self.spent_usd()
        if spent >= self.budget_usd:
            what = f"stage {name!r}" if stage else f"task {name!r}"
            raise NodeFailure(path, name, ErrorInfo(
                type=BUDGET_ERROR,
                message=f"budget exceeded: the goal's model calls have spent {usd(spent)} of its budget_usd "
                        f"{usd(self.budget_usd)}; {what} was not sent",
            ), tid, stage)
        return self.budget_usd - spent

    async def _wait(self, handle: AsyncResult[Any], timeout_s: float | None) -> ResultRecord | None:
        """The node's final record, or None if ``timeout_s`` ran out.

        A notice lost while NATS reconnected is caught by heddle.notices, which
        reads the stored record again after reconnects and while the wait goes on.
        """
        try:
            await handle.aget(timeout=timeout_s, propagate=False)
        except ResultTimeout:
            return None
        return handle.final_record

    # -- pipelines -----------------------------------------------------------------------

    async def _pipeline(self, node: PipelineNode, path: str) -> Any:
        try:
            plan = build_plan(node)
        except PipelineError as exc:
            raise NodeFailure(path, node.name, ErrorInfo(type="heddle.PipelineError", message=str(exc))) from None
        scope: dict[str, Any] = {"goal": {"context": dict(self.goal.context), "id": self.goal.id}}
        skipped: set[str] = set()
        tasks: dict[str, asyncio.Future[Any]] = {}

        async def stage(sp: StagePlan) -> None:
            for dep in sorted(sp.deps):
                await asyncio.shield(tasks[dep])
            await self._stage(sp, child_path(path, sp.spec.name), scope, skipped)

        # Topological order: every stage's dependencies have their tasks before it runs.
        for name in plan.order:
            tasks[name] = asyncio.ensure_future(stage(plan.stages[name]))
        await self._all(list(tasks.values()), path)
        if plan.output is None:
            return {n: scope[n] for n in plan.stages if n in scope}
        out: dict[str, Any] = {}
        for key, mapped in plan.output.items():
            if isinstance(mapped, Ref) and mapped.stage in skipped:
                out[key] = None
                continue
            try:
                out[key] = value_of(mapped, scope)
            except PathError as exc:
                raise NodeFailure(path, node.name, ErrorInfo(type="heddle.PathError",
                                                             message=f"output_mapping.{key}: {exc}")) from None
        return out

    async def _stage(self, sp: StagePlan, path: str, scope: dict[str, Any], skipped: set[str]) -> None:
        spec = sp.spec
        name = spec.name
        reused = self.goal.reuse.get(name)
        if reused is not None:
            await self._reuse(path, name, reused, scope, skipped)
            return
        reason = ""
        upstream = sorted(sp.reads & skipped)
        try:
            if upstream:
                reason = f"reads the output of skipped stage(s) {', '.join(upstream)}"
            elif sp.condition is not None and not sp.condition.evaluate(scope):
                reason = f"condition {sp.condition.source!r} is false"
            inputs = {} if reason else {k: value_of(m, scope) for k, m in sp.inputs.items()}
        except PathError as exc:
            raise NodeFailure(path, name, ErrorInfo(type="heddle.PathError", message=str(exc)),
                              node_task_id(self.goal.id, path), stage=True) from None
        if reason:
            skipped.add(name)
            await self._skip(path, name, reason)
            return
        args: tuple[Any, ...]
        wt: str | None
        if spec.worker_type is not None:
            task, args, kwargs, wt = spec.worker_type, (inputs,), {}, spec.worker_type
        else:
            assert spec.task is not None
            task, args, kwargs, wt = spec.task, (), inputs, spec.task_worker_type
        scope[name] = await self._task(
            path, name, task, args, kwargs, worker_type=wt, tier=spec.tier,
            timeout_s=spec.timeout_s, retries=spec.retries, stage=True,
            headers={names.HDR_CACHE: str(spec.cache_ttl_s)} if spec.cache_ttl_s else None,
        )

    async def _reuse(self, path: str, name: str, reused: ReusedStage, scope: dict[str, Any],
                     skipped: set[str]) -> None:
        """A rerun's stage before the one it reruns from: its original output, not sent again."""
        if reused.skipped:
            skipped.add(name)
            await self._skip(path, name, reused.skipped)
            return
        scope[name] = reused.output
        st = self.nodes.get(path)
        if st is not None and st.state == SUCCEEDED:
            return
        tid = node_task_id(self.goal.id, path)
        now = time.time()
        reason = f"reused from {reused.task_id}"
        await self.conns.store_final(ResultRecord(id=tid, state=SUCCESS, task=name, result=reused.output,
                                                  worker=self.orchestrator, finished_at=now,
                                                  meta={"reused_from": reused.task_id}))
        await self.mark(NodeState(path=path, name=name, state=SUCCEEDED, task_id=tid, ended_at=now, reason=reason))

    async def _skip(self, path: str, name: str, reason: str) -> None:
        st = self.nodes.get(path)
        if st is not None and st.state == SKIPPED:
            return
        tid = node_task_id(self.goal.id, path)
        now = time.time()
        # A skipped stage's handle resolves to None, with the reason in its metadata.
        await self.conns.store_final(ResultRecord(id=tid, state=SUCCESS, task=name, worker=self.orchestrator,
                                                  finished_at=now, meta={"skipped": reason}))
        await self.mark(NodeState(path=path, name=name, state=SKIPPED, task_id=tid, ended_at=now, reason=reason))
