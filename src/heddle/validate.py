"""``heddle validate FILE...``: check config files and print every error with file and line.

Each file is parsed once (keeping line numbers, within the limits every config
file is read under: :mod:`heddle.configfile`) and handed to the first
:class:`ConfigKind` whose ``matches`` recognises the document by its keys:
worker configs (``system_prompt``, ``input_schema``, ``output_schema``),
pipelines (``stages``, checked by :func:`heddle.graphs.pipeline.check_pipeline`) and
router rules (``tier_overrides``, ``rate_limits``, ``fallback``,
``unknown_worker_grace_seconds``, checked by :func:`heddle.rules.check_rules_file`,
the same check the router makes when it loads them).

Hook for other config kinds: append a ``ConfigKind`` to :data:`KINDS`, or call
:func:`register` from the module that defines the format::

    register(ConfigKind("price table", looks_like_prices, check_prices, ("input_per_mtok",)))

``check(data, file)`` returns the problems found, each with ``file``, ``line``
and a ``str()`` of ``file:line: message`` (:class:`heddle.configfile.ConfigIssue`); an empty
list means the file is valid. A
check that reads the file itself (``pipeline.validate_pipeline_file(path)``)
fits as ``lambda data, file: validate_pipeline_file(file)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from heddle.configfile import ConfigIssue, load_yaml

__all__ = ["KINDS", "ConfigKind", "FileReport", "register", "run_validate", "validate_file"]


@dataclass(frozen=True)
class ConfigKind:
    """A kind of YAML config file that ``heddle validate`` knows.

    Attributes:
        name: Shown in reports (``worker config``).
        matches: Whether a parsed document is of this kind, judged by its keys.
        check: Every problem of a document of this kind, each with file and line.
        keys: Keys that identify the kind, for the message shown when nothing matches.
    """

    name: str
    matches: Callable[[Any], bool]
    check: Callable[[Any, str], Sequence[Any]]
    keys: tuple[str, ...] = ()


def _check_worker(data: Any, file: str) -> Sequence[Any]:
    from heddle.llm.config import check_worker_config

    return check_worker_config(data, file)[1]


def _is_worker(data: Any) -> bool:
    from heddle.llm.config import looks_like_worker_config

    return looks_like_worker_config(data)


def _check_pipeline(data: Any, file: str) -> Sequence[Any]:
    from heddle.graphs.pipeline import check_pipeline

    return check_pipeline(data, file)


def _is_pipeline(data: Any) -> bool:
    from heddle.graphs.pipeline import looks_like_pipeline

    return looks_like_pipeline(data)


def _check_rules(data: Any, file: str) -> Sequence[Any]:
    from heddle.rules import check_rules_file

    # The rules check walks YAML nodes (for their lines), so it reads the file again.
    return check_rules_file(file)


def _is_rules(data: Any) -> bool:
    from heddle.rules import looks_like_rules

    return looks_like_rules(data)


#: The kinds tried in order.
KINDS: list[ConfigKind] = [
    ConfigKind("worker config", _is_worker, _check_worker, ("system_prompt", "input_schema", "output_schema")),
    ConfigKind("pipeline", _is_pipeline, _check_pipeline, ("stages",)),
    ConfigKind("router rules file", _is_rules, _check_rules, ("tier_overrides", "rate_limits", "fallback")),
]


def register(kind: ConfigKind) -> None:
    """Teach ``heddle validate`` a new kind of config file (tried after the ones already known)."""
    if all(k.name != kind.name for k in KINDS):
        KINDS.append(kind)


@dataclass(frozen=True)
class FileReport:
    """What validating one file found."""

    file: str
    kind: str | None
    issues: list[Any]
    label: str = ""

    @property
    def ok(self) -> bool:
        """Whether the file has no errors."""
        return not self.issues


def validate_file(path: str | Path) -> FileReport:
    """Parse ``path`` and check it as the kind of config its keys say it is."""
    file = str(path)
    data, parsed = load_yaml(path)
    issues: list[Any] = list(parsed)
    if data is None and issues:
        return FileReport(file, None, issues)
    for kind in KINDS:
        if kind.matches(data):
            issues += kind.check(data, file)
            label = f" {data.get('name')!r}" if isinstance(data, dict) and isinstance(data.get("name"), str) else ""
            return FileReport(file, kind.name, sorted(issues, key=lambda i: getattr(i, "line", 0)), label)
    known = "; ".join(f"a {k.name} has {', '.join(k.keys)}" for k in KINDS)
    issues.append(ConfigIssue(file, getattr(data, "line", 1), f"cannot tell what kind of config this is ({known})"))
    return FileReport(file, None, issues)


def run_validate(paths: Iterable[str | Path], out: TextIO) -> int:
    """Validate every file, print every error and a line per file; 0 if all are valid, else 1."""
    reports = [validate_file(p) for p in paths]
    for r in reports:
        for issue in r.issues:
            print(issue, file=out)
    for r in reports:
        kind = r.kind or "config"
        if r.ok:
            print(f"ok      {r.file}: {kind}{r.label}", file=out)
        else:
            print(f"invalid {r.file}: {len(r.issues)} error(s) in this {kind}", file=out)
    failed = sum(not r.ok for r in reports)
    print(f"{len(reports) - failed} valid, {failed} invalid", file=out)
    return 1 if failed else 0
