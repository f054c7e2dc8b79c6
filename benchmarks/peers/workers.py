"""A peer's worker as a real subprocess, started through the peer's own CLI and stopped by PID.

Celery's and Dramatiq's CLIs start a supervisor and fork the worker process
from it, so the worker is started in a session of its own: its CPU is read over
the whole process tree, and if SIGTERM does not end it within the grace period
the process group (whose id is the PID we started) is killed, never anything
found by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from harness import cpu_s

BIN_DIR = Path(sys.executable).parent
PEERS_DIR = Path(__file__).resolve().parent
BENCH_DIR = PEERS_DIR.parent


def script(name: str) -> str:
    """The console script ``name`` installed next to this interpreter (``.venv/bin/NAME``)."""
    path = BIN_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found; install the extra: pip install -e '.[dev,peers]'")
    return str(path)


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it, from ``/proc/PID/task/TID/children``."""
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
            except FileNotFoundError:
                continue
    return found


class TreeCpuMeter:
    """CPU seconds used by a process tree (and some single processes) between ``start()`` and ``stop()``.

    The tree is listed at ``start()``: the peers' worker processes are all forked
    before the worker answers its first task, and none is forked per task.
    """

    def __init__(self, tree_root: int, others: dict[str, int]) -> None:
        self.tree_root = tree_root
        self.others = others
        self._tree: list[int] = []
        self._start: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def _read(self) -> dict[str, float]:
        tree = 0.0
        for pid in self._tree:
            try:
                tree += cpu_s(pid)
            except (FileNotFoundError, ProcessLookupError):
                continue
        return {"worker": tree, **{name: cpu_s(pid) for name, pid in self.others.items()}}

    def start(self) -> None:
        self._tree = descendants(self.tree_root)
        self._start = self._read()

    def stop(self) -> dict[str, float]:
        end = self._read()
        self.used = {name: end[name] - self._start[name] for name in end}
        return self.used


class PeerWorker:
    """One worker subprocess: ``command`` with ``env``, its output in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.command = command
        self.ready_s = 0.0
        self._stopped = False
        self.log_path = log_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        full_env = {
            **os.environ,
            **env,
            "PYTHONPATH": os.pathsep.join(p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH", "")) if p),
        }
        self.proc = subprocess.Popen(
            command,
            env=full_env,
            cwd=BENCH_DIR,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, tail: int = 40) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])

    def warnings(self) -> list[str]:
        """The worker's log lines at WARNING level or above (every CLI here logs the level name)."""
        lines = self.log_path.read_text(errors="replace").splitlines()
        return [line for line in lines if any(level in line for level in ("WARNING", "ERROR", "CRITICAL"))]

    def wait_ready(self, ping: Callable[[float], bool], timeout_s: float = 60.0) -> None:
        """Call ``ping(budget_s)`` (one round trip through the worker) until it succeeds.

        Sets ``ready_s``: seconds from this call to the first answered ping.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} worker exited early ({self.command}):\n{self.output()}")
            if ping(min(5.0, max(1.0, deadline - time.monotonic()))):
                self.ready_s = time.monotonic() - t0
                return
        raise RuntimeError(f"{self.name} worker did not answer within {timeout_s}s:\n{self.output()}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM (every peer's warm shutdown); SIGKILL to its process group if it does not exit."""
        if self._stopped:
            return
        self._stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        # The group id is the PID we started (start_new_session): only our own worker tree.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()
