"""Hostile and malformed messages from the bus: each fails alone, with a reason, and nothing else stalls.

Anything that can publish on the bus can send a worker, the router or an
orchestrator bytes that nest thousands of levels deep, inflate to tens of
megabytes, carry a task id that is a subject wildcard, name a tier that is not
one, lack ``Nats-Msg-Id``, or forge a JetStream advisory. Every test here
publishes such a message next to good ones, against real nats-server and
valkey-server, and checks that the bad one is dead-lettered with a reason (its
result FAILURE when it has a usable id) while the good ones finish promptly.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest
import valkey

import heddle
from heddle import names
from heddle.graphs.model import GoalMessage, TaskNode
from heddle.messages import FAILURE, PENDING, TaskMessage, encoder
from heddle.router import Router
from heddle.rules import RouterRules
from heddle.testing import running_actors, running_worker
from heddle.testing.orchestrators import running_orchestrator
from heddle.worker import Worker
from tests.conftest import dead_letters, wait_for

# Good tasks must finish well inside AckWait (30 s): a batch lost to one bad message
# comes back only after it.
PROMPT_S = 10.0


# -- helpers ---------------------------------------------------------------------------


def _uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _s(text: str) -> bytes:
    return encoder.encode(text)


def _task_bytes(task_id: str, task: str, args: bytes) -> bytes:
    """A task message written by hand (msgspec cannot encode what these tests send)."""
    return b"\x83" + _s("id") + _s(task_id) + _s("task") + _s(task) + _s("args") + args


def _nested(depth: int) -> bytes:
    """A list nested ``depth`` levels deep, around one nil."""
    return b"\x91" * depth + b"\xc0"


def _many(unit: bytes, count: int) -> bytes:
    """A list (array32) of ``count`` copies of the msgpack value ``unit``."""
    return b"\xdd" + count.to_bytes(4, "big") + unit * count


async def _apublish(nats_url: str, messages: list[tuple[str, bytes, dict[str, str] | None]]) -> list[int]:
    """Publish raw messages to JetStream in order; their stream sequence numbers."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        return [(await js.publish(subject, payload, headers=headers or None)).seq
                for subject, payload, headers in messages]
    finally:
        await nc.close()


def _publish(nats_url: str, messages: list[tuple[str, bytes, dict[str, str] | None]]) -> list[int]:
    return asyncio.run(_apublish(nats_url, messages))


def _ensure_streams(app: heddle.Heddle) -> None:
    async def main() -> None:
        await app.connect()
        await app.aclose()

    asyncio.run(main())


def _stored(nats_url: str, seq: int) -> bool:
    """True if the task stream still holds message ``seq``."""

    async def main() -> bool:
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().get_msg(names.TASKS_STREAM, seq)
            return True
        except nats.js.errors.NotFoundError:
            return False
        finally:
            await nc.close()

    return asyncio.run(main())


def _dead(nats_url: str, match: Callable[[dict[str, str], bytes], bool]) -> list[dict[str, str]]:
    try:
        letters = asyncio.run(dead_letters(nats_url))
    except nats.js.errors.BadRequestError:
        return []  # an empty stream: dead_letters asks for message #0
    return [h for h, data in letters if match(h, data)]


def _dead_letter_of(nats_url: str, *, task_id: str = "", payload: bytes = b"") -> dict[str, str]:
    """The one dead letter for ``task_id`` (or, for a message without a usable id, ``payload``)."""

    def match(h: dict[str, str], data: bytes) -> bool:
        return h.get(names.HDR_TASK_ID) == task_id if task_id else data == payload

    found = wait_for(lambda: _dead(nats_url, match), 20, f"the dead letter of {task_id or 'the message'}")
    assert isinstance(found, list) and len(found) == 1, found
    return found[0]


