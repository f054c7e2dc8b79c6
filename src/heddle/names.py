"""Every subject, stream, consumer and key name Heddle uses, in one place."""

from __future__ import annotations

from heddle.errors import TaskIdError

# JetStream streams. HEDDLE_TASKS holds ``heddle.tasks.incoming`` (router input)
# and the routed ``heddle.tasks.{worker_type}.{tier}`` subjects; the dead-letter
# subject has a single token after ``heddle.tasks`` so it never overlaps them.
TASKS_STREAM = "HEDDLE_TASKS"
DLQ_STREAM = "HEDDLE_DLQ"

TASK_SUBJECT_PREFIX = "heddle.tasks."
INCOMING_SUBJECT = "heddle.tasks.incoming"
ROUTED_SUBJECTS = "heddle.tasks.*.*"
# A routed task of a priority band other than the default one: heddle.tasks.{wt}.{tier}.{band}.
BANDED_SUBJECTS = "heddle.tasks.*.*.*"
DEAD_LETTER_SUBJECT = "heddle.tasks.dead_letter"

# Core NATS (not persisted): result notices, control broadcasts, events.
RESULT_SUBJECT_PREFIX = "heddle.results."
REVOKE_SUBJECT = "heddle.control.revoke"
EVENTS_PREFIX = "heddle.events."
EVENTS_ALL = "heddle.events.>"
# Lifecycle events (heddle.events): heddle.events.task.{state}, heddle.events.worker.{state}.
TASK_EVENTS_PREFIX = "heddle.events.task."
WORKER_EVENTS_PREFIX = "heddle.events.worker."

MAX_DELIVERIES_ADVISORY = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"

# Valkey keys.
RESULT_KEY_PREFIX = "heddle:result:"
# Sorted set of sent task ids not yet final, scored by send time (heddle.audit).
SUBMITTED_KEY = "heddle:submitted"

# Message headers.
HDR_MSG_ID = "Nats-Msg-Id"
HDR_TASK = "Heddle-Task"
HDR_WORKER_TYPE = "Heddle-Worker-Type"
HDR_TIER = "Heddle-Tier"
HDR_REASON = "Heddle-Reason"
HDR_ORIGINAL_SUBJECT = "Heddle-Original-Subject"
HDR_TASK_ID = "Heddle-Task-Id"
HDR_FAILED_AT = "Heddle-Failed-At"
# A dead letter too large to copy with its headers keeps its payload in Valkey under this key.
HDR_PAYLOAD_REF = "Heddle-Payload-Ref"
DLQ_PAYLOAD_KEY_PREFIX = "heddle:dlq-payload:"

TIERS = ("local", "standard", "frontier")


def task_subject(worker_type: str, tier: str) -> str:
    """Subject a routed task for ``worker_type`` at ``tier`` is published on."""
    return f"{TASK_SUBJECT_PREFIX}{worker_type}.{tier}"


def worker_filter(worker_type: str, tier: str | None = None) -> str:
    """Filter subject of one worker type: every tier, or only ``tier``."""
    return f"{TASK_SUBJECT_PREFIX}{worker_type}.{tier or '*'}"


def consumer_name(worker_type: str, tier: str | None = None) -> str:
    """Durable consumer shared by every replica of a worker type (and tier, if pinned)."""
    return f"heddle-{worker_type}" + (f"-{tier}" if tier else "")


# Priorities: 0 (lowest) to 9 (highest), in three bands (heddle.bands). The default
# band keeps the plain worker subject; the others get a subject and a consumer of their own.
MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
HIGH_BAND = "high"  # priorities 7-9
LOW_BAND = "low"  # priorities 0-3
BANDS = (HIGH_BAND, LOW_BAND)
HDR_PRIORITY = "Heddle-Priority"


def band_of(priority: int) -> str:
    """The band of a priority: ``high``, ``low``, or ``""`` for the default band (4-6)."""
    return HIGH_BAND if priority >= 7 else LOW_BAND if priority <= 3 else ""


def banded_subject(subject: str, priority: str | None) -> str:
    """A routed task's subject for the ``Heddle-Priority`` header ``priority`` (malformed: default band)."""
    if not priority:
        return subject
    try:
        band = band_of(int(priority))
    except ValueError:
        return subject
    return f"{subject}.{band}" if band else subject


