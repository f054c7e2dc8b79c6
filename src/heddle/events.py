"""Lifecycle events on core NATS: ``heddle.events.>``.

Every actor announces what happens, fire and forget (core NATS, no stream, no
ack), so watching costs nothing when nobody listens and a slow watcher never
slows a worker:

=====================================  =========================================
subject                                 payload (msgpack)
=====================================  =========================================
``heddle.events.task.{state}``          :class:`TaskEvent`; state is one of
                                        :data:`TASK_STATES`
``heddle.events.worker.{state}``        :class:`WorkerEvent`; online, heartbeat,
                                        offline
``heddle.events.goals.{goal_id}``       :class:`heddle.graphs.model.NodeState` (goal and
                                        stage progress; empty when the goal ends)
``heddle.events.llm.{worker_type}``     :class:`LLMCallEvent`
=====================================  =========================================

Who sends what: the router sends ``received`` (with the task message itself
when it is small, so watchers can show a task's arguments after its message
has left the work-queue stream) and ``dead_lettered`` for what it cannot
route; the worker sends ``started``, ``succeeded``, ``failed``, ``retried`` and
``dead_lettered``; heartbeats send the worker events; the orchestrator's goal
runs send node transitions.

The hot path stays lean: subjects are precomputed, the encoder is built once,
and one publish is a buffer append in nats-py. :func:`describe` turns any
event on ``heddle.events.>`` into a plain dict for the CLI and the Workshop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final

import msgspec

from heddle import names
from heddle.errors import DecodeError
from heddle.messages import decode as bounded_decode

if TYPE_CHECKING:
    from heddle.broker import Broker

log = logging.getLogger("heddle.events")

RECEIVED: Final = "received"
STARTED: Final = "started"
SUCCEEDED: Final = "succeeded"
FAILED: Final = "failed"
RETRIED: Final = "retried"
DEAD_LETTERED: Final = "dead_lettered"
EXPIRED: Final = "expired"  # its expires time passed before it started; it never ran
TASK_STATES: Final = (RECEIVED, STARTED, SUCCEEDED, FAILED, RETRIED, DEAD_LETTERED, EXPIRED)

ONLINE: Final = "online"
HEARTBEAT: Final = "heartbeat"
OFFLINE: Final = "offline"
WORKER_STATES: Final = (ONLINE, HEARTBEAT, OFFLINE)

# The router attaches the task message to ``received`` only up to this size.
MAX_PAYLOAD_BYTES: Final = 8192


class TaskEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One task transition.

    Attributes:
        state: One of :data:`TASK_STATES`.
        id: Task id.
        task: Task name.
        worker_type: Worker type the task is routed to.
        tier: Tier it runs at (once routed).
        worker: Who sent the event (a worker's name, or ``router``).
        at: Epoch seconds.
        duration_s: Run time, on succeeded, failed and retried.
        retries: Retries so far.
        error: ``type: message`` on failed, retried, dead_lettered and expired.
        input_tokens: Model tokens (YAML LLM workers and tasks that call ``heddle.llm``).
        output_tokens: Model tokens out.
        payload: The task message (msgpack :class:`~heddle.messages.TaskMessage`),
            on ``received`` when it is at most :data:`MAX_PAYLOAD_BYTES`.
    """

    v: int = 1
    state: str
    id: str
    task: str = ""
    worker_type: str = ""
    tier: str = ""
    worker: str = ""
    at: float = 0.0
    duration_s: float = 0.0
    retries: int = 0
    error: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    payload: msgspec.Raw = msgspec.Raw()  # empty: not attached


class WorkerEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A worker coming online, beating, or going offline."""

    v: int = 1
    state: str
    id: str
    worker_type: str
    tiers: list[str] = []
    concurrency: int = 0
    host: str = ""
    pid: int = 0
    tasks: list[str] = []
    at: float = 0.0


encoder: Final = msgspec.msgpack.Encoder()
class LLMCallEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Published (msgpack) on ``heddle.events.llm.{worker_type}`` after each task of an LLM worker."""

    v: int = 1
    task_id: str
    worker_type: str
    tier: str
    ok: bool
    backend: str = ""
    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    latency_s: float = 0.0
    llm_calls: int = 0
    cost_usd: float | None = None
    error: str = ""
    at: float = 0.0


task_event_decoder: Final = msgspec.msgpack.Decoder(TaskEvent)
worker_event_decoder: Final = msgspec.msgpack.Decoder(WorkerEvent)
llm_event_decoder: Final = msgspec.msgpack.Decoder(LLMCallEvent)

TASK_SUBJECTS: Final = {s: f"{names.TASK_EVENTS_PREFIX}{s}" for s in TASK_STATES}
WORKER_SUBJECTS: Final = {s: f"{names.WORKER_EVENTS_PREFIX}{s}" for s in WORKER_STATES}