def _task_headers(app: heddle.Heddle, task_id: str, task: str) -> dict[str, str]:
    return {names.HDR_MSG_ID: task_id, names.HDR_TASK: task, names.HDR_WORKER_TYPE: app.worker_type}


def _goods(app: heddle.Heddle, task: str, subject: str, n: int = 5) -> list[tuple[str, bytes, dict[str, str]]]:
    """``n`` good messages calling ``task(i)``, for ``subject`` (routed or incoming)."""
    out = []
    for i in range(n):
        tid = _uid(f"good{i}")
        out.append((subject, encoder.encode(TaskMessage(id=tid, task=task, args=[i])), _task_headers(app, tid, task)))
    return out


def _ids(goods: list[tuple[str, bytes, dict[str, str]]]) -> list[str]:
    return [h[names.HDR_MSG_ID] for _, _, h in goods]


def _assert_good_tasks_finish_promptly(app: heddle.Heddle, ids: list[str]) -> None:
    assert [app.AsyncResult(tid).get(timeout=PROMPT_S) for tid in ids] == list(range(len(ids)))


def _routed(app: heddle.Heddle) -> str:
    return names.task_subject(app.worker_type, "standard")


# -- the worker: decoding --------------------------------------------------------------

_ECHO = "echo"

BAD_TASKS: dict[str, tuple[Callable[[str], bytes], str]] = {
    # kind: (payload for a task id, what the dead letter's reason says)
    "nested-5000-deep": (lambda tid: _task_bytes(tid, _ECHO, b"\x91" + _nested(5000)), "deeper than 128 levels"),
    "nested-100000-deep": (lambda tid: _task_bytes(tid, _ECHO, b"\x91" + _nested(100_000)), "deeper than 128 levels"),
    "version-0": (lambda tid: encoder.encode(TaskMessage(v=0, id=tid, task=_ECHO, args=[1])), "message version 0"),
    "version-minus-1": (lambda tid: encoder.encode(TaskMessage(v=-1, id=tid, task=_ECHO, args=[1])),
                        "message version -1"),
    "eta-infinite": (lambda tid: encoder.encode(TaskMessage(id=tid, task=_ECHO, args=[1], eta=math.inf)), "eta"),
    "eta-nan": (lambda tid: encoder.encode(TaskMessage(id=tid, task=_ECHO, args=[1], eta=math.nan)), "eta"),
}


@pytest.mark.parametrize("kind", list(BAD_TASKS))
def test_a_bad_task_message_is_dead_lettered_alone_and_the_rest_of_its_batch_runs(heddle_app, heddle_servers, kind):
    ran: list[Any] = []

    @heddle_app.task(name=_ECHO)
    def echo(x: Any) -> Any:
        ran.append(x)
        return x

    make, reason = BAD_TASKS[kind]
    bad_id, junk_id = _uid("bad"), _uid("junk")
    bad = make(bad_id)
    subject = _routed(heddle_app)
    goods = _goods(heddle_app, _ECHO, subject)
    _ensure_streams(heddle_app)
    # Published before the worker starts, so the bad message opens the batch the good ones are in.
    _publish(heddle_servers.nats_url, [
        (subject, bad, _task_headers(heddle_app, bad_id, _ECHO)),
        (subject, b"\xc1" + os.urandom(300), _task_headers(heddle_app, junk_id, _ECHO)),
        *goods,
    ])
    with running_worker(heddle_app, router=False) as worker:
        _assert_good_tasks_finish_promptly(heddle_app, _ids(goods))
        letter = _dead_letter_of(heddle_servers.nats_url, task_id=bad_id)
        assert reason in letter[names.HDR_REASON]
        assert "undecodable" in _dead_letter_of(heddle_servers.nats_url, task_id=junk_id)[names.HDR_REASON]
        wait_for(lambda: heddle_app.AsyncResult(bad_id).state == FAILURE, 10, "the bad task's FAILURE")
        with pytest.raises(heddle.TaskError, match=reason):
            heddle_app.AsyncResult(bad_id).get(timeout=5)
        assert worker.stats["dead_lettered"] == 2
    assert sorted(ran) == list(range(5))


