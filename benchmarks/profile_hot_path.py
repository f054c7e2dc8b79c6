"""Where the time goes: sample the client and the worker with py-spy during a throughput run.

Not a benchmark (pytest does not collect it); a script::

    .venv/bin/pip install py-spy
    .venv/bin/python benchmarks/profile_hot_path.py [--n 20000] [--out benchmarks/results/profile]

It starts embedded servers and one ``heddle worker -A bench_app`` process, then
samples with ``py-spy record --nonblocking`` (attaching to a PID needs ptrace
rights: root, or ``kernel.yama.ptrace_scope=0``):

* ``e2e``: client (this process) and worker while N tasks are submitted and
  awaited, as in ``test_throughput.py``;
* ``drain``: the worker alone while it drains N queued tasks.

For each it writes py-spy's raw (collapsed-stack) output, which
``flamegraph.pl`` or speedscope.app render, and prints the functions with the
largest inclusive share of samples. Idle time (waiting in epoll) is not sampled.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import BENCH_DIR, BenchConfig, WorkerProcess, run_async

from heddle import names
from heddle.testing import EmbeddedServers

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::\d+)?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("site-packages/", "src/", "python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def summarize(folded: Path, top: int = 40, only: str | None = None) -> str:
    """Inclusive and self shares of the functions in a py-spy raw file."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if only and only not in stack:
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    if not total:
        return f"{folded.name}: no samples"
    lines = [f"{folded.name}: {total} samples", "  inclusive:"]
    lines += [f"    {100 * v / total:5.1f}%  {k}" for k, v in inclusive.most_common(top)]
    lines.append("  self:")
    lines += [f"    {100 * v / total:5.1f}%  {k}" for k, v in own.most_common(top // 2)]
    return "\n".join(lines)


class Sampler:
    """A ``py-spy record`` attached to one PID until ``stop()``."""

    def __init__(self, pid: int, out: Path, rate: int = 1000) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(pyspy, os.X_OK):
            raise SystemExit("py-spy not found; install it with `.venv/bin/pip install py-spy`")
        self.out = out
        self.proc = subprocess.Popen(
            [
                pyspy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # let py-spy attach before the measured phase starts

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        if not self.out.exists():
            raise SystemExit(f"py-spy wrote nothing: {err.decode(errors='replace')}")


async def _e2e(task: Any, n: int) -> float:
    try:
        await task.app.connect()
        t0 = time.perf_counter()
        results = [task.apply_async() for _ in range(n)]
        for r in results:
            await r.aget(timeout=120)
        return n / (time.perf_counter() - t0)
    finally:
        await task.app.aclose()


async def _queue(task: Any, n: int) -> list[Any]:
    try:
        results = [task.apply_async() for _ in range(n)]
        for r in results:
            await r.sent()
        return results
    finally:
        await task.app.aclose()


async def _wait_drained(nats_url: str, worker_type: str) -> None:
    import nats

    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    consumers = [names.ROUTER_CONSUMER, names.consumer_name(worker_type)]
    try:
        while True:
            for durable in consumers:  # the worker process hosts the router too
                info = await js.consumer_info(names.TASKS_STREAM, durable)
                if info.num_pending or info.num_ack_pending:
                    break
            else:
                return
            await asyncio.sleep(0.01)
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "profile")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cfg = BenchConfig.from_env()
    os.environ["HEDDLE_BENCH_APP"] = cfg.app_name

    with EmbeddedServers() as servers:
        worker = WorkerProcess(servers, cfg, args.out)
        try:
            import bench_app

            bench_app.app.configure(nats_url=servers.nats_url, valkey_url=servers.valkey_url)
            run_async(lambda: _e2e(bench_app.noop, 2_000))  # warm up

            client_s = Sampler(os.getpid(), args.out / "client-e2e.txt")
            worker_s = Sampler(worker.pid, args.out / "worker-e2e.txt")
            rate = run_async(lambda: _e2e(bench_app.noop, args.n))
            client_s.stop()
            worker_s.stop()
            print(f"e2e: {rate:,.0f} tasks/s while sampled\n")

            worker.pause()
            run_async(lambda: _queue(bench_app.noop, args.n))
            worker_s = Sampler(worker.pid, args.out / "worker-drain.txt")
            t0 = time.perf_counter()
            worker.resume()
            run_async(lambda: _wait_drained(servers.nats_url, cfg.app_name))
            drain = args.n / (time.perf_counter() - t0)
            worker_s.stop()
            print(f"drain: {drain:,.0f} tasks/s while sampled\n")
        finally:
            worker.stop()
            bench_app.app.close()

    print(summarize(args.out / "client-e2e.txt", args.top))
    print()
    print(summarize(args.out / "worker-e2e.txt", args.top))
    print()
    print(summarize(args.out / "worker-drain.txt", args.top))


if __name__ == "__main__":
    main()