def band_filter(worker_type: str, tier: str | None, band: str) -> str:
    """Filter subject of one worker type's consumer for a priority band."""
    return f"{worker_filter(worker_type, tier)}.{band}"


def band_consumer(worker_type: str, tier: str | None, band: str) -> str:
    """Durable consumer of a worker type's priority band ('+' is in no worker type's name)."""
    return f"{consumer_name(worker_type, tier)}+{band}"


# A task id becomes one subject token (``heddle.results.{id}``) and part of Valkey keys.
MAX_TASK_ID_LENGTH = 255
# Wildcards, whitespace and control characters (C0, DEL, C1). A '.' is allowed (graph
# node ids are ``goal:1.2``) but never where it would make an empty subject token.
_BAD_ID_CHARS = frozenset("*>") | frozenset(chr(c) for c in (*range(0x21), *range(0x7F, 0xA1)))


def check_task_id(task_id: object, what: str = "task_id") -> str:
    """Return ``task_id`` if it can be a subject token; raise :class:`TaskIdError` naming ``what``.

    Refused: a non-string, empty, over 255 characters, holding ``*``, ``>``, whitespace
    or control characters, or a ``.`` at either end or twice in a row (an empty
    subject token). ``task_id=">"`` would otherwise subscribe to every result.
    """
    if not isinstance(task_id, str):
        raise TaskIdError(f"{what} must be a string, got {type(task_id).__name__}")
    if not task_id:
        raise TaskIdError(f"{what} must not be empty")
    if len(task_id) > MAX_TASK_ID_LENGTH:
        raise TaskIdError(f"{what} is {len(task_id)} characters long; the limit is {MAX_TASK_ID_LENGTH}")
    if not _BAD_ID_CHARS.isdisjoint(task_id) or not task_id.isprintable():
        bad = next((c for c in task_id if c in _BAD_ID_CHARS or not c.isprintable()), "")
        raise TaskIdError(
            f"{what} {task_id[:60]!r} contains {bad!r}; task ids become NATS subject tokens, so they may "
            f"not hold '*', '>', whitespace or control characters (use letters, digits, '-', '_', ':', '.')"
        )
    if task_id[0] == "." or task_id[-1] == "." or ".." in task_id:
        raise TaskIdError(
            f"{what} {task_id[:60]!r} starts or ends with '.' or holds '..'; each '.' separates NATS "
            f"subject tokens, which may not be empty"
        )
    return task_id


def result_key(task_id: str) -> str:
    """Valkey hash holding one task's state and result record."""
    return f"{RESULT_KEY_PREFIX}{task_id}"


# A task's result notice goes to ``heddle.results.{sender}.{task_id}``: ``sender`` is the
# token the sending connection put in ``Heddle-Notify`` (it follows every notice of its
# own sends with one subscription, ``heddle.results.{sender}.>``: a task id may hold
# dots), or NO_SENDER ("_")
# when the message named none. A handle on someone else's task subscribes to
# ``heddle.results.*.{task_id}``.
NO_SENDER = "_"
_SENDER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_MAX_SENDER = 64


def notice_subject(sender: str, task_id: str) -> str:
    """Core NATS subject a task's final result notice is published on."""
    return f"{RESULT_SUBJECT_PREFIX}{sender}.{task_id}"


def result_subject(task_id: str) -> str:
    """The subscription that takes a task's result notice, whoever sent the task."""
    return f"{RESULT_SUBJECT_PREFIX}*.{task_id}"


def sender_of(headers: dict[str, str] | None) -> str:
    """The notice token a task message's ``Heddle-Notify`` header names, if it can be one; else "_".

    Anyone on the bus can set the header, so only a plain subject token is taken.
    """
    token = headers.get(HDR_NOTIFY, "") if headers else ""
    if token and len(token) <= _MAX_SENDER and _SENDER_CHARS.issuperset(token):
        return token
    return NO_SENDER

# JetStream KV bucket of live workers (heartbeats with a TTL).
WORKERS_BUCKET = "heddle_workers"
# Entries of the routing rules each router announces, ``_routing={router id}``
# (heddle.routes); worker entries are ``{worker_type}.{id}``, always with a dot, so
# these are never one of them.
ROUTING_RULES_PREFIX = "_routing="


