"""heddle.natsclient parses NATS headers exactly as nats-py does, only with fewer calls."""

from __future__ import annotations

import asyncio

import nats
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
