"""Fuzzing the config loaders and the CLI (Hypothesis): random and mutated YAML files and
command lines. Every input is either accepted or refused with Heddle's own error; nothing
crashes, hangs or prints a traceback."""

from __future__ import annotations

import io
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from heddle.errors import ConfigError
from heddle.graphs.pipeline import load_pipeline
from heddle.llm.config import load_worker_config
from heddle.rules import load_rules

ROOT = Path(__file__).resolve().parents[2]
SEEDS = {
    "worker": (ROOT / "configs/workers/summarizer.yaml").read_text(),
    "pipeline": (ROOT / "configs/pipelines/review.yaml").read_text(),
    "rules": (ROOT / "configs/router_rules.example.yaml").read_text(),
}
LOADERS = {"worker": load_worker_config, "pipeline": load_pipeline, "rules": load_rules}
# Characters that matter to YAML, so mutations hit the parser's interesting paths.
YAML_BITS = st.sampled_from([
    *":-[]{},&*!|>'\"%@`#\n\t ", "&a ", "*a", "<<: *a", "- ", ": ", "\n  ", "!!python/object ", "0/s", "-5/s",
    "1e400", ".nan", "~", "null", "[*a,*a,*a]",
])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> str:
    text = SEEDS[kind]
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 12))
        text = text[:at] + "".join(draw(st.lists(YAML_BITS, max_size=4))) + text[at + cut:]
    return text


def _load(kind: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"{kind}.yaml"
        path.write_text(text)
        try:
            LOADERS[kind](path)
        except ConfigError as exc:
            assert str(path.name) in str(exc) or kind == "rules" or "config" in str(exc).lower(), exc


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", sorted(LOADERS))
@FUZZ
@given(data=st.data())
def test_mutated_config_files_load_or_fail_with_a_config_error(kind: str, data: st.DataObject) -> None:
    _load(kind, data.draw(mutated(kind)))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", sorted(LOADERS))
@FUZZ
@given(text=st.text(max_size=400) | st.lists(YAML_BITS, max_size=200).map("".join))
def test_random_text_as_a_config_file_loads_or_fails_with_a_config_error(kind: str, text: str) -> None:
    _load(kind, text)


WORDS = st.sampled_from([
    "validate", "status", "inspect", "dlq", "list", "show", "replay", "--sample", "--audit", "--older-than",
    "--limit", "--json", "-1", "0", "nan", "inf", "1e309", "x", "", "--", "-A", "--all",
    "configs/workers/classifier.yaml",
    "/dev/null", "no/such/file.yaml", ">", "*", "\x00", "é", "--state", "--count", "--timeout", "--help",
])


@pytest.mark.timeout(600)
@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(argv=st.lists(WORDS | st.text(max_size=12), min_size=1, max_size=6))
def test_random_command_lines_end_with_usage_or_a_clear_error_never_a_traceback(
    argv: list[str], heddle_servers, monkeypatch
) -> None:
    from heddle import cli

    monkeypatch.setenv("NATS_URL", heddle_servers.nats_url)
    monkeypatch.setenv("VALKEY_URL", heddle_servers.valkey_url)
    if argv[0] not in ("validate", "status", "inspect", "dlq"):
        argv = ["validate", *argv]  # only commands that end on their own
    if argv[0] in ("status", "events"):
        argv += ["--sample", "0"] if "--sample" not in argv else []
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse: usage errors and --help
            code = exc.code if isinstance(exc.code, int) else 2
    assert code in (0, 1, 2, 3), (argv, code)
    assert "Traceback" not in out.getvalue() + err.getvalue(), (argv, err.getvalue())
