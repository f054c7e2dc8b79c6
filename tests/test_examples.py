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