def test_a_task_due_in_the_far_future_waits_without_breaking_its_batch(heddle_app, heddle_servers):
    @heddle_app.task(name=_ECHO)
    def echo(x: Any) -> Any:
        return x

    later_id = _uid("later")
    subject = _routed(heddle_app)
    goods = _goods(heddle_app, _ECHO, subject)
    _ensure_streams(heddle_app)
    (later_seq, *_) = _publish(heddle_servers.nats_url, [
        (subject, encoder.encode(TaskMessage(id=later_id, task=_ECHO, args=[1], eta=1e300)),
         _task_headers(heddle_app, later_id, _ECHO)),
        *goods,
    ])
    with running_worker(heddle_app, router=False):
        _assert_good_tasks_finish_promptly(heddle_app, _ids(goods))
        assert heddle_app.AsyncResult(later_id).state == PENDING
        assert _stored(heddle_servers.nats_url, later_seq)


def test_a_message_that_would_decode_to_tens_of_megabytes_is_refused_before_decoding(heddle_app, heddle_servers):
    @heddle_app.task(name="count")
    def count(*items: Any) -> int:
        return len(items)

    big_id = _uid("big")
    # ~1 MB of one-element lists: ~36 MB once decoded, the issue's +40 MB per message.
    big = _task_bytes(big_id, "count", _many(b"\x91\xc0", 490_000))
    subject = _routed(heddle_app)
    goods = [(subject, encoder.encode(TaskMessage(id=h[names.HDR_MSG_ID], task="count", args=[0] * i)), h)
             for i, (_, _, h) in enumerate(_goods(heddle_app, "count", subject))]
    _ensure_streams(heddle_app)
    _publish(heddle_servers.nats_url, [(subject, big, _task_headers(heddle_app, big_id, "count")), *goods])
    with running_worker(heddle_app, router=False):
        _assert_good_tasks_finish_promptly(heddle_app, _ids(goods))
        with pytest.raises(heddle.TaskError, match="would decode to more than 32 MiB"):
            heddle_app.AsyncResult(big_id).get(timeout=PROMPT_S)
    assert "would decode to more than" in _dead_letter_of(heddle_servers.nats_url, task_id=big_id)[names.HDR_REASON]


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def test_four_inflating_messages_leave_a_workers_memory_alone(heddle_servers, spawn_worker, test_env):
    env = test_env(heddle_servers)
    worker = spawn_worker("tests.apps.crashy", env)
    client = heddle.Heddle(env["HEDDLE_TEST_APP"], nats_url=env["NATS_URL"], valkey_url=env["VALKEY_URL"])
    try:
        subject = names.task_subject(client.worker_type, "standard")
        before = _peak_rss_mb(worker.pid)
        ids = [_uid("inflate") for _ in range(4)]
        # 1 MB of empty lists each: ~75 MB apiece once decoded.
        _publish(env["NATS_URL"], [
            (subject, _task_bytes(tid, "tests.apps.crashy.echo", _many(b"\x90", 1_000_000)),
             _task_headers(client, tid, "tests.apps.crashy.echo"))
            for tid in ids
        ])
        wait_for(lambda: all(client.AsyncResult(t).state == FAILURE for t in ids), 60, "the four to fail")
        grown = _peak_rss_mb(worker.pid) - before
        assert grown < 40, f"the worker's peak memory grew by {grown:.0f} MB"
        assert all("would decode to more than" in _dead_letter_of(env["NATS_URL"], task_id=t)[names.HDR_REASON]
                   for t in ids)
    finally:
        client.close()


# -- the worker: task ids --------------------------------------------------------------

