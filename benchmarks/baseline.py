"""The raw nats-py JetStream baseline Heddle is compared with, measured in the same run.

It does what the transport half of a Heddle task does, and nothing else: a
file-backed work-queue stream, messages the size of a no-op task message with a
``Nats-Msg-Id`` header (deduplication on, as for tasks), pipelined publishes,
and a durable pull consumer that fetches in batches and acks each message.
No Valkey, no result notices, no second process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any

import nats
from nats.js import api

STREAM = "BENCH_BASELINE"
SUBJECT = "bench.baseline"
# About the size of an encoded no-op TaskMessage.
PAYLOAD = b"x" * 110
_BATCH = 256
_MAX_PENDING = 8192


@dataclass
class BaselineRound:
    """Figures of one throughput round of the baseline."""

    n: int
    publish_s: float
    consume_s: float

    @property
    def total_s(self) -> float:
        return self.publish_s + self.consume_s


def servers(nats_url: str) -> list[str]:
    """A ``NATS_URL`` server list (comma-separated) as nats-py takes it."""
    return [u.strip() for u in nats_url.split(",") if u.strip()]


async def _fresh_stream(js: nats.js.JetStreamContext, replicas: int = 1) -> None:
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream(STREAM)
    await js.add_stream(
        api.StreamConfig(
            name=STREAM,
            subjects=[SUBJECT],
            retention=api.RetentionPolicy.WORK_QUEUE,
            storage=api.StorageType.FILE,
            duplicate_window=120.0,
            num_replicas=replicas,
        )
    )
    await js.add_consumer(
        STREAM,
        api.ConsumerConfig(
            durable_name="baseline",
            ack_policy=api.AckPolicy.EXPLICIT,
            max_ack_pending=20_000,
            max_waiting=512,
        ),
    )


async def throughput_round(nats_url: str, n: int, replicas: int = 1) -> BaselineRound:
    """Publish ``n`` messages (pipelined acks), then fetch them in batches and ack each."""
    nc = await nats.connect(servers(nats_url))
    try:
        js = nc.jetstream(publish_async_max_pending=_MAX_PENDING)
        await _fresh_stream(js, replicas)
        psub = await js.pull_subscribe_bind(durable="baseline", stream=STREAM)
        prefix = uuid.uuid4().hex

        t0 = time.perf_counter()
        for i in range(n):
            await js.publish_async(SUBJECT, PAYLOAD, headers={"Nats-Msg-Id": f"{prefix}{i}"})
        await js.publish_async_completed()
        t1 = time.perf_counter()

        got = 0
        while got < n:
            msgs = await psub.fetch(batch=min(_BATCH, n - got), timeout=5)
            for msg in msgs:
                await msg.ack()
            got += len(msgs)
        await nc.flush()
        t2 = time.perf_counter()
        await js.delete_stream(STREAM)
        return BaselineRound(n=n, publish_s=t1 - t0, consume_s=t2 - t1)
    finally:
        await nc.close()


async def round_trips(nats_url: str, n: int, warmup: int = 50, replicas: int = 1) -> list[float]:
    """``n`` sequential round trips: publish and wait for the stream's ack, fetch(1), ack."""
    nc = await nats.connect(servers(nats_url))
    try:
        js = nc.jetstream()
        await _fresh_stream(js, replicas)
        psub = await js.pull_subscribe_bind(durable="baseline", stream=STREAM)
        samples: list[float] = []
        for i in range(warmup + n):
            t0 = time.perf_counter()
            await js.publish(SUBJECT, PAYLOAD, headers={"Nats-Msg-Id": uuid.uuid4().hex})
            (msg,) = await psub.fetch(batch=1, timeout=5)
            await msg.ack()
            if i >= warmup:
                samples.append(time.perf_counter() - t0)
        await js.delete_stream(STREAM)
        return samples
    finally:
        await nc.close()


async def one_way(nats_url: str, n: int, warmup: int = 50, replicas: int = 1) -> list[float]:
    """``n`` sequential one-way hops: from a publish until a pull request already waiting has the message.

    A Heddle task's first hop, from the sender to an idle worker's open pull request,
    with no Heddle in it: the request goes out on a second connection and is known to
    the server (a flush) before the clock starts; the message is acked as it comes.
    """
    sender = await nats.connect(servers(nats_url))
    taker = await nats.connect(servers(nats_url))
    try:
        js = sender.jetstream()
        await _fresh_stream(js, replicas)
        arrived: asyncio.Queue[float] = asyncio.Queue()

        async def on_msg(msg: Any) -> None:
            if msg.headers and "Status" in msg.headers:  # the request ended without a message
                return
            arrived.put_nowait(time.perf_counter())
            await msg.ack()

        inbox = taker.new_inbox()
        await taker.subscribe(inbox, cb=on_msg)
        request = b'{"batch":1,"expires":5000000000}'
        samples: list[float] = []
        for i in range(warmup + n):
            await taker.publish(f"$JS.API.CONSUMER.MSG.NEXT.{STREAM}.baseline", request, reply=inbox)
            await taker.flush()
            t0 = time.perf_counter()
            await js.publish(SUBJECT, PAYLOAD, headers={"Nats-Msg-Id": uuid.uuid4().hex})
            took = await asyncio.wait_for(arrived.get(), 5) - t0
            if i >= warmup:
                samples.append(took)
        await js.delete_stream(STREAM)
        return samples
    finally:
        await taker.close()
        await sender.close()


if __name__ == "__main__":  # pragma: no cover - quick manual run
    import sys

    url = sys.argv[1] if len(sys.argv) > 1 else "nats://127.0.0.1:4222"
    r = asyncio.run(throughput_round(url, 20_000))
    print(f"{r.n / r.total_s:,.0f} msgs/s (publish {r.publish_s:.2f}s, consume {r.consume_s:.2f}s)")
