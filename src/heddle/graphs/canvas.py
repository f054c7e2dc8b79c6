"""The canvas: signatures and the task graphs built from them.

A :class:`Signature` is one task call that has not been sent. Signatures
compose, as in Celery:

* ``chain(a.s(x), b.s(), c.s())`` or ``a.s(x) | b.s() | c.s()``: run in order,
  each result passed as the *first* argument of the next step (an immutable
  signature, ``task.si()``, ignores it);
* ``group(a.s(1), a.s(2))``: run in parallel; the result is the list of
  results in the order of the members;
* ``chord(group(...), body.s())`` (or ``group(...) | body.s()``): the body is
  called with the list of the group's results;
* ``task.map(items)`` / ``task.starmap(items)``: one call per element (each
  element is the argument, or the list of arguments for ``starmap``); with no
  items, inside a chain, the elements are those of the previous result;
* ``sig.on_error(handler.s())`` / ``sig.link_error(handler.s())``: if the node
  fails, ``handler`` is called with a failure dict (``node``, ``name``,
  ``task_id``, ``type``, ``message``, ``traceback``) and its result stands in
  for the node's, so the graph goes on.

A plain signature's ``delay()`` sends one task. Any graph (or a signature with
an error callback) is sent as a *goal* to ``heddle.goals.incoming`` and run by
an orchestrator (``heddle-worker`` hosts one); ``delay()`` / ``apply_async()``
return a :class:`GraphResult`, whose ``get()`` gives the final value and whose
``children`` and :meth:`GraphResult.node` give every node's own result.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from heddle import names
from heddle.errors import HeddleError
from heddle.graphs.model import (
    ChainNode,
    ChordNode,
    GoalMessage,
    GroupNode,
    MapNode,
    Node,
    NodeState,
    PipelineNode,
    ReusedStage,
    TaskNode,
    child_path,
    goal_decoder,
    node_task_id,
)
from heddle.messages import encoder
from heddle.results import AsyncResult
from heddle.send import check_budget_usd, check_message_size, encode_args, new_task_id, send_by_name, submit

if TYPE_CHECKING:
    from heddle.connections import Client

__all__ = ["GraphResult", "Signature", "chain", "chord", "group", "submit_goal", "xmap", "xstarmap"]

# Options a signature may carry into a graph node; ids and absolute times belong to the graph.
_NODE_OPTIONS = frozenset({"tier", "worker_type", "headers", "countdown"})
_GOAL_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,150}$")


class Signature:
    """A task invocation that has not been sent yet.

    Args:
        task: Task name.
        args: Positional arguments.
        kwargs: Keyword arguments.
        options: ``apply_async`` options (countdown, eta, task_id, headers, tier).
        immutable: If True, a chain does not pass the previous result to it.
        app: The app to send through.
    """

    def __init__(
        self,
        task: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        options: dict[str, Any] | None = None,
        immutable: bool = False,
        app: Client | None = None,
    ) -> None:
        self.task = task
        self.args = tuple(args)
        self.kwargs = dict(kwargs or {})
        self.options = dict(options or {})
        self.immutable = immutable
        self.app = app
        self.errback: Signature | None = None

    def __repr__(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task}{'!' if self.immutable else ''}({', '.join(parts)})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Signature):
            return NotImplemented
        return (self.task, self.args, self.kwargs, self.options, self.immutable, self.errback) == (
            other.task,
            other.args,
            other.kwargs,
            other.options,
            other.immutable,
            other.errback,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like Celery's

    def _copy(self, args: tuple[Any, ...], kwargs: dict[str, Any], options: dict[str, Any]) -> Signature:
        sig = Signature(self.task, args, kwargs, options, self.immutable, self.app)
        sig.errback = self.errback
        return sig

    def set(self, **options: Any) -> Signature:
        """Return a copy with extra ``apply_async`` options."""
        return self._copy(self.args, self.kwargs, {**self.options, **options})

    def clone(self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Signature:
        """Return a copy with ``args`` prepended (unless immutable) and ``kwargs`` merged."""
        if self.immutable:
            return self._copy(self.args, self.kwargs, self.options)
        return self._copy(tuple(args) + self.args, {**self.kwargs, **(kwargs or {})}, self.options)

    def _app(self) -> Client:
        if self.app is None:
            raise HeddleError(f"signature {self!r} has no app; build it with task.s(...)")
        return self.app

    # -- composing -----------------------------------------------------------------

    def __or__(self, other: Signature | _Canvas) -> _Canvas:
        return _pipe(self, other)

    def link_error(self, errback: Signature) -> Signature:
        """Call ``errback`` if this node fails (see the module doc); returns ``errback``, as Celery does."""
        self.errback = _errback(self, errback)
        return errback

    def on_error(self, errback: Signature) -> Signature:
        """Like :meth:`link_error`, but returns this signature, for chaining calls."""
        self.link_error(errback)
        return self

    def to_node(self) -> TaskNode:
        """This signature as a graph node (the wire form sent in a goal)."""
        app = self._app()
        unknown = set(self.options) - _NODE_OPTIONS
        if unknown:
            raise HeddleError(
                f"option(s) {', '.join(sorted(unknown))} of {self!r} cannot be used inside a task graph: "
                f"node task ids come from the graph's id (pass task_id= to the graph's apply_async) "
                f"and nodes start when their inputs are ready; allowed: {', '.join(sorted(_NODE_OPTIONS))}"
            )
        encode_args(self.task, self.args, self.kwargs)
        task = app.tasks.get(self.task)
        worker_type = self.options.get("worker_type")
        if worker_type is None:
            # As send_task: a bare name that is not one of the app's tasks names a worker
            # type of its own (a YAML LLM worker); anything else runs on the app's workers.
            worker_type = self.task if task is None and "." not in self.task else app.worker_type
        tier = self.options.get("tier") or (task.options.tier if task is not None else None)
        if tier is not None and tier not in names.TIERS:
            raise HeddleError(f"tier of {self!r} must be one of {', '.join(names.TIERS)}, got {tier!r}")
        countdown = self.options.get("countdown")
        if task is not None and self.immutable:
            try:
                task.signature.bind(*self.args, **self.kwargs)
            except TypeError as exc:
                raise TypeError(
                    f"bad arguments for task {self.task!r} with signature {task.signature}: {exc}"
                ) from None
        return TaskNode(
            task=self.task,
            args=list(self.args),
            kwargs=dict(self.kwargs),
            immutable=self.immutable,
            worker_type=worker_type,
            tier=tier,
            headers=dict(self.options.get("headers") or {}),
            countdown_s=float(countdown) if countdown is not None else None,
            on_error=self.errback.to_node() if self.errback is not None else None,
        )

    # -- sending -------------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> AsyncResult[Any]:
        """Send with extra arguments (prepended unless immutable)."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None, **options: Any
    ) -> AsyncResult[Any]:
        """Send the task; ``options`` override the signature's own.

        With an error callback (``link_error=`` here, or set before) the task is
        sent as a one-node graph and a :class:`GraphResult` is returned.
        """
        errback = options.pop("link_error", None)
        if errback is not None or self.errback is not None:
            sig = self.set(**{k: v for k, v in options.items() if k != "task_id"})
            if errback is not None:
                sig.link_error(errback)
            return chain(sig).apply_async(args, kwargs, task_id=options.get("task_id"))
        sig = self.clone(args, kwargs)
        app = self._app()
        task = app.tasks.get(sig.task)
        opts = {**sig.options, **options}
        if task is not None:
            result: AsyncResult[Any] = task.apply_async(sig.args, sig.kwargs, **opts)
            return result
        return send_by_name(app, sig.task, sig.args, sig.kwargs, **opts)