BAD_IDS = {
    "greater-than": ">",
    "star": "*",
    "space": "a b",
    "tab": "tab\tid",
    "newline": "new\nline",
    "empty": "",
    "too-long": "x" * 256,
    "empty-token": "a..b",
    "leading-dot": ".a",
}


@pytest.mark.parametrize("bad_id", list(BAD_IDS.values()), ids=list(BAD_IDS))
def test_a_task_whose_id_cannot_be_a_subject_token_is_dead_lettered_without_using_the_id(
    heddle_app, heddle_servers, bad_id
):
    ran: list[Any] = []

    @heddle_app.task(name=_ECHO)
    def echo(x: Any) -> Any:
        ran.append(x)
        return x

    # The headers name a valid id: the one the sender waits on, where the failure goes.
    sent_as = _uid("sent-as")
    subject = _routed(heddle_app)
    goods = _goods(heddle_app, _ECHO, subject)
    _ensure_streams(heddle_app)
    _publish(heddle_servers.nats_url, [
        (subject, encoder.encode(TaskMessage(id=bad_id, task=_ECHO, args=["bad"])),
         _task_headers(heddle_app, sent_as, _ECHO)),
        *goods,
    ])
    with running_worker(heddle_app, router=False):
        _assert_good_tasks_finish_promptly(heddle_app, _ids(goods))
        letter = _dead_letter_of(heddle_servers.nats_url, task_id=sent_as)
        assert "task_id" in letter[names.HDR_REASON]
        with pytest.raises(heddle.TaskError, match="task_id"):
            heddle_app.AsyncResult(sent_as).get(timeout=5)
    assert "bad" not in ran
    store = valkey.Valkey.from_url(heddle_servers.valkey_url)
    try:
        assert not store.exists(names.result_key(bad_id))
    finally:
        store.close()


# -- the worker: max-deliveries advisories ---------------------------------------------


def test_a_forged_max_deliveries_advisory_leaves_every_queued_task_alone(heddle_servers, caplog):
    url = heddle_servers.nats_url
    mine = heddle.Heddle(_uid("a"), nats_url=url, valkey_url=heddle_servers.valkey_url)
    other = heddle.Heddle(_uid("b"), nats_url=url, valkey_url=heddle_servers.valkey_url)

    @mine.task(name=_ECHO)
    def echo(x: Any) -> Any:
        return x

    @other.task(name=_ECHO)
    def other_echo(x: Any) -> Any:
        return x

    _ensure_streams(mine)
    theirs_id, later_id = _uid("theirs"), _uid("later")
    # Another worker type's task, queued while none of its workers runs; and one of
    # this worker's own, waiting for its eta (delivered once, then held back).
    theirs_seq, later_seq = _publish(url, [
        (_routed(other), encoder.encode(TaskMessage(id=theirs_id, task=_ECHO, args=[7])),
         _task_headers(other, theirs_id, _ECHO)),
        (_routed(mine), encoder.encode(TaskMessage(id=later_id, task=_ECHO, args=[8], eta=time.time() + 4)),
         _task_headers(mine, later_id, _ECHO)),
    ])
    limit = mine.settings.max_deliver
    own = names.consumer_name(mine.worker_type)
    forged = [
        {"stream": names.TASKS_STREAM, "consumer": names.consumer_name(other.worker_type),
         "stream_seq": theirs_seq, "deliveries": limit},
        {"stream": names.TASKS_STREAM, "consumer": own, "stream_seq": theirs_seq, "deliveries": limit},
        {"stream": names.GOALS_STREAM, "consumer": own, "stream_seq": theirs_seq, "deliveries": limit},
        {"stream": names.TASKS_STREAM, "consumer": own, "stream_seq": later_seq, "deliveries": 1},
    ]

    async def forge() -> None:
        nc = await nats.connect(url)
        try:
            subject = names.MAX_DELIVERIES_ADVISORY.format(stream=names.TASKS_STREAM, consumer=own)
            for adv in forged:
                body = {"type": "io.nats.jetstream.advisory.v1.max_deliver", "id": uuid.uuid4().hex,
                        "timestamp": "2026-01-01T00:00:00Z", **adv}
                await nc.publish(subject, json.dumps(body).encode())
            await nc.flush()
        finally:
            await nc.close()

    def ignored() -> int:
        return sum("ignoring max-deliveries advisory" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.WARNING, logger="heddle.worker"), running_worker(mine, router=False):
        wait_for(lambda: mine.AsyncResult(later_id).state == PENDING and _stored(url, later_seq), 10, "the eta")
        asyncio.run(forge())
        wait_for(lambda: ignored() == len(forged), 10, "every forged advisory to be ignored")
        assert _stored(url, theirs_seq) and _stored(url, later_seq)
        assert other.AsyncResult(theirs_id).state == PENDING
        assert mine.AsyncResult(later_id).get(timeout=15) == 8
    with running_worker(other, router=False):
        assert other.AsyncResult(theirs_id).get(timeout=PROMPT_S) == 7
    assert not _dead(url, lambda h, _: h.get(names.HDR_TASK_ID) in (theirs_id, later_id))
    mine.close()
    other.close()