# A sender that follows ``heddle:notices:{sender}`` on Valkey says so in HDR_NOTIFY_VALKEY;
# its worker's store script then announces the task's final record there, and on the
# task's own channel ``heddle:task-notices:{id}`` for handles elsewhere, in the same step
# as it stores it, and no NATS notice is sent (heddle.notices).
NOTICE_CHANNEL_PREFIX = "heddle:notices:"
TASK_NOTICE_CHANNEL_PREFIX = "heddle:task-notices:"
HDR_NOTIFY_VALKEY = "Heddle-Notify-Valkey"


def notice_channel(sender: str) -> str:
    """Valkey channel of the result notices of the tasks ``sender`` sent (see HDR_NOTIFY_VALKEY)."""
    return f"{NOTICE_CHANNEL_PREFIX}{sender}"


def task_notice_channel(task_id: str) -> str:
    """Valkey channel a handle on a task sent elsewhere follows, for a sender told on Valkey."""
    return f"{TASK_NOTICE_CHANNEL_PREFIX}{task_id}"


def channel_of(headers: dict[str, str] | None) -> str:
    """The Valkey channel a task message asks its result to be announced on, or "" for none."""
    if not headers or headers.get(HDR_NOTIFY_VALKEY) != "1":
        return ""
    sender = sender_of(headers)
    return "" if sender == NO_SENDER else notice_channel(sender)


def notice_route(headers: dict[str, str] | None) -> tuple[str, str]:
    """``(sender, channel)``: where a task message asks its result to be announced (NATS, Valkey)."""
    return sender_of(headers), channel_of(headers)

# Router.
ROUTER_CONSUMER = "heddle-router"
HDR_TIER_REQUESTED = "Heddle-Tier-Requested"
# The sending connection's result-notice token (names.notice_subject).
HDR_NOTIFY = "Heddle-Notify"
HDR_ROUTE_REASON = "Heddle-Route-Reason"
# Set by the router on what it routes; a task sent directly (heddle.routes) has none,
# and its worker announces its ``received`` event instead.
HDR_ROUTED_BY = "Heddle-Routed-By"
HDR_REPLAYED_BY = "Heddle-Replayed-By"
HDR_REPLAYED_AT = "Heddle-Replayed-At"
# Token buckets and reservations (heddle.ratelimit): one script takes a message's
# reservation and every bucket that applies to it at once, so in a Valkey Cluster
# they must share a slot: the hash tag {rate} puts every rate key in one.
RATE_KEY_PREFIX = "heddle:{rate}:"
# Set by a router on a task it charged to model-token buckets: "{estimate} {key},{key}";
# the worker settles the charge with the usage the provider reported (heddle.ratelimit).
HDR_TOKEN_CHARGE = "Heddle-Token-Charge"
# Concurrency-limit slots: heddle:limit:{task}:{key value} (heddle.limits).
LIMIT_KEY_PREFIX = "heddle:limit:"
# A task message put back on its subject while it waits for a concurrency slot
# (a new copy, so its delivery count starts over): the copy number.
HDR_WAITED = "Heddle-Waited"
REPLAY_KEY_PREFIX = "heddle:replayed:"


def task_id_of(headers: dict[str, str]) -> str:
    """A task message's id from its headers alone (for messages whose body cannot be read).

    ``Heddle-Task-Id`` when set (routed copies and replays carry it, because their
    ``Nats-Msg-Id`` is a dedup key of their own), else ``Nats-Msg-Id``.
    """
    return headers.get(HDR_TASK_ID) or headers.get(HDR_MSG_ID, "")


def routed_msg_id(task_id: str) -> str:
    """Dedup id of a routed copy: it shares a stream with the incoming message."""
    return f"{task_id}:routed"


# Goals (task graphs) and orchestrators. HEDDLE_GOALS is a work-queue stream of
# its own; every orchestrator shares one durable pull consumer on it.
GOALS_STREAM = "HEDDLE_GOALS"
GOALS_SUBJECT = "heddle.goals.incoming"
ORCHESTRATOR_CONSUMER = "heddle-orchestrator"
GOAL_KEY_PREFIX = "heddle:goal:"
GOAL_EVENTS_PREFIX = "heddle.events.goals."


def goal_key(goal_id: str) -> str:
    """Valkey hash holding a goal's checkpoint: one field per node, plus the goal's own."""
    return f"{GOAL_KEY_PREFIX}{goal_id}"


