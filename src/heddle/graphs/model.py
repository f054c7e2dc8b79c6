"""Task graphs on the wire: the goal message, its node tree, and node checkpoints.

A goal is a graph submitted to ``heddle.goals.incoming`` and run by an
orchestrator. Its graph is a tree of tagged msgspec Structs:

* :class:`TaskNode`: one task call (a signature);
* :class:`ChainNode`: steps run one after another, each result passed on;
* :class:`GroupNode`: members run in parallel, results collected in order;
* :class:`ChordNode`: a group, then a body called with the list of results;
* :class:`MapNode`: one task called for every element of a list;
* :class:`PipelineNode`: the stages of a YAML pipeline (a DAG, see ``heddle.graphs.pipeline``).

Every node has a *path*: ``""`` for the root, then child indexes joined by
dots (``"1.0"``), stage names for pipeline stages, and ``e`` for a node's
error callback (``"1.e"``). A node's task id is the goal id plus its path
(``{goal}:1.0``), so a resumed goal sends the same ids again and the
foundation's deduplication and stored-result check make sure no completed node
runs twice. The root's result is the goal's own result, stored under the goal id.

Schema evolution follows :mod:`heddle.messages`: new fields get defaults and go
at the end, and a reader rejects a higher ``v``.
"""

from __future__ import annotations

from typing import Any, Final

import msgspec

from heddle.messages import WIRE_VERSION, ErrorInfo

# Node checkpoint states.
DISPATCHED: Final = "dispatched"  # the task message is stored by JetStream
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
RECOVERED: Final = "recovered"  # failed, and its error callback gave the value
SKIPPED: Final = "skipped"  # a pipeline stage whose condition was false
REVOKED_NODE: Final = "revoked"  # abandoned when a sibling failed or the goal was revoked
NODE_FINAL_STATES: Final = frozenset({SUCCEEDED, FAILED, RECOVERED, SKIPPED, REVOKED_NODE})

# Goal checkpoint states.
GOAL_RUNNING: Final = "running"
GOAL_SUCCEEDED: Final = "succeeded"
GOAL_FAILED: Final = "failed"
GOAL_REVOKED: Final = "revoked"

ERRBACK_SEGMENT: Final = "e"


class TaskNode(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="task"):
    """One task call.

    Attributes:
        task: Task name sent to the worker.
        args: Positional arguments after the ones passed in by the graph.
        kwargs: Keyword arguments.
        immutable: Ignore what the graph passes in (``task.si()``).
        worker_type: Worker type that runs it (resolved by the client).
        tier: Requested tier, or None for the worker type's default.
        headers: Extra headers carried by the task message.
        countdown_s: Delay between dispatch and the earliest run.
        on_error: Error callback, run with a failure dict if this node fails.
    """

    task: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    immutable: bool = False
    worker_type: str | None = None
    tier: str | None = None
    headers: dict[str, str] = {}
    countdown_s: float | None = None
    on_error: TaskNode | None = None


class ChainNode(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="chain"):
    """Steps run in order; each result is the first argument of the next step."""

    steps: list[Node]
    on_error: TaskNode | None = None


class GroupNode(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="group"):
    """Members run in parallel; the result is the list of their results, in order."""

    members: list[Node]
    on_error: TaskNode | None = None


class ChordNode(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="chord"):
    """A header group, then a body called with the list of header results."""

    header: GroupNode
    body: Node
    on_error: TaskNode | None = None


class MapNode(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="map"):
    """``task`` called once per element of ``items`` (or of the incoming value if None).

    With ``star`` each element is a list of positional arguments (``starmap``).
    """

    task: TaskNode
    items: list[Any] | None = None
    star: bool = False
    on_error: TaskNode | None = None