# -- the router ------------------------------------------------------------------------


def _router_actors(app: heddle.Heddle, **router: Any) -> Callable[[], list[Any]]:
    rules = RouterRules(unknown_worker_grace_s=30.0)
    return lambda: [Worker(app, concurrency=8, grace_s=5), Router(app, rules=rules, **router)]


def test_a_message_without_nats_msg_id_is_routed_and_the_rest_of_its_batch_flows(heddle_app, heddle_servers):
    @heddle_app.task(name=_ECHO)
    def echo(x: Any) -> Any:
        return x

    incoming = names.INCOMING_SUBJECT
    goods = _goods(heddle_app, _ECHO, incoming)
    no_msg_id = _uid("no-msg-id")
    anonymous = b"\xc1 an envelope that names no task " + uuid.uuid4().bytes
    _ensure_streams(heddle_app)
    _publish(heddle_servers.nats_url, [
        # A task id, but no Nats-Msg-Id (the dedup key the router derives the routed copy's from).
        (incoming, encoder.encode(TaskMessage(id=no_msg_id, task=_ECHO, args=[42])),
         {names.HDR_TASK_ID: no_msg_id, names.HDR_TASK: _ECHO, names.HDR_WORKER_TYPE: heddle_app.worker_type}),
        # Nothing that names the task at all.
        (incoming, anonymous, {names.HDR_WORKER_TYPE: heddle_app.worker_type}),
        *goods,
    ])
    with running_actors(heddle_app, _router_actors(heddle_app)):
        _assert_good_tasks_finish_promptly(heddle_app, _ids(goods))
        assert heddle_app.AsyncResult(no_msg_id).get(timeout=PROMPT_S) == 42
        letter = _dead_letter_of(heddle_servers.nats_url, payload=anonymous)
        assert names.HDR_MSG_ID in letter[names.HDR_REASON]


GARBAGE_HEADERS: dict[str, tuple[dict[str, str], str, bool]] = {
    # kind: (headers over the good ones, what the reason says, whether the task id is usable)
    "tier-with-a-dot": ({names.HDR_TIER_REQUESTED: "x.y"}, names.HDR_TIER_REQUESTED, True),
    "tier-wildcard": ({names.HDR_TIER_REQUESTED: ">"}, names.HDR_TIER_REQUESTED, True),
    "tier-unknown": ({names.HDR_TIER_REQUESTED: "nonsense"}, names.HDR_TIER_REQUESTED, True),
    "worker-type-with-a-dot": ({names.HDR_WORKER_TYPE: "a.b"}, names.HDR_WORKER_TYPE, True),
    "worker-type-wildcard": ({names.HDR_WORKER_TYPE: "*"}, names.HDR_WORKER_TYPE, True),
    "worker-type-with-a-space": ({names.HDR_WORKER_TYPE: "a b"}, names.HDR_WORKER_TYPE, True),
    "msg-id-with-a-space": ({names.HDR_MSG_ID: "a b"}, "task_id", False),
    "task-id-wildcard": ({names.HDR_TASK_ID: ">"}, "task_id", False),
}


