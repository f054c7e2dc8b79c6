"""R1 against R3: no-op tasks on a 3-node nats-server cluster on loopback (issue 20).

One cluster (three nats-servers with routes, JetStream on file storage) and one
valkey-server, started here. First every stream has one replica, then three
(``HEDDLE_STREAM_REPLICAS``: raised in place, so R1 is measured first). For each:

- the raw nats-py baseline on a stream with the same replica count;
- end to end, as a user runs it: a worker started with default flags
  (``heddle worker -A bench_app``, ``NATS_URL`` = the three servers) and a
  plain-asyncio client that submits N no-op tasks, then awaits every result;
- sequential round trips (``apply_async().aget()``) next to the baseline's
  publish → fetch → ack.

All on one 2-core machine, so the three nodes share the cores with the worker
and the client: the figures show what replication costs here, not what three
machines would do.
"""

from __future__ import annotations

import asyncio
import os
import time
import types
from functools import partial
from typing import Any

import baseline
from harness import BenchConfig, WorkerProcess, median, percentile, run_async
from rich.table import Table

import heddle
from heddle.testing import EmbeddedValkey
from heddle.testing.cluster import EmbeddedNatsCluster

_WARMUP = 200


def _client(cfg: BenchConfig, nats_url: str, valkey_url: str, replicas: int) -> Any:
    app = heddle.Heddle(cfg.app_name, nats_url=nats_url, valkey_url=valkey_url, stream_replicas=replicas)

    @app.task(name="bench.noop")
    async def noop() -> None:
        """The worker's no-op, sent by name."""

    return noop


async def _end_to_end(task: Any, n: int) -> float:
    try:
        for r in [task.apply_async() for _ in range(_WARMUP)]:
            await r.aget(timeout=60)
        t0 = time.perf_counter()
        results = [task.apply_async() for _ in range(n)]
        for r in results:
            assert await r.aget(timeout=300) is None
        return n / (time.perf_counter() - t0)
    finally:
        await task.app.aclose()


async def _round_trips(task: Any, n: int) -> list[float]:
    samples = []
    try:
        for i in range(50 + n):
            t0 = time.perf_counter()
            await task.apply_async().aget(timeout=30)
            if i >= 50:
                samples.append(time.perf_counter() - t0)
        return samples
    finally:
        await task.app.aclose()


async def _replicated(nats_url: str, replicas: int) -> float:
    """Raise every Heddle stream to ``replicas`` and wait until each has a leader and that many current peers."""
    from heddle.broker import Broker
    from heddle.settings import Settings

    broker = Broker(Settings(nats_url=nats_url, stream_replicas=replicas))
    await broker.connect()
    t0 = time.perf_counter()
    try:
        await broker.ensure_streams()
        while True:
            ready = True
            for stream in ("HEDDLE_TASKS", "HEDDLE_GOALS", "HEDDLE_DLQ"):
                try:
                    info = await broker.stream_info(stream)
                except heddle.HeddleError:
                    ready = False
                    break
                peers = [p for p in (info.cluster.replicas or []) if p.current] if info.cluster else []
                if not (info.cluster and info.cluster.leader and len(peers) + 1 >= replicas):
                    ready = False
            if ready:
                return time.perf_counter() - t0
            await asyncio.sleep(0.1)
    finally:
        await broker.close()


def test_throughput_and_round_trip_with_one_and_with_three_replicas(
    bench_config: BenchConfig, report: Any, tmp_path_factory: Any
) -> None:
    cfg = bench_config
    log_dir = tmp_path_factory.mktemp("cluster-workers")
    rows: dict[int, dict[str, float]] = {}
    with EmbeddedNatsCluster(3) as cluster, EmbeddedValkey("127.0.0.1", None, None) as valkey:
        servers = types.SimpleNamespace(nats_url=cluster.url, valkey_url=valkey.url)
        for replicas in (1, 3):
            os.environ["HEDDLE_STREAM_REPLICAS"] = str(replicas)  # the worker process's setting
            scaled_s = run_async(partial(_replicated, cluster.url, replicas))
            report.progress(f"R{replicas}: streams ready with {replicas} replica(s) after {scaled_s:.1f}s")
            figures: dict[str, list[float]] = {"base": [], "heddle": [], "rt": [], "base_rt": []}
            try:
                for _ in range(cfg.rounds):
                    base = run_async(partial(baseline.throughput_round, cluster.url, cfg.n, replicas))
                    base_rt = run_async(partial(baseline.round_trips, cluster.url, cfg.latency_n, replicas=replicas))
                    worker = WorkerProcess(servers, cfg, log_dir)  # type: ignore[arg-type]
                    try:
                        task = _client(cfg, cluster.url, valkey.url, replicas)
                        tput = run_async(partial(_end_to_end, task, cfg.n))
                        task = _client(cfg, cluster.url, valkey.url, replicas)
                        rts = run_async(partial(_round_trips, task, cfg.latency_n))
                    finally:
                        worker.stop()
                    figures["base"].append(cfg.n / base.total_s)
                    figures["heddle"].append(tput)
                    figures["rt"].extend(rts)
                    figures["base_rt"].extend(base_rt)
                    report.progress(f"R{replicas}: baseline {figures['base'][-1]:,.0f} msgs/s, heddle {tput:,.0f} "
                                    f"tasks/s, round trip p50 {percentile(rts, 50) * 1000:.2f} ms")
            finally:
                os.environ.pop("HEDDLE_STREAM_REPLICAS", None)
            rows[replicas] = {
                "baseline_msgs_per_s": median(figures["base"]),
                "tasks_per_s": median(figures["heddle"]),
                "round_trip_p50_ms": percentile(figures["rt"], 50) * 1000,
                "round_trip_p99_ms": percentile(figures["rt"], 99) * 1000,
                "baseline_round_trip_p50_ms": percentile(figures["base_rt"], 50) * 1000,
                "streams_ready_s": scaled_s,
            }
    table = Table(title=f"R1 vs R3 on a 3-node loopback cluster (n={cfg.n}, {cfg.rounds} round(s), medians)")
    for col in ("replicas", "raw msgs/s", "Heddle tasks/s", "ratio", "RT p50 ms", "RT p99 ms", "raw RT p50 ms"):
        table.add_column(col, justify="right")
    for replicas, r in rows.items():
        table.add_row(
            f"R{replicas}", f"{r['baseline_msgs_per_s']:,.0f}", f"{r['tasks_per_s']:,.0f}",
            f"{r['tasks_per_s'] / r['baseline_msgs_per_s']:.2f}", f"{r['round_trip_p50_ms']:.2f}",
            f"{r['round_trip_p99_ms']:.2f}", f"{r['baseline_round_trip_p50_ms']:.2f}",
        )
    report.show(table)
    report.add("cluster", {f"R{k}": v for k, v in rows.items()})
