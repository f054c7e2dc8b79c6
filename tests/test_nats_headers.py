"""heddle.natsclient parses NATS headers exactly as nats-py does, only with fewer calls, and serves
inline subscriptions in its reader (both pinned to nats-py's internals here)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import nats
import nats.errors
import pytest
from nats.aio.client import Client

from heddle.broker import Broker
from heddle.natsclient import Connection, parse_header_lines
from heddle.settings import Settings

BLOCKS = [
    b"Nats-Msg-Id: 3b75d175a3f74ec2\r\nHeddle-Task: bench.noop\r\nHeddle-Worker-Type: bench\r\n\r\n",
    b"Compact:value\r\nTabbed:\tvalue\t\r\nSpaced :  padded  \r\n\r\n",
    b"Bad Name: skipped\r\nBad\tName: skipped\r\nBad\x1cName: skipped\r\nGood: kept\r\n\r\n",
    "Caf\u00e9: non-ascii name skipped\r\nValue: caf\u00e9 \u2603\r\n\r\n".encode(),
    b"Broken: \xff\xfe bytes\r\nNo colon here\r\n\r\n\r\nLate: 1\r\nLate: 2\r\n",
    b"Empty:\r\n: no name\r\n\r\n",
    b"",
]


@pytest.mark.parametrize("block", BLOCKS)
def test_header_blocks_parse_as_nats_py_parses_them(block):
    assert parse_header_lines(block) == Client._parse_header_lines(block)


HEADER_DICTS = [
    {"Nats-Msg-Id": "3b75d175a3f74ec2", "Heddle-Task": "bench.noop", "Heddle-Notify": "a1b2"},
    {" Padded ": "  value  ", "Tabbed": "\tx\t", "Unicode": "caf\u00e9 \u2603"},
    {"Broken": "line\r\nInjected: 1", "Ends": "x\n", "Starts": "\rx", "Empty": ""},
    {"   ": "an empty name is skipped", "Kept": "1"},
    {},
]


def _sent(client: Client, headers: dict[str, str]) -> bytes:
    """The bytes ``client`` queues to publish ``headers`` (nothing is connected)."""
    sent: list[bytes] = []

    async def capture(cmd: bytes, priority: bool = False) -> None:
        sent.append(cmd)

    client._send_command = capture  # type: ignore[method-assign]
    client._flush_queue = None
    asyncio.run(client._send_publish("hdr.test", "_INBOX.x.1", b"payload", 7, headers))
    return b"".join(sent)


@pytest.mark.parametrize("headers", HEADER_DICTS)
def test_headers_are_sent_as_the_bytes_nats_py_sends(headers):
    assert _sent(Connection(), headers) == _sent(Client(), headers)


@contextlib.asynccontextmanager
async def _connected(url: str) -> AsyncIterator[Connection]:
    """A Connection to ``url`` that the server knows (flushed), closed when the block ends."""
    nc = Connection()
    await nc.connect(url)
    try:
        await nc.flush()
        yield nc
    finally:
        await nc.close()


@pytest.mark.parametrize("headers", HEADER_DICTS)
def test_a_publish_queued_in_the_callers_step_is_the_bytes_nats_py_publishes(heddle_servers, headers):
    async def queued() -> bytes:
        async with _connected(heddle_servers.nats_url) as nc:
            # The first send of a turn of the loop is written at once; the next one waits
            # for the flusher, in the same step, as nats-py's publish would queue it.
            assert nc.publish_now("hdr.first", b"payload", "_INBOX.x.0", {})
            assert nc._pending == []
            assert nc.publish_now("hdr.test", b"payload", "_INBOX.x.1", headers)
            return b"".join(nc._pending)  # in the same step: the flusher has not run

    assert asyncio.run(queued()) == _sent(Client(), headers)


def test_the_first_send_of_a_turn_reaches_a_subscriber_with_the_rest_of_the_turn_queued(heddle_servers):
    async def sends() -> list[bytes]:
        async with _connected(heddle_servers.nats_url) as nc, _connected(heddle_servers.nats_url) as reader:
            sub = await reader.subscribe("turn.>")
            await reader.flush()
            for i in range(3):
                assert nc.publish_now(f"turn.{i}", b"%d" % i, "", {"H": "v"})
            assert len(nc._pending) == 2  # only the first left in the caller's step
            return [(await sub.next_msg(timeout=5)).data for _ in range(3)]

    assert asyncio.run(sends()) == [b"0", b"1", b"2"]


def test_a_publish_queued_in_the_callers_step_leaves_a_bad_header_name_to_the_usual_publish(heddle_servers):
    async def refused() -> list[bytes]:
        async with _connected(heddle_servers.nats_url) as nc:
            assert not nc.publish_now("hdr.test", b"payload", "_INBOX.x.1", {"Bad Name": "x"})
            with pytest.raises(nats.errors.BadHeaderError):
                await nc.publish("hdr.test", b"payload", headers={"Bad Name": "x"})
            return list(nc._pending)

    assert asyncio.run(refused()) == []


@pytest.mark.parametrize("name", ["Bad Name", "Bad:Name", "Caf\u00e9"])
def test_a_header_name_nats_py_refuses_is_refused_alike(name):
    for client in (Client(), Connection()):
        with pytest.raises(nats.errors.BadHeaderError):
            _sent(client, {name: "x"})


def test_the_broker_receives_the_headers_a_plain_nats_py_client_receives(heddle_servers):
    headers = {"Nats-Msg-Id": "abc", "Heddle-Task": "shop.add", "X-Unicode": "caf\u00e9", "X-Compact": "1"}

    async def exchange() -> tuple[dict[str, str], dict[str, str], type]:
        broker = Broker(Settings(nats_url=heddle_servers.nats_url))
        await broker.connect()
        plain = await nats.connect(heddle_servers.nats_url)
        try:
            ours: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
            theirs: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()

            async def on_ours(msg: object) -> None:
                ours.set_result(dict(msg.headers or {}))  # type: ignore[attr-defined]

            async def on_theirs(msg: object) -> None:
                theirs.set_result(dict(msg.headers or {}))  # type: ignore[attr-defined]

            await broker.subscribe("hdr.test", cb=on_ours)
            await plain.subscribe("hdr.test", cb=on_theirs)
            await broker.flush()
            await plain.flush()
            await plain.publish("hdr.test", b"x", headers=headers)
            got = await asyncio.wait_for(asyncio.gather(ours, theirs), 10)
            return got[0], got[1], type(broker.nc)
        finally:
            await plain.close()
            await broker.close()

    ours, theirs, kind = asyncio.run(exchange())
    assert kind is Connection
    assert ours == theirs == headers


async def test_an_inline_subscription_gets_every_message_in_order_in_the_reader_and_holds_none_pending(
    heddle_servers,
):
    nc = Connection()
    await nc.connect(heddle_servers.nats_url)
    plain = await nats.connect(heddle_servers.nats_url)
    try:
        got: list[bytes] = []
        tasks: set[object] = set()

        def handler(msg) -> None:
            got.append(msg.data)
            tasks.add(asyncio.current_task())  # the reader's task: no task of its own per subscription
            if msg.data == b"boom":
                raise RuntimeError("a broken handler")  # logged; the reader goes on

        sub = await nc.subscribe_inline("inline.test", handler)
        await nc.flush()
        sent = [b"boom"] + [b"%d" % i for i in range(2000)]
        for data in sent:
            await plain.publish("inline.test", data)
        await plain.flush()
        for _ in range(500):
            if len(got) == len(sent):
                break
            await asyncio.sleep(0.01)  # pacing of a bounded wait for the messages
        assert got == sent
        assert sub._pending_size == 0 and sub.pending_msgs == 0
        assert len(tasks) == 1 and sub._wait_for_msgs_task is None
        await sub.drain()  # nats-py's drain joins the pending queue
    finally:
        await plain.close()
        await nc.close()


def test_core_publishes_queued_in_the_callers_step_reach_a_subscriber_in_order(heddle_servers):
    async def sends() -> list[tuple[str, bytes]]:
        async with _connected(heddle_servers.nats_url) as nc, _connected(heddle_servers.nats_url) as reader:
            sub = await reader.subscribe("core.>")
            await reader.flush()
            assert nc.publish_core_now("core.a", b"one")
            await nc.publish("core.b", b"two")  # nats-py's own publish keeps its place among them
            assert nc.publish_core_now("core.c", b"")
            assert nc.publish_core_now("core.d", b"with\r\nCRLF")
            got = []
            for _ in range(4):
                m = await sub.next_msg(timeout=5)
                got.append((m.subject, m.data))
            return got

    assert asyncio.run(sends()) == [
        ("core.a", b"one"), ("core.b", b"two"), ("core.c", b""), ("core.d", b"with\r\nCRLF"),
    ]


def test_a_core_publish_that_would_fail_is_left_to_the_usual_publish(heddle_servers):
    async def refused() -> list[bytes]:
        async with _connected(heddle_servers.nats_url) as nc:
            assert not nc.publish_core_now("bad subject", b"x")
            assert not nc.publish_core_now("bad\r\nPUB x 1", b"x")
            assert not nc.publish_core_now("", b"x")
            assert not nc.publish_core_now("too.big", b"x" * (nc.max_payload + 1))
            with pytest.raises(nats.errors.BadSubjectError):
                await nc.publish("bad subject", b"x")
            with pytest.raises(nats.errors.MaxPayloadError):
                await nc.publish("too.big", b"x" * (nc.max_payload + 1))
            return list(nc._pending)

    assert asyncio.run(refused()) == []