@pytest.mark.parametrize("kind", list(GARBAGE_HEADERS))
def test_garbage_routing_headers_are_dead_lettered_alone_with_a_reason(heddle_app, heddle_servers, kind):
    @heddle_app.task(name=_ECHO)
    def echo(x: Any) -> Any:
        return x

    garbage, reason, usable = GARBAGE_HEADERS[kind]
    incoming = names.INCOMING_SUBJECT
    bad_id = _uid("garbage")
    headers = {**_task_headers(heddle_app, bad_id, _ECHO), **garbage}
    payload = encoder.encode(TaskMessage(id=bad_id, task=_ECHO, args=[kind]))
    goods = _goods(heddle_app, _ECHO, incoming)
    _ensure_streams(heddle_app)
    _publish(heddle_servers.nats_url, [(incoming, payload, headers), *goods])
    with running_actors(heddle_app, _router_actors(heddle_app)):
        _assert_good_tasks_finish_promptly(heddle_app, _ids(goods))
        letter = _dead_letter_of(heddle_servers.nats_url, payload=payload)
        assert reason in letter[names.HDR_REASON]
        if usable:
            assert letter[names.HDR_TASK_ID] == bad_id
            with pytest.raises(heddle.TaskError, match=reason):
                heddle_app.AsyncResult(bad_id).get(timeout=5)
        else:
            assert letter[names.HDR_TASK_ID] == ""


@pytest.mark.parametrize(
    ("padding", "reason"),
    [(8000, "characters of headers"), (0, "max_payload")],
    ids=["headers-too-big-to-copy", "payload-at-the-limit"],
)
def test_a_message_whose_routed_copy_would_pass_max_payload_is_dead_lettered(
    heddle_app, heddle_servers, padding, reason
):
    @heddle_app.task(name=_ECHO)
    def echo(x: Any) -> Any:
        return x

    incoming = names.INCOMING_SUBJECT
    big_id = _uid("at-the-limit")
    headers = _task_headers(heddle_app, big_id, _ECHO)
    if padding:
        headers["Heddle-Padding"] = "x" * padding
    goods = _goods(heddle_app, _ECHO, incoming)
    _ensure_streams(heddle_app)

    async def publish() -> None:
        nc = await nats.connect(heddle_servers.nats_url)
        try:
            # 40 bytes under the server's max_payload, headers included: the routed copy,
            # with the router's headers added, would be over it (and nats-server closes
            # the connection of a client that publishes that).
            wire = len(b"NATS/1.0\r\n\r\n") + sum(len(k) + len(v) + 4 for k, v in headers.items())
            bare = len(encoder.encode(TaskMessage(id=big_id, task=_ECHO, args=[""])))
            fill = nc.max_payload - 40 - wire - (bare + 4)  # a str32 header is 4 bytes longer
            payload = encoder.encode(TaskMessage(id=big_id, task=_ECHO, args=["x" * fill]))
            js = nc.jetstream()
            await js.publish(incoming, payload, headers=headers)
            for subject, data, h in goods:
                await js.publish(subject, data, headers=h)
        finally:
            await nc.close()

    asyncio.run(publish())
    with running_actors(heddle_app, _router_actors(heddle_app)):
        _assert_good_tasks_finish_promptly(heddle_app, _ids(goods))
        with pytest.raises(heddle.TaskError, match=reason):
            heddle_app.AsyncResult(big_id).get(timeout=PROMPT_S)
    assert reason in _dead_letter_of(heddle_servers.nats_url, task_id=big_id)[names.HDR_REASON]


