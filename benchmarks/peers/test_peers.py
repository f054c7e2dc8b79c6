"""Heddle against Celery, taskiq and Dramatiq: same machine, same run, same workloads.

Each framework runs with its usual broker on one pair of embedded servers
(``heddle.testing.EmbeddedServers``: nats-server with JetStream, valkey-server)
and its worker started through its own CLI, as a subprocess, with its defaults
(Celery, taskiq and Dramatiq start one process per CPU or two; Heddle one):

==========  ===================================================  ==============================================
framework   broker / result backend                              worker command
==========  ===================================================  ==============================================
heddle      JetStream / Valkey                                   ``heddle-worker -A peers.heddle_app`` (defaults)
celery      Redis protocol on valkey / redis backend             ``celery -A peers.celery_app worker`` (prefork)
taskiq      taskiq-nats pull JetStream broker / taskiq-redis     ``taskiq worker peers.taskiq_app:broker``
dramatiq    Redis broker / Results middleware, redis backend     ``dramatiq peers.dramatiq_app``
==========  ===================================================  ==============================================

Per round, one framework after another (the order rotates every round, so no
framework always runs first or last), its worker is started, runs the three
workloads of ``drivers.py`` and is stopped again, so that no idle worker of
another framework shares the two cores:

1. throughput: ``HEDDLE_BENCH_N`` (20,000) no-op tasks submitted, then every
   result awaited; CPU of the worker process tree, the client, nats-server and
   valkey-server read from ``/proc`` meanwhile;
2. ``HEDDLE_BENCH_LATENCY_N`` (500) sequential round trips, p50/p99;
3. a 100-wide fan-out/fan-in, ``HEDDLE_PEERS_FANOUT_REPEATS`` (5) times.

Heddle runs once more per round with a tuned ``--concurrency 256``
(throughput only). The tables show medians over the
rounds; ratios are peer / Heddle of the same round's medians. Nothing about
time is asserted. A peer that fails a round (its client or worker raising on
the busy machine) is noted under the table and left out of that round's
medians; a Heddle failure fails the benchmark.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import pytest

pytest.importorskip("celery", reason="the peers extra is not installed: pip install -e '.[dev,peers]'")
pytest.importorskip("taskiq", reason="the peers extra is not installed: pip install -e '.[dev,peers]'")
pytest.importorskip("taskiq_nats", reason="the peers extra is not installed: pip install -e '.[dev,peers]'")
pytest.importorskip("taskiq_redis", reason="the peers extra is not installed: pip install -e '.[dev,peers]'")
pytest.importorskip("dramatiq", reason="the peers extra is not installed: pip install -e '.[dev,peers]'")
pytest.importorskip("redis", reason="the peers extra is not installed: pip install -e '.[dev,peers]'")

from harness import median, percentile, server_pids
from rich.table import Table

from .drivers import (
    CeleryDriver,
    DramatiqDriver,
    Driver,
    HeddleDriver,
    HeddleTunedDriver,
    TaskiqDriver,
)
from .workers import TreeCpuMeter

FANOUT_WIDTH = 100


def _latency_summary(samples: list[float]) -> dict[str, float]:
    return {
        "p50_ms": percentile(samples, 50) * 1e3,
        "p90_ms": percentile(samples, 90) * 1e3,
        "p99_ms": percentile(samples, 99) * 1e3,
        "mean_ms": statistics.fmean(samples) * 1e3,
        "max_ms": max(samples) * 1e3,
    }


def _run_one(driver: Driver, start_worker: Any, servers: Any, cfg: Any, repeats: int, report: Any) -> dict[str, Any]:
    """Start the driver's worker, run its workloads, stop it; the figures of this round."""
    worker = start_worker(driver)
    out: dict[str, Any] = {"worker_ready_s": worker.ready_s}
    try:
        if "throughput" in driver.workloads:
            meter = TreeCpuMeter(worker.pid, {"client": os.getpid(), **server_pids(servers)})
            rates = driver.throughput(cfg.n, meter)
            cpu = meter.used
            out["throughput_tasks_per_s"] = rates
            out["cpu_us_per_task"] = {name: s / cfg.n * 1e6 for name, s in cpu.items()}
        if "round_trips" in driver.workloads:
            samples = driver.round_trips(cfg.latency_n)
            out["round_trip"] = {variant: _latency_summary(s) for variant, s in samples.items()}
        if "fan_out" in driver.workloads:
            driver.fan_out(FANOUT_WIDTH)  # warm-up
            runs = [driver.fan_out(FANOUT_WIDTH) for _ in range(repeats)]
            out["fan_out_ms"] = [r * 1e3 for r in runs]
    finally:
        worker.stop()
    # A stalled fetch loop or a failed store shows up here, next to the figures it explains.
    warnings = worker.warnings()
    out["worker_log_warnings"] = {"count": len(warnings), "first": warnings[:5]}
    parts = []
    for variant, rate in out.get("throughput_tasks_per_s", {}).items():
        parts.append(f"{variant} {rate:,.0f} tasks/s")
    for variant, lat in out.get("round_trip", {}).items():
        parts.append(f"{variant} p50 {lat['p50_ms']:.2f} ms")
    if "fan_out_ms" in out:
        parts.append(f"fan-out {statistics.median(out['fan_out_ms']):.1f} ms (max {max(out['fan_out_ms']):.0f})")
    if warnings:
        parts.append(f"{len(warnings)} warnings in the worker log, first: {warnings[0][-120:]}")
    report.progress(f"{driver.name:>13}: " + ", ".join(parts))
    return out


