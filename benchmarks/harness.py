"""Helpers shared by the benchmarks: sizes, statistics, /proc readings, the worker process, the report.

The fixtures built on them live in ``conftest.py``; see its docstring for how to
run the suite and which environment variables size it.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from rich.console import Console
from rich.table import Table

from heddle.testing import EmbeddedServers, nats_server_binary, valkey_server_binary

T = TypeVar("T")

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_PATH = BENCH_DIR / "results" / "latest.json"
WORKER_MODULE = "bench_app"

# The goals of issue 16 for a worker with default flags on a 2-core machine; shown
# next to the measured figures and never asserted.
TARGETS = {
    "end_to_end_tasks_per_s": 6000.0,
    "end_to_end_ratio_to_raw": 0.35,
    "round_trip_p50_ms": 1.2,
    "round_trip_ratio_to_raw": 2.0,
}


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise pytest.UsageError(f"{name} must be an integer, got {raw!r}") from None
    if value < 1:
        raise pytest.UsageError(f"{name} must be >= 1, got {value}")
    return value


@dataclass(frozen=True)
class BenchConfig:
    """Benchmark sizes, read once from the environment (``HEDDLE_BENCH_*``)."""

    n: int
    latency_n: int
    memory_n: int
    rounds: int
    #: ``--concurrency`` of the tuned worker shown beside the default one.
    tuned_concurrency: int
    app_name: str

    @classmethod
    def from_env(cls) -> BenchConfig:
        return cls(
            n=_env_int("HEDDLE_BENCH_N", 20_000),
            latency_n=_env_int("HEDDLE_BENCH_LATENCY_N", 500),
            memory_n=_env_int("HEDDLE_BENCH_MEMORY_N", 100_000),
            rounds=_env_int("HEDDLE_BENCH_ROUNDS", 3),
            tuned_concurrency=_env_int("HEDDLE_BENCH_TUNED_CONCURRENCY", 256),
            app_name=os.environ.get("HEDDLE_BENCH_APP", "bench"),
        )


# -- small statistics and /proc helpers ---------------------------------------------


def median(values: list[float]) -> float:
    """Median of the rounds (the figure every table shows)."""
    return float(statistics.median(values))


def percentile(values: list[float], pct: float) -> float:
    """The ``pct`` percentile (0-100) of ``values``, linear interpolation."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * pct / 100.0
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def rss_kib(pid: int) -> int:
    """Resident set size of a process, from ``VmRSS`` in ``/proc/PID/status``."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used, from ``/proc/PID/stat``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")" that ends the command name, utime and stime are fields 12 and 13.
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class CpuMeter:
    """CPU seconds used by a set of processes between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        self._start = {name: cpu_s(pid) for name, pid in self.pids.items()}

    def stop(self) -> dict[str, float]:
        self.used = {name: cpu_s(pid) - self._start[name] for name, pid in self.pids.items()}
        return self.used


def run_async(main: Callable[[], Coroutine[Any, Any, T]], uvloop: bool = False) -> T:
    """Run a coroutine on a fresh event loop: plain asyncio, as a user's ``asyncio.run`` script does,
    or uvloop (the loop ``heddle worker`` uses) for the tuned client."""
    if not uvloop:
        with asyncio.Runner() as runner:
            return runner.run(main())
    import uvloop as uv

    with asyncio.Runner(loop_factory=uv.new_event_loop) as runner:
        return runner.run(main())


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Poll an async condition until it holds; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


# -- the machine -----------------------------------------------------------------------


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    from importlib.metadata import version

    cpu_model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
                break
    commit = _first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "mem_total_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nats_server": _first_line([nats_server_binary(), "--version"]),
        "valkey_server": _first_line([valkey_server_binary(), "--version"]).split(" sha=")[0],
        "nats_py": version("nats-py"),
        "valkey_py": version("valkey"),
        "msgspec": version("msgspec"),
        "uvloop": version("uvloop"),
        "heddle_commit": commit + ("+dirty-src" if dirty else ""),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


# -- the report --------------------------------------------------------------------------


class Report:
    """Figures of this run: printed as tables, written as JSON at the end of the session."""

    def __init__(self, config: BenchConfig, capture_on: bool) -> None:
        self.config = config
        self.capture_on = capture_on
        self.figures: dict[str, Any] = {}
        self.rendered: list[str] = []
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def add(self, section: str, figures: dict[str, Any]) -> None:
        self.figures[section] = figures

    def show(self, table: Table, note: str = "") -> None:
        """Print a table now (seen with ``-s``) and keep it for the terminal summary."""
        buf = io.StringIO()
        console = Console(file=buf, width=110, force_terminal=False, color_system=None)
        console.print(table)
        if note:
            console.print(note)
        text = buf.getvalue()
        self.rendered.append(text)
        sys.stdout.write("\n" + text)
        sys.stdout.flush()

    def progress(self, line: str) -> None:
        sys.stdout.write(f"  {line}\n")
        sys.stdout.flush()

    def write_json(self, machine: dict[str, Any]) -> Path:
        RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "started": self.started,
            "command": ".venv/bin/pytest benchmarks/ -s",
            "machine": machine,
            "config": asdict(self.config),
            "targets": TARGETS,
            **self.figures,
        }
        RESULTS_PATH.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        return RESULTS_PATH


class WorkerProcess:
    """A ``python -m heddle worker -A bench_app`` subprocess, stopped by PID.

    With ``concurrency`` None it runs with the CLI's default flags, as a user starts it.
    """

    def __init__(
        self,
        servers: EmbeddedServers,
        config: BenchConfig,
        log_dir: Path,
        concurrency: int | None = None,
        profile_to: Path | None = None,
    ) -> None:
        self.log_path = log_dir / f"worker-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        env = {
            **os.environ,
            "NATS_URL": servers.nats_url,
            "VALKEY_URL": servers.valkey_url,
            "HEDDLE_BENCH_APP": config.app_name,
            "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH", "")) if p),
        }
        # With ``profile_to``, the worker runs under cProfile, which writes its stats
        # there when the worker exits (``stop()`` lets it drain and return).
        runner = ["-m", "heddle"] if profile_to is None else [
            "-c",
            "import cProfile, runpy, sys; sys.argv[0] = 'heddle'; "
            f"cProfile.run('runpy.run_module(\"heddle\", run_name=\"__main__\")', {str(profile_to)!r})",
        ]
        self.command = [
            sys.executable,
            *runner,
            "worker",
            "-A",
            WORKER_MODULE,
            "--quiet",
            *(("--concurrency", str(concurrency)) if concurrency is not None else ()),
            "--loglevel",
            "INFO",
        ]
        self.proc = subprocess.Popen(self.command, env=env, cwd=BENCH_DIR, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"benchmark worker exited early:\n{self.output()}")
            if " consuming " in self.output():
                return
            time.sleep(0.05)
        raise RuntimeError(f"benchmark worker did not subscribe within {timeout_s}s:\n{self.output()}")

    def rss_kib(self) -> int:
        return rss_kib(self.pid)

    def pause(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        """SIGTERM (the worker drains), SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def server_pids(servers: EmbeddedServers) -> dict[str, int]:
    """PIDs of the embedded servers, for CPU accounting."""
    assert servers.nats.pid is not None and servers.valkey.pid is not None
    return {"nats-server": servers.nats.pid, "valkey-server": servers.valkey.pid}
