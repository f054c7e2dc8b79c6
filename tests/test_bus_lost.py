"""A process whose NATS connection is closed for good (nats-py never reconnects after the
server closed it, e.g. for a protocol violation or a refused login) is not left running
deaf: /healthz fails, and its actors stop with the reason, so a supervisor restarts it."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from heddle import Heddle
from heddle.errors import BrokerUnavailable
from heddle.health import HealthServer, probe
from heddle.runtime import run_actors
from heddle.testing import EmbeddedServers
from heddle.worker import Worker


async def test_a_worker_cut_off_from_nats_for_good_fails_healthz_and_stops_with_the_reason(
    fresh_servers: EmbeddedServers,
) -> None:
    app = Heddle(f"b{uuid.uuid4().hex[:10]}", nats_url=fresh_servers.nats_url, valkey_url=fresh_servers.valkey_url)

    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    worker = Worker(app, concurrency=2, grace_s=1)
    run = asyncio.ensure_future(run_actors(app, [worker], None))
    health = HealthServer([worker], port=0, host="127.0.0.1")
    try:
        await asyncio.wait_for(worker.ready.wait(), 20)
        await health.start()
        live, body = await asyncio.to_thread(probe, health.port)
        assert live, body
        assert worker.conns is not None
        broker = worker.conns.broker
        assert broker.nc is not None
        # What the server does to a client that breaks the protocol: nats-py's own check
        # counts the payload alone, the server counts the headers too, and closes us.
        await broker.nc.publish("heddle.test.cut", b"x" * (broker.max_payload - 10), headers={"H": "h" * 100})
        await asyncio.wait_for(broker.lost_event.wait(), 10)
        live, body = await asyncio.to_thread(probe, health.port)
        assert not live and "closed for good" in body and "restart the process" in body
        with pytest.raises(BrokerUnavailable, match=r"closed for good.*exiting so it can be restarted"):
            await asyncio.wait_for(run, 60)
    finally:
        await health.stop()
        if not run.done():
            worker.request_stop()
            await asyncio.gather(run, return_exceptions=True)
