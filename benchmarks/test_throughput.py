"""Throughput: no-op tasks through one worker process, next to a raw nats-py baseline.

Each round runs, back to back so that all see the same machine load:

1. the raw nats-py JetStream baseline (``baseline.throughput_round``);
2. the headline, as a user runs it: a worker started with default flags
   (``heddle worker -A bench_app``) and a client on plain ``asyncio`` that submits
   N async no-op tasks with ``apply_async``, then awaits every result with
   ``aget`` while the worker runs them;
3. the same with a sync no-op task (run in the worker's thread pool);
4. split, on the same worker: the worker process is paused (SIGSTOP) while N
   tasks are submitted, which measures the client's submission alone; then it
   is resumed (SIGCONT) and timed until the consumers have nothing pending or
   unacked, which measures the worker process alone;
5. tuned, beside it: a worker with ``--concurrency HEDDLE_BENCH_TUNED_CONCURRENCY``
   and a client on uvloop, end to end as in 2.

Each worker process is stopped after its part, so no two share the work. CPU
seconds used by each process (client, worker, nats-server, valkey-server)
during the headline end-to-end phase show where the machine's two cores go.
"""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any

import baseline
import nats
from harness import (
    TARGETS,
    CpuMeter,
    median,
    run_async,
    server_pids,
    wait_until,
)
from rich.table import Table

from heddle import names

_WARMUP = 500


async def _warm_up(task: Any) -> None:
    await task.app.connect()
    results = [task.apply_async() for _ in range(_WARMUP)]
    for r in results:
        await r.aget(timeout=60)


async def _end_to_end(task: Any, n: int, meter: CpuMeter) -> dict[str, float]:
    """Submit ``n`` tasks, then wait for all results; the worker runs them meanwhile."""
    app = task.app
    try:
        await _warm_up(task)
        meter.start()
        t0 = time.perf_counter()
        results = [task.apply_async() for _ in range(n)]
        t_called = time.perf_counter()
        for r in results:
            await r.sent()
        t_sent = time.perf_counter()
        for r in results:
            assert await r.aget(timeout=120) is None
        t_done = time.perf_counter()
        cpu = meter.stop()
    finally:
        await app.aclose()
    return {
        "apply_async_calls_s": t_called - t0,
        "submitted_s": t_sent - t0,
        "completed_s": t_done - t0,
        "tasks_per_s": n / (t_done - t0),
        "submit_per_s": n / (t_sent - t0),
        **{f"cpu_s.{name}": s for name, s in cpu.items()},
    }


async def _split(task: Any, n: int, worker: Any, nats_url: str) -> dict[str, float]:
    """Submission with the worker process paused, then its drain measured at the stream.

    The worker process hosts the router too, so the drain ends when both the
    router's consumer and the worker's consumer have nothing pending and nothing
    awaiting an ack: every task routed, its result stored, its message acked.
    The client only waits for the results after that, so it takes no CPU from
    the worker meanwhile (beyond its connection receiving the result notices).
    """
    app = task.app
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    consumers = [names.ROUTER_CONSUMER, names.consumer_name(app.worker_type)]

    async def drained() -> bool:
        for durable in consumers:  # in this order: routed messages land in the second
            info = await js.consumer_info(names.TASKS_STREAM, durable)
            if info.num_pending or info.num_ack_pending:
                return False
        return True

    try:
        await _warm_up(task)
        worker.pause()
        try:
            t0 = time.perf_counter()
            results = [task.apply_async() for _ in range(n)]
            for r in results:
                await r.sent()
            t_sent = time.perf_counter()
        finally:
            worker.resume()
        t_resumed = time.perf_counter()
        await wait_until(drained, 120, "the worker to drain its consumer", interval_s=0.005)
        t_drained = time.perf_counter()
        for r in results:
            assert await r.aget(timeout=120) is None
    finally:
        await nc.close()
        await app.aclose()
    return {
        "submit_only_s": t_sent - t0,
        "submit_only_per_s": n / (t_sent - t0),
        "drain_s": t_drained - t_resumed,
        "drain_per_s": n / (t_drained - t_resumed),
    }


