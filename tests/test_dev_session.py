"""`heddle dev` across shells: stable ports, the session file other shells find, and --reload.

Every `heddle dev` here runs with a tmp_path as its directory, so its session
file (.heddle/dev.json) never lands where other tests run; the in-process tests
chdir to a tmp_path too.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import heddle
from heddle.devsession import DevSession
from heddle.settings import DEFAULT_NATS_URL, DEFAULT_VALKEY_URL, Settings
from heddle.testing import free_port
from tests.conftest import wait_for

DEVMOD = """\
import heddle

app = heddle.Heddle("devsession")


@app.task
def version() -> str:
    return "v1"
"""


def shell_env() -> dict[str, str]:
    """The environment of a fresh shell: no NATS_URL or VALKEY_URL exported."""
    env = {k: v for k, v in os.environ.items() if k not in ("NATS_URL", "VALKEY_URL")}
    return {**env, "COLUMNS": "200", "PYTHONPATH": os.pathsep.join(filter(None, [".", env.get("PYTHONPATH")]))}


class Dev:
    """A `heddle dev` subprocess we started, in ``cwd``; stopped by its PID with Ctrl-C (SIGINT)."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.cwd = cwd
        self.log = cwd / f"dev-{free_port()}.log"
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "heddle", "dev", "--quiet", "--no-workshop", *args],
                cwd=cwd, env=shell_env(), stdout=f, stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_consuming(self, times: int = 1) -> None:
        def consuming() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"heddle dev exited early:\n{self.output()}")
            return len(re.findall(r"worker \S+:\d+ consuming", self.output())) >= times

        wait_for(consuming, 60, "heddle dev's worker to consume")

    def url(self, var: str) -> str:
        return next(line.split("=", 1)[1].strip() for line in self.output().splitlines()
                    if line.strip().startswith(f"{var}="))

    def worker_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"worker \S+:(\d+) consuming", self.output())]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


@pytest.fixture
def devs() -> Iterator[list[Dev]]:
    started: list[Dev] = []
    yield started
    for dev in started:
        dev.stop()


def two_free_ports() -> tuple[int, int]:
    nats_port = free_port()
    valkey_port = free_port()
    while valkey_port == nats_port:
        valkey_port = free_port()
    return nats_port, valkey_port


def session_in(directory: Path) -> dict[str, object]:
    return json.loads((directory / ".heddle" / "dev.json").read_text())


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def test_heddle_dev_starts_on_the_same_ports_each_run_and_says_which_was_taken_when_it_falls_back(tmp_path, devs):
    nats_port, valkey_port = two_free_ports()
    ports = ("--nats-port", str(nats_port), "--valkey-port", str(valkey_port))
    (tmp_path / "devmod.py").write_text(DEVMOD)
    for _ in range(2):  # a restart comes back on the same URLs: other shells need not change theirs
        dev = Dev(tmp_path, "-A", "devmod", *ports)
        devs.append(dev)
        dev.wait_consuming()
        assert dev.url("NATS_URL") == f"nats://127.0.0.1:{nats_port}"
        assert dev.url("VALKEY_URL") == f"valkey://127.0.0.1:{valkey_port}/0"
        assert dev.stop() == 0, dev.output()
        assert not (tmp_path / ".heddle" / "dev.json").exists(), "the session file outlived heddle dev"

    with socket.socket() as holder:  # someone else's server on the nats port
        holder.bind(("127.0.0.1", nats_port))
        holder.listen()
        dev = Dev(tmp_path, "-A", "devmod", *ports)
        devs.append(dev)
        dev.wait_consuming()
        text = " ".join(dev.output().split())
        assert f"port {nats_port} (nats-server) is taken, so both servers run on free ports" in text
        nats_url, valkey_url = dev.url("NATS_URL"), dev.url("VALKEY_URL")
        # Both move, so that no client pairs this nats-server with a stranger's valkey-server.
        assert f":{nats_port}" not in nats_url and f":{valkey_port}/" not in valkey_url
        assert session_in(tmp_path) == {"nats_url": nats_url, "valkey_url": valkey_url, "pid": dev.proc.pid}
        assert dev.stop() == 0, dev.output()


