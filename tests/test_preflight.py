"""Pre-flight checks: ``heddle preflight`` and the checks every actor command runs first."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from heddle.testing import EmbeddedNats, free_port
from tests.conftest import ROOT

RUNBOOK = "docs/runbooks/verify-nats-connectivity.md"


def heddle(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heddle", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


class NatsWithoutJetStream(EmbeddedNats):
    """A real nats-server started without ``--jetstream``."""

    def command(self) -> list[str]:
        return [a for a in super().command() if a != "--jetstream"]

    def _probe(self) -> bool:
        with socket.create_connection((self.host, self.port), timeout=0.5) as s:
            return s.recv(4096).startswith(b"INFO")


@pytest.fixture
def nats_without_jetstream() -> Iterator[NatsWithoutJetStream]:
    with NatsWithoutJetStream("127.0.0.1", None, None) as server:
        yield server  # type: ignore[misc]


def refused_url(scheme: str = "nats", userinfo: str = "") -> str:
    return f"{scheme}://{userinfo}127.0.0.1:{free_port()}"


def test_preflight_passes_against_real_servers_and_says_what_it_found(heddle_servers):
    out = heddle("preflight", env={"NATS_URL": heddle_servers.nats_url, "VALKEY_URL": heddle_servers.valkey_url})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pre-flight checks passed" in out.stdout
    lines = out.stdout.splitlines()
    assert any(line.split()[:2] == ["ok", "NATS"] and heddle_servers.nats_url in line for line in lines)
    assert any(line.split()[:2] == ["ok", "JetStream"] and "enabled" in line for line in lines)
    assert any(line.split()[:2] == ["ok", "Valkey"] and heddle_servers.valkey_url in line for line in lines)


def test_an_unreachable_nats_server_fails_preflight_with_the_url_the_cause_and_the_fix(heddle_servers):
    url = refused_url()
    out = heddle("preflight", env={"NATS_URL": url, "VALKEY_URL": heddle_servers.valkey_url})
    assert out.returncode == 1
    assert f"cannot reach nats-server at {url}: connection refused" in out.stdout
    assert "fix: start nats-server there, or set NATS_URL to where it runs" in out.stdout
    assert RUNBOOK in out.stdout
    assert "JetStream" not in out.stdout, "JetStream cannot be checked without a connection"


def test_a_nats_server_without_jetstream_fails_preflight_and_says_how_to_enable_it(
    heddle_servers, nats_without_jetstream
):
    out = heddle("preflight", env={"NATS_URL": nats_without_jetstream.url, "VALKEY_URL": heddle_servers.valkey_url})
    assert out.returncode == 1
    assert "ok   NATS" in out.stdout
    assert "FAIL JetStream" in out.stdout and "JetStream is not enabled on nats-server" in out.stdout
    assert "-js (--jetstream)" in out.stdout


def test_a_port_that_is_not_nats_fails_preflight_as_not_a_nats_server(heddle_servers):
    # Valkey's port accepts the connection but never sends NATS's INFO greeting.
    url = heddle_servers.valkey_url.replace("valkey://", "nats://").rsplit("/", 1)[0]
    out = heddle("preflight", "--timeout", "0.5", "--no-valkey", env={"NATS_URL": url})
    assert out.returncode == 1
    assert "sent no NATS greeting" in out.stdout and "client port" in out.stdout


def test_an_unreachable_valkey_fails_preflight(heddle_servers):
    url = refused_url("valkey") + "/0"
    out = heddle("preflight", env={"NATS_URL": heddle_servers.nats_url, "VALKEY_URL": url})
    assert out.returncode == 1
    assert "ok   JetStream" in out.stdout
    assert "FAIL Valkey" in out.stdout and f"cannot reach valkey-server at {url}: connection refused" in out.stdout
    assert "set VALKEY_URL" in out.stdout


def test_a_malformed_url_is_a_clear_preflight_failure(heddle_servers):
    out = heddle("preflight", env={"NATS_URL": "http//nats:4222", "VALKEY_URL": heddle_servers.valkey_url})
    assert out.returncode == 1
    assert "NATS_URL=http//nats:4222 is not a valid URL" in out.stdout and "nats://host:4222" in out.stdout


def test_passwords_in_urls_never_reach_the_output(heddle_servers):
    url = refused_url(userinfo="heddle:s3cret-pw@")
    out = heddle("preflight", env={"NATS_URL": url, "VALKEY_URL": heddle_servers.valkey_url})
    assert out.returncode == 1
    assert "s3cret-pw" not in out.stdout + out.stderr
    assert "heddle:***@127.0.0.1" in out.stdout


def test_an_actor_command_refuses_to_start_when_preflight_fails_unless_skipped(tmp_path):
    (tmp_path / "mod.py").write_text("import heddle\napp = heddle.Heddle('m', connect_timeout_s=0.5)\n")
    env = {"NATS_URL": refused_url(), "VALKEY_URL": refused_url("valkey")}
    out = heddle("worker", "-A", "mod", "--quiet", env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert "pre-flight checks failed" in out.stderr
    assert "FAIL NATS" in out.stderr and "FAIL Valkey" in out.stderr and "--skip-preflight" in out.stderr

    # Skipped: the worker goes straight to connecting, and fails there in its own words.
    out = heddle("worker", "-A", "mod", "--quiet", "--skip-preflight", env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert "pre-flight" not in out.stderr
    assert f"cannot reach nats-server at {env['NATS_URL']} while connecting" in out.stderr


def test_the_router_runs_the_same_preflight_checks():
    out = heddle("router", env={"NATS_URL": refused_url(), "VALKEY_URL": refused_url("valkey")})
    assert out.returncode == 2
    assert "pre-flight checks failed" in out.stderr and "FAIL NATS" in out.stderr
