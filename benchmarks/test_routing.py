"""Routing throughput: messages/s through one and two router processes, next to the
raw nats-py consume -> publish -> ack hop measured in the same run (the physical
limit for a Python router). Figures only; nothing here asserts a speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import nats
from harness import median, run_async
from nats.js import api
from rich.table import Table

from heddle import names
from heddle.app import Heddle
from heddle.registry import Heartbeat, WorkerInfo, worker_id
from heddle.router import DEFAULT_MAX_DELIVER

HOP_STREAM = "BENCH_HOP"
BATCH = 256


async def _publish_many(js: Any, subject: str, n: int, headers_for: Any) -> None:
    futures = []
    for i in range(n):
        futures.append(await js.publish_async(subject, b"x" * 64, headers=headers_for(i)))
        if len(futures) >= 4000:
            await asyncio.gather(*futures)
            futures.clear()
    await asyncio.gather(*futures)


async def raw_hop(nats_url: str, n: int) -> float:
    """msgs/s of a plain pull consumer that republishes each message and acks it."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream(publish_async_max_pending=8192)
    with contextlib.suppress(Exception):  # left over from an interrupted run
        await js.delete_stream(HOP_STREAM)
    await js.add_stream(name=HOP_STREAM, subjects=["benchhop.in", "benchhop.out"],
                        retention=api.RetentionPolicy.WORK_QUEUE, storage=api.StorageType.FILE)
    await js.add_consumer(HOP_STREAM, durable_name="hop", filter_subject="benchhop.in",
                          ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=20000)
    await _publish_many(js, "benchhop.in", n, lambda i: {"Nats-Msg-Id": f"hop-{i}"})
    sub = await js.pull_subscribe_bind(durable="hop", stream=HOP_STREAM)
    done = 0
    t0 = time.perf_counter()
    while done < n:
        msgs = await sub.fetch(batch=BATCH, timeout=5)
        futs = [await js.publish_async("benchhop.out", m.data, headers={"Nats-Msg-Id": f"{m.headers['Nats-Msg-Id']}:o"})
                for m in msgs]
        await asyncio.gather(*futs)
        for m in msgs:
            await m.ack()
        done += len(msgs)
    await nc.flush()
    elapsed = time.perf_counter() - t0
    await sub.unsubscribe()
    await js.delete_stream(HOP_STREAM)
    await nc.close()
    return n / elapsed


async def _router_consumer_state(js: Any) -> tuple[int, int, int]:
    info = await js.consumer_info(names.TASKS_STREAM, names.ROUTER_CONSUMER)
    return info.delivered.consumer_seq, info.num_pending, info.num_ack_pending


async def through_routers(servers: Any, n: int, routers: int, log_dir: Path) -> float:
    """msgs/s through ``routers`` router processes, from their first delivery to the last ack."""
    wtype = f"route{uuid.uuid4().hex[:6]}"
    app = Heddle("benchrouting", nats_url=servers.nats_url, valkey_url=servers.valkey_url)
    await app.connect()
    conns = await app.connections()
    # A real announcement of a worker type, so the routers have somewhere to send.
    beat = Heartbeat(conns.broker, WorkerInfo(
        id=worker_id(), worker_type=wtype, tiers=["*"], default_tier="standard", concurrency=1,
        host="bench", pid=os.getpid(), version="bench", started_at=time.time()))
    await beat.start()
    js = conns.broker.js
    await conns.broker.ensure_named_consumer(
        names.ROUTER_CONSUMER, names.INCOMING_SUBJECT, max_deliver=DEFAULT_MAX_DELIVER
    )
    await _publish_many(js, names.INCOMING_SUBJECT, n, lambda i: {
        names.HDR_MSG_ID: f"{wtype}-{i}", names.HDR_WORKER_TYPE: wtype, names.HDR_TASK: "noop"})
    procs = []
    env = {**os.environ, "NATS_URL": servers.nats_url, "VALKEY_URL": servers.valkey_url}
    for i in range(routers):
        log = open(log_dir / f"router-{wtype}-{i}.log", "wb")  # noqa: SIM115
        procs.append((subprocess.Popen([sys.executable, "-m", "heddle", "router", "--loglevel", "WARNING"],
                                       env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        start_seq, _, _ = await _router_consumer_state(js)
        t0 = None
        while True:
            seq, pending, ack_pending = await _router_consumer_state(js)
            now = time.perf_counter()
            if t0 is None and seq > start_seq:
                t0 = now
            if t0 is not None and pending == 0 and ack_pending == 0:
                break
            await asyncio.sleep(0.01)
        elapsed = now - t0
    finally:
        for p, log in procs:
            p.terminate()
            p.wait(30)
            log.close()
        await beat.stop()
        await js.purge_stream(names.TASKS_STREAM, subject=names.task_subject(wtype, "standard"))
        await app.aclose()
    return n / elapsed


def test_routing_throughput(servers, bench_config, report, tmp_path):
    n = bench_config.n
    rounds = bench_config.rounds
    hop, one, two = [], [], []
    for _ in range(rounds):
        hop.append(run_async(lambda: raw_hop(servers.nats_url, n)))
        one.append(run_async(lambda: through_routers(servers, n, 1, tmp_path)))
        two.append(run_async(lambda: through_routers(servers, n, 2, tmp_path)))
    figures = {
        "n": n,
        "rounds": rounds,
        "raw_hop_msgs_per_s": median(hop),
        "one_router_msgs_per_s": median(one),
        "two_routers_msgs_per_s": median(two),
    }
    figures["one_router_to_raw_hop"] = figures["one_router_msgs_per_s"] / figures["raw_hop_msgs_per_s"]
    figures["two_routers_to_raw_hop"] = figures["two_routers_msgs_per_s"] / figures["raw_hop_msgs_per_s"]
    report.add("routing", figures)
    table = Table(title=f"routing throughput, {n} messages, median of {rounds}")
    table.add_column("path")
    table.add_column("msgs/s", justify="right")
    table.add_column("vs raw hop", justify="right")
    table.add_row("raw nats-py consume -> publish_async -> ack", f"{figures['raw_hop_msgs_per_s']:,.0f}", "1.00")
    table.add_row("heddle router, 1 process", f"{figures['one_router_msgs_per_s']:,.0f}",
                  f"{figures['one_router_to_raw_hop']:.2f}")
    table.add_row("heddle router, 2 processes", f"{figures['two_routers_msgs_per_s']:,.0f}",
                  f"{figures['two_routers_to_raw_hop']:.2f}")
    report.show(table, note="target: 1 router >= 0.80 of the raw hop (~9,000 msgs/s here)")