def test_a_message_past_the_routers_max_deliver_is_dead_lettered_and_forged_advisories_are_not(
    fresh_servers, caplog
):
    url = fresh_servers.nats_url
    app = heddle.Heddle(_uid("m"), nats_url=url, valkey_url=fresh_servers.valkey_url, ack_wait_s=1)
    rules = RouterRules(unknown_worker_grace_s=3600)
    make = lambda: [Router(app, rules=rules, max_deliver=1)]  # noqa: E731
    with running_actors(app, make):
        pass  # the router's consumer now gives each message one delivery
    stuck_id, queued_id = _uid("stuck"), _uid("queued")
    stuck_seq, queued_seq = _publish(url, [
        (names.INCOMING_SUBJECT, encoder.encode(TaskMessage(id=stuck_id, task=_ECHO)),
         {names.HDR_MSG_ID: stuck_id, names.HDR_TASK: _ECHO, names.HDR_WORKER_TYPE: "ghost"}),
        # A routed task queued for a worker type: no business of the router's.
        (names.task_subject("ghost", "standard"), encoder.encode(TaskMessage(id=queued_id, task=_ECHO)),
         {names.HDR_MSG_ID: f"{queued_id}:routed", names.HDR_TASK_ID: queued_id, names.HDR_TASK: _ECHO}),
    ])

    async def take_and_die() -> None:
        """A router replica that takes the message and dies before acking it: its only delivery."""
        nc = await nats.connect(url)
        try:
            psub = await nc.jetstream().pull_subscribe_bind(names.ROUTER_CONSUMER, names.TASKS_STREAM)
            (msg,) = await psub.fetch(1, timeout=5)
            assert msg.metadata.sequence.stream == stuck_seq
        finally:
            await nc.close()

    asyncio.run(take_and_die())

    async def forge() -> None:
        nc = await nats.connect(url)
        try:
            subject = names.MAX_DELIVERIES_ADVISORY.format(stream=names.TASKS_STREAM, consumer=names.ROUTER_CONSUMER)
            for consumer in (names.ROUTER_CONSUMER, names.consumer_name("ghost")):
                adv = {"stream": names.TASKS_STREAM, "consumer": consumer, "stream_seq": queued_seq, "deliveries": 1}
                await nc.publish(subject, json.dumps(adv).encode())
            await nc.flush()
        finally:
            await nc.close()

    with caplog.at_level(logging.WARNING, logger="heddle.router"), running_actors(app, make):
        # JetStream's own advisory, once AckWait has passed.
        letter = _dead_letter_of(url, task_id=stuck_id)
        assert "MaxDeliver" in letter[names.HDR_REASON]
        with pytest.raises(heddle.TaskError, match="MaxDeliver"):
            app.AsyncResult(stuck_id).get(timeout=5)
        assert not _stored(url, stuck_seq)
        asyncio.run(forge())
        wait_for(lambda: sum("ignoring max-deliveries advisory" in r.getMessage() for r in caplog.records) == 2,
                 10, "both forged advisories to be ignored")
        assert _stored(url, queued_seq)
    app.close()


# -- the orchestrator ------------------------------------------------------------------


def _goal_bytes(goal_id: str, graph: bytes) -> bytes:
    return b"\x82" + _s("id") + _s(goal_id) + _s("graph") + graph


BAD_GOALS: dict[str, tuple[Callable[[str], bytes], str]] = {
    "nested-5000-deep": (
        lambda gid: _goal_bytes(gid, b"\x83" + _s("type") + _s("task") + _s("task") + _s(_ECHO)
                                + _s("args") + b"\x91" + _nested(5000)),
        "deeper than 128 levels",
    ),
    "id-with-a-space": (lambda gid: encoder.encode(GoalMessage(id="a b", graph=TaskNode(task=_ECHO))), "goal id"),
    "id-wildcard": (lambda gid: encoder.encode(GoalMessage(id=">", graph=TaskNode(task=_ECHO))), "goal id"),
    "version-0": (lambda gid: encoder.encode(GoalMessage(v=0, id=gid, graph=TaskNode(task=_ECHO))), "version 0"),
}