def _errback(owner: object, errback: object) -> Signature:
    if not isinstance(errback, Signature):
        raise TypeError(
            f"an error callback must be a signature such as handler.s(), got {type(errback).__name__}"
        )
    current = getattr(owner, "errback", None)
    if current is not None and current is not errback:
        raise HeddleError(
            f"{owner!r} already has the error callback {current!r}; a node has one, so combine "
            f"the handling in one task"
        )
    return errback


# -- graphs ------------------------------------------------------------------------------


def _as_signature_or_canvas(obj: object, where: str) -> Signature | _Canvas:
    if isinstance(obj, Signature | _Canvas):
        return obj
    if hasattr(obj, "s") and hasattr(obj, "fn"):
        raise TypeError(f"{where} takes signatures; got the task {obj!r} itself: call {obj.__name__}.s(...)")  # type: ignore[attr-defined]
    raise TypeError(f"{where} takes signatures (task.s(...)) or graphs, got {type(obj).__name__}: {obj!r}")


def _flatten_args(tasks: tuple[Any, ...], where: str) -> list[Signature | _Canvas]:
    # chain(a, b) and chain([a, b]) / chain(generator) both work, as in Celery.
    if len(tasks) == 1 and not isinstance(tasks[0], Signature | _Canvas) and isinstance(tasks[0], Iterable):
        tasks = tuple(tasks[0])
    return [_as_signature_or_canvas(t, where) for t in tasks]


