"""The command line: heddle-worker / heddle worker / heddle dev."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_for


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "heddle", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_missing_module_is_a_clear_error(tmp_path):
    out = run_cli("worker", "-A", "no_such_module_xyz", cwd=tmp_path)
    assert out.returncode == 2
    assert "cannot import 'no_such_module_xyz'" in out.stderr
    assert "PYTHONPATH" in out.stderr


def test_a_module_without_an_app_is_a_clear_error(tmp_path):
    (tmp_path / "plain.py").write_text("x = 1\n")
    out = run_cli("worker", "-A", "plain", cwd=tmp_path)
    assert out.returncode == 2
    assert "defines no heddle.Heddle app" in out.stderr


def test_an_unreachable_nats_server_is_a_clear_error(tmp_path):
    from heddle.testing import free_port

    (tmp_path / "mod.py").write_text("import heddle\napp = heddle.Heddle('m', connect_timeout_s=0.5)\n")
    url = f"nats://127.0.0.1:{free_port()}"
    out = run_cli("worker", "-A", "mod", "--quiet", env={"NATS_URL": url}, cwd=tmp_path)
    assert out.returncode == 2
    assert f"cannot reach nats-server at {url}" in out.stderr


def test_heddle_worker_prints_a_banner_with_tasks_and_subjects(heddle_servers, tmp_path):
    name = f"b{uuid.uuid4().hex[:8]}"
    (tmp_path / "bannermod.py").write_text(
        f"import heddle\napp = heddle.Heddle({name!r})\n\n@app.task(retries=2, timeout=5)\n"
        "def add(x: int, y: int) -> int:\n    return x + y\n"
    )
    log = tmp_path / "out.log"
    env = {**os.environ, "NATS_URL": heddle_servers.nats_url, "VALKEY_URL": heddle_servers.valkey_url,
           "COLUMNS": "200"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from heddle.cli import worker_main; worker_main()", "-A", "bannermod"],
            cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: " consuming " in log.read_text(), 30, "the worker to start")
        text = log.read_text()
        assert f"heddle worker {name}" in text
        assert "bannermod.add" in text
        assert f"heddle.tasks.{name}.standard" in text
        assert heddle_servers.nats_url in text
        assert "durable consumer heddle-" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_heddle_dev_runs_servers_and_a_worker_and_stops_on_ctrl_c(tmp_path):
    (tmp_path / "devmod.py").write_text(
        "import heddle\napp = heddle.Heddle('devapp')\n\n@app.task\ndef ping() -> str:\n    return 'pong'\n"
    )
    log = tmp_path / "dev.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "heddle", "dev", "-A", "devmod", "--quiet"],
            cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "COLUMNS": "200"},
        )
    try:
        wait_for(lambda: " consuming " in log.read_text(), 30, "heddle dev to start")
        text = log.read_text()
        nats_url = next(line.split("=", 1)[1].strip() for line in text.splitlines() if "NATS_URL=" in line)
        valkey_url = next(line.split("=", 1)[1].strip() for line in text.splitlines() if "VALKEY_URL=" in line)
        import heddle

        app = heddle.Heddle("devapp", nats_url=nats_url, valkey_url=valkey_url)
        assert app.send_task("devmod.ping").get(timeout=10) == "pong"
        app.close()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(30)
    assert code == 0, log.read_text()
    assert "heddle dev: stopped" in log.read_text()


def test_heddle_version_prints_the_version():
    from heddle.version import __version__

    out = subprocess.run([sys.executable, "-m", "heddle", "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"heddle {__version__}", out.stdout + out.stderr


def test_a_mistyped_app_attribute_names_what_the_module_has(tmp_path):
    (tmp_path / "shopattr.py").write_text("import heddle\napp = heddle.Heddle('shopattr')\n")
    out = run_cli("worker", "-A", "shopattr:ap", cwd=tmp_path)
    assert out.returncode == 2
    assert "module 'shopattr' has no attribute 'ap' (its apps: app)" in out.stderr
    assert "NoneType" not in out.stderr


def test_a_module_whose_own_import_fails_shows_where_not_pythonpath_advice(tmp_path):
    (tmp_path / "shopbroken.py").write_text("import heddle\nimport a_dependency_nobody_installed\n")
    out = run_cli("worker", "-A", "shopbroken", cwd=tmp_path)
    assert out.returncode == 2
    assert "importing 'shopbroken' given to -A failed, in its own code" in out.stderr
    assert 'shopbroken.py", line 2' in out.stderr and "a_dependency_nobody_installed" in out.stderr
    assert "PYTHONPATH" not in out.stderr
    (tmp_path / "shopraises.py").write_text("x = 1\nraise RuntimeError('no config file')\n")
    out = run_cli("worker", "-A", "shopraises", cwd=tmp_path)
    assert out.returncode == 2
    assert 'shopraises.py", line 2' in out.stderr and "RuntimeError: no config file" in out.stderr


def test_heddle_dev_help_says_what_it_does_and_every_option_has_help(tmp_path):
    out = run_cli("dev", "--help", cwd=tmp_path)
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "Start nats-server and valkey-server on free loopback ports" in text
    lines = out.stdout.splitlines()
    options = [i for i, line in enumerate(lines) if line.startswith("  -")]
    for i in options:
        # argparse puts the help on the option's line, or on the next one when the option is long.
        here = lines[i].strip().split("  ", 1)
        assert len(here) == 2 or lines[i + 1].startswith(" " * 10), f"no help for {lines[i].strip()}"


def test_without_the_workshop_extra_heddle_dev_goes_on_and_heddle_workshop_names_the_extra(monkeypatch, caplog):
    import argparse

    from heddle.cli.workshop import dev_workshop, run_workshop_command
    from heddle.errors import ConfigError

    # What a base install (no jinja2) looks like to the Workshop's web modules.
    for name in [m for m in sys.modules if m.startswith(("heddle.workshop.web", "heddle.workshop.evaluate",
                                                         "heddle.workshop.pipelines"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "jinja2", None)
    assert dev_workshop(argparse.Namespace(no_workshop=False, workshop_port=None)) is None
    assert "pip install 'heddle[workshop]'" in caplog.text and "goes on without it" in caplog.text
    args = argparse.Namespace(loglevel="INFO", port=None, host="127.0.0.1", configs=None, eval_db=None)
    with pytest.raises(ConfigError, match=r"pip install 'heddle\[workshop\]'"):
        run_workshop_command(args)
