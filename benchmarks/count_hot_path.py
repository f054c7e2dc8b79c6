"""What one task costs, counted rather than timed: Python calls, Valkey commands, NATS messages.

Not a benchmark (pytest does not collect it); a script::

    .venv/bin/python benchmarks/count_hot_path.py [--n 5000] [--out benchmarks/results/counts]

Timings on a shared 2-core machine move by a third from one run to the next;
counts barely move. To compare two versions of Heddle, run this script from one
checkout against the other's code (``PYTHONPATH=/path/to/other/src``) and then
against this one's; the figures differ only where the hot path changed.

It starts embedded servers and one ``heddle worker -A bench_app`` under cProfile
(default flags), then, for each of two phases:

* ``batch``: N no-op tasks submitted, then every result awaited (as in
  ``test_throughput.py``, so tasks arrive in batches);
* ``sequential``: N/10 ``apply_async().aget()`` calls one after another (as in
  ``test_latency.py``, so each task travels alone).

it reports, per task: the worker's and the client's Python function calls
(cProfile's primitive calls, all of them, the event loop's included), the Valkey commands run (inside
Lua scripts too) and the microseconds Valkey spent on them (``INFO
commandstats``), and the NATS messages of each kind the servers carried (seen
by a ``>`` subscriber on a thread of its own in this process, which adds no
messages and no client calls).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import cProfile
import os
import pstats
import re
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH_DIR, BenchConfig, WorkerProcess, run_async

from heddle.testing import EmbeddedServers

# Ids and inboxes vary per message; the kinds of messages do not.
_KINDS = [
    (re.compile(r"^_INBOX\..*"), "_INBOX.* (publish acks, pull request statuses)"),
    (re.compile(r"^\$JS\.ACK\..*"), "$JS.ACK.* (acks)"),
    (re.compile(r"^heddle\.results\..*"), "heddle.results.* (result notices)"),
    (re.compile(r"^\$JS\.API\.CONSUMER\.MSG\.NEXT\..*"), "$JS.API.CONSUMER.MSG.NEXT.* (pull requests)"),
    (re.compile(r"^heddle\.tasks\..*"), "heddle.tasks.* (the task: publish, then delivery)"),
]


def _kind(subject: str) -> str:
    for pattern, kind in _KINDS:
        if pattern.match(subject):
            return kind
    return subject


class _Counter:
    """A ``>`` subscriber on a thread and event loop of its own, so the client's profile leaves it out."""

    def __init__(self, nats_url: str) -> None:
        self.seen: collections.Counter[str] = collections.Counter()
        self._url = nats_url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="counter", daemon=True)
        self._nc: Any = None

    def start(self) -> None:
        import nats

        self._thread.start()

        async def subscribe() -> None:
            self._nc = await nats.connect(self._url)

            async def count(msg: Any) -> None:
                self.seen[_kind(msg.subject)] += 1

            await self._nc.subscribe(">", cb=count)
            await self._nc.flush()

        asyncio.run_coroutine_threadsafe(subscribe(), self._loop).result(10)

    def stop(self) -> collections.Counter[str]:
        async def close() -> None:
            await self._nc.flush()
            # Notices, acks and events published just before the last result arrived.
            await asyncio.sleep(0.5)
            await self._nc.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        return self.seen


async def _phase(task: Any, n: int, sequential: bool) -> None:
    try:
        await task.app.connect()
        if sequential:
            for _ in range(n):
                await task.apply_async().aget(timeout=60)
        else:
            results = [task.apply_async() for _ in range(n)]
            for r in results:
                await r.aget(timeout=120)
    finally:
        await task.app.aclose()


def _valkey_stats(valkey_url: str, reset: bool = False) -> dict[str, Any]:
    import valkey

    client = valkey.Valkey.from_url(valkey_url)
    try:
        if reset:
            client.config_resetstat()
            return {}
        stats: dict[str, Any] = client.info("commandstats")
        return stats
    finally:
        client.close()


def _python_calls(path: Path) -> int:
    return sum(v[1] for v in pstats.Stats(str(path)).stats.values())  # type: ignore[attr-defined]


def run_phase(cfg: BenchConfig, out: Path, n: int, sequential: bool) -> dict[str, Any]:
    """One worker under cProfile, one phase; counts per task."""
    import bench_app

    name = "sequential" if sequential else "batch"
    prof = out / f"worker-{name}.pstats"
    with EmbeddedServers() as servers:
        bench_app.app.configure(nats_url=servers.nats_url, valkey_url=servers.valkey_url)
        # The worker's start-up and shutdown calls are counted too; warm-up tasks
        # are not run, so that both versions compared count the same fixed cost.
        idle = WorkerProcess(servers, cfg, out, profile_to=out / "worker-idle.pstats")
        idle.stop()
        worker = WorkerProcess(servers, cfg, out, profile_to=prof)
        try:
            _valkey_stats(servers.valkey_url, reset=True)
            counter = _Counter(servers.nats_url)
            counter.start()
            client = cProfile.Profile()
            client.enable()
            run_async(lambda: _phase(bench_app.noop, n, sequential))
            client.disable()
            seen = counter.stop()
            commands = _valkey_stats(servers.valkey_url)
        finally:
            worker.stop()
            bench_app.app.close()
    calls = _python_calls(prof) - _python_calls(out / "worker-idle.pstats")
    return {
        "phase": name,
        "tasks": n,
        "python_calls": calls / n,
        "client_python_calls": sum(v[1] for v in pstats.Stats(client).stats.values()) / n,  # type: ignore[attr-defined]
        "valkey_commands": sum(v["calls"] for v in commands.values()) / n,
        "valkey_us": sum(v["usec"] for v in commands.values()) / n,
        "valkey_by_command": {k.removeprefix("cmdstat_"): v["calls"] / n for k, v in commands.items()},
        "nats_messages": sum(seen.values()) / n,
        "nats_by_kind": {k: v / n for k, v in seen.most_common()},
    }


def report(counts: dict[str, Any]) -> str:
    """The counts of one phase as text."""
    lines = [
        f"{counts['phase']} ({counts['tasks']:,} tasks), per task:",
        f"  worker Python calls  {counts['python_calls']:8.1f}",
        f"  client Python calls  {counts['client_python_calls']:8.1f}",
        f"  Valkey commands      {counts['valkey_commands']:8.2f}   ({counts['valkey_us']:.1f} us in Valkey)",
    ]
    lines += [f"      {v:6.2f}  {k}" for k, v in sorted(counts["valkey_by_command"].items(), key=lambda kv: -kv[1])]
    lines.append(f"  NATS messages        {counts['nats_messages']:8.2f}")
    lines += [f"      {v:6.2f}  {k}" for k, v in counts["nats_by_kind"].items() if v >= 0.005]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5_000, help="tasks in the batch phase (a tenth of it sequential)")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "counts")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig.from_env()
    os.environ["HEDDLE_BENCH_APP"] = cfg.app_name
    import heddle

    print(f"heddle from {Path(heddle.__file__).parent}")
    for sequential in (False, True):
        n = max(1, args.n // 10) if sequential else args.n
        print(report(run_phase(cfg, args.out, n, sequential)))
        print()


if __name__ == "__main__":
    main()