class StageSpec(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One pipeline stage, as written in the pipeline file (see ``heddle.graphs.pipeline``).

    Attributes:
        name: Stage name; also its node path.
        worker_type: A YAML worker type: called with one dict, the mapped input.
        task: A Python task name: called with the mapped input as keyword arguments.
        task_worker_type: Worker type that runs ``task`` (resolved by the client).
        tier: Requested tier.
        input_mapping: Argument name -> path (``goal.context.text``,
            ``extract.output.claims``) or literal.
        depends_on: Stages that must end first (besides those referenced).
        condition: Expression over paths; the stage is skipped when it is false.
        timeout_s: How long the orchestrator waits for one attempt.
        retries: Attempts after the first, each under a new task id.
        cache_ttl_s: With ``cache: true``, how long the worker keeps the stage's output for
            the same input, config and model (``heddle.llm.cache``); None: not cached.
    """

    name: str
    worker_type: str | None = None
    task: str | None = None
    task_worker_type: str | None = None
    tier: str | None = None
    input_mapping: dict[str, Any] = {}
    depends_on: list[str] = []
    condition: str | None = None
    timeout_s: float | None = None
    retries: int = 0
    cache_ttl_s: int | None = None


class PipelineNode(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag="pipeline"):
    """A pipeline: stages forming a DAG, plus an optional output mapping."""

    name: str
    stages: list[StageSpec]
    output_mapping: dict[str, Any] | None = None
    on_error: TaskNode | None = None
    budget_usd: float | None = None  # most the goal's model calls may cost in all


Node = TaskNode | ChainNode | GroupNode | ChordNode | MapNode | PipelineNode


class ReusedStage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A stage a rerun does not send: its stored output (or why it was skipped) from the original goal.

    Attributes:
        output: The stage's result in the original goal.
        skipped: Why it was skipped there, when it was ("" when it ran).
        task_id: The task id its result was stored under.
    """

    output: Any = None
    skipped: str = ""
    task_id: str = ""


class GoalMessage(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A graph to run, published on ``heddle.goals.incoming``.

    Attributes:
        id: Goal id; the goal's result is stored under it like a task result.
        graph: The root node.
        args: Positional arguments passed into the root (``chain.delay(x)``).
        kwargs: Keyword arguments passed into the root.
        context: Pipeline input, read by ``goal.context.*`` paths.
        name: A label for displays (pipeline name).
        submitted_at: Epoch seconds.
        budget_usd: Most the goal's model calls may cost in all (US dollars), or None.
        reuse: For a rerun (``heddle goals rerun``): pipeline stages not sent again, by name.
        rerun_of: The goal this one reruns, or "".
    """

    v: int = WIRE_VERSION
    id: str
    graph: Node
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    context: dict[str, Any] = {}
    name: str = ""
    submitted_at: float = 0.0
    budget_usd: float | None = None
    reuse: dict[str, ReusedStage] = {}
    rerun_of: str = ""


class NodeState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A node's checkpoint: its last transition and, once known, its timing.

    Attributes:
        path: Node path in the graph.
        name: Task or stage name, for messages and displays.
        state: One of dispatched, succeeded, failed, recovered, skipped, revoked.
        task_id: The id of the task message of the current attempt.
        attempt: 0 for the first attempt.
        sent_at: When the current attempt was dispatched (epoch seconds).
        started_at: When a worker started it (from its result record).
        ended_at: When it ended.
        worker: The worker that ran it.
        tier: The tier it ran at.
        error: Why it failed.
        reason: Why it was skipped or revoked.
        composite: True for chain, group, chord and map nodes.
        cost_usd: What its model calls cost (every attempt's), from its result metadata.
    """

    path: str
    name: str
    state: str
    task_id: str = ""
    attempt: int = 0
    sent_at: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    worker: str = ""
    tier: str = ""
    error: ErrorInfo | None = None
    reason: str = ""
    composite: bool = False  # a chain/group/chord/map node: its value is made by the orchestrator
    cost_usd: float | None = None


class GoalState(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """The goal's own checkpoint entry."""

    id: str
    state: str
    name: str = ""
    orchestrator: str = ""
    started_at: float = 0.0
    ended_at: float = 0.0
    runs: int = 1  # how many orchestrator runs it took (2+ means it was resumed)


goal_decoder: Final = msgspec.msgpack.Decoder(GoalMessage)
node_state_decoder: Final = msgspec.msgpack.Decoder(NodeState)
goal_state_decoder: Final = msgspec.msgpack.Decoder(GoalState)
node_decoder: Final = msgspec.msgpack.Decoder(Node)


def child_path(parent: str, segment: str | int) -> str:
    """Path of a child node: ``"" + 0 -> "0"``, ``"1" + 2 -> "1.2"``."""
    return f"{parent}.{segment}" if parent else str(segment)


def node_task_id(goal_id: str, path: str, attempt: int = 0) -> str:
    """Task id of the node at ``path``; the root is the goal itself."""
    if not path:
        return goal_id
    return f"{goal_id}:{path}" + (f"~{attempt}" if attempt else "")


def node_label(node: Node) -> str:
    """A short name of a node for errors and displays."""
    if isinstance(node, TaskNode):
        return node.task
    if isinstance(node, MapNode):
        return f"{'starmap' if node.star else 'map'}({node.task.task})"
    if isinstance(node, PipelineNode):
        return node.name
    return type(node).__name__.removesuffix("Node").lower()
