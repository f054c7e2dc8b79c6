"""Where a sequential round trip goes, Heddle next to Celery: CPU and messages per call, py-spy samples.

Not a benchmark (pytest does not collect it); a script, run after installing
the ``peers`` extra and py-spy::

    .venv/bin/pip install py-spy
    .venv/bin/python benchmarks/peers/profile_round_trip.py [--n 2000] [--out benchmarks/results/profile-peers]

It starts embedded servers (nats-server with its monitoring port on) and, one
after the other, a Heddle worker (``heddle-worker -A peers.heddle_app``) and a
Celery worker (``celery -A peers.celery_app worker --pool solo``). For each it
runs ``n`` sequential ``noop.delay().get()`` calls, unsampled, and reports per
call:

* the CPU microseconds of the client (this process), the worker process tree,
  nats-server and valkey-server (``/proc/PID/stat``): a sequential round trip
  is a relay in which one process works while the others mostly wait, so CPU
  per call is most of a call's time;
* the messages into and out of nats-server (its ``/varz``);
* for Heddle, the p50 of each phase, from the ``started_at`` and
  ``finished_at`` the worker stores in every result record (read after each
  call, in a separate run of ``n`` calls).

Then it runs ``n`` Heddle calls again under ``py-spy record --nonblocking`` on
the client and on the worker (attaching needs ptrace rights) and prints the
functions with the largest share of samples; idle time is not sampled. With
``--strace`` it also runs ``n`` calls of each framework under ``strace -c -f``
(on the worker process tree and on the client) and prints the system calls
per call.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(BENCH))

from harness import percentile, server_pids  # noqa: E402
from profile_hot_path import Sampler, summarize  # noqa: E402

from heddle.testing import EmbeddedServers, free_port  # noqa: E402
from heddle.testing.servers import EmbeddedNats  # noqa: E402
from peers.drivers import CeleryDriver, Driver, HeddleDriver  # noqa: E402
from peers.workers import PeerWorker, TreeCpuMeter, descendants  # noqa: E402


class _MonitoredNats(EmbeddedNats):
    """The embedded nats-server with its HTTP monitoring port on (for ``/varz``)."""

    def __init__(self, host: str) -> None:
        super().__init__(host, None, None)
        self.monitor_port = free_port(host)

    def command(self) -> list[str]:
        return [*super().command(), "--http_port", str(self.monitor_port)]

    def varz(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://{self.host}:{self.monitor_port}/varz", timeout=5) as r:
            return dict(json.load(r))


def _sync_calls(driver: Driver, n: int, phases_too: bool = False) -> tuple[list[float], list[dict[str, float]]]:
    """``n`` sequential ``noop.delay().get()``; with ``phases_too`` (Heddle) also each call's phases."""
    noop = driver.module.noop  # type: ignore[attr-defined]
    samples, phases = [], []
    for _ in range(n):
        w0 = time.time()
        t0 = time.perf_counter()
        r = noop.delay()
        r.get(timeout=30)
        samples.append(time.perf_counter() - t0)
        w1 = time.time()
        if phases_too:
            rec = r.record  # one more Valkey read, outside the timed part
            phases.append(
                {
                    "submit to claimed": rec.started_at - w0,
                    "running": rec.finished_at - rec.started_at,
                    "finished to caller": w1 - rec.finished_at,
                }
            )
    return samples, phases


