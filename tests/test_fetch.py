"""Pulling from a durable consumer: a fetched message is handed over as soon as it arrives.

The worker, router and orchestrator loops all fetch through :class:`heddle.pull.Puller`.
nats-py's own ``fetch(batch > 1)`` could hold messages it already had for the whole
fetch timeout (the ~1 s stalls before a burst of deliveries); these tests give each
fetch a long timeout and require delivery in well under half of it, so a stall fails
them without any tight wall-clock bound.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

import heddle
from heddle import names
from heddle.broker import Broker
from heddle.pull import Feed, Puller, ack_now
from heddle.settings import Settings

# Long, so that a fetch sitting on a message until its timeout cannot pass for noise.
TIMEOUT_S = 10.0
PROMPT_S = TIMEOUT_S / 2


@dataclass
class Consumer:
    broker: Broker
    worker_type: str
    durable: str

    @property
    def subject(self) -> str:
        return names.task_subject(self.worker_type, "local")

    async def publish(self, *payloads: bytes) -> float:
        """Publish, wait for the stream's acks; the send time of the first."""
        sent = time.monotonic()
        for payload in payloads:
            await self.broker.publish(self.subject, payload, {})
        return sent

    async def puller(self) -> Puller:
        return Puller(await self.broker.pull_subscribe(self.durable), self.durable, self.broker.url)

    async def waiting_requests(self) -> int:
        return (await self.broker.consumer_info(names.TASKS_STREAM, self.durable)).num_waiting

    async def until_waiting(self, n: int = 1) -> None:
        """Wait until the server holds ``n`` pull requests (a fetch is parked on the consumer)."""
        async with asyncio.timeout(10):
            while await self.waiting_requests() < n:
                await asyncio.sleep(0.01)


@pytest.fixture
async def make_consumer(heddle_servers) -> AsyncIterator[Callable[..., Awaitable[Consumer]]]:
    """A fresh durable consumer of its own worker type; settings may be overridden."""
    brokers: list[Broker] = []

    async def make(**settings: Any) -> Consumer:
        broker = Broker(
            Settings(nats_url=heddle_servers.nats_url, valkey_url=heddle_servers.valkey_url).with_(**settings)
        )
        brokers.append(broker)
        await broker.connect()
        await broker.ensure_streams()
        worker_type = f"fetch{uuid.uuid4().hex[:8]}"
        return Consumer(broker, worker_type, await broker.ensure_consumer(worker_type))

    yield make
    for broker in brokers:
        await broker.close()


@pytest.fixture
async def consumer(make_consumer) -> Consumer:
    return await make_consumer()


async def _stale_status(consumer: Consumer, puller: Puller, status: str, description: str) -> None:
    """Put a pull-request status into the puller's inbox, as a request that ended earlier would."""
    assert consumer.broker.nc is not None
    await consumer.broker.nc.publish(puller.psub._deliver, b"", headers={"Status": status, "Description": description})


async def test_a_message_reaches_an_idle_fetch_as_soon_as_it_is_published(consumer):
    puller = await consumer.puller()
    try:
        fetch = asyncio.ensure_future(puller.fetch(16, TIMEOUT_S))
        await consumer.until_waiting()
        sent = await consumer.publish(b"one")
        msgs = await fetch
        took = time.monotonic() - sent
        assert [m.data for m in msgs] == [b"one"]
        assert took < PROMPT_S, f"delivered {took:.2f}s after publishing; the fetch timeout is {TIMEOUT_S}s"
        await msgs[0].ack()
    finally:
        await puller.close()


@pytest.mark.parametrize(
    ("status", "description"),
    [("408", "Request Timeout"), ("408", "Requests Pending"), ("404", "No Messages")],
)
async def test_a_status_from_another_pull_request_does_not_hold_the_next_message(consumer, status, description):
    # nats-py's fetch took such a status for the answer to its first pull request,
    # fell back to a plain pull for the whole batch, and returned the message that
    # came next only when that pull expired.
    puller = await consumer.puller()
    try:
        fetch = asyncio.ensure_future(puller.fetch(16, TIMEOUT_S))
        await consumer.until_waiting()
        await _stale_status(consumer, puller, status, description)
        sent = await consumer.publish(b"after the status")
        msgs = await fetch
        if not msgs:  # the status ended this fetch early; the next one has the message
            msgs = await puller.fetch(16, TIMEOUT_S)
        took = time.monotonic() - sent
        assert [m.data for m in msgs] == [b"after the status"]
        assert took < PROMPT_S, f"delivered {took:.2f}s after publishing; the fetch timeout is {TIMEOUT_S}s"
        await msgs[0].ack()
    finally:
        await puller.close()


