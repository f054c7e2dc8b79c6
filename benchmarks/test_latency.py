"""Round-trip latency: one task at a time through the worker process, against raw nats-py.

* raw nats-py: publish and wait for the stream's ack, fetch(1) from a pull
  consumer, ack (``baseline.round_trips``);
* raw nats-py, one way: from a publish until a pull request already waiting on
  another connection has the message (``baseline.one_way``), the hop a task
  takes from its sender to an idle worker;
* heddle, sync caller: ``noop.delay().get()``, the Celery-style call (it goes
  through the client's background event loop thread);
* heddle, async caller: ``await noop.apply_async().aget()`` on plain asyncio.

The worker runs with default flags, as a user starts it.

Each call waits for the previous one, so the worker is idle between tasks and
the figure is the pure path: publish, delivery, claim, run, store, notice.
"""

from __future__ import annotations

import os
import time
from typing import Any

import baseline
from harness import TARGETS, CpuMeter, median, percentile, run_async, server_pids
from rich.table import Table

_WARMUP = 50


def _sync_round_trips(task: Any, n: int) -> tuple[list[float], dict[str, list[float]]]:
    """Time ``delay().get()``; split each call by the worker's timestamps in its result record.

    ``started_at`` is taken by the worker once the task is claimed in Valkey and
    ``finished_at`` when the function returned, both on this machine's clock.
    """
    samples = []
    phases: dict[str, list[float]] = {"to_claimed": [], "running": [], "to_caller": []}
    for i in range(_WARMUP + n):
        w0 = time.time()
        t0 = time.perf_counter()
        r = task.delay()
        r.get(timeout=30)
        elapsed = time.perf_counter() - t0
        w1 = time.time()
        if i >= _WARMUP:
            samples.append(elapsed)
            rec = r.record  # one more Valkey read, outside the timed part
            phases["to_claimed"].append(rec.started_at - w0)
            phases["running"].append(rec.finished_at - rec.started_at)
            phases["to_caller"].append(w1 - rec.finished_at)
    return samples, phases


async def _async_round_trips(task: Any, n: int, meter: CpuMeter) -> list[float]:
    """Time ``await apply_async().aget()``; ``meter`` takes the CPU of the timed calls."""
    samples = []
    try:
        for i in range(_WARMUP + n):
            if i == _WARMUP:
                meter.start()
            t0 = time.perf_counter()
            await task.apply_async().aget(timeout=30)
            if i >= _WARMUP:
                samples.append(time.perf_counter() - t0)
        meter.stop()
    finally:
        await task.app.aclose()
    return samples


def _summary(rounds: list[list[float]]) -> dict[str, float]:
    """Median over rounds of each round's p50/p99/mean, in milliseconds."""
    return {
        "p50_ms": median([percentile(r, 50) for r in rounds]) * 1e3,
        "p90_ms": median([percentile(r, 90) for r in rounds]) * 1e3,
        "p99_ms": median([percentile(r, 99) for r in rounds]) * 1e3,
        "mean_ms": median([sum(r) / len(r) for r in rounds]) * 1e3,
        "max_ms": median([max(r) for r in rounds]) * 1e3,
    }


