"""The scheduler: an actor that installs an app's schedules in nats-server and turns their ticks into tasks.

Every worker process that loads an app with schedules (``app.periodic``) hosts
one. At start it makes nats-server's definitions match the app's declarations
(:mod:`heddle.schedules`): a definition that is missing or differs is published,
compare-and-set on the subject's last sequence so that workers starting together
write it once and an unchanged schedule keeps its phase; a definition the app no
longer declares is purged. Then it consumes the app's ticks on the durable
consumer ``heddle-scheduler-{app}``, which every such process shares: each tick
goes to one process, which sends the task ``periodic:{app}:{name}:{tick ms}``
(JetStream keeps the tick until then, so a tick whose process died is delivered
again and sent under the same id: deduplicated, never doubled) and records the
schedule's last run in Valkey before acking the tick.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from heddle import names
from heddle.actor import Actor, acknowledge
from heddle.errors import DecodeError, EncodeError, HeddleError
from heddle.schedules import Schedule, decode_call, encode_call
from heddle.send import send_by_name
from heddle.task import Task

if TYPE_CHECKING:
    from heddle.app import Heddle
    from heddle.broker import Broker
    from heddle.broker import Message as Msg
    from heddle.connections import Connections

log = logging.getLogger("heddle.scheduler")

# A tick that could not be sent (a server unreachable) comes back after this long.
_RETRY_DELAY_S = 1.0


class Scheduler(Actor):
    """Installs an app's schedules and sends a task for each of their ticks (an :class:`~heddle.actor.Actor`).

    Args:
        app: The app whose ``schedules`` it runs.
        name: Identity in logs (default ``scheduler@host:pid``).
    """

    what = "schedule ticks"
    max_batch = 64
    actor_kind = "scheduler"
    exhausted_why = "its schedulers crashed or stalled on it"

    def __init__(self, app: Heddle, name: str | None = None) -> None:
        super().__init__(app)
        self.heddle = app
        self.name = name or f"scheduler@{socket.gethostname()}:{os.getpid()}"
        self.sent = 0

    def __repr__(self) -> str:
        return f"<Scheduler {self.heddle.name} schedules={len(self.heddle.schedules)}>"

    async def ensure_consumer(self, conns: Connections) -> tuple[str, str]:
        await conns.broker.ensure_schedules_stream()
        durable = await conns.broker.ensure_named_consumer(
            names.scheduler_consumer(self.heddle.name), self.filter_subject, max_deliver=self.max_deliver,
            stream=names.SCHEDULES_STREAM,
        )
        return durable, names.SCHEDULES_STREAM

    @property
    def filter_subject(self) -> str:
        return names.tick_subject(self.heddle.name)

    async def on_start(self, conns: Connections) -> None:
        await install(conns.broker, self.heddle.name, self.heddle.schedules)
        log.info("scheduler: running %d schedule(s) of app %r: %s", len(self.heddle.schedules), self.heddle.name,
                 "; ".join(f"{s.name} ({s.describe()})" for s in self.heddle.schedules.values()))

    async def handle(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            await self._fire(msg)

    async def _fire(self, msg: Msg) -> None:
        assert self.conns is not None
        app = self.heddle
        schedule = msg.subject.rpartition(".")[2]
        tick = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else time.time()
        task_id = names.periodic_task_id(app.name, schedule, int(tick * 1000))
        try:
            call = decode_call(msg.data)
            headers = {names.HDR_SCHEDULE: call.schedule}
            task = app.tasks.get(call.task)
            if isinstance(task, Task):
                result = task.apply_async(call.args, call.kwargs, task_id=task_id, headers=headers)
            else:
                result = send_by_name(app, call.task, call.args, call.kwargs, task_id=task_id, headers=headers)
            await result.sent()
        except (DecodeError, EncodeError, TypeError) as exc:
            # A definition this worker cannot send (written by another version of the app):
            # the tick is dead-lettered and its task fails with the reason; later ticks go on.
            await self.reject(msg, f"schedule {schedule!r} cannot send its task: {exc}", task_id=task_id,
                              error_type="heddle.ScheduleError", worker_type=app.worker_type)
            return
        except HeddleError as exc:
            log.warning("schedule %s: could not send tick %s (%s); it comes back in %gs", schedule, task_id, exc,
                        _RETRY_DELAY_S)
            await acknowledge(msg, "nak", task_id, delay=_RETRY_DELAY_S, logger=log)
            return
        try:
            await self.conns.backend.set_fields(names.schedule_key(app.name, schedule), {
                "tick": f"{tick:.3f}", "task_id": task_id, "task": call.task, "sent_at": f"{time.time():.3f}",
            })
        except HeddleError as exc:
            log.warning("schedule %s: sent %s but could not record its last run (%s)", schedule, task_id, exc)
        self.sent += 1
        log.info("schedule %s: sent %s[%s]", schedule, call.task, task_id)
        await acknowledge(msg, "ack", task_id, logger=log)


async def install(broker: Broker, app: str, schedules: dict[str, Schedule]) -> None:
    """Make nats-server's schedule definitions of ``app`` match ``schedules``.

    Raises:
        BrokerError: nats-server refused a definition (it says why).
    """
    stream = names.SCHEDULES_STREAM
    defined = await broker.stream_subjects(stream, names.schedule_subject(app))
    wanted = {names.schedule_subject(app, s.name): s for s in schedules.values()}
    for subject in sorted(set(defined) - set(wanted)):
        name = subject.rpartition(".")[2]
        # Declared no more by the app this worker loads: stop it, and drop a tick it left.
        await broker.purge_subject(stream, subject)
        await broker.purge_subject(stream, names.tick_subject(app, name))
        log.info("schedule %s of app %r: removed (no longer declared)", name, app)
    for subject, s in wanted.items():
        headers = s.definition_headers(app)
        body = encode_call(s.call())
        seq = await _installed_seq(broker, subject, headers, body) if subject in defined else 0
        for attempt in range(2):
            if seq is None:
                break  # installed as declared: left alone, so it keeps its phase
            try:
                await broker.publish(subject, body, {**headers, names.HDR_EXPECTED_LAST_SUBJECT_SEQ: str(seq)})
            except HeddleError:
                # Another worker wrote it first (the subject's sequence moved on: look
                # again), or the server refused the definition (raised the second time).
                seq = await _installed_seq(broker, subject, headers, body)
                if seq is not None and attempt:
                    raise
                continue
            log.info("schedule %s of app %r: installed (%s)", s.name, app, s.describe())
            break


async def _installed_seq(broker: Broker, subject: str, headers: dict[str, str], body: bytes) -> int | None:
    """None if the definition on ``subject`` is this one; else the sequence to replace (0: none)."""
    try:
        stored: Any = await broker.last_stream_msg(names.SCHEDULES_STREAM, subject)
    except HeddleError:
        return 0
    have = stored.headers or {}
    same = (stored.data or b"") == body and all(have.get(k) == v for k, v in headers.items()) and (
        names.HDR_NATS_SCHEDULE_TIME_ZONE in headers or names.HDR_NATS_SCHEDULE_TIME_ZONE not in have
    )
    return None if same else int(stored.seq or 0)
