"""The orchestrator: an actor that runs goals (task graphs) from ``heddle.goals.incoming``.

Every orchestrator shares one durable pull consumer, ``heddle-orchestrator``,
on the ``HEDDLE_GOALS`` stream. Each takes at most ``max_concurrent_goals``
goals at a time; the rest wait in the stream (they are never rejected). A goal
message is acked only when the goal has ended and its result is stored; while
it runs, in-progress acks keep it from redelivery, so AckWait can stay short
and a dead orchestrator's goals come back quickly, to be resumed from their
checkpoints by whichever orchestrator takes them (see :mod:`heddle.graphs.run`).

On SIGTERM an orchestrator stops fetching, stops walking its goals and naks
their messages at once: a goal is resumable, so handing it over is cheaper than
waiting for a long graph to end. Nodes already dispatched keep running on the
workers and are waited for by the next orchestrator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from heddle import names
from heddle.actor import Actor, acknowledge
from heddle.errors import DecodeError, HeddleError, TaskIdError
from heddle.graphs.model import GOAL_FAILED, GOAL_REVOKED, GOAL_SUCCEEDED, goal_decoder
from heddle.graphs.run import GoalRun
from heddle.graphs.store import GoalStore, check_durability
from heddle.messages import (
    READY_STATES,
    SUCCESS,
    ResultRecord,
    check_version,
    decode,
    revoke_decoder,
    usable_task_id,
)

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.broker import Message as Msg
    from heddle.connections import Connections

log = logging.getLogger("heddle.orchestrator")

_FETCH_TIMEOUT_S = 1.0
_BACKOFF_S = 0.5
# A goal interrupted by an infrastructure error (Valkey or NATS unreachable) is
# handed back with this delay and resumed from its checkpoint.
_RETRY_DELAY_S = 2.0
DEFAULT_MAX_CONCURRENT_GOALS = 16


@dataclass(eq=False)
class _Active:
    msg: Msg
    run: GoalRun
    task: asyncio.Task[None] | None = None
    revoked: bool = False


class Orchestrator(Actor):
    """Runs goals (an :class:`~heddle.actor.Actor` on ``heddle-orchestrator``).

    Args:
        app: Any app: gives settings and connections; node tasks name their own worker types.
        max_concurrent_goals: Most goals in progress at once in this orchestrator.
        name: Identity recorded in goal results (default ``orchestrator@host:pid``).
    """

    def __init__(
        self,
        app: Heddle,
        *,
        max_concurrent_goals: int = DEFAULT_MAX_CONCURRENT_GOALS,
        name: str | None = None,
    ) -> None:
        if not isinstance(max_concurrent_goals, int) or max_concurrent_goals < 1:
            raise HeddleError(f"max_concurrent_goals must be an int >= 1, got {max_concurrent_goals!r}")
        super().__init__(app)
        self.max_concurrent_goals = max_concurrent_goals
        self.name = name or f"orchestrator@{socket.gethostname()}:{os.getpid()}"
        self.active: dict[str, _Active] = {}
        self.stats = {"received": 0, "succeeded": 0, "failed": 0, "revoked": 0, "resumed": 0, "peak_active": 0}
        #: The start-up warning about Valkey durability, if there was one.
        self.durability_warning: str | None = None
        self.store: GoalStore | None = None

    def __repr__(self) -> str:
        return f"<Orchestrator {self.name} active={len(self.active)}/{self.max_concurrent_goals}>"

    # For the health server (``heddle.health``): labels, consumers to check, in-flight gauge.
    actor_kind = "orchestrator"

    @property
    def inflight(self) -> dict[str, _Active]:
        """Goals in progress here."""
        return self.active

    # -- lifecycle -----------------------------------------------------------------------

    what = "goals"
    exhausted_why = "its orchestrators probably crash or hang on it"

    async def ensure_consumer(self, conns: Connections) -> tuple[str, str]:
        durable = await conns.broker.ensure_named_consumer(
            names.ORCHESTRATOR_CONSUMER, names.GOALS_SUBJECT, max_deliver=self.max_deliver,
            stream=names.GOALS_STREAM,
        )
        return durable, names.GOALS_STREAM

    @property
    def filter_subject(self) -> str:
        return names.GOALS_SUBJECT

    def free_slots(self) -> int:
        # Goals beyond the bound stay in the stream for this or another orchestrator.
        return self.max_concurrent_goals - len(self.active)

    def in_progress(self) -> Iterable[tuple[Msg, str]]:
        return ((a.msg, a.run.goal.id) for a in self.active.values())

    async def on_start(self, conns: Connections) -> None:
        self.store = GoalStore(conns.backend, self.settings.result_ttl_s)
        self.durability_warning = await check_durability(conns.backend)
        if self.durability_warning:
            log.warning("!" * 78)
            log.warning("!! %s", self.durability_warning)
            log.warning("!" * 78)
        self._subs.append(await conns.broker.subscribe(names.REVOKE_SUBJECT, cb=self._on_revoke))
        # Deliberately not the worker's "consuming" wording: process supervisors and
        # tests wait for that line to know the *worker* is subscribed.
        log.info("orchestrator %s taking goals from %s (at most %d at once)",
                 self.name, names.GOALS_SUBJECT, self.max_concurrent_goals)

    async def handle(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                await self._accept(msg)
            except Exception:
                # Never let one goal stop the loop; an unacked message comes back.
                log.exception("failed to accept a goal message")

    async def _accept(self, msg: Msg) -> None:
        assert self.conns is not None and self.store is not None
        self.stats["received"] += 1
        # The client sends a goal with Nats-Msg-Id = goal id: the id to fail when the body has none to offer.
        sent_as = (msg.headers or {}).get(names.HDR_MSG_ID, "")
        try:
            goal = decode(goal_decoder, msg.data)
        except DecodeError as exc:
            await self._reject(msg, f"undecodable goal message: {exc}", usable_task_id(sent_as))
            return
        try:
            check_version(goal.v, "goal")
            # Node task ids are built on it, and each becomes a subject token and a key.
            names.check_task_id(goal.id, "goal id")
        except (DecodeError, TaskIdError) as exc:
            await self._reject(msg, str(exc), usable_task_id(goal.id, sent_as))
            return
        running = self.active.get(goal.id)
        if running is not None:
            # Redelivered while it still runs here (AckWait passed): keep running it
            # and ack the newest delivery when it ends.
            running.msg = msg
            return
        try:
            (claim,) = await self.conns.backend.claim_many([goal.id], self.name)
        except HeddleError as exc:
            log.warning("cannot claim goal %s (%s); handing it back", goal.id, exc)
            await acknowledge(msg, "nak", goal.id, delay=_RETRY_DELAY_S, logger=log)
            return
        if claim.previous_state in READY_STATES:
            # Ended already (a duplicate, or a crash between storing the result and
            # acking), or revoked before it started.
            await acknowledge(msg, "ack", goal.id, logger=log)
            return
        delivered = msg.metadata.num_delivered or 1
        if delivered >= self.settings.max_deliver:
            await self._reject(
                msg,
                f"goal delivered {delivered} times without ending (MaxDeliver); its orchestrators "
                f"probably crash or hang on it",
                goal.id,
            )
            return
        run = GoalRun(self.app, self.conns, goal, self.store, self.name)
        active = _Active(msg, run)
        self.active[goal.id] = active
        self.stats["peak_active"] = max(self.stats["peak_active"], len(self.active))
        if delivered > 1:
            self.stats["resumed"] += 1
        active.task = asyncio.get_running_loop().create_task(self._run_goal(active), name=f"goal-{goal.id}")

    async def _reject(self, msg: Msg, reason: str, goal_id: str) -> None:
        """Dead-letter a goal that can never run, fail its result, and ack it."""
        await self.reject(msg, reason, task_id=goal_id, task_name="graph")

    # -- running -------------------------------------------------------------------------

    async def _run_goal(self, active: _Active) -> None:
        run = active.run
        goal_id = run.goal.id
        try:
            try:
                record = await run.run()
            except asyncio.CancelledError:
                raise  # stopping or revoked: whoever cancelled settles the message
            except TaskIdError as exc:
                # A node id built from the goal (a stage name) that cannot be a subject
                # token: the same on every delivery, so the goal fails now.
                await self._reject(active.msg, f"goal {goal_id} names a node it cannot send: {exc}", goal_id)
                return
            except HeddleError as exc:
                log.warning("goal %s interrupted (%s); it resumes from its checkpoint", goal_id, exc)
                await acknowledge(active.msg, "nak", goal_id, delay=_RETRY_DELAY_S, logger=log)
                return
            except Exception:
                log.exception("goal %s failed in the orchestrator; it resumes from its checkpoint", goal_id)
                await acknowledge(active.msg, "nak", goal_id, delay=_RETRY_DELAY_S, logger=log)
                return
            try:
                await self._finish(run, record, *names.notice_route(active.msg.headers))
            except HeddleError as exc:
                log.warning("cannot store the result of goal %s (%s); retrying", goal_id, exc)
                await acknowledge(active.msg, "nak", goal_id, delay=_RETRY_DELAY_S, logger=log)
                return
            await acknowledge(active.msg, "ack", goal_id, logger=log)
            self.stats["succeeded" if record.state == SUCCESS else "failed"] += 1
        finally:
            if self.active.get(goal_id) is active:
                del self.active[goal_id]
            self.slot_freed()

    async def _finish(self, run: GoalRun, record: ResultRecord, sender: str, channel: str = "") -> None:
        """Store the goal's result like a task result (announced to ``sender``), then its final checkpoint."""
        assert self.store is not None
        await self._store_result(record, sender, channel)
        state = GOAL_SUCCEEDED if record.state == SUCCESS else GOAL_FAILED
        await self.store.put(run.goal.id, goal=run.goal_state(state, record.finished_at))
        with contextlib.suppress(Exception):
            assert self.conns is not None
            await self.conns.broker.publish_core(names.goal_event_subject(run.goal.id), b"")
        log.info("goal %s %s after %.3fs (%d node(s))", run.goal.id, record.state,
                 record.finished_at - record.started_at, len(record.meta.get("timeline", ())))

    async def _store_result(self, record: ResultRecord, sender: str = names.NO_SENDER, channel: str = "") -> None:
        assert self.conns is not None
        await self.conns.store_final(record, sender, channel)

    # -- control -------------------------------------------------------------------------

    async def _on_revoke(self, msg: Msg) -> None:
        try:
            notice = decode(revoke_decoder, msg.data)
        except DecodeError:
            return
        active = self.active.get(notice.id)
        if active is None or active.revoked or active.task is None:
            return
        active.revoked = True
        asyncio.get_running_loop().create_task(self._revoke_goal(active))

    async def _revoke_goal(self, active: _Active) -> None:
        """A revoked goal stops: its dispatched nodes are revoked and its message acked."""
        assert active.task is not None and self.store is not None
        active.task.cancel()
        await asyncio.gather(active.task, return_exceptions=True)
        run = active.run
        try:
            await run.abandon("", "the goal was revoked")
            await self.store.put(run.goal.id, goal=run.goal_state(GOAL_REVOKED, time.time()))
        except HeddleError as exc:
            log.warning("could not revoke the nodes of goal %s: %s", run.goal.id, exc)
        await acknowledge(active.msg, "ack", run.goal.id, logger=log)
        self.stats["revoked"] += 1
        log.info("goal %s revoked", run.goal.id)

    # -- shutdown ------------------------------------------------------------------------

    async def on_stop(self) -> None:
        """Stop walking running goals and nak them for prompt resumption elsewhere."""
        running = [a for a in self.active.values() if a.task is not None and not a.revoked]
        for a in running:
            assert a.task is not None
            a.task.cancel()
        if running:
            await asyncio.gather(*(a.task for a in running if a.task is not None), return_exceptions=True)
            for a in running:
                await acknowledge(a.msg, "nak", a.run.goal.id, logger=log)
            log.info("handed %d unfinished goal(s) back to the stream", len(running))
        log.info("orchestrator %s stopped: %s", self.name, self.stats)