def _pipe(left: Signature | _Canvas, right: object) -> _Canvas:
    right = _as_signature_or_canvas(right, "|")
    if isinstance(left, group) and left.errback is None:
        return chord(left, right)
    steps: list[Signature | _Canvas] = []
    for part in (left, right):
        if isinstance(part, chain) and part.errback is None:
            steps.extend(part.tasks)
        else:
            steps.append(part)
    return chain(*steps)


def _find_app(parts: Iterable[Signature | _Canvas]) -> Client | None:
    for p in parts:
        app = p.app if isinstance(p, Signature) else p._find_app()
        if app is not None:
            return app
    return None


class _Canvas:
    """What every graph shares: composing, an error callback, sending as a goal."""

    errback: Signature | None = None

    def _parts(self) -> list[Signature | _Canvas]:
        raise NotImplementedError

    def _find_app(self) -> Client | None:
        return _find_app(self._parts())

    @property
    def app(self) -> Client | None:
        """The app of the first signature in the graph."""
        return self._find_app()

    def to_node(self) -> Node:
        """The graph's wire form."""
        raise NotImplementedError

    def __or__(self, other: Signature | _Canvas) -> _Canvas:
        return _pipe(self, other)

    def link_error(self, errback: Signature) -> Signature:
        """Call ``errback`` if this graph fails; its result stands in for the graph's."""
        self.errback = _errback(self, errback)
        return errback

    def on_error(self, errback: Signature) -> _Canvas:
        """Like :meth:`link_error`, but returns the graph."""
        self.link_error(errback)
        return self

    def _errback_node(self) -> TaskNode | None:
        return self.errback.to_node() if self.errback is not None else None

    def delay(self, *args: Any, **kwargs: Any) -> GraphResult:
        """Submit the graph; ``args``/``kwargs`` are passed into its first node(s)."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        task_id: str | None = None,
        app: Client | None = None,
    ) -> GraphResult:
        """Submit the graph as a goal and return its handle.

        Args:
            args: Positional arguments prepended to the first node's (every
                member's, for a group), as ``Signature.delay`` does.
            kwargs: Keyword arguments merged into the first node(s).
            task_id: The goal id (default: a fresh one). Node task ids derive
                from it, and a repeated id within the dedup window is dropped.
            app: The app to send through (default: the first signature's).

        Raises:
            EncodeError: An argument cannot be encoded; the message names it.
            HeddleError: The graph is malformed; the message says how to fix it.
        """
        app = app or self._find_app()
        if app is None:
            raise HeddleError(f"graph {self!r} has no app; build its signatures with task.s(...)")
        return submit_goal(app, self.to_node(), args=tuple(args), kwargs=kwargs, goal_id=task_id)

    async def aapply_async(self, *a: Any, **kw: Any) -> GraphResult:
        """Like :meth:`apply_async`, but returns once JetStream has stored the goal."""
        result = self.apply_async(*a, **kw)
        await result.sent()
        return result


class chain(_Canvas):  # Celery's name
    """Run steps one after another; each result is the first argument of the next step."""

    def __init__(self, *tasks: Any) -> None:
        self.tasks = _flatten_args(tasks, "chain()")
        if not self.tasks:
            raise HeddleError("chain() needs at least one step, e.g. chain(fetch.s(url), parse.s())")

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks)

    def _parts(self) -> list[Signature | _Canvas]:
        return list(self.tasks)

    def to_node(self) -> ChainNode:
        return ChainNode(steps=[t.to_node() for t in self.tasks], on_error=self._errback_node())


class group(_Canvas):  # Celery's name
    """Run members in parallel; the result is the list of their results, in member order."""

    def __init__(self, *tasks: Any) -> None:
        self.tasks = _flatten_args(tasks, "group()")

    def __repr__(self) -> str:
        return f"group({', '.join(repr(t) for t in self.tasks)})"

    def _parts(self) -> list[Signature | _Canvas]:
        return list(self.tasks)

    def to_node(self) -> GroupNode:
        return GroupNode(members=[t.to_node() for t in self.tasks], on_error=self._errback_node())


class chord(_Canvas):  # Celery's name
    """A group (the header), then ``body`` called with the list of the header's results.

    ``chord(header)(body)`` submits at once, as in Celery.
    """

    def __init__(self, header: Any, body: Signature | _Canvas | None = None) -> None:
        if not isinstance(header, group):
            header = group(header)
        self.header: group = header
        self.body = _as_signature_or_canvas(body, "chord() body") if body is not None else None

    def __repr__(self) -> str:
        return f"chord({self.header!r}, {self.body!r})"

    def _parts(self) -> list[Signature | _Canvas]:
        return [self.header, *([self.body] if self.body is not None else [])]

    def __call__(self, body: Signature | _Canvas | None = None, **options: Any) -> GraphResult:
        """Submit with ``body`` (``chord(header)(body)``)."""
        if body is not None:
            self.body = _as_signature_or_canvas(body, "chord() body")
        return self.apply_async(**options)

    def to_node(self) -> ChordNode:
        if self.body is None:
            raise HeddleError("chord has no body; use chord(header, body.s()) or chord(header)(body.s())")
        return ChordNode(header=self.header.to_node(), body=self.body.to_node(), on_error=self._errback_node())


class xmap(_Canvas):  # Celery's name
    """``task.map(items)``: ``task`` called once per element, results in order.

    Unlike Celery's (one message, run sequentially), each call is a node of its
    own and they run in parallel. With ``items=None`` the elements are those of
    the value passed in (the previous result in a chain); with items given, the
    value passed in is ignored, as for an immutable signature.
    """

    star = False

    def __init__(self, task: Signature, items: Iterable[Any] | None = None) -> None:
        if not isinstance(task, Signature):
            raise TypeError(f"map needs a signature, got {type(task).__name__}")
        self.task = task
        self.items = list(items) if items is not None else None
        if self.star and self.items is not None:
            for i, item in enumerate(self.items):
                if not isinstance(item, list | tuple):
                    raise TypeError(
                        f"starmap element {i} of {task.task} must be a list or tuple of arguments, "
                        f"got {type(item).__name__}: {item!r}; use map() for one argument per element"
                    )

    def __repr__(self) -> str:
        kind = "starmap" if self.star else "map"
        return f"{self.task.task}.{kind}({self.items!r})" if self.items is not None else f"{self.task.task}.{kind}()"

    def _parts(self) -> list[Signature | _Canvas]:
        return [self.task]

    def to_node(self) -> MapNode:
        if self.items is not None:
            encode_args(f"{self.task.task} (map items)", tuple(self.items), {})
        items = [list(i) for i in self.items] if self.star and self.items is not None else self.items
        return MapNode(task=self.task.to_node(), items=items, star=self.star, on_error=self._errback_node())


class xstarmap(xmap):  # Celery's name
    """``task.starmap(items)``: each element is the list of arguments of one call."""

    star = True


# -- submitting ---------------------------------------------------------------------------


def submit_goal(
    app: Client,
    graph: Node,
    *,
    args: tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    context: dict[str, Any] | None = None,
    name: str = "",
    goal_id: str | None = None,
    budget_usd: float | None = None,
    reuse: dict[str, ReusedStage] | None = None,
    rerun_of: str = "",
) -> GraphResult:
    """Publish a goal to ``heddle.goals.incoming``; every graph is sent through here.

    ``budget_usd`` is what the goal's model calls may cost in all: the orchestrator
    sends no task once it is spent, and gives each task what is left as its budget.

    A lone task node is wrapped in a one-step chain, so the goal's own result
    (stored under the goal id) and the task's are never the same record.
    """

    if goal_id is not None and (not isinstance(goal_id, str) or not _GOAL_ID_RE.match(goal_id)):
        raise TypeError(
            f"a graph's task_id must be 1-150 letters, digits or '_', '-', '.', ':' (node ids are "
            f"derived from it), got {goal_id!r}"
        )
    if isinstance(graph, TaskNode):
        graph = ChainNode(steps=[graph])
    encode_args("graph input", tuple(args), dict(kwargs or {}))
    gid = goal_id or new_task_id()
    label = name or (graph.name if isinstance(graph, PipelineNode) else "")
    msg = GoalMessage(
        id=gid,
        graph=graph,
        args=list(args),
        kwargs=dict(kwargs or {}),
        context=dict(context or {}),
        name=label,
        submitted_at=time.time(),
        budget_usd=check_budget_usd(budget_usd, f"graph {label or gid!r}"),
        reuse=dict(reuse or {}),
        rerun_of=rerun_of,
    )
    payload = encoder.encode(msg)
    check_message_size(app.settings, f"graph {label or gid!r}", payload)
    headers = {names.HDR_MSG_ID: gid, names.HDR_TASK: label or "heddle.graphs.model"}
    result = GraphResult(gid, app, graph=graph, goal_id=gid, path="", task_name=label or "graph")
    submit(app, result, names.GOALS_SUBJECT, payload, headers)
    return result


class GraphResult(AsyncResult[Any]):
    """A handle on a submitted graph (or on one composite node of it).

    ``get()`` / ``aget()`` return the final value (a list, in order, for a
    group) or raise :class:`~heddle.errors.TaskError` naming the failed node.
    ``children`` gives the handles of the direct children (a plain
    :class:`AsyncResult` for a task node), :meth:`node` the handle of any node
    by path or pipeline stage name, and :meth:`nodes` every node's checkpoint
    (state, timing, worker, tier).

    Args:
        task_id: The id the node's result is stored under (the goal id for the root).
        app: The app whose connections are used.
        graph: The node this handle is for.
        goal_id: The goal's id.
        path: The node's path (``""`` for the root).
        task_name: A label.
    """

    def __init__(
        self,
        task_id: str,
        app: Client,
        graph: Node | None = None,
        goal_id: str | None = None,
        path: str = "",
        task_name: str = "graph",
    ) -> None:
        super().__init__(task_id, app, task_name)
        self.graph = graph
        self.goal_id = goal_id or task_id
        self.path = path

    def __repr__(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"<GraphResult {self.task_name}[{self.goal_id}]{where}>"

    @classmethod
    async def aload(cls, app: Client, goal_id: str) -> GraphResult:
        """A handle on an existing goal by id, with its graph read from the checkpoint."""
        from heddle.graphs.store import GoalStore

        conns = await app.connections()
        cp = await GoalStore(conns.backend, app.settings.result_ttl_s).load(goal_id)
        graph = cp.goal_message.graph if cp.goal_message is not None else None
        return cls(goal_id, app, graph=graph, goal_id=goal_id)

    def _child(self, node: Node, path: str) -> AsyncResult[Any]:
        tid = node_task_id(self.goal_id, path)
        if isinstance(node, TaskNode):
            return AsyncResult(tid, self.app, node.task)
        return GraphResult(tid, self.app, graph=node, goal_id=self.goal_id, path=path, task_name=_label(node))

    @property
    def children(self) -> list[AsyncResult[Any]]:
        """Handles of the direct children: steps, members, [header, body], map calls, or stages."""
        g = self.graph
        if g is None:
            return []
        if isinstance(g, ChainNode):
            return [self._child(s, child_path(self.path, i)) for i, s in enumerate(g.steps)]
        if isinstance(g, GroupNode):
            return [self._child(m, child_path(self.path, i)) for i, m in enumerate(g.members)]
        if isinstance(g, ChordNode):
            return [self._child(g.header, child_path(self.path, 0)), self._child(g.body, child_path(self.path, 1))]
        if isinstance(g, MapNode):
            if g.items is not None:
                count = len(g.items)
            else:  # the elements came from the incoming value: ask the checkpoint how many
                prefix = child_path(self.path, "")
                count = len({p[len(prefix):].split(".")[0] for p in self.nodes() if p.startswith(prefix)} - {"e"})
            return [AsyncResult(node_task_id(self.goal_id, child_path(self.path, i)), self.app, g.task.task)
                    for i in range(count)]
        if isinstance(g, PipelineNode):
            return [self.node(s.name) for s in g.stages]
        return []

    def node(self, path: str) -> AsyncResult[Any]:
        """The handle of the node at ``path`` (``"1.0"``, or a pipeline stage's name).

        For a pipeline stage that was retried, the handle is of its last attempt.
        """
        state = self.nodes().get(path)
        if state is not None and state.task_id:
            return AsyncResult(state.task_id, self.app, state.name)
        node = _find_node(self.graph, self.path, path) if self.graph is not None else None
        if node is not None:
            return self._child(node, path)
        return AsyncResult(node_task_id(self.goal_id, path), self.app)

    async def anodes(self) -> dict[str, NodeState]:
        """Every node's checkpoint, by path (only nodes that have started)."""
        from heddle.graphs.store import GoalStore

        conns = await self.app.connections()
        cp = await GoalStore(conns.backend, self.app.settings.result_ttl_s).load(self.goal_id)
        return cp.nodes

    def nodes(self) -> dict[str, NodeState]:
        """Every node's checkpoint, by path (see :meth:`anodes`)."""
        return self.app.run_sync(self.anodes(), 30.0)

    def timeline(self) -> list[dict[str, Any]]:
        """Per-node timing of a finished goal: path, name, state, started, ended, wall_s, tier, worker."""
        record = self.record
        if record is None:
            return []
        return list(record.meta.get("timeline", []))


def _label(node: Node) -> str:
    from heddle.graphs.model import node_label

    return node_label(node)


def _find_node(root: Node, root_path: str, path: str) -> Node | None:
    """The node at ``path`` under ``root`` (whose own path is ``root_path``), if it is static."""
    if path == root_path:
        return root
    prefix = child_path(root_path, "")
    if root_path and not path.startswith(prefix):
        return None
    rest = path[len(prefix):] if root_path else path
    node: Node = root
    for seg in rest.split("."):
        nxt: Node | None = None
        if seg == "e":
            nxt = node.on_error
        elif isinstance(node, ChainNode) and seg.isdigit() and int(seg) < len(node.steps):
            nxt = node.steps[int(seg)]
        elif isinstance(node, GroupNode) and seg.isdigit() and int(seg) < len(node.members):
            nxt = node.members[int(seg)]
        elif isinstance(node, ChordNode) and seg in ("0", "1"):
            nxt = node.header if seg == "0" else node.body
        elif isinstance(node, MapNode) and seg.isdigit():
            nxt = node.task
        if nxt is None:
            return None
        node = nxt
    return node


def decode_goal(data: bytes) -> GoalMessage:
    """Decode a goal message (for tools that read the goals stream)."""
    return goal_decoder.decode(data)
