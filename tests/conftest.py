"""Shared fixtures: real servers (from heddle's pytest plugin) and worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from heddle.testing import EmbeddedServers

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], object], timeout_s: float = 20.0, what: str = "condition") -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def fresh_servers() -> Iterator[EmbeddedServers]:
    """Servers of this test's own, for tests that stop, kill or freeze them."""
    with EmbeddedServers() as servers:
        yield servers


class ActorProcess:
    """A ``python -m heddle ...`` actor subprocess we started and stop by PID."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, ready_marker: str, what: str) -> None:
        self.log_path = log_path
        self.ready_marker = ready_marker
        self.what = what
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "heddle", *args], env=env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.what} exited early:\n{self.output()}")
            return self.ready_marker in self.output()

        wait_for(ready, timeout_s, f"the {self.what} to bind its consumer")

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def wait(self, timeout_s: float = 60.0) -> int:
        return self.proc.wait(timeout_s)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        self._log.close()


class WorkerProcess(ActorProcess):
    """A ``heddle worker -A MODULE`` subprocess."""

    def __init__(self, module: str, env: dict[str, str], log_dir: Path, *extra: str) -> None:
        log_path = log_dir / f"worker-{uuid.uuid4().hex[:6]}.log"
        super().__init__(["worker", "-A", module, "--quiet", *extra], env, log_path, " consuming ", "worker")


class OrchestratorProcess(ActorProcess):
    """A ``heddle orchestrator -A tests.apps.graphs`` subprocess."""

    def __init__(self, env: dict[str, str], log_path: Path, *extra: str) -> None:
        args = ["orchestrator", "-A", "tests.apps.graphs", "--skip-preflight", *extra]
        super().__init__(args, env, log_path, "taking goals from", "orchestrator")


@pytest.fixture
def spawn_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start worker processes for ``tests.apps.*`` modules; all are killed after the test."""
    started: list[WorkerProcess] = []

    def spawn(module: str, env: dict[str, str], *extra: str, ready: bool = True) -> WorkerProcess:
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
        w = WorkerProcess(module, full_env, tmp_path, *extra)
        started.append(w)
        if ready:
            w.wait_ready()
        return w

    yield spawn
    for w in started:
        w.stop()


@pytest.fixture
def spawn_orchestrator(tmp_path: Path) -> Iterator[Callable[..., OrchestratorProcess]]:
    """Start ``heddle orchestrator`` processes for ``tests.apps.graphs``; all are killed after the test."""
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


@pytest.fixture
def test_env(tmp_path: Path) -> Callable[..., dict[str, str]]:
    """Environment for a worker process of ``tests.apps.crashy`` with a unique app name."""

    def make(servers: EmbeddedServers, **extra: str) -> dict[str, str]:
        return {
            "NATS_URL": servers.nats_url,
            "VALKEY_URL": servers.valkey_url,
            "HEDDLE_TEST_APP": f"p{uuid.uuid4().hex[:10]}",
            "HEDDLE_TEST_LOG": str(tmp_path / "executions.log"),
            **extra,
        }

    return make


def executions(env: dict[str, str]) -> list[tuple[int, str, str]]:
    """Lines (pid, kind, value) recorded by tasks in ``tests.apps.crashy``."""
    path = Path(env["HEDDLE_TEST_LOG"])
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        pid, kind, value = line.split(" ", 2)
        out.append((int(pid), kind, value))
    return out


async def dead_letters(nats_url: str) -> list[tuple[dict[str, str], bytes]]:
    """Every message in the dead-letter stream, oldest first: (headers, payload)."""
    import nats
    import nats.js.errors

    from heddle import names

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        info = await js.stream_info(names.DLQ_STREAM)
        out: list[tuple[dict[str, str], bytes]] = []
        if not info.state.messages:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                m = await js.get_msg(names.DLQ_STREAM, seq)
            except nats.js.errors.NotFoundError:
                continue
            out.append((dict(m.headers or {}), m.data or b""))
        return out
    finally:
        await nc.close()


async def publish_raw(nats_url: str, subject: str, payload: bytes, headers: dict[str, str]) -> None:
    """Publish bytes straight to JetStream, bypassing Heddle's client."""
    import nats

    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(subject, payload, headers=headers)
    finally:
        await nc.close()
