"""Sizes: a message too large is refused where it is made, a large result is delivered, and
nothing Heddle publishes can make nats-server close its connection."""

from __future__ import annotations

import asyncio
import uuid

import nats
import pytest

import heddle
from heddle import names
from heddle.connections import Connections
from heddle.settings import Settings
from heddle.testing import EmbeddedServers, running_worker
from tests.conftest import dead_letters


def _messages(url: str) -> int:
    async def count() -> int:
        nc = await nats.connect(url)
        try:
            return (await nc.jetstream().stream_info(names.TASKS_STREAM)).state.messages
        finally:
            await nc.close()

    return asyncio.run(count())


def test_an_argument_over_the_message_limit_fails_at_the_call_site_naming_its_size(
    heddle_app: heddle.Heddle, heddle_servers: EmbeddedServers
) -> None:
    @heddle_app.task
    def take(data: str) -> int:
        return len(data)

    take.delay("ok")  # creates the streams; no worker runs it
    before = _messages(heddle_servers.nats_url)
    with pytest.raises(heddle.EncodeError, match=r"encode to 2,097,\d+ bytes, over the limit of 983,040"):
        take.delay("x" * 2 * 1024 * 1024)
    assert _messages(heddle_servers.nats_url) == before
    small = heddle.Heddle(heddle_app.name, nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url,
                          max_message_bytes=4096)
    try:
        with pytest.raises(heddle.EncodeError, match=r"over the limit of 4,096 .*max_message_bytes"):
            small.send_task(take.name, ("y" * 5000,))
    finally:
        small.close()
    with pytest.raises(heddle.ConfigError, match="max_message_bytes"):
        Settings(max_message_bytes=10)


def test_a_result_of_several_mib_is_stored_and_returned_to_the_waiting_caller(
    heddle_app: heddle.Heddle, heddle_servers: EmbeddedServers
) -> None:
    @heddle_app.task
    def big(mib: int) -> str:
        return "r" * (mib * 1024 * 1024)

    with running_worker(heddle_app):
        # Longer than the handles' periodic re-read: the answer must come from the notice path.
        assert len(big.delay(3).get(timeout=10)) == 3 * 1024 * 1024


async def test_headers_that_would_push_a_message_past_max_payload_are_refused_and_the_connection_lives(
    fresh_servers: EmbeddedServers,
) -> None:
    conns = Connections(Settings(nats_url=fresh_servers.nats_url, valkey_url=fresh_servers.valkey_url), "t")
    await conns.start()
    try:
        await conns.ensure_streams()
        limit = conns.broker.max_payload
        payload = b"p" * (limit - 100)  # fits alone, as nats-py checks it
        headers = {names.HDR_MSG_ID: uuid.uuid4().hex, "Heddle-Padding": "h" * 200}
        with pytest.raises(heddle.MessageTooLarge, match=f"over nats-server's max_payload of {limit:,}"):
            await conns.broker.publish(names.INCOMING_SUBJECT, payload, headers)
        with pytest.raises(heddle.MessageTooLarge):
            await conns.broker.publish_core("heddle.test.big", b"x" * (limit + 1))
        await conns.broker.flush()
        assert conns.broker.connected
    finally:
        await conns.close()


async def test_a_message_too_large_to_dead_letter_with_its_reason_is_kept_by_reference_and_replays(
    fresh_servers: EmbeddedServers,
) -> None:
    from heddle.dlq import get_dead_letter, list_dead_letters

    settings = Settings(nats_url=fresh_servers.nats_url, valkey_url=fresh_servers.valkey_url)
    conns = Connections(settings, "t")
    await conns.start()
    app = heddle.Heddle("dlqtest", settings=settings)
    try:
        await conns.ensure_streams()
        payload = b"d" * (conns.broker.max_payload - 200)
        headers = {names.HDR_WORKER_TYPE: "nobody", names.HDR_TASK: "nobody.task"}
        await conns.broker.dead_letter(payload, "r" * 900, task_id="big-1", subject="heddle.tasks.nobody.local",
                                       dedup_key="t:1", original_headers=headers)
        assert await conns.broker.flush() is None and conns.broker.connected
        [(dl_headers, dl_data)] = await dead_letters(fresh_servers.nats_url)
        assert dl_data == b"" and dl_headers[names.HDR_PAYLOAD_REF].startswith(names.DLQ_PAYLOAD_KEY_PREFIX)
        [dl] = await list_dead_letters(app)
        assert (await get_dead_letter(app, dl.id)).data == payload
    finally:
        await app.aclose()
        await conns.close()


def test_arguments_nested_deeper_than_a_worker_decodes_fail_at_the_call_site(heddle_app: heddle.Heddle) -> None:
    @heddle_app.task
    def take(data: list) -> int:  # type: ignore[type-arg]
        return len(data)

    deep: list = []  # type: ignore[type-arg]
    for _ in range(200):
        deep = [deep]
    with pytest.raises(heddle.EncodeError, match=r"cannot be sent: .*deep"):
        take.delay(deep)