async def test_a_pull_request_refused_for_another_replica_does_not_hold_the_next_message(make_consumer):
    # The server refuses a no-wait pull with "408 Requests Pending" while requests of
    # other replicas wait for every pending message. nats-py's fetch then sent a plain
    # pull for the whole batch and returned the message that came next only when that
    # pull expired. MaxAckPending 1 keeps replica A's request waiting here, on purpose.
    consumer = await make_consumer(max_ack_pending=1)
    await consumer.publish(b"m0", b"m1")
    a, b = await consumer.puller(), await consumer.puller()
    try:
        [m0] = await a.fetch(10, TIMEOUT_S)  # A's request stays open: m1 is pending, MaxAckPending is reached
        fetch_b = asyncio.ensure_future(b.fetch(10, TIMEOUT_S))  # refused: A's request wants m1
        await asyncio.sleep(0.1)  # let B be refused at least once (a refusal leaves nothing to wait on)
        await m0.ack()
        [m1] = await a.fetch(10, TIMEOUT_S)  # A's request takes m1 and ends
        await m1.ack()
        await consumer.until_waiting(1)  # B's request is the one left
        sent = await consumer.publish(b"m2")
        msgs = await fetch_b
        took = time.monotonic() - sent
        assert [m.data for m in msgs] == [b"m2"]
        assert took < PROMPT_S, f"delivered {took:.2f}s after publishing; the fetch timeout is {TIMEOUT_S}s"
        await msgs[0].ack()
    finally:
        await a.close()
        await b.close()


