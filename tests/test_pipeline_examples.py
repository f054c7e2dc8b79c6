"""The pipeline example runs end to end: validate, heddle submit, and from Python."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_pipeline_example_validates_submits_and_skips_a_conditional_stage():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pipelines" / "run.py")],
        capture_output=True, text=True, timeout=180,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "ok      claims.yaml: pipeline 'claims_review'" in text
    assert "timeline claims_review" in text
    assert '"report": "[claims_review] 1 supported, 1 unsupported, tone excited"' in text
    assert '"ticket": "REVIEW-1"' in text
    assert "output: {'report': '[claims_review] 1 supported, 0 unsupported, tone calm', 'escalated': None}" in text
    assert "escalate  skipped" in text
    assert "worker stopped (exit 0)" in text
    assert "pipelines example done" in text