class Held:
    """Events held back a moment, so that they leave in the same write as what follows them.

    A worker's ``received`` and ``started`` go out with the task's outcome when it
    ends within :attr:`hold_s` (one socket write and one server read per task
    instead of two), else when the hold is over: a watcher sees a long task start
    at most ``hold_s`` late, stamped with the time it really started.

    Args:
        broker: The connection they are published on.
        hold_s: The longest an event is held.
    """

    def __init__(self, broker: Broker, hold_s: float) -> None:
        self.broker = broker
        self.hold_s = hold_s
        self._events: list[TaskEvent] = []
        self._timer: Any = None
        self._flushing: Any = None

    def add(self, event: TaskEvent) -> None:
        """Hold ``event`` until :meth:`flush`, or ``hold_s`` from now at the latest."""
        self._events.append(event)
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.hold_s, self._due)

    def _due(self) -> None:
        self._timer = None
        if self._events:
            self._flushing = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        """Publish every held event now, in the order they were added."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        events, self._events = self._events, []
        for ev in events:
            await publish(self.broker, ev)


async def publish(broker: Broker, event: TaskEvent | WorkerEvent) -> None:
    """Announce ``event``; best effort: events never fail the work they describe."""
    subject = (TASK_SUBJECTS if isinstance(event, TaskEvent) else WORKER_SUBJECTS)[event.state]
    try:
        payload = encoder.encode(event)
        if not broker.publish_core_now(subject, payload):  # queued in this step, as a rule
            await broker.publish_core(subject, payload)
    except Exception as exc:
        log.debug("could not publish a %s event: %r", event.state, exc)


def payload_of(data: bytes) -> msgspec.Raw:
    """The task message to attach to a ``received`` event (empty when too big)."""
    return msgspec.Raw(data) if len(data) <= MAX_PAYLOAD_BYTES else msgspec.Raw()


def task_event(state: str, task_id: str, **fields: Any) -> TaskEvent:
    """A :class:`TaskEvent` stamped now."""
    return TaskEvent(state=state, id=task_id, at=time.time(), **fields)


def describe(subject: str, data: bytes) -> dict[str, Any] | None:
    """Any event on ``heddle.events.>`` as a plain dict with ``kind`` and ``state`` (None if unreadable).

    Task events get their arguments decoded from the attached task message
    (``args``, ``kwargs``); goal events are node transitions.
    """
    try:
        if subject.startswith(names.TASK_EVENTS_PREFIX):
            ev = bounded_decode(task_event_decoder, data)
            out = msgspec.structs.asdict(ev)
            raw = out.pop("payload")
            if len(raw):
                from heddle.messages import task_decoder

                tm = bounded_decode(task_decoder, bytes(raw))
                out["args"], out["kwargs"] = tm.args, tm.kwargs
                out["submitted_at"] = tm.submitted_at
                if tm.expires is not None:
                    out["expires"] = tm.expires
                if tm.priority is not None:
                    out["priority"] = tm.priority
            return {"kind": "task", **out}
        if subject.startswith(names.WORKER_EVENTS_PREFIX):
            return {"kind": "worker", **msgspec.structs.asdict(bounded_decode(worker_event_decoder, data))}
        if subject.startswith(names.GOAL_EVENTS_PREFIX):
            goal_id = subject[len(names.GOAL_EVENTS_PREFIX):]
            if not data:
                return {"kind": "goal", "state": "ended", "id": goal_id, "at": time.time()}
            from heddle.graphs.model import node_state_decoder

            node = msgspec.structs.asdict(bounded_decode(node_state_decoder, data))
            return {"kind": "goal", "id": goal_id, "at": time.time(), **node, "node_task_id": node["task_id"]}
        if subject.startswith(names.LLM_EVENTS_PREFIX):
            llm = msgspec.structs.asdict(bounded_decode(llm_event_decoder, data))
            return {"kind": "llm", "state": "ok" if llm["ok"] else "error", "id": llm["task_id"], **llm}
    except (DecodeError, UnicodeDecodeError):
        return None
    return None


async def job_event(broker: Broker, state: str, job: Any, worker: Any, outcome: Any = None) -> None:
    """Announce a worker's job transition (``heddle.worker.Job``, ``Worker``, ``Outcome``).

    Called once per task per transition from the worker's batch loops; builds
    one struct and appends one publish to the connection's buffer.
    """
    await publish(broker, job_task_event(state, job, worker, outcome))


def job_task_event(state: str, job: Any, worker: Any, outcome: Any = None) -> TaskEvent:
    """The :class:`TaskEvent` of a worker's job transition, stamped now (see :func:`job_event`)."""
    tm = job.message
    headers = job.msg.headers or {}
    meta: dict[str, Any] = job.context.meta if job.context is not None else {}
    return TaskEvent(
        state=state,
        id=tm.id,
        task=tm.task,
        worker_type=worker.worker_type,
        tier=headers.get(names.HDR_TIER) or tm.tier or "",
        worker=worker.name,
        at=time.time(),
        duration_s=(outcome.finished_at - job.started_at) if outcome is not None else 0.0,
        retries=job.retries,
        error=f"{outcome.error.type}: {outcome.error.message}" if outcome is not None and outcome.error else "",
        input_tokens=int(meta.get("input_tokens", 0) or 0),
        output_tokens=int(meta.get("output_tokens", 0) or 0),
    )


def worker_event(state: str, info: Any) -> WorkerEvent:
    """A worker's ``online``, ``heartbeat`` or ``offline`` event (``info``: its ``heddle.registry.WorkerInfo``)."""
    return WorkerEvent(
        state=state, id=info.id, worker_type=info.worker_type, tiers=info.tiers, concurrency=info.concurrency,
        host=info.host, pid=info.pid, tasks=info.tasks, at=time.time(),
    )


def received(data: bytes, headers: dict[str, str], tier: str, by: str = "router") -> TaskEvent:
    """The ``received`` event of a routed message (headers only; the payload rides along as is).

    ``by`` is the router, or the worker of a task sent to it directly (heddle.routes).
    """
    return TaskEvent(
        state=RECEIVED,
        id=headers.get(names.HDR_TASK_ID) or headers.get(names.HDR_MSG_ID, ""),
        task=headers.get(names.HDR_TASK, ""),
        worker_type=headers.get(names.HDR_WORKER_TYPE, ""),
        tier=tier,
        worker=by,
        at=time.time(),
        payload=payload_of(data),
    )
