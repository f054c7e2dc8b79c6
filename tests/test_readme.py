"""The README, walked as a newcomer walks it, on a copy of the project (#21).

One module-scoped copy of the working tree gets the README's first command run
literally: a fresh venv with the *base* install (no extras) that runs the
quickstart. The rest of the walk runs in that venv: the Tasks section's
``shop/tasks.py`` under ``heddle dev`` (which must go on without the Workshop
extra and say how to add it), the calls the README shows from another process,
the CLI commands it lists, and the "Testing your tasks" conftest and test.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT, wait_for

README = ROOT / "README.md"
# A plain shell of a newcomer: no server URLs, no Heddle settings, no venv of ours.
_DROP = ("NATS_", "VALKEY_", "HEDDLE_", "PYTHONPATH", "VIRTUAL_ENV", "WORKER_CONFIG", "MODEL_TIER")


def blocks(lang: str) -> list[str]:
    """The README's fenced code blocks in ``lang``, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def newcomer_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP)}
    env.update(extra)
    return env


def run(cmd: str | list[str], cwd: Path, timeout_s: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd, cwd=cwd, shell=isinstance(cmd, str), executable="/bin/bash" if isinstance(cmd, str) else None,
        env=newcomer_env(**env), capture_output=True, text=True, timeout=timeout_s,
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the working tree (tracked and new files, nothing ignored) with the README's first command run."""
    dest = tmp_path_factory.mktemp("readme") / "heddle"
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def quickstart(project: Path) -> subprocess.CompletedProcess[str]:
    install_and_demo = blocks("bash")[0].splitlines()[0]
    return run(install_and_demo, project, timeout_s=600)


def test_the_first_command_installs_heddle_without_extras_and_runs_the_quickstart(project, quickstart):
    assert quickstart.returncode == 0, quickstart.stdout + quickstart.stderr
    assert "add.delay(2, 3).get() = 5" in quickstart.stdout
    assert "quickstart done" in quickstart.stdout
    # It is the base install: the Workshop's extra is not there.
    probe = run([str(project / ".venv/bin/python"), "-c", "import jinja2"], project)
    assert probe.returncode != 0 and "No module named 'jinja2'" in probe.stderr


def test_the_second_command_is_what_ci_runs():
    test_command = blocks("bash")[0].splitlines()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    # .ci/run runs the README's test command, only quieter (pip -q).
    assert test_command.replace("pip install -e", "pip install -q -e") in ci


def test_heddle_version_answers(project, quickstart):
    out = run([str(project / ".venv/bin/heddle"), "--version"], project)
    assert out.returncode == 0 and out.stdout.startswith("heddle "), out.stderr


class Dev:
    """``heddle dev -A shop.tasks`` in the copy, stopped with Ctrl-C (SIGINT) like a user stops it."""

    def __init__(self, project: Path, log: Path) -> None:
        self.log = log
        self._out = open(log, "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [str(project / ".venv/bin/heddle"), "dev", "-A", "shop.tasks"], cwd=project,
            env=newcomer_env(), stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group we started: dev and its servers
                self.proc.wait(10)
        self._out.close()


@pytest.fixture(scope="module")
def shop_dev(project: Path, quickstart: subprocess.CompletedProcess[str]) -> Iterator[Dev]:
    """The Tasks section's module written where the README says, served by ``heddle dev``."""
    assert quickstart.returncode == 0
    tasks = next(b for b in blocks("python") if b.startswith("# shop/tasks.py"))
    (project / "shop").mkdir(exist_ok=True)
    (project / "shop" / "__init__.py").write_text("")
    (project / "shop" / "tasks.py").write_text(tasks)
    dev = Dev(project, project / "dev.log")
    try:
        wait_for(lambda: " consuming " in dev.output() or dev.proc.poll() is not None, 60, "heddle dev to start")
        assert dev.proc.poll() is None, dev.output()
        yield dev
    finally:
        dev.stop()


def test_heddle_dev_runs_the_readme_tasks_without_the_workshop_extra_and_says_how_to_add_it(shop_dev):
    out = shop_dev.output()
    assert "pip install 'heddle[workshop]'" in out, out
    assert "Traceback" not in out, out


def test_the_readme_calls_work_from_another_process(project, shop_dev):
    calls = next(b for b in blocks("python") if b.startswith("add.delay(2, 3)"))
    # Each README line runs as written; a line with a top-level await runs on its own loop.
    script = textwrap.dedent(f"""
        import ast, asyncio, sys
        sys.path.insert(0, ".")
        from shop.tasks import add, app
        namespace = {{"add": add, "app": app}}
        for line in {calls.splitlines()!r}:
            code = compile(line, "README", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            value = eval(code, namespace)
            if asyncio.iscoroutine(value):
                asyncio.run(value)
            print("ok:", line.split("#")[0].strip())
        print("again:", add.delay(2, 3).get(timeout=10))
    """)
    # Another shell in the project needs no exports: heddle dev's session file says where it runs.
    assert (project / ".heddle" / "dev.json").exists(), shop_dev.output()
    out = run([str(project / ".venv/bin/python"), "-c", script], project, timeout_s=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count("ok:") == len(calls.splitlines())
    assert "again: 5" in out.stdout


def test_the_cli_commands_the_readme_lists_answer_against_heddle_dev(project, shop_dev):
    env: dict[str, str] = {}  # as in another shell of the project: the session file is enough
    heddle = str(project / ".venv/bin/heddle")
    listing = run([heddle, "dlq", "list"], project, **env)
    assert listing.returncode == 0, listing.stderr
    status = run([heddle, "status"], project, **env)
    assert status.returncode == 0 and "shop" in status.stdout, status.stdout + status.stderr
    sent = run([str(project / ".venv/bin/python"), "-c",
                "from shop.tasks import add; r = add.delay(2, 3); r.get(timeout=10); print(r.id)"], project, **env)
    assert sent.returncode == 0, sent.stderr
    inspected = run([heddle, "inspect", sent.stdout.strip()], project, **env)
    assert inspected.returncode == 0 and "SUCCESS" in inspected.stdout, inspected.stdout + inspected.stderr
    validated = run(f"{heddle} validate configs/workers/*.yaml", project)
    assert validated.returncode == 0, validated.stdout + validated.stderr
    # Without the extra, `heddle workshop` says which one to install, with no traceback.
    workshop = run([heddle, "workshop"], project, timeout_s=60, **env)
    assert workshop.returncode != 0
    assert "pip install 'heddle[workshop]'" in workshop.stderr + workshop.stdout
    assert "Traceback" not in workshop.stderr


def test_the_testing_section_runs_with_pytest_in_the_base_install(project, shop_dev):
    block = next(b for b in blocks("python") if b.startswith("# conftest.py"))
    conftest, _, test_file = block.partition("# test_shop.py")
    where = project / "usertests"
    where.mkdir(exist_ok=True)
    (where / "conftest.py").write_text(conftest)
    (where / "test_shop.py").write_text(test_file)
    pip = run([str(project / ".venv/bin/pip"), "install", "-q", "pytest"], project)
    assert pip.returncode == 0, pip.stderr
    started = time.monotonic()
    out = run([str(project / ".venv/bin/python"), "-m", "pytest", "-q", "-p", "no:cacheprovider", "usertests"],
              project, timeout_s=180, PYTHONPATH=str(project))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 passed" in out.stdout, (out.stdout, time.monotonic() - started)


def test_the_development_commands_name_tools_the_dev_extra_installs():
    dev_block = blocks("bash")[-1]
    tools = {line.split()[0] for line in dev_block.splitlines() if line.startswith(".venv/bin/")}
    pyproject = (ROOT / "pyproject.toml").read_text()
    for tool in tools:
        name = tool.removeprefix(".venv/bin/")
        assert re.search(rf'^\s+"{name}[>=<\[]', pyproject, flags=re.M), f"{name} is not in the dev extra"


def test_the_readme_parses_as_python_where_it_shows_python():
    shown = blocks("python")
    assert len(shown) >= 4
    for block in shown:
        compile(block, "README", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
