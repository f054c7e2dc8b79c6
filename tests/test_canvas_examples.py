"""The task-graph example runs end to end."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_the_graphs_example_runs_chains_groups_chords_maps_and_error_callbacks():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "graphs" / "run.py")],
        capture_output=True, text=True, timeout=180,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin", "HOME": "/tmp"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "fetch | word_count | describe = '12 words'" in text
    assert "node results: [12, '12 words']" in text
    assert "with | : '3 tokens'" in text
    scores = "[{'page': 'a', 'sentences': 2}, {'page': 'b', 'sentences': 3}, {'page': 'c', 'sentences': 1}]"
    assert f"group(score) = {scores}" in text
    assert "chord(score..., rank) = ['b', 'a', 'c']" in text
    assert "square.map(range(5)) = [0, 1, 4, 9, 16]" in text
    assert "add.starmap([(1, 2), (3, 4)]) = [3, 7]" in text
    assert "with an error callback, then +1 = 43" in text
    assert "without one the graph fails: builtins.ValueError: node 'tasks.parse_int' at 0 failed" in text
    assert "goal state: FAILURE" in text
    assert "worker stopped (exit 0)" in text
    assert "graphs example done" in text