def test_no_op_task_throughput_against_a_raw_nats_baseline(
    servers: Any, spawn_worker: Any, bench_app: Any, bench_config: Any, report: Any
) -> None:
    cfg = bench_config
    n = cfg.n
    rounds: list[dict[str, Any]] = []
    for i in range(cfg.rounds):
        base = run_async(lambda: baseline.throughput_round(servers.nats_url, n))
        worker = spawn_worker()
        try:
            meter = CpuMeter({"client": os.getpid(), "worker": worker.pid, **server_pids(servers)})
            e2e = run_async(partial(_end_to_end, bench_app.noop, n, meter))
            sync = run_async(partial(_end_to_end, bench_app.noop_sync, n, meter))
            split = run_async(partial(_split, bench_app.noop, n, worker, servers.nats_url))
        finally:
            worker.stop()
        tuned_worker = spawn_worker(cfg.tuned_concurrency)
        try:
            tuned_meter = CpuMeter({"client": os.getpid(), "worker": tuned_worker.pid, **server_pids(servers)})
            tuned = run_async(partial(_end_to_end, bench_app.noop, n, tuned_meter), uvloop=True)
        finally:
            tuned_worker.stop()
        r = {
            "baseline_msgs_per_s": n / base.total_s,
            "baseline_publish_per_s": n / base.publish_s,
            "baseline_consume_per_s": n / base.consume_s,
            "async": e2e,
            "sync": sync,
            "split": split,
            "tuned": tuned,
        }
        rounds.append(r)
        report.progress(
            f"round {i + 1}/{cfg.rounds}: baseline {r['baseline_msgs_per_s']:,.0f} msgs/s, "
            f"heddle defaults {e2e['tasks_per_s']:,.0f} tasks/s (sync task {sync['tasks_per_s']:,.0f}), "
            f"tuned {tuned['tasks_per_s']:,.0f}, submit-only {split['submit_only_per_s']:,.0f}/s, "
            f"drain {split['drain_per_s']:,.0f}/s"
        )

    def med(path: str) -> float:
        values = []
        for r in rounds:
            v: Any = r
            for part in path.split("/"):
                v = v[part]
            values.append(float(v))
        return median(values)

    base_rate = med("baseline_msgs_per_s")
    # Issue 16's goal is a share of the raw pull+ack rate alone: the consuming half of
    # the baseline, which is faster than publish-then-consume timed together.
    pull_ack_rate = med("baseline_consume_per_s")
    heddle_rate = med("async/tasks_per_s")
    tuned_rate = med("tuned/tasks_per_s")
    figures = {
        "n": n,
        "rounds": cfg.rounds,
        "worker_flags": "defaults",
        "tuned_concurrency": cfg.tuned_concurrency,
        "baseline": {
            "msgs_per_s": base_rate,
            "publish_per_s": med("baseline_publish_per_s"),
            "consume_per_s": pull_ack_rate,
        },
        "heddle": {
            "tasks_per_s": heddle_rate,
            "sync_task_tasks_per_s": med("sync/tasks_per_s"),
            "tuned_tasks_per_s": tuned_rate,
            "submit_per_s_while_worker_runs": med("async/submit_per_s"),
            "submit_only_per_s": med("split/submit_only_per_s"),
            "worker_drain_per_s": med("split/drain_per_s"),
            "apply_async_call_us": med("async/apply_async_calls_s") / n * 1e6,
            "cpu_us_per_task": {name: med(f"async/cpu_s.{name}") / n * 1e6
                                for name in ("client", "worker", "nats-server", "valkey-server")},
        },
        "ratio_heddle_to_baseline": heddle_rate / base_rate,
        "ratio_heddle_to_pull_ack": heddle_rate / pull_ack_rate,
        "ratio_tuned_to_baseline": tuned_rate / base_rate,
        "per_round": rounds,
    }
    report.add("throughput", figures)

    t = Table(title=f"Throughput: {n:,} no-op tasks, one worker process; median of {cfg.rounds} rounds")
    t.add_column("measure")
    t.add_column("rate", justify="right")
    t.add_column("x raw", justify="right")
    t.add_column("x pull+ack", justify="right")
    t.add_column("note")
    t.add_row(
        "raw nats-py JetStream: publish N, then fetch+ack N",
        f"{base_rate:,.0f} msgs/s",
        "1.00",
        f"{base_rate / pull_ack_rate:.2f}",
        f"publish alone {figures['baseline']['publish_per_s']:,.0f}/s",
    )
    t.add_row(
        "raw nats-py JetStream: fetch(256)+ack alone",
        f"{pull_ack_rate:,.0f} msgs/s",
        "",
        "1.00",
        "issue 16's baseline",
    )
    t.add_row(
        "heddle, default flags, asyncio client (async no-op)",
        f"{heddle_rate:,.0f} tasks/s",
        f"{figures['ratio_heddle_to_baseline']:.2f}",
        f"{figures['ratio_heddle_to_pull_ack']:.2f}",
        f"goal >= {TARGETS['end_to_end_tasks_per_s']:,.0f} and >= {TARGETS['end_to_end_ratio_to_raw']:.2f} x pull+ack",
    )
    t.add_row(
        "heddle, default flags (sync no-op, thread pool)",
        f"{figures['heddle']['sync_task_tasks_per_s']:,.0f} tasks/s",
        f"{figures['heddle']['sync_task_tasks_per_s'] / base_rate:.2f}",
        f"{figures['heddle']['sync_task_tasks_per_s'] / pull_ack_rate:.2f}",
        "",
    )
    t.add_row(
        f"heddle, --concurrency {cfg.tuned_concurrency}, uvloop client",
        f"{tuned_rate:,.0f} tasks/s",
        f"{figures['ratio_tuned_to_baseline']:.2f}",
        f"{tuned_rate / pull_ack_rate:.2f}",
        "tuned",
    )
    t.add_row(
        "submission while the worker runs (defaults)",
        f"{figures['heddle']['submit_per_s_while_worker_runs']:,.0f} tasks/s",
        "",
        "",
        "apply_async + publish acks",
    )
    t.add_row(
        "submission alone (worker paused)",
        f"{figures['heddle']['submit_only_per_s']:,.0f} tasks/s",
        "",
        "",
        f"apply_async() call itself {figures['heddle']['apply_async_call_us']:.0f} us",
    )
    t.add_row(
        "worker drain alone (N queued, worker resumed)",
        f"{figures['heddle']['worker_drain_per_s']:,.0f} tasks/s",
        "",
        "",
        "measured at the stream: all acked",
    )
    report.show(t)

    c = Table(title="CPU per task during the headline end-to-end phase (median)")
    c.add_column("process")
    c.add_column("CPU us / task", justify="right")
    c.add_column("share", justify="right")
    cpu = figures["heddle"]["cpu_us_per_task"]
    total = sum(cpu.values())
    for name, us in cpu.items():
        c.add_row(name, f"{us:,.0f}", f"{us / total:.0%}")
    c.add_row("all (2 cores = 1e6/rate*2 us available)", f"{total:,.0f}", f"{2e6 / heddle_rate:,.0f} us wall*cores")
    report.show(c)