def test_heddle_against_celery_taskiq_and_dramatiq_in_the_same_run(
    peer_servers: Any,
    start_peer_worker: Any,
    bench_config: Any,
    fanout_repeats: int,
    celery_pool: tuple[str, int],
    peers_report: Any,
) -> None:
    cfg = bench_config
    heddle = HeddleDriver(peer_servers)
    drivers: list[Driver] = [
        heddle,
        HeddleTunedDriver(heddle, cfg.tuned_concurrency),
        CeleryDriver(peer_servers, *celery_pool),
        TaskiqDriver(peer_servers),
        DramatiqDriver(peer_servers),
    ]
    peers_report.extra_config = {
        "fanout_width": FANOUT_WIDTH,
        "fanout_repeats": fanout_repeats,
        "celery_pool": celery_pool[0],
        "celery_concurrency": celery_pool[1] if celery_pool[0] != "solo" else 1,
    }
    per_round: list[dict[str, Any]] = []
    try:
        for i in range(cfg.rounds):
            k = i % len(drivers)
            order = drivers[k:] + drivers[:k]
            peers_report.progress(f"round {i + 1}/{cfg.rounds}: {', '.join(d.name for d in order)}")
            per_round.append(
                {d.name: _run_or_note(d, start_peer_worker, peer_servers, cfg, fanout_repeats, peers_report)
                 for d in order}
            )
    finally:
        for d in drivers:
            d.close()

    failed = {d.name: [r[d.name]["failed"] for r in per_round if "failed" in r[d.name]] for d in drivers}
    failed = {name: whys for name, whys in failed.items() if whys}
    figures = _medians(drivers, per_round)
    peers_report.add(
        "peers",
        {
            "frameworks": {
                d.name: {
                    "package": d.package,
                    "version": d.version(),
                    "broker": d.broker,
                    "worker_command": " ".join(_short(a) for a in d.worker_command()),
                    "concurrency": d.concurrency,
                    "fan_in": d.fan_in,
                    "caller": d.caller,
                    "variants": list(d.variants),
                }
                for d in drivers
            },
            "medians": figures,
            "per_round": per_round,
            "failed_rounds": failed,
        },
    )
    _show(drivers, figures, cfg, fanout_repeats, peers_report, failed)


def _run_or_note(driver: Driver, start_worker: Any, servers: Any, cfg: Any, repeats: int,
                 report: Any) -> dict[str, Any]:
    """:func:`_run_one`; a peer that fails a round is noted and left out of that round's medians.

    Heddle's own failures are never set aside: they fail the benchmark.
    """
    try:
        return _run_one(driver, start_worker, servers, cfg, repeats, report)
    except Exception as exc:
        if driver.package == "heddle":
            raise
        why = f"{type(exc).__name__}: {exc}"[:300]
        report.progress(f"{driver.name:>13}: failed this round ({why}); left out of its medians")
        return {"failed": why}


def _short(arg: str) -> str:
    """``/path/to/.venv/bin/celery`` -> ``celery``: the command as a user types it."""
    return os.path.basename(arg) if arg.startswith("/") else arg


