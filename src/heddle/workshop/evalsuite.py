"""Evaluation suites: JSON test cases for one worker, checked whole, and how an output is scored.

A suite is one JSON object::

    {
      "name": "sentiment",
      "description": "optional words for people",
      "target": "classifier",
      "match": "field",
      "cases": [
        {"name": "cold food", "input": {"text": "The food was cold."}, "expected": {"label": "negative"}},
        {"name": "sum", "input": [2, 3], "expected": 5, "match": "exact"}
      ]
    }

``target`` is the worker type of a YAML LLM worker or the name of a Python task
(its last dotted part is enough when only one live task ends with it); the
Workshop page can override it. ``input`` is the YAML worker's input object, or
for a Python task a list (positional arguments) or an object (keyword
arguments). ``match`` (default ``field``, overridable per case) says how the
output is scored:

* ``field``: ``expected`` is an object of fields; each key is a path into the
  output (``address.city``, ``people.0``: dots go into objects, numbers index
  lists; a key that exists as written wins over descending). The case scores
  matched fields / expected fields.
* ``exact``: the whole output equals ``expected``: 1 or 0.

Equality is JSON equality: ``1 == 1.0``, but ``true`` is not ``1``. A case
passes at score 1; a failed or timed-out task scores 0.

:func:`parse_suite` reports every problem at once, each with its place
(``cases[2] "cold food".expected``), as :class:`~heddle.configfile.ConfigIssue`
values like every other config file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heddle.configfile import ConfigIssue, unknown_key_message

__all__ = [
    "MATCH_MODES",
    "Case",
    "FieldCheck",
    "Score",
    "Suite",
    "SuiteFile",
    "failed_score",
    "find_suites",
    "input_issues",
    "lookup",
    "parse_suite",
    "same",
    "score_output",
]

MATCH_MODES = ("field", "exact")
MAX_CASES = 1000
MAX_SUITE_BYTES = 1_000_000
_SUITE_KEYS = ("name", "description", "target", "match", "cases")
_CASE_KEYS = ("name", "input", "expected", "match")


@dataclass(frozen=True)
class Case:
    """One test case: what goes in, what should come out, how to compare."""

    index: int
    name: str
    input: Any
    expected: Any
    match: str


@dataclass(frozen=True)
class Suite:
    """A checked suite; ``data`` is the JSON object it came from (kept with every run)."""

    name: str
    target: str
    match: str
    cases: tuple[Case, ...]
    source: str
    description: str = ""
    data: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self) -> str:
        """The suite as JSON text, as stored with a run."""
        return json.dumps(self.data, ensure_ascii=False)


@dataclass(frozen=True)
class SuiteFile:
    """A suite file found under a config directory: the suite, or why it cannot run."""

    path: Path
    suite: Suite | None
    issues: list[ConfigIssue]


# -- reading and checking ------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number; write a plain number or a string")


def _decode(text: str, source: str) -> tuple[Any, list[ConfigIssue]]:
    """JSON text -> value; duplicate keys (which JSON lets the last one win silently) are problems."""
    dups: dict[int, list[str]] = {}
    keep: list[Any] = []  # keeps every object alive, so the ids in ``dups`` stay theirs

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for k, v in items:
            if k in obj:
                dups.setdefault(id(obj), []).append(k)
            obj[k] = v
        keep.append(obj)
        return obj

    try:
        value = json.loads(text, object_pairs_hook=pairs, parse_constant=_no_constant)
    except json.JSONDecodeError as exc:
        return None, [ConfigIssue(source, exc.lineno, f"invalid JSON at column {exc.colno}: {exc.msg}")]
    except ValueError as exc:
        return None, [ConfigIssue(source, 0, f"invalid JSON: {exc}")]
    issues = [
        ConfigIssue(source, 0, f"duplicate key {key!r} (JSON would keep only the last one); keep one", where)
        for where, key in _duplicates(value, "", dups)
    ]
    return value, issues


def _duplicates(value: Any, where: str, dups: dict[int, list[str]]) -> Iterator[tuple[str, str]]:
    if isinstance(value, dict):
        for key in dups.get(id(value), []):
            yield where or "(top level)", key
        for k, v in value.items():
            yield from _duplicates(v, f"{where}.{k}" if where else k, dups)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _duplicates(v, f"{where}[{i}]", dups)


def parse_suite(text: str, source: str = "pasted suite") -> tuple[Suite | None, list[ConfigIssue]]:
    """Check a suite's JSON text completely.

    Args:
        text: The JSON text.
        source: Where it came from (a file path, or "pasted suite"), used in every problem.

    Returns:
        The suite (None when anything is wrong) and every problem found, each with its place.
    """
    if len(text.encode("utf-8", "replace")) > MAX_SUITE_BYTES:
        return None, [ConfigIssue(source, 0, f"the suite is larger than {MAX_SUITE_BYTES:,} bytes; split it")]
    if not text.strip():
        return None, [ConfigIssue(source, 0, 'empty; a suite is a JSON object {"name": ..., "cases": [...]}')]
    data, issues = _decode(text, source)
    if data is None and issues:
        return None, issues

    def problem(where: str, message: str) -> None:
        issues.append(ConfigIssue(source, 0, message, where))

    if not isinstance(data, dict):
        problem("", f'a suite is a JSON object {{"name": ..., "cases": [...]}}, not {_kind(data)}')
        return None, issues
    for key in data:
        if key not in _SUITE_KEYS:
            problem(key, unknown_key_message(key, _SUITE_KEYS))
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        problem("name", "required: a non-empty string naming the suite")
    target = data.get("target", "")
    if not isinstance(target, str):
        problem("target", f"must be a worker type or task name (a string), not {_kind(target)}")
    description = data.get("description", "")
    if not isinstance(description, str):
        problem("description", f"must be a string, not {_kind(description)}")
    match = data.get("match", "field")
    if match not in MATCH_MODES:
        problem("match", f"must be one of {', '.join(map(repr, MATCH_MODES))}, not {match!r}")
        match = "field"
    cases = data.get("cases")
    if not isinstance(cases, list) or not cases:
        problem("cases", "required: a non-empty list of cases, each {\"input\": ..., \"expected\": ...}")
        cases = []
    elif len(cases) > MAX_CASES:
        problem("cases", f"{len(cases)} cases; at most {MAX_CASES} per suite")
    checked: list[Case] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(cases):
        case_name, case = _check_case(i, raw, match, problem)
        if case_name is not None and case_name in seen:
            problem(_where(i, case_name), f"the same name as cases[{seen[case_name]}]; runs are compared "
                    "case by case by name, so give each case its own")
        elif case_name is not None:
            seen[case_name] = i
        if case is not None:
            checked.append(case)
    if issues:
        return None, issues
    assert isinstance(name, str) and isinstance(target, str) and isinstance(description, str)
    return Suite(name.strip(), target.strip(), match, tuple(checked), source, description, data), []


def _check_case(i: int, raw: Any, default_match: str, problem: Any) -> tuple[str | None, Case | None]:
    """The case's name (None if it has none to speak of) and the case, if it is sound."""
    if not isinstance(raw, dict):
        problem(f"cases[{i}]", f'a case is an object {{"input": ..., "expected": ...}}, not {_kind(raw)}')
        return None, None
    name = raw.get("name", f"case {i + 1}")
    if not isinstance(name, str) or not name.strip():
        problem(f"cases[{i}].name", "must be a non-empty string")
        name = f"case {i + 1}"
    name = name.strip()
    where = _where(i, name)
    ok = True
    for key in raw:
        if key not in _CASE_KEYS:
            problem(f"{where}.{key}", unknown_key_message(key, _CASE_KEYS))
            ok = False
    match = raw.get("match", default_match)
    if match not in MATCH_MODES:
        problem(f"{where}.match", f"must be one of {', '.join(map(repr, MATCH_MODES))}, not {match!r}")
        ok, match = False, default_match
    if "input" not in raw:
        problem(f"{where}.input", "required: the worker's input object, or a task's arguments as a list or object")
        ok = False
    elif not isinstance(raw["input"], dict | list):
        problem(f"{where}.input", "must be an object (a YAML worker's input, or keyword arguments) or a list "
                f"(positional arguments), not {_kind(raw['input'])}")
        ok = False
    if "expected" not in raw:
        problem(f"{where}.expected", "required: the fields the output should have (or, with match "
                '"exact", the whole output)')
        ok = False
    elif match == "field":
        expected = raw["expected"]
        if not isinstance(expected, dict) or not expected:
            problem(f"{where}.expected", 'with match "field" this is a non-empty object of output fields, '
                    f'not {_kind(expected)}; use "match": "exact" to compare the whole output')
            ok = False
        else:
            for key in expected:
                if not key or any(not part for part in key.split(".")):
                    problem(f"{where}.expected", f"field path {key!r} has an empty part; write a.b.c")
                    ok = False
    if not ok:
        return name, None
    return name, Case(i, name, raw["input"], raw["expected"], match)