async def test_two_pullers_sharing_a_consumer_get_a_paced_stream_without_stalls(consumer):
    # Two replicas on one consumer are what made the server refuse pull requests
    # with "408 Requests Pending", the usual start of the old stall.
    pullers = [await consumer.puller() for _ in range(2)]
    sent_at: dict[bytes, float] = {}
    latency: dict[bytes, float] = {}
    total = 600
    all_in = asyncio.Event()

    async def pull(puller: Puller) -> None:
        while True:
            for msg in await puller.fetch(256, TIMEOUT_S):
                latency[msg.data] = time.monotonic() - sent_at[msg.data]
                await msg.ack()
            if len(latency) >= total:
                all_in.set()

    loops = [asyncio.ensure_future(pull(p)) for p in pullers]
    try:
        await consumer.until_waiting(2)
        for burst in range(total // 20):  # 20 every 25 ms: 800/s
            payloads = [b"%d" % n for n in range(burst * 20, burst * 20 + 20)]
            now = time.monotonic()
            sent_at.update(dict.fromkeys(payloads, now))
            await asyncio.gather(*(consumer.broker.publish(consumer.subject, p, {}) for p in payloads))
            await asyncio.sleep(0.025)
        async with asyncio.timeout(TIMEOUT_S * 2):
            await all_in.wait()
        assert len(latency) == total
        worst = max(latency.values())
        assert worst < PROMPT_S, f"a message waited {worst:.2f}s; the fetch timeout is {TIMEOUT_S}s"
    finally:
        for loop in loops:
            loop.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for p in pullers:
            await p.close()


async def test_a_fetch_returns_at_most_its_batch_and_every_message_once(consumer):
    await consumer.publish(*(b"%d" % n for n in range(10)))
    puller = await consumer.puller()
    got: list[bytes] = []
    try:
        async with asyncio.timeout(TIMEOUT_S):
            while len(got) < 10:
                msgs = await puller.fetch(3, TIMEOUT_S)
                assert 1 <= len(msgs) <= 3
                for msg in msgs:
                    got.append(msg.data)
                    await msg.ack()
        assert sorted(got) == sorted(b"%d" % n for n in range(10))
    finally:
        await puller.close()


async def test_an_idle_fetch_returns_nothing_after_its_timeout(consumer):
    puller = await consumer.puller()
    try:
        assert await puller.fetch(8, 0.3) == []
    finally:
        await puller.close()


async def test_a_deleted_consumer_is_a_broker_error_so_the_loop_rebinds(consumer):
    puller = await consumer.puller()
    try:
        fetch = asyncio.ensure_future(puller.fetch(8, TIMEOUT_S))
        await consumer.until_waiting()
        assert consumer.broker.js is not None
        await consumer.broker.js.delete_consumer(names.TASKS_STREAM, consumer.durable)
        started = time.monotonic()
        with pytest.raises(heddle.BrokerError, match=rf"{consumer.durable}: 409 Consumer Deleted"):
            await fetch
        assert time.monotonic() - started < PROMPT_S
    finally:
        await puller.close()


async def test_a_feed_whose_consumer_was_deleted_re_creates_it_and_goes_on(consumer):
    # What the worker, router and orchestrator loops rely on: a failed pull is not raised,
    # and the next fetch binds a re-created consumer that delivers what is published.
    ensured = 0

    async def ensure() -> tuple[str, str]:
        nonlocal ensured
        ensured += 1
        return await consumer.broker.ensure_consumer(consumer.worker_type), names.TASKS_STREAM

    stop = asyncio.Event()
    feed = Feed(consumer.broker, ensure, stop, "tasks", backoff_s=0.1)
    await feed.start()
    try:
        assert feed.durable == consumer.durable and ensured == 1
        fetch = asyncio.ensure_future(feed.fetch(8, TIMEOUT_S))
        await consumer.until_waiting()
        assert consumer.broker.js is not None
        await consumer.broker.js.delete_consumer(names.TASKS_STREAM, consumer.durable)
        assert await fetch == []  # the refused pull, logged and backed off
        fetch = asyncio.ensure_future(feed.fetch(8, TIMEOUT_S))
        async with asyncio.timeout(10):
            while ensured < 2:  # the next fetch re-creates the consumer first
                await asyncio.sleep(0.01)
        await consumer.until_waiting()
        sent = await consumer.publish(b"after")
        msgs = await fetch
        assert time.monotonic() - sent < PROMPT_S
        assert ensured == 2 and [m.data for m in msgs] == [b"after"]
        await msgs[0].ack()
    finally:
        await feed.close()


async def test_the_nats_py_internals_puller_relies_on_are_there(heddle_servers) -> None:
    # Puller reads a pull subscription's private parts (its queue, inbox and next-message
    # subject) and does nats-py's own bookkeeping of them. Pinned here: an upgrade of
    # nats-py that renames them fails this test, not production.
    from importlib.metadata import version

    broker = Broker(Settings(nats_url=heddle_servers.nats_url), "pin")
    await broker.connect()
    try:
        await broker.ensure_streams()
        durable = await broker.ensure_named_consumer("pin-" + uuid.uuid4().hex[:8], "heddle.tasks.pin.*",
                                                     max_deliver=3)
        psub = await broker.pull_subscribe(durable)
        assert version("nats-py").startswith("2.")
        assert isinstance(psub._sub._pending_queue, asyncio.Queue)
        assert isinstance(psub._sub._pending_size, int)
        assert psub._nms.startswith("$JS.API.CONSUMER.MSG.NEXT.") and psub._deliver
        assert callable(psub._nc.publish)
        await psub.unsubscribe()
    finally:
        await broker.close()


async def test_an_ack_made_in_the_callers_step_removes_the_message_and_is_made_once(consumer):
    puller = await consumer.puller()
    try:
        fetch = asyncio.ensure_future(puller.fetch(1, TIMEOUT_S))
        await consumer.until_waiting()
        await consumer.publish(b"one")
        (msg,) = await fetch
        assert ack_now(msg)
        assert msg.is_acked
        assert not ack_now(msg)  # acknowledged already: msg.ack() would raise, nothing is sent again
        await consumer.broker.flush()
        info = await consumer.broker.consumer_info(names.TASKS_STREAM, consumer.durable)
        assert (info.num_ack_pending, info.num_pending) == (0, 0)
        assert info.ack_floor.consumer_seq == info.delivered.consumer_seq == 1
    finally:
        await puller.close()