def test_round_trip_latency_against_a_raw_nats_baseline(
    servers: Any, worker: Any, bench_app: Any, bench_config: Any, report: Any
) -> None:
    cfg = bench_config
    n = cfg.latency_n
    raw: list[list[float]] = []
    one_way: list[list[float]] = []
    sync: list[list[float]] = []
    aio: list[list[float]] = []
    phases: dict[str, list[list[float]]] = {}
    cpu: list[dict[str, float]] = []
    for i in range(cfg.rounds):
        raw.append(run_async(lambda: baseline.round_trips(servers.nats_url, n)))
        one_way.append(run_async(lambda: baseline.one_way(servers.nats_url, n)))
        samples, round_phases = _sync_round_trips(bench_app.noop, n)
        sync.append(samples)
        for name, values in round_phases.items():
            phases.setdefault(name, []).append(values)
        meter = CpuMeter({"client": os.getpid(), "worker": worker.pid, **server_pids(servers)})
        aio.append(run_async(lambda: _async_round_trips(bench_app.noop, n, meter)))  # noqa: B023
        cpu.append({name: s / n * 1e6 for name, s in meter.used.items()})
        report.progress(
            f"round {i + 1}/{cfg.rounds}: p50 raw {percentile(raw[-1], 50) * 1e3:.2f} ms, "
            f"delay().get() {percentile(sync[-1], 50) * 1e3:.2f} ms, "
            f"apply_async().aget() {percentile(aio[-1], 50) * 1e3:.2f} ms"
        )
    figures = {
        "n": n,
        "rounds": cfg.rounds,
        "raw_nats_round_trip": _summary(raw),
        "raw_nats_one_way": _summary(one_way),
        "heddle_sync_delay_get": _summary(sync),
        "heddle_async_apply_async_aget": _summary(aio),
    }
    figures["sync_phases_p50_ms"] = {
        name: median([percentile(r, 50) for r in rounds]) * 1e3 for name, rounds in phases.items()
    }
    # CPU each process spent per lone task (aget phase): the four processes share two cores here.
    figures["async_cpu_us_per_task"] = {name: median([c[name] for c in cpu]) for name in cpu[0]}
    figures["ratio_sync_p50_to_raw_p50"] = (
        figures["heddle_sync_delay_get"]["p50_ms"] / figures["raw_nats_round_trip"]["p50_ms"]
    )
    figures["ratio_async_p50_to_raw_p50"] = (
        figures["heddle_async_apply_async_aget"]["p50_ms"] / figures["raw_nats_round_trip"]["p50_ms"]
    )
    report.add("latency", figures)

    t = Table(title=f"Round trip: {n} sequential calls, median of {cfg.rounds} rounds (ms)")
    t.add_column("path")
    for col in ("p50", "p90", "p99", "mean", "max"):
        t.add_column(col, justify="right")
    rows = [
        ("raw nats-py: publish+ack, fetch(1), ack", "raw_nats_round_trip"),
        ("raw nats-py, one way: publish until a waiting pull has it", "raw_nats_one_way"),
        ("heddle: noop.delay().get()", "heddle_sync_delay_get"),
        ("heddle: await noop.apply_async().aget()", "heddle_async_apply_async_aget"),
    ]
    for label, key in rows:
        f = figures[key]
        t.add_row(label, *(f"{f[k]:.2f}" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms")))
    report.show(
        t,
        note=f"goal: p50 <= {TARGETS['round_trip_p50_ms']} ms and <= {TARGETS['round_trip_ratio_to_raw']:.0f}x raw; "
        f"p50 is {figures['ratio_sync_p50_to_raw_p50']:.1f}x raw for delay().get(), "
        f"{figures['ratio_async_p50_to_raw_p50']:.1f}x for aget()",
    )

    p = Table(title="Where a delay().get() round trip goes (p50 of each phase, ms)")
    p.add_column("phase")
    p.add_column("ms", justify="right")
    p.add_column("what happens")
    labels = {
        "to_claimed": "publish, JetStream store + ack, delivery to the worker, Valkey claim",
        "running": "the no-op task runs; its outcome is queued for the store loop",
        "to_caller": "Valkey store, result notice, ack, the caller wakes up",
    }
    for name, label in labels.items():
        p.add_row(name, f"{figures['sync_phases_p50_ms'][name]:.2f}", label)
    report.show(p, note=f"the raw one-way hop alone (publish until a waiting pull has it), p50: "
                        f"{figures['raw_nats_one_way']['p50_ms']:.2f} ms")

    c = Table(title="CPU per lone task, aget() phase (us; median of rounds)")
    for name in figures["async_cpu_us_per_task"]:
        c.add_column(name, justify="right")
    c.add_column("all", justify="right")
    used = figures["async_cpu_us_per_task"]
    c.add_row(*(f"{v:.0f}" for v in used.values()), f"{sum(used.values()):.0f}")
    busy = sum(used.values()) / (figures["heddle_async_apply_async_aget"]["mean_ms"] * 1e3)
    report.show(c, note=f"{busy:.2f} of the machine's {os.cpu_count()} cores busy on average over these round trips")
