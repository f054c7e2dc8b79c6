"""Every example runs."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_quickstart_runs_end_to_end_on_embedded_servers():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart" / "run.py")],
        capture_output=True,
        text=True,
        timeout=180,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "add.delay(2, 3).get() = 5" in text
    assert "quickstart-order-17: 42" in text
    assert "ZeroDivisionError" in text
    assert "revoked before it ran: state=REVOKED" in text
    assert "2000 tasks round trip" in text
    assert "worker stopped (exit 0)" in text
    assert "quickstart done" in text


def test_a_heddle_process_that_exits_early_is_an_error_with_its_output(tmp_path):
    import pytest

    from heddle.errors import HeddleError
    from heddle.testing import heddle_process

    with (
        pytest.raises(HeddleError, match=r"(?s)`heddle worker -A no_such_module_here` exited early:.*no_such_mod"),
        heddle_process(["worker", "-A", "no_such_module_here"], cwd=tmp_path, log_path=tmp_path / "w.log"),
    ):
        pass
