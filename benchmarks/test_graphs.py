"""Goal overhead: task graphs against the same number of independent tasks, in the same run.

The benchmark worker process (``heddle worker -A bench_app``) hosts the worker,
a router and an orchestrator, as ``heddle-worker`` does by default. Per round,
back to back so that every figure sees the same machine load:

* a 10-node chain of no-op tasks (``noop.si()`` ten times: a chain waits for
  each node before it sends the next) against 10 no-op tasks sent one after
  another, each awaited before the next is sent (the same dependency shape,
  without an orchestrator);
* a chord of 100 no-op tasks and a no-op body against 100 independent no-op
  tasks sent at once and awaited, then one more (the body).

Each shape runs ``REPEATS`` times per round; the tables show the median of the
per-round medians. Overhead = graph time - independent time; it covers the goal
message, the orchestrator's checkpoint writes (two per node), the node result
notices it waits for, and storing the goal's result.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from harness import median, run_async
from rich.table import Table

from heddle.graphs.canvas import chain, chord, group

REPEATS = 15
CHAIN_N = 10
CHORD_N = 100


async def _timed(fn: Any) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def _round(noop: Any) -> dict[str, float]:
    async def chained() -> None:
        r = chain(*[noop.si() for _ in range(CHAIN_N)]).apply_async()
        assert await r.aget(timeout=120) is None

    async def sequential() -> None:
        for _ in range(CHAIN_N):
            assert await noop.apply_async().aget(timeout=120) is None

    async def chorded() -> None:
        r = chord(group(noop.si() for _ in range(CHORD_N)), noop.si()).apply_async()
        assert await r.aget(timeout=120) is None

    async def independent() -> None:
        results = [noop.apply_async() for _ in range(CHORD_N)]
        for res in results:
            assert await res.aget(timeout=120) is None
        assert await noop.apply_async().aget(timeout=120) is None

    out: dict[str, list[float]] = {"chain": [], "sequential": [], "chord": [], "independent": []}
    for _ in range(REPEATS):
        out["sequential"].append(await _timed(sequential))
        out["chain"].append(await _timed(chained))
        out["independent"].append(await _timed(independent))
        out["chord"].append(await _timed(chorded))
    return {k: statistics.median(v) for k, v in out.items()}


def test_goal_overhead_of_a_chain_and_a_chord_against_independent_tasks(worker, bench_app, bench_config, report):
    noop = bench_app.noop
    app = noop.app

    async def main() -> list[dict[str, float]]:
        try:
            await app.connect()
            await _round(noop)  # warm-up: connections, consumers, scripts, the orchestrator's first goal
            return [await _round(noop) for _ in range(bench_config.rounds)]
        finally:
            await app.aclose()

    rounds = run_async(main)
    fig = {k: median([r[k] for r in rounds]) for k in rounds[0]}
    figures = {
        "chain_nodes": CHAIN_N,
        "chord_width": CHORD_N,
        "repeats_per_round": REPEATS,
        "chain_ms": fig["chain"] * 1e3,
        "sequential_tasks_ms": fig["sequential"] * 1e3,
        "chain_overhead_ms": (fig["chain"] - fig["sequential"]) * 1e3,
        "chain_overhead_per_node_ms": (fig["chain"] - fig["sequential"]) * 1e3 / CHAIN_N,
        "chord_ms": fig["chord"] * 1e3,
        "independent_tasks_ms": fig["independent"] * 1e3,
        "chord_overhead_ms": (fig["chord"] - fig["independent"]) * 1e3,
        "chord_overhead_per_node_ms": (fig["chord"] - fig["independent"]) * 1e3 / (CHORD_N + 1),
        "rounds": rounds,
    }
    report.add("graphs", figures)

    table = Table(title=f"Goal overhead (median of {bench_config.rounds} rounds x {REPEATS} runs)")
    for col in ("shape", "as a graph", "as independent tasks", "overhead", "per node"):
        table.add_column(col, justify="right" if col != "shape" else "left")
    table.add_row(
        f"{CHAIN_N}-node chain vs {CHAIN_N} sequential tasks",
        f"{figures['chain_ms']:.1f} ms",
        f"{figures['sequential_tasks_ms']:.1f} ms",
        f"{figures['chain_overhead_ms']:.1f} ms",
        f"{figures['chain_overhead_per_node_ms']:.2f} ms",
    )
    table.add_row(
        f"{CHORD_N}-wide chord vs {CHORD_N + 1} concurrent tasks",
        f"{figures['chord_ms']:.1f} ms",
        f"{figures['independent_tasks_ms']:.1f} ms",
        f"{figures['chord_overhead_ms']:.1f} ms",
        f"{figures['chord_overhead_per_node_ms']:.2f} ms",
    )
    report.show(table, note="no-op tasks; one worker process hosting worker, router and orchestrator")