def _medians(drivers: list[Driver], rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: the median over rounds of throughput, round-trip figures and fan-out medians."""
    out: dict[str, Any] = {}
    for d in drivers:
        per = [r[d.name] for r in rounds if "failed" not in r[d.name]]
        if not per:
            continue
        for variant in d.variants:
            fig: dict[str, Any] = {}
            tput = [p.get("throughput_tasks_per_s", {}) for p in per]
            rates = [t[variant] for t in tput if variant in t]
            if rates:
                fig["tasks_per_s"] = median(rates)
                if variant == d.variants[0]:
                    fig["cpu_us_per_task"] = {
                        name: median([p["cpu_us_per_task"][name] for p in per]) for name in per[0]["cpu_us_per_task"]
                    }
            lats = [p["round_trip"][variant] for p in per if variant in p.get("round_trip", {})]
            if lats:
                fig["round_trip"] = {key: median([lat[key] for lat in lats]) for key in lats[0]}
            if variant == d.variants[0] and "fan_out_ms" in per[0]:
                fig["fan_out_ms"] = median([statistics.median(p["fan_out_ms"]) for p in per])
                fig["fan_out_max_ms"] = max(max(p["fan_out_ms"]) for p in per)
            if fig:
                out[variant] = fig
    # Ratios: peer / Heddle. Throughput against Heddle's async-task row; round trips
    # against the Heddle row with the same kind of caller (blocking get or await).
    h = out["heddle"]
    h_async = out.get("heddle, async caller", {}).get("round_trip")
    for d in drivers:
        for variant in d.variants:
            fig = out.get(variant)
            if not fig:
                continue
            if "tasks_per_s" in fig:
                fig["throughput_ratio_to_heddle"] = fig["tasks_per_s"] / h["tasks_per_s"]
            if "round_trip" in fig and variant not in ("heddle", "heddle, async caller"):
                ref = h_async if d.caller == "async" and h_async else h["round_trip"]
                fig["round_trip_p50_ratio_to_heddle"] = fig["round_trip"]["p50_ms"] / ref["p50_ms"]
                fig["round_trip_p99_ratio_to_heddle"] = fig["round_trip"]["p99_ms"] / ref["p99_ms"]
            if "fan_out_ms" in fig:
                fig["fan_out_ratio_to_heddle"] = fig["fan_out_ms"] / h["fan_out_ms"]
    return out


def _fmt_ratio(fig: dict[str, Any], key: str) -> str:
    return f"{fig[key]:.2f}" if key in fig else ""


def _show(
    drivers: list[Driver], figures: dict[str, Any], cfg: Any, repeats: int, report: Any, failed: dict[str, list[str]]
) -> None:
    t = Table(title=f"Against the peers: medians of {cfg.rounds} rounds (ratio = peer / heddle)")
    for col in (
        "framework",
        "version",
        "tasks/s",
        "ratio",
        "round trip p50/p99 ms",
        "ratio p50",
        "fan-out ms (max)",
        "ratio",
    ):
        t.add_column(col, justify="left" if col == "framework" else "right")
    for d in drivers:
        for variant in d.variants:
            fig = figures.get(variant)
            if not fig:
                continue
            rt = fig.get("round_trip")
            t.add_row(
                variant,
                d.version(),
                f"{fig['tasks_per_s']:,.0f}" if "tasks_per_s" in fig else "",
                _fmt_ratio(fig, "throughput_ratio_to_heddle"),
                f"{rt['p50_ms']:.2f} / {rt['p99_ms']:.2f}" if rt else "",
                _fmt_ratio(fig, "round_trip_p50_ratio_to_heddle"),
                f"{fig['fan_out_ms']:.1f} ({fig['fan_out_max_ms']:.0f})" if "fan_out_ms" in fig else "",
                _fmt_ratio(fig, "fan_out_ratio_to_heddle"),
            )
    report.show(
        t,
        note=f"throughput: {cfg.n:,} no-op tasks, each worker with its defaults; "
        f"round trips: {cfg.latency_n} sequential; "
        f"fan-out: {FANOUT_WIDTH} tasks then one, median of {repeats} per round (max: the slowest one). "
        "Round-trip ratios are to the heddle row with the same kind of caller (blocking get, or await for taskiq)."
        + "".join(f" {name} failed {len(whys)} of {cfg.rounds} rounds, left out of its medians (first: {whys[0]})."
                  for name, whys in failed.items()),
    )

    c = Table(title=f"CPU per task during the {cfg.n:,}-task throughput run (median, us)")
    for col in ("framework", "worker", "client", "nats-server", "valkey-server", "all"):
        c.add_column(col, justify="left" if col == "framework" else "right")
    for d in drivers:
        fig = figures.get(d.variants[0], {})
        cpu = fig.get("cpu_us_per_task")
        if cpu:
            c.add_row(
                d.variants[0],
                *(f"{cpu[k]:,.0f}" for k in ("worker", "client", "nats-server", "valkey-server")),
                f"{sum(cpu.values()):,.0f}",
            )
    report.show(c)

    w = Table(title="How each framework ran")
    for col in ("framework", "broker", "worker concurrency", "fan-out/fan-in"):
        w.add_column(col)
    for d in drivers:
        w.add_row(d.name, d.broker, d.concurrency, d.fan_in if "fan_out" in d.workloads else "")
    report.show(w)