# Memoized pipeline stages (heddle.llm.cache): heddle:llm-cache:{sha256 of config, model, input}.
LLM_CACHE_KEY_PREFIX = "heddle:llm-cache:"
# A task header that asks an LLM worker to answer from that cache, and fill it; its value
# is the entry's time to live in seconds. Pipeline stages with ``cache: true`` send it.
HDR_CACHE = "heddle-cache"


def llm_cache_key(digest: str) -> str:
    """Valkey key of one cached LLM output."""
    return f"{LLM_CACHE_KEY_PREFIX}{digest}"


def goal_event_subject(goal_id: str) -> str:
    """Core NATS subject a goal's node transitions are announced on (live progress)."""
    return f"{GOAL_EVENTS_PREFIX}{goal_id}"


# LLM workers announce every model call (usage, model, latency, cost) here.
LLM_EVENTS_PREFIX = "heddle.events.llm."


def llm_event_subject(worker_type: str) -> str:
    """Core NATS subject a YAML LLM worker's model calls are announced on."""
    return f"{LLM_EVENTS_PREFIX}{worker_type}"


# Periodic schedules (heddle.schedules). nats-server keeps the time: each schedule is a
# message-schedule definition (ADR-51) on ``heddle.schedules.def.{app}.{name}`` in the
# HEDDLE_SCHEDULES stream, and the server publishes a tick on
# ``heddle.schedules.tick.{app}.{name}`` at every due time. The app's workers share one
# durable consumer on its ticks and turn each into a task ``periodic:{app}:{name}:{tick ms}``.
SCHEDULES_STREAM = "HEDDLE_SCHEDULES"
SCHEDULES_SUBJECTS = "heddle.schedules.>"
SCHEDULE_KEY_PREFIX = "heddle:schedule:"
PERIODIC_ID_PREFIX = "periodic:"
# On a scheduled task's message: the name of the schedule that sent it.
HDR_SCHEDULE = "Heddle-Schedule"
# nats-server's message-schedule headers (ADR-51) and the compare-and-set header.
HDR_NATS_SCHEDULE = "Nats-Schedule"
HDR_NATS_SCHEDULE_TARGET = "Nats-Schedule-Target"
HDR_NATS_SCHEDULE_TIME_ZONE = "Nats-Schedule-Time-Zone"
HDR_NATS_SCHEDULE_ROLLUP = "Nats-Schedule-Rollup"
HDR_NATS_SCHEDULE_NEXT = "Nats-Schedule-Next"
HDR_EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"


def schedule_subject(app: str, name: str = "*") -> str:
    """Subject of an app's schedule definition (``*``: every definition of the app)."""
    return f"heddle.schedules.def.{app}.{name}"


def tick_subject(app: str, name: str = "*") -> str:
    """Subject nats-server publishes a schedule's ticks on (``*``: every tick of the app)."""
    return f"heddle.schedules.tick.{app}.{name}"


def scheduler_consumer(app: str) -> str:
    """Durable consumer of an app's ticks, shared by every worker process that loads the app."""
    return f"heddle-scheduler-{app}"


def schedule_key(app: str, name: str) -> str:
    """Valkey hash holding a schedule's last run (tick time, task id, sent at)."""
    return f"{SCHEDULE_KEY_PREFIX}{app}:{name}"


def periodic_task_id(app: str, name: str, tick_ms: int) -> str:
    """The task id of one tick: the same for every delivery of that tick, so it runs once."""
    return f"{PERIODIC_ID_PREFIX}{app}:{name}:{tick_ms}"


# Token streams (heddle.chunks): a streaming LLM call publishes its reply's chunks, as the
# provider sends them, on ``heddle.streams.{task_id}`` in HEDDLE_STREAMS, a limits stream
# bounded by age and size, so a reader that joins late replays them from the first.
STREAMS_STREAM = "HEDDLE_STREAMS"
STREAM_SUBJECT_PREFIX = "heddle.streams."
STREAM_SUBJECTS = "heddle.streams.*"
# A task header that asks an LLM worker to stream its reply (``apply_async(headers={...: "1"})``).
HDR_STREAM = "heddle-stream"


def stream_subject(task_id: str) -> str:
    """JetStream subject the token chunks of task ``task_id`` are published on."""
    return f"{STREAM_SUBJECT_PREFIX}{task_id}"