def input_issues(suite: Suite, target: str, errors_of: Callable[[Any], list[Any]] | None) -> list[ConfigIssue]:
    """Problems with the cases' inputs for a target, before anything is sent.

    Args:
        suite: A checked suite.
        target: The target's name, for messages.
        errors_of: For a YAML worker, its input schema's check (every violation of
            one input); None for a Python task, which takes a list or an object.
    """
    if errors_of is None:
        return []
    out = []
    for case in suite.cases:
        where = f"{_where(case.index, case.name)}.input"
        if not isinstance(case.input, dict):
            out.append(ConfigIssue(suite.source, 0, f"the YAML worker {target} takes one input object, "
                                   f"not {_kind(case.input)}", where))
            continue
        out.extend(ConfigIssue(suite.source, 0, f"does not fit {target}'s input_schema: {err}", where)
                   for err in errors_of(case.input))
    return out


def _where(i: int, name: str) -> str:
    return f"cases[{i}] {json.dumps(name, ensure_ascii=False)}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def find_suites(dirs: list[Path]) -> list[SuiteFile]:
    """Every ``evals/*.json`` under the config directories, each checked (broken ones keep their problems)."""
    found: list[SuiteFile] = []
    for base in dirs:
        for path in sorted(base.glob("evals/*.json")):
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                found.append(SuiteFile(path, None, [ConfigIssue(str(path), 0, f"cannot read the file: {exc}")]))
                continue
            suite, issues = parse_suite(text, str(path))
            found.append(SuiteFile(path, suite, issues))
    return found


