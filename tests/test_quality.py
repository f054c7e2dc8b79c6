"""The code passes its own linters: ruff and mypy run as part of the suite."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_ruff_finds_nothing():
    dirs = [d for d in ("src", "tests", "examples", "benchmarks") if (ROOT / d).is_dir()]
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", *dirs],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_finds_nothing_in_the_package():
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
