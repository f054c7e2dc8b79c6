"""Rerun a finished pipeline goal from one stage (``heddle goals rerun GOAL_ID --from STAGE``).

The rerun is a new goal with the same pipeline. The stage named and every
stage after it (each stage that reads it or waits for it, directly or through
others) are sent again; every other stage is not sent: its stored output (or
the reason it was skipped) from the original goal travels in the new goal
message (``GoalMessage.reuse``), and the orchestrator uses it as that stage's
value. ``context`` replaces the goal's input for the stages that are sent.

Every stage that is reused must have succeeded (or been skipped) in the
original goal, and its result must still be stored (results live
``result_ttl_s``); otherwise the rerun is refused, naming the stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from heddle.errors import ConfigError
from heddle.graphs.model import SKIPPED, SUCCEEDED, PipelineNode, ReusedStage, node_label
from heddle.graphs.paths import did_you_mean
from heddle.graphs.pipeline import Plan, build_plan
from heddle.graphs.store import GoalStore
from heddle.messages import READY_STATES, SUCCESS

if TYPE_CHECKING:
    from heddle.connections import Client
    from heddle.graphs.canvas import GraphResult

__all__ = ["Rerun", "after", "arerun"]


@dataclass
class Rerun:
    """A rerun as submitted: the new goal's handle, and what it reuses and sends."""

    result: GraphResult
    node: PipelineNode
    rerun_of: str
    from_stage: str
    reused: list[str]
    sent: list[str]


def after(plan: Plan, stage: str) -> set[str]:
    """``stage`` and every stage that reads it or waits for it, directly or through others."""
    out = {stage}
    for name in plan.order:  # topological: a stage's dependencies come before it
        if plan.stages[name].deps & out:
            out.add(name)
    return out


async def arerun(
    app: Client,
    goal_id: str,
    from_stage: str,
    context: dict[str, Any] | None = None,
    *,
    budget_usd: float | None = None,
    task_id: str | None = None,
) -> Rerun:
    """Submit a rerun of the finished pipeline goal ``goal_id`` from ``from_stage``.

    Args:
        app: The app to send through.
        goal_id: The finished goal.
        from_stage: The first stage to send again; it and the stages after it are sent.
        context: New input for the goal (default: the original goal's).
        budget_usd: The rerun's budget (default: the original goal's).
        task_id: The new goal's id (default: a fresh one).

    Raises:
        ConfigError: The goal is unknown or expired, not a pipeline, not finished; the
            stage is unknown (with a did-you-mean); a stage to reuse has no stored output.
    """
    from heddle.graphs.canvas import submit_goal

    conns = await app.connections()
    cp = await GoalStore(conns.backend, app.settings.result_ttl_s).load(goal_id)
    goal = cp.goal_message
    if goal is None:
        raise ConfigError(f"no goal {goal_id}: it never ran, or its checkpoint expired (goals are kept "
                          f"result_ttl_s={app.settings.result_ttl_s:g}s)")
    node = goal.graph
    if not isinstance(node, PipelineNode):
        raise ConfigError(f"goal {goal_id} is a {node_label(node)} graph, not a pipeline; only pipeline goals "
                          f"rerun from a stage")
    state, _ = await conns.backend.read(goal_id)
    if state not in READY_STATES:
        raise ConfigError(f"goal {goal_id} has not finished ({state}); wait for it, or revoke it, then rerun it")
    plan = build_plan(node)
    if from_stage not in plan.stages:
        raise ConfigError(f"pipeline {node.name!r} has no stage {from_stage!r}{did_you_mean(from_stage, plan.stages)}"
                          f"; its stages: {', '.join(plan.order)}")
    sent = after(plan, from_stage)
    reuse: dict[str, ReusedStage] = {}
    for name in plan.order:
        if name in sent:
            continue
        st = cp.nodes.get(name)
        if st is not None and st.state == SKIPPED:
            reuse[name] = ReusedStage(skipped=st.reason or "skipped", task_id=st.task_id)
            continue
        record = None
        if st is not None and st.state == SUCCEEDED:
            _, record = await conns.backend.read(st.task_id)
        if record is None or record.state != SUCCESS:
            how = "its result has expired" if st is not None and st.state == SUCCEEDED else (
                f"it {st.state}" if st is not None else "it never ran")
            raise ConfigError(f"stage {name!r} has no output in goal {goal_id} to reuse ({how}); rerun from an "
                              f"earlier stage, e.g. --from {name}")
        reuse[name] = ReusedStage(output=record.result, task_id=st.task_id if st is not None else "")
    result = submit_goal(
        app, node, context=goal.context if context is None else context, name=goal.name,
        goal_id=task_id, budget_usd=budget_usd if budget_usd is not None else goal.budget_usd,
        reuse=reuse, rerun_of=goal_id,
    )
    await result.sent()
    return Rerun(result, node, goal_id, from_stage, [n for n in plan.order if n in reuse],
                 [n for n in plan.order if n in sent])