# -- scoring ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldCheck:
    """One expected field: what was wanted, whether the output has it, what it had."""

    field: str
    expected: Any
    found: bool
    got: Any
    ok: bool


@dataclass(frozen=True)
class Score:
    """A case's score (0 to 1) and, for field match, each field's check."""

    value: float
    checks: tuple[FieldCheck, ...] = ()

    @property
    def passed(self) -> bool:
        """A case passes when everything matched."""
        return self.value >= 1.0


def same(a: Any, b: Any) -> bool:
    """JSON equality: numbers compare by value (1 == 1.0), but a boolean is never a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def lookup(value: Any, path: str) -> tuple[bool, Any]:
    """Find ``path`` (``a.b.0``) in an output: (found, value).

    A key that exists as written (``"a.b"``) wins over descending, so outputs
    whose keys contain dots can still be checked.
    """
    if isinstance(value, dict) and path in value:
        return True, value[path]
    node = value
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list | tuple) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, None
    return True, node


def score_output(match: str, expected: Any, output: Any) -> Score:
    """Score a task's output against what a case expects (see the module docstring)."""
    if match == "exact":
        return Score(1.0 if same(output, expected) else 0.0)
    checks = []
    for path, want in expected.items():
        found, got = lookup(output, path)
        checks.append(FieldCheck(path, want, found, got, found and same(got, want)))
    return Score(sum(c.ok for c in checks) / len(checks), tuple(checks))


def failed_score(match: str, expected: Any) -> Score:
    """The score of a case whose task failed or timed out: 0, with every field unmatched."""
    if match == "exact":
        return Score(0.0)
    return Score(0.0, tuple(FieldCheck(path, want, False, None, False) for path, want in expected.items()))
