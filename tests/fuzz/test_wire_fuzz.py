"""Fuzzing the bus (Hypothesis): random and mutated task and goal messages with random
headers, published straight to JetStream next to good work, against a real worker,
router and orchestrator on real servers.

Each example asserts: the good tasks and the good goal of the same round finish
promptly (no loop crashed or stalled, no good work affected), every fuzzed message
leaves its stream (run, or dead-lettered: nothing redelivers forever), and every dead
letter carries a reason.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import nats
import nats.js.errors
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import heddle
from heddle import names
from heddle.errors import DecodeError
from heddle.graphs.model import GoalMessage, TaskNode, goal_decoder
from heddle.messages import TaskMessage, decode, encoder, task_decoder
from heddle.router import Router
from heddle.rules import RouterRules
from heddle.testing import EmbeddedServers, running_actors
from heddle.testing.orchestrators import running_orchestrator
from heddle.worker import Worker
from tests.conftest import wait_for

PROMPT_S = 15.0
ECHO = "echo"

HEADER_NAMES = st.sampled_from([
    names.HDR_MSG_ID, names.HDR_TASK, names.HDR_WORKER_TYPE, names.HDR_TIER_REQUESTED, names.HDR_TASK_ID,
    names.HDR_TIER, "Status", "Description", "Heddle-Route-Reason", "X-Anything",
])
# Header values as they come over the wire: printable ASCII without CR/LF (nats-py refuses
# those itself), wildcards, spaces, dots, empty, long.
HEADER_VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
    st.sampled_from([">", "*", "a.b", "..", " ", "", "x" * 300, "local", "standard", "frontier", "404", "408"]),
)
SMALL_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def payloads(draw: st.DrawFn, valid: bytes) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "fields", "deep"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "deep":
        return b"\x83\xa2id\xa1x\xa4task\xa4echo\xa4args" + b"\x91" * draw(st.integers(100, 20_000)) + b"\xc0"
    if kind == "fields":
        fields = draw(st.dictionaries(
            st.sampled_from(["v", "id", "task", "args", "kwargs", "tier", "headers", "graph", "context", "x"]),
            SMALL_VALUES, max_size=6))
        return encoder.encode(fields)
    data = bytearray(valid)
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


def _delayed(payload: bytes) -> bool:
    """A message that decodes to a valid task with an eta waits in the stream on purpose."""
    try:
        return decode(task_decoder, payload).eta is not None
    except DecodeError:
        return False


@pytest.fixture(scope="module")
def system(heddle_servers: EmbeddedServers) -> Iterator[heddle.Heddle]:
    app = heddle.Heddle(f"fz{uuid.uuid4().hex[:8]}", nats_url=heddle_servers.nats_url,
                        valkey_url=heddle_servers.valkey_url, ack_wait_s=2.0, max_deliver=3)

    @app.task(name=ECHO)
    def echo(x: Any = None, *rest: Any, **kw: Any) -> Any:
        return x

    rules = RouterRules(unknown_worker_grace_s=0.5)
    with running_actors(app, lambda: [Worker(app, concurrency=8, grace_s=2), Router(app, rules=rules)]), \
            running_orchestrator(app):
        yield app
    app.close()


async def _publish_all(url: str, messages: list[tuple[str, bytes, dict[str, str]]]) -> list[tuple[str, int]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        out = []
        for subject, payload, headers in messages:
            try:
                ack = await js.publish(subject, payload, headers=headers or None)
            except nats.errors.Error:
                continue  # refused on the way in (a header nats-py will not send): nothing to follow
            stream = names.GOALS_STREAM if subject == names.GOALS_SUBJECT else names.TASKS_STREAM
            out.append((stream, ack.seq))
        return out
    finally:
        await nc.close()


async def _still_stored(url: str, seqs: list[tuple[str, int]]) -> list[tuple[str, int]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        left = []
        for stream, seq in seqs:
            try:
                await js.get_msg(stream, seq)
                left.append((stream, seq))
            except nats.js.errors.NotFoundError:
                pass
        return left
    finally:
        await nc.close()


async def _dead_letter_reasons(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(names.DLQ_STREAM)
        reasons = []
        for seq in range(max(1, info.state.last_seq - 200), info.state.last_seq + 1):
            try:
                m = await js.get_msg(names.DLQ_STREAM, seq)
            except nats.js.errors.NotFoundError:
                continue
            reasons.append((m.headers or {}).get(names.HDR_REASON, ""))
        return reasons
    finally:
        await nc.close()


@pytest.mark.timeout(900)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzzed_wire_messages_fail_alone_and_good_work_goes_on(system: heddle.Heddle, data: st.DataObject,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    app = system
    url = app.settings.nats_url
    tid = uuid.uuid4().hex
    valid_task = encoder.encode(TaskMessage(id=tid, task=ECHO, args=[1]))
    valid_goal = msgspec.msgpack.encode(GoalMessage(id=f"g{tid}", graph=TaskNode(task=ECHO, args=[1])))
    assert decode(goal_decoder, valid_goal).id == f"g{tid}"
    subjects = [names.INCOMING_SUBJECT, names.task_subject(app.worker_type, "standard"), names.GOALS_SUBJECT]
    fuzzed: list[tuple[str, bytes, dict[str, str]]] = []
    for _ in range(data.draw(st.integers(1, 4), label="bad messages")):
        subject = data.draw(st.sampled_from(subjects), label="subject")
        payload = data.draw(payloads(valid_goal if subject == names.GOALS_SUBJECT else valid_task), label="payload")
        assume(not _delayed(payload))
        headers = data.draw(st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=5), label="headers")
        if subject != names.GOALS_SUBJECT and data.draw(st.booleans(), label="worker type header"):
            headers[names.HDR_WORKER_TYPE] = app.worker_type
        fuzzed.append((subject, payload, headers))
    seqs = asyncio.run(_publish_all(url, fuzzed))
    with caplog.at_level(logging.ERROR):
        goods = [app.send_task(ECHO, (n,)) for n in range(3)]
        goal = (heddle.chain(heddle.Signature(task=ECHO, args=(5,), app=app))).delay()
        assert [g.get(timeout=PROMPT_S) for g in goods] == [0, 1, 2]
        assert goal.get(timeout=PROMPT_S) == 5
    # Nothing redelivers forever: AckWait 2 s x MaxDeliver 3, then dead-lettered.
    wait_for(lambda: not asyncio.run(_still_stored(url, seqs)), 30, "every fuzzed message to leave its stream")
    assert all(asyncio.run(_dead_letter_reasons(url))), "a dead letter without a reason"
    crashed = [r for r in caplog.records if "failed to accept" in r.getMessage() or r.exc_info]
    assert not crashed, [r.getMessage() for r in crashed]
