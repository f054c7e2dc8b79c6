"""Why a Heddle chord is sometimes slow: every lifecycle event of each chord, and the worker's warnings.

Not a benchmark (pytest does not collect it); a script::

    .venv/bin/python benchmarks/peers/trace_chord.py [--chords 20] [--n 20000]

It starts embedded servers and ``heddle-worker -A peers.heddle_app``, runs the
peers benchmark's throughput and round-trip workloads first (so the worker's
orchestrator has been idle for a while, as in the benchmark), then ``--chords``
100-wide chords one after the other while a plain nats-py subscription records
every event on ``heddle.events.>``. For each chord slower than ``--slow-ms``
it prints the longest silences between events, then the warnings of the
worker log.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nats

from heddle.events import describe
from heddle.graphs.canvas import chord, group
from heddle.testing import EmbeddedServers
from peers.drivers import HeddleDriver
from peers.workers import PeerWorker


class _NoMeter:
    def start(self) -> None:
        pass

    def stop(self) -> dict[str, float]:
        return {}


async def _trace(driver: HeddleDriver, nats_url: str, chords: int, slow_s: float) -> list[float]:
    nc = await nats.connect(nats_url)
    events: list[tuple[float, str, Any]] = []

    async def record(msg: Any) -> None:
        events.append((time.perf_counter(), msg.subject, describe(msg.subject, msg.data)))

    await nc.subscribe("heddle.events.>", cb=record)
    noop = driver.module.noop
    times = []
    try:
        for i in range(chords):
            events.clear()
            t0 = time.perf_counter()
            await chord(group(noop.si() for _ in range(100)), noop.si()).apply_async().aget(timeout=60)
            elapsed = time.perf_counter() - t0
            times.append(elapsed)
            await asyncio.sleep(0.05)  # the last events of this chord
            if elapsed < slow_s:
                continue
            print(f"chord {i}: {elapsed * 1e3:.0f} ms, {len(events)} events; longest silences:")
            gaps, last = [], t0
            for t, subject, what in events:
                gaps.append((t - last, t - t0, subject, what))
                last = t
            for gap, at, subject, what in sorted(gaps, key=lambda g: -g[0])[:3]:
                state = what.get("state") if isinstance(what, dict) else None
                print(f"  {gap * 1e3:6.0f} ms before the event at {at * 1e3:4.0f} ms: {subject} ({state})")
    finally:
        await nc.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chords", type=int, default=20)
    parser.add_argument("--n", type=int, default=20_000, help="tasks of the throughput run before the chords")
    parser.add_argument("--slow-ms", type=float, default=150.0)
    args = parser.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="heddle-peers-trace-"))
    with EmbeddedServers() as servers:
        driver = HeddleDriver(servers, 256)
        worker = PeerWorker(driver.name, driver.worker_command(), driver.worker_env(), log_dir)
        try:
            worker.wait_ready(driver.ping)
            driver.throughput(args.n, _NoMeter())
            driver.round_trips(500)
            times = driver.loop.run(_trace(driver, servers.nats_url, args.chords, args.slow_ms / 1e3))
        finally:
            worker.stop()
            driver.close()
    print("chords, ms:", " ".join(f"{t * 1e3:.0f}" for t in times))
    print("worker log warnings:")
    for line in worker.warnings():
        print(" ", line)


if __name__ == "__main__":
    main()
