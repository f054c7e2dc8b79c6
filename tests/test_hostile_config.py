"""Hostile and malformed config files: alias bombs, huge or deeply nested documents, rates that stall.

Every Heddle YAML file (worker configs, pipelines, router rules, price tables)
goes through one loader with limits; each bad file is rejected quickly with a
config error that names the file, the line where known, the limit and the fix.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import heddle
from heddle.configfile import MAX_CONFIG_BYTES, MAX_YAML_ALIASES, load_yaml
from heddle.errors import ConfigFileError
from heddle.graphs.pipeline import load_pipeline
from heddle.llm.config import load_worker_config
from heddle.router import Router
from heddle.rules import RulesError, load_rules
from heddle.validate import validate_file
from tests.conftest import ROOT

# The bombs' tests time out in a thread: the code they guard against spends its
# time inside C (repr of a list), where the default SIGALRM timeout never fires.
BOMB_TIMEOUT = pytest.mark.timeout(10, method="thread")

# Nine lists of nine aliases to the list before: 9**9 (387 million) "lol"s once
# expanded, from 81 aliases and half a kilobyte of text.
BOMB = "\n".join(
    ['lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]']
    + [f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]" for i in range(1, 9)]
)


def _indented(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _bomb_first(body: str) -> str:
    """A document whose anchors come first (top-level keys), then ``body`` using ``*lol8``."""
    return f"{BOMB}\n{body}"


def _assert_names_the_alias_limit(message: str, file: Path) -> None:
    assert str(file) in message
    assert "alias" in message
    assert "anchor" in message  # the fix: write the repeated part out, or use fewer anchors


@BOMB_TIMEOUT
def test_an_alias_bomb_in_a_worker_config_is_rejected_not_expanded(tmp_path):
    bomb = _write(tmp_path / "worker.yaml", _bomb_first(
        "name: bomb\nsystem_prompt: hi\ninput_schema: {type: object}\n"
        "output_schema: {type: object, properties: {x: *lol8}}\n"
    ))
    with pytest.raises(ConfigFileError) as info:
        load_worker_config(bomb)
    _assert_names_the_alias_limit(str(info.value), bomb)
    assert info.value.issues and info.value.issues[0].line > 1  # the line of the alias that went over


@BOMB_TIMEOUT
def test_an_alias_bomb_in_a_pipeline_is_rejected_not_loaded(tmp_path):
    bomb = _write(tmp_path / "pipeline.yaml", (
        "name: p\nstages:\n  - name: one\n    task: shop.tasks.extract\n    input_mapping:\n"
        f"      text: goal.context.text\n{_indented(BOMB, 6)}\n"
    ))
    with pytest.raises(ConfigFileError) as info:
        load_pipeline(bomb)
    _assert_names_the_alias_limit(str(info.value), bomb)


@BOMB_TIMEOUT
def test_an_alias_bomb_in_router_rules_is_rejected_naming_the_limit(tmp_path):
    bomb = _write(tmp_path / "rules.yaml", _bomb_first("fallback:\n  local: *lol8\n"))
    with pytest.raises(RulesError) as info:
        load_rules(bomb)
    assert isinstance(info.value, ConfigFileError)
    _assert_names_the_alias_limit(str(info.value), bomb)


@BOMB_TIMEOUT
def test_a_chain_of_doubling_aliases_is_rejected_although_it_uses_few_aliases(tmp_path):
    # 61 aliases, well under the count limit, yet 2**30 values once expanded.
    chain = ["d0: &d0 [standard]"] + [f"d{i}: &d{i} [*d{i - 1}, *d{i - 1}]" for i in range(1, 31)]
    bomb = _write(tmp_path / "worker.yaml", "\n".join(chain) + (
        "\nname: chain\nsystem_prompt: hi\ninput_schema: {type: object}\n"
        "output_schema: {type: object, properties: {x: *d30}}\n"
    ))
    with pytest.raises(ConfigFileError) as info:
        load_worker_config(bomb)
    assert str(bomb) in str(info.value) and "expanded" in str(info.value)


def test_router_rules_may_use_aliases_up_to_the_limit_and_not_one_more(tmp_path):
    def rules_with(aliases: int) -> Path:
        many = ", ".join(["*std"] * aliases)
        return _write(tmp_path / "rules.yaml", f"tier_overrides:\n  a: &std standard\nfallback:\n  local: [{many}]\n")

    assert len(load_rules(rules_with(MAX_YAML_ALIASES)).fallback["local"]) == MAX_YAML_ALIASES
    with pytest.raises(RulesError) as info:
        load_rules(rules_with(MAX_YAML_ALIASES + 1))
    assert f"{tmp_path / 'rules.yaml'}:4: the document uses more than {MAX_YAML_ALIASES} aliases" in str(info.value)


def test_an_anchor_used_inside_itself_is_rejected_as_endless(tmp_path):
    rules = _write(tmp_path / "rules.yaml", "fallback: &loop\n  local: *loop\n")
    with pytest.raises(RulesError, match=r"rules\.yaml:2: alias \*loop is used inside its own anchor"):
        load_rules(rules)


def test_a_config_file_over_the_size_limit_is_rejected_before_it_is_parsed(tmp_path):
    huge = _write(tmp_path / "worker.yaml", (
        "name: huge\ninput_schema: {type: object}\noutput_schema: {type: object}\n"
        f"system_prompt: {'x' * MAX_CONFIG_BYTES}\n"
    ))
    with pytest.raises(ConfigFileError) as info:
        load_worker_config(huge)
    message = str(info.value)
    assert str(huge) in message and "1 MiB" in message and "split" in message
    with pytest.raises(RulesError, match="1 MiB"):
        load_rules(_write(tmp_path / "rules.yaml", "tier_overrides:\n" + "  w: local\n" * 200_000))


def test_a_deeply_nested_document_is_a_config_error_not_a_crash(tmp_path):
    deep = _write(tmp_path / "deep.yaml", "name: deep\nsystem_prompt: " + "[" * 5000 + "]" * 5000 + "\n")
    data, issues = load_yaml(deep)
    assert data is None
    assert len(issues) == 1 and issues[0].line == 2 and "nested more than" in issues[0].message
    report = validate_file(deep)
    assert not report.ok and "nested more than" in str(report.issues[0])


def test_heddle_validate_reports_alias_bombs_like_other_config_errors(tmp_path):
    worker = _write(tmp_path / "worker.yaml", _bomb_first(
        "name: bomb\nsystem_prompt: hi\ninput_schema: {type: object}\n"
        "output_schema: {type: object, properties: {x: *lol8}}\n"
    ))
    pipeline = _write(tmp_path / "pipeline.yaml", _bomb_first(
        "name: p\nstages:\n  - {name: one, task: shop.tasks.extract, input_mapping: {text: *lol8}}\n"
    ))
    rules = _write(tmp_path / "rules.yaml", _bomb_first("fallback:\n  local: *lol8\n"))
    out = subprocess.run(
        [sys.executable, "-m", "heddle", "validate", str(worker), str(pipeline), str(rules)],
        capture_output=True, text=True, timeout=30, cwd=ROOT,  # kills the child if it hangs on a bomb
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    for f in (worker, pipeline, rules):
        assert any(line.startswith(f"{f}:") and "alias" in line for line in out.stdout.splitlines()), out.stdout
    assert "0 valid, 3 invalid" in out.stdout


# -- rates that would stall the router ---------------------------------------------------------


def _rules(tmp_path: Path, limit: str) -> Path:
    return _write(tmp_path / "rules.yaml", f"rate_limits:\n  workers:\n    extractor: {limit}\n")


@pytest.mark.parametrize("rate", ["0/s", "0.0/m", "-5/s", "-1/h", "0.00000001/h"])
def test_a_rate_that_would_hold_tasks_forever_is_rejected_naming_the_rule(tmp_path, rate):
    path = _rules(tmp_path, f"{{rate: {rate}, burst: 5}}")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    [issue] = info.value.issues
    assert issue.line == 3
    assert issue.message.startswith("rate_limits.workers.extractor.rate: ")
    assert "at least" in issue.message and "or remove the limit" in issue.message


def test_every_unusable_burst_is_reported_with_its_rule(tmp_path):
    path = _write(tmp_path / "rules.yaml", (
        "rate_limits:\n  workers:\n"
        "    zero: {rate: 5/s, burst: 0}\n"
        "    negative: {rate: 5/s, burst: -3}\n"
        "    superscript: {rate: 5/s, burst: ²}\n"
        f"    huge: {{rate: 5/s, burst: {'9' * 5000}}}\n"
    ))
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert [(i.line, i.message.split(" ")[0]) for i in info.value.issues] == [
        (3, "rate_limits.workers.zero.burst"),
        (4, "rate_limits.workers.negative.burst"),
        (5, "rate_limits.workers.superscript.burst"),
        (6, "rate_limits.workers.huge.burst"),
    ]


def test_a_rate_too_large_to_be_a_number_is_rejected(tmp_path):
    with pytest.raises(RulesError, match=r"rate_limits\.workers\.extractor\.rate: .*too large"):
        load_rules(_rules(tmp_path, f"{{rate: {'9' * 400}/s}}"))


@pytest.mark.parametrize("grace", ["nan", "inf", "1e400"])
def test_an_unknown_worker_grace_that_is_not_a_finite_number_is_rejected(tmp_path, grace):
    with pytest.raises(RulesError, match="unknown_worker_grace_seconds must be a number of seconds >= 0"):
        load_rules(_write(tmp_path / "rules.yaml", f"unknown_worker_grace_seconds: {grace}\n"))


def test_a_router_refuses_to_start_on_a_zero_rate_and_keeps_its_rules_when_one_is_edited_in(tmp_path):
    app = heddle.Heddle("hostile")
    path = _rules(tmp_path, "{rate: 0/s, burst: 5}")
    with pytest.raises(RulesError, match=r"rate_limits\.workers\.extractor\.rate"):
        Router(app, rules_path=path, watch_rules=False)
    _rules(tmp_path, "{rate: 5/s, burst: 5}")
    router = Router(app, rules_path=path, watch_rules=False)
    before = router.rules
    _rules(tmp_path, "{rate: -5/s, burst: 5}")
    assert router.reload() is False
    assert router.rules is before and router.rules.worker_limits["extractor"].rate_per_s == 5.0


def test_heddle_validate_checks_router_rules_and_names_each_bad_rate(tmp_path):
    bad = _write(tmp_path / "rules.yaml", (
        "rate_limits:\n  tiers:\n    standard: {rate: 0/s, burst: 10}\n"
        "  workers:\n    extractor: {rate: -5/s, burst: 5}\n"
    ))
    example = ROOT / "configs" / "router_rules.example.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "heddle", "validate", str(bad), str(example)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith(f"{bad}:3: rate_limits.tiers.standard.rate: ") for line in lines), out.stdout
    assert any(line.startswith(f"{bad}:5: rate_limits.workers.extractor.rate: ") for line in lines), out.stdout
    assert f"invalid {bad}: 2 error(s) in this router rules file" in lines
    assert f"ok      {example}: router rules file" in lines