def _per_call(driver: Driver, worker: PeerWorker, servers: EmbeddedServers, nats: _MonitoredNats, n: int) -> str:
    meter = TreeCpuMeter(worker.pid, {"client": os.getpid(), **server_pids(servers)})
    v0 = nats.varz()
    meter.start()
    t0 = time.perf_counter()
    samples, _ = _sync_calls(driver, n)
    wall = time.perf_counter() - t0
    used = meter.stop()
    v1 = nats.varz()
    # The phases take one more Valkey read per call, so they come from a run of their own.
    phases = _sync_calls(driver, n, phases_too=True)[1] if isinstance(driver, HeddleDriver) else []
    cpu = ", ".join(f"{k} {v / n * 1e6:,.0f}" for k, v in used.items())
    lines = [
        f"{driver.name}: {n} x noop.delay().get(): p50 {percentile(samples, 50) * 1e3:.2f} ms, "
        f"p99 {percentile(samples, 99) * 1e3:.2f} ms, wall {wall / n * 1e6:,.0f} us per call",
        f"  CPU us per call: {cpu}; all {sum(used.values()) / n * 1e6:,.0f}",
        f"  nats-server messages per call: in {(v1['in_msgs'] - v0['in_msgs']) / n:.1f}, "
        f"out {(v1['out_msgs'] - v0['out_msgs']) / n:.1f}",
    ]
    if phases:
        split = ", ".join(f"{k} {percentile([p[k] for p in phases], 50) * 1e3:.2f}" for k in phases[0])
        lines.append(f"  phases, p50 ms: {split}")
    return "\n".join(lines)


def _strace_counts(path: Path) -> collections.Counter[str]:
    """Calls per syscall from an ``strace -c`` summary."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text().splitlines():
        parts = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            counts[parts[-1]] += int(parts[3])
    return counts


def _syscalls_per_call(driver: Driver, worker: PeerWorker, n: int, out: Path) -> str:
    """``n`` calls with ``strace -c -f`` attached to the worker tree and to this process."""
    strace = shutil.which("strace")
    if strace is None:
        return f"{driver.name}: strace not found"
    targets = [("worker", pid) for pid in descendants(worker.pid)] + [("client", os.getpid())]
    tracers = []
    for role, pid in targets:
        path = out / f"strace-{driver.name}-{role}-{pid}.txt"
        cmd = [strace, "-c", "-f", "-p", str(pid), "-o", str(path)]
        tracers.append((role, path, subprocess.Popen(cmd, stderr=subprocess.DEVNULL)))
    time.sleep(1.0)  # let strace attach
    _sync_calls(driver, n)
    per_role: dict[str, collections.Counter[str]] = {}
    for role, path, proc in tracers:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
        per_role.setdefault(role, collections.Counter()).update(_strace_counts(path))
    lines = [f"{driver.name}: system calls per call (strace -c, {n} calls)"]
    for role, counts in per_role.items():
        top = ", ".join(f"{name} {c / n:.1f}" for name, c in counts.most_common(8))
        lines.append(f"  {role}: all {sum(counts.values()) / n:.1f}; {top}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=BENCH / "results" / "profile-peers")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--strace", action="store_true", help="also count system calls per call")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="heddle-peers-profile-"))
    servers = EmbeddedServers()
    nats = servers.nats = _MonitoredNats(servers.nats.host)
    with servers:
        heddle = HeddleDriver(servers, 256)
        celery = CeleryDriver(servers, "solo", 1)
        try:
            for driver in (heddle, celery):
                worker = PeerWorker(driver.name, driver.worker_command(), driver.worker_env(), log_dir)
                try:
                    worker.wait_ready(driver.ping)
                    _sync_calls(driver, 200)  # warm-up
                    print(_per_call(driver, worker, servers, nats, args.n), flush=True)
                    if args.strace:
                        print(_syscalls_per_call(driver, worker, args.n, args.out), flush=True)
                    if driver is heddle:
                        client_s = Sampler(os.getpid(), args.out / "heddle-client-round-trip.txt")
                        worker_s = Sampler(worker.pid, args.out / "heddle-worker-round-trip.txt")
                        _sync_calls(driver, args.n)
                        client_s.stop()
                        worker_s.stop()
                finally:
                    worker.stop()
        finally:
            heddle.close()
            celery.close()
    print()
    print(summarize(args.out / "heddle-client-round-trip.txt", args.top))
    print()
    print(summarize(args.out / "heddle-worker-round-trip.txt", args.top))


if __name__ == "__main__":
    main()