@pytest.mark.parametrize("kind", list(BAD_GOALS))
def test_a_bad_goal_is_dead_lettered_and_the_next_goal_runs(heddle_app, heddle_servers, kind):
    @heddle_app.task(name=_ECHO)
    def echo(x: Any = 0) -> Any:
        return x

    @heddle_app.task(name="inc")
    def inc(x: int) -> int:
        return x + 1

    make, reason = BAD_GOALS[kind]
    goal_id = _uid("goal")
    payload = make(goal_id)
    _ensure_streams(heddle_app)
    _publish(heddle_servers.nats_url, [(names.GOALS_SUBJECT, payload, {names.HDR_MSG_ID: goal_id})])
    with running_worker(heddle_app), running_orchestrator(heddle_app):
        with pytest.raises(heddle.TaskError, match=reason) as info:
            heddle_app.AsyncResult(goal_id).get(timeout=PROMPT_S)
        assert info.value.type_name == "heddle.DeadLettered"
        assert (inc.s(1) | inc.s()).delay().get(timeout=PROMPT_S) == 3
    assert reason in _dead_letter_of(heddle_servers.nats_url, task_id=goal_id)[names.HDR_REASON]


# -- acks ------------------------------------------------------------------------------


async def test_ack_failures_are_logged_with_the_task_id(heddle_servers, caplog):
    from heddle.actor import acknowledge

    worker_type = _uid("acks")
    subject = names.task_subject(worker_type, "standard")
    nc = await nats.connect(heddle_servers.nats_url)
    js = nc.jetstream()
    for i in range(2):
        await js.publish(subject, msgspec.msgpack.encode(i))
    psub = await js.pull_subscribe(subject, durable=worker_type, stream=names.TASKS_STREAM)
    first, second = await psub.fetch(2, timeout=5)
    core: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    await nc.subscribe(f"{subject}.core", future=core)
    await nc.publish(f"{subject}.core", b"not from a stream")
    not_a_stream_message = await asyncio.wait_for(core, 5)

    with caplog.at_level(logging.DEBUG, logger="heddle.actor"):
        assert await acknowledge(first, "ack", "task-acked")
        assert not await acknowledge(first, "ack", "task-acked-twice")
        assert not await acknowledge(not_a_stream_message, "nak", "task-not-from-a-stream")
        await nc.close()
        assert not await acknowledge(second, "in_progress", "task-on-a-closed-connection")

    def level(task_id: str) -> str:
        (record,) = [r for r in caplog.records if task_id in r.getMessage()]
        return record.levelname

    # Routine: a redelivery race, or shutdown (the broker warns about the connection itself).
    assert level("task-acked-twice") == "DEBUG"
    assert level("task-on-a-closed-connection") == "DEBUG"
    assert level("task-not-from-a-stream") == "WARNING"


def test_a_task_carrying_its_own_status_header_is_routed_and_run_not_taken_for_a_pull_status(
    heddle_app, heddle_servers
):
    @heddle_app.task(name=_ECHO)
    def echo(x: Any) -> Any:
        return x

    tid = _uid("status-header")
    headers = {**_task_headers(heddle_app, tid, _ECHO), "Status": "404", "Description": "No Messages"}
    _ensure_streams(heddle_app)
    _publish(heddle_servers.nats_url, [(names.INCOMING_SUBJECT, encoder.encode(TaskMessage(id=tid, task=_ECHO,
                                                                                            args=[7])), headers)])
    with running_actors(heddle_app, _router_actors(heddle_app)):
        assert heddle_app.AsyncResult(tid).get(timeout=PROMPT_S) == 7