def test_heddle_dev_prefers_the_ports_clients_try_by_default(tmp_path, devs):
    (tmp_path / "devmod.py").write_text(DEVMOD)
    dev = Dev(tmp_path, "-A", "devmod")
    devs.append(dev)
    dev.wait_consuming()
    text = " ".join(dev.output().split())
    if "is taken" in text or "are taken" in text:  # another heddle dev (or a system server) has them
        assert "4222 (nats-server)" in text or "6379 (valkey-server)" in text
    else:
        assert (dev.url("NATS_URL"), dev.url("VALKEY_URL")) == (DEFAULT_NATS_URL, DEFAULT_VALKEY_URL)
        assert "they are the default URLs too" in text
    assert dev.stop() == 0, dev.output()


def test_a_client_and_a_heddle_command_in_another_shell_find_a_running_heddle_dev(tmp_path, devs):
    (tmp_path / "devmod.py").write_text(DEVMOD)
    nats_port, valkey_port = two_free_ports()  # not the default ports: only the session file leads there
    dev = Dev(tmp_path, "-A", "devmod", "--nats-port", str(nats_port), "--valkey-port", str(valkey_port))
    devs.append(dev)
    dev.wait_consuming()
    text = " ".join(dev.output().split())
    assert f"wrote {tmp_path / '.heddle' / 'dev.json'}" in text
    assert f"started in {tmp_path} pick these URLs up when NATS_URL and VALKEY_URL are unset" in text

    client = (
        "import devmod\n"
        "print(devmod.app.settings.nats_url, devmod.app.settings.valkey_url)\n"
        "print(devmod.version.delay().get(timeout=20))\n"
        "devmod.app.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", client], cwd=tmp_path, env=shell_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [dev.url("NATS_URL"), dev.url("VALKEY_URL"), "v1"]

    out = subprocess.run([sys.executable, "-m", "heddle", "preflight"], cwd=tmp_path, env=shell_env(),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"answers at nats://127.0.0.1:{nats_port}" in out.stdout

    assert dev.stop() == 0, dev.output()
    assert not (tmp_path / ".heddle" / "dev.json").exists()


def test_settings_take_a_running_sessions_urls_only_when_neither_url_is_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.delenv("VALKEY_URL", raising=False)
    assert Settings.load().nats_url == DEFAULT_NATS_URL, "no session file here: the defaults"

    nats_url, valkey_url = "nats://127.0.0.1:14222", "valkey://127.0.0.1:16379/0"
    DevSession(nats_url, valkey_url, os.getpid(), DevSession.path_in()).write()
    assert (Settings.load().nats_url, Settings.load().valkey_url) == (nats_url, valkey_url)
    assert heddle.Heddle("devsession").settings.nats_url == nats_url
    # Explicit arguments, then the environment, beat the session; one URL given keeps both off it.
    assert Settings.load(nats_url="nats://elsewhere:4222").valkey_url == DEFAULT_VALKEY_URL
    monkeypatch.setenv("VALKEY_URL", "valkey://elsewhere:6379/0")
    assert Settings.load().nats_url == DEFAULT_NATS_URL
    monkeypatch.delenv("VALKEY_URL")

    # Another directory knows nothing of it: only the current one is read.
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert Settings.load().nats_url == DEFAULT_NATS_URL
    monkeypatch.chdir(tmp_path)

    # A file left by a heddle dev that has exited is ignored.
    DevSession(nats_url, valkey_url, dead_pid(), DevSession.path_in()).write()
    assert Settings.load().nats_url == DEFAULT_NATS_URL


async def test_an_unreachable_server_error_says_what_the_dev_session_file_had_to_do_with_it(tmp_path, monkeypatch):
    from heddle.broker import Broker
    from heddle.store import ResultBackend

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NATS_URL", raising=False)
    monkeypatch.delenv("VALKEY_URL", raising=False)
    path = DevSession.path_in()
    refused_nats, refused_valkey = f"nats://127.0.0.1:{free_port()}", f"valkey://127.0.0.1:{free_port()}/0"

    # The URLs came from a session whose heddle dev runs, but its servers do not answer.
    DevSession(refused_nats, refused_valkey, os.getpid(), path).write()
    settings = Settings.load(connect_timeout_s=0.5)
    with pytest.raises(heddle.BrokerUnavailable) as nats_error:
        await Broker(settings).connect()
    said = " ".join(str(nats_error.value).split())
    assert f"cannot reach nats-server at {refused_nats}" in said
    assert f"This URL comes from the heddle dev session in {path} (pid {os.getpid()})" in said
    backend = ResultBackend(settings)
    with pytest.raises(heddle.BackendUnavailable) as valkey_error:
        await backend.connect()
    assert f"This URL comes from the heddle dev session in {path}" in str(valkey_error.value)

    # A running session passed over for another URL: say how to use it.
    monkeypatch.setenv("NATS_URL", f"nats://127.0.0.1:{free_port()}")
    with pytest.raises(heddle.BrokerUnavailable) as nats_error:
        await Broker(Settings.load(connect_timeout_s=0.5)).connect()
    said = " ".join(str(nats_error.value).split())
    assert f"A heddle dev session (pid {os.getpid()}) serves this directory at {refused_nats}" in said
    assert "unset NATS_URL and VALKEY_URL to use it" in said

    # A file left by a heddle dev that has exited: not used, and said so.
    pid = dead_pid()
    DevSession(refused_nats, refused_valkey, pid, path).write()
    with pytest.raises(heddle.BrokerUnavailable) as nats_error:
        await Broker(Settings.load(connect_timeout_s=0.5)).connect()
    assert f"{path} is left from a heddle dev that has exited (pid {pid}), so it was not used" in " ".join(
        str(nats_error.value).split())

    # No file at all, and the default URL.
    os.remove(path)
    from heddle.settings import dev_session_note

    assert dev_session_note(DEFAULT_NATS_URL, "NATS_URL") == (
        f"No heddle dev session was found here ({path}), so the default URL was used.")
    assert dev_session_note("nats://nats.prod:4222", "NATS_URL") == "", "a URL set on purpose needs no dev note"


def test_heddle_dev_reload_restarts_the_worker_on_a_change_and_keeps_the_servers(tmp_path, devs):
    (tmp_path / "devmod.py").write_text(DEVMOD)
    nats_port, valkey_port = two_free_ports()
    dev = Dev(tmp_path, "-A", "devmod", "--reload", "--grace", "2",
              "--nats-port", str(nats_port), "--valkey-port", str(valkey_port))
    devs.append(dev)
    dev.wait_consuming()
    session = session_in(tmp_path)
    assert session["pid"] == dev.proc.pid
    first_worker = dev.worker_pids()[0]
    assert first_worker != dev.proc.pid, "the worker runs in a child, so the servers outlive it"

    app = heddle.Heddle("devsession", nats_url=str(session["nats_url"]), valkey_url=str(session["valkey_url"]))
    try:
        assert app.send_task("devmod.version").get(timeout=20) == "v1"
        (tmp_path / "devmod.py").write_text(DEVMOD.replace('"v1"', '"v2"'))
        # The same connection, to the same servers, sees the new code once the worker restarts.
        wait_for(lambda: app.send_task("devmod.version").get(timeout=20) == "v2", 60, "the reloaded worker")
    finally:
        app.close()
    assert session_in(tmp_path) == session, "a reload must not move the servers"
    assert dev.worker_pids()[-1] != first_worker
    wait_for(lambda: not pid_alive(first_worker), 30, "the old worker to exit")

    assert dev.stop() == 0, dev.output()
    assert "heddle dev: stopped" in dev.output()
    assert not (tmp_path / ".heddle" / "dev.json").exists()
    wait_for(lambda: not pid_alive(dev.worker_pids()[-1]), 30, "the worker to exit with heddle dev")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
