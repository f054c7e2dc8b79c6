"""Memory: the worker's resident set before and after HEDDLE_BENCH_MEMORY_N tasks.

A fresh worker process runs the tasks; the client keeps a bounded number in
flight (a window, as a long-running producer would) and reads the worker's
``VmRSS`` from ``/proc/PID/status`` at checkpoints. A leak per task (a dict
entry, a subscription, a future) shows up as growth proportional to the
tasks run; a flat line means per-task state is freed.
"""

from __future__ import annotations

import os
import time
from typing import Any

from harness import rss_kib, run_async
from rich.table import Table

_WARMUP = 5_000
_WINDOW = 5_000
_CHECKPOINTS = 10


async def _run(task: Any, n: int, on_checkpoint: Any) -> float:
    """Run ``n`` tasks, at most ``_WINDOW`` in flight; call ``on_checkpoint(done)`` along the way."""
    step = max(_WINDOW, n // _CHECKPOINTS)
    done = 0
    t0 = time.perf_counter()
    try:
        await task.app.connect()
        while done < n:
            chunk = min(_WINDOW, n - done)
            results = [task.apply_async() for _ in range(chunk)]
            for r in results:
                assert await r.aget(timeout=120) is None
            before, done = done, done + chunk
            if done // step != before // step or done == n:
                on_checkpoint(done)
    finally:
        await task.app.aclose()
    return time.perf_counter() - t0


def test_worker_memory_stays_flat(spawn_worker: Any, bench_app: Any, bench_config: Any, report: Any) -> None:
    n = bench_config.memory_n
    worker = spawn_worker()
    samples: list[dict[str, int]] = []

    def checkpoint(done: int) -> None:
        samples.append({"tasks": done, "worker_kib": worker.rss_kib(), "client_kib": rss_kib(os.getpid())})

    checkpoint(0)
    run_async(lambda: _run(bench_app.noop, _WARMUP, lambda _done: None))
    checkpoint(0)
    samples[-1]["tasks"] = _WARMUP
    elapsed = run_async(lambda: _run(bench_app.noop, n, lambda d: checkpoint(d + _WARMUP)))
    worker.stop()

    idle, before, after = samples[0], samples[1], samples[-1]
    growth_kib = after["worker_kib"] - before["worker_kib"]
    figures = {
        "n": n,
        "warmup": _WARMUP,
        "window": _WINDOW,
        "worker_rss_mib_idle": idle["worker_kib"] / 1024,
        "worker_rss_mib_before": before["worker_kib"] / 1024,
        "worker_rss_mib_after": after["worker_kib"] / 1024,
        "worker_growth_mib": growth_kib / 1024,
        "worker_growth_bytes_per_task": growth_kib * 1024 / n,
        "client_rss_mib_before": before["client_kib"] / 1024,
        "client_rss_mib_after": after["client_kib"] / 1024,
        "tasks_per_s": n / elapsed,
        "samples": samples,
    }
    report.add("memory", figures)

    t = Table(title=f"Worker memory over {n:,} no-op tasks (VmRSS, MiB)")
    t.add_column("tasks run", justify="right")
    t.add_column("worker RSS", justify="right")
    t.add_column("client RSS", justify="right")
    for i, s in enumerate(samples):
        label = "idle" if i == 0 else f"{s['tasks']:,}" + (" (after warm-up)" if i == 1 else "")
        t.add_row(label, f"{s['worker_kib'] / 1024:.1f}", f"{s['client_kib'] / 1024:.1f}")
    report.show(
        t,
        note=f"worker growth after warm-up: {figures['worker_growth_mib']:+.1f} MiB "
        f"({figures['worker_growth_bytes_per_task']:+.1f} bytes/task); "
        f"{figures['tasks_per_s']:,.0f} tasks/s with {_WINDOW:,} in flight",
    )
