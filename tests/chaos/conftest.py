"""Fixtures of the fault-injection suite: orchestrator processes we can SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_for


class OrchestratorProcess:
    """A ``heddle orchestrator -A tests.apps.graphs`` subprocess we started and stop by PID."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "heddle", "orchestrator", "-A", "tests.apps.graphs", "--skip-preflight", *extra],
            env=env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"orchestrator exited early:\n{self.output()}")
            return "taking goals from" in self.output()

        wait_for(ready, timeout_s, "the orchestrator to bind its consumer")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


@pytest.fixture
def spawn_orchestrator(tmp_path: Path) -> Iterator[Callable[..., OrchestratorProcess]]:
    """Start orchestrator processes; all are killed after the test."""
    started: list[OrchestratorProcess] = []

    def spawn(env: dict[str, str], *extra: str) -> OrchestratorProcess:
        o = OrchestratorProcess(
            {**os.environ, **env, "PYTHONPATH": str(ROOT)}, tmp_path / f"orch-{len(started)}.log", *extra
        )
        started.append(o)
        o.wait_ready()
        return o

    yield spawn
    for o in started:
        o.stop()
