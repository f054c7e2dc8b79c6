"""YAML config files that remember line numbers, so every error names its file and line.

``load_yaml`` parses with a ``yaml.SafeLoader`` subclass whose mappings and
sequences are :class:`LineMap` / :class:`LineList`: plain ``dict`` / ``list``
subclasses that also record the line of every key and item. Validators walk the
data, collect :class:`ConfigIssue` values (never stopping at the first), and
raise :class:`~heddle.errors.ConfigFileError` with all of them.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from heddle.errors import ConfigFileError

__all__ = ["ConfigIssue", "LineList", "LineMap", "issues_error", "line_of", "load_yaml", "unknown_key_message"]


@dataclass(frozen=True)
class ConfigIssue:
    """One error in a config file.

    Every config kind (worker configs, pipelines, router rules) reports with it,
    so their reports print and sort alike.

    Attributes:
        file: Path of the file, as given.
        line: 1-based line number (0 when unknown, e.g. a missing file).
        message: What is wrong and how to fix it.
        path: Dotted location inside the document (``output_schema.properties.label``), if any.
    """

    file: str
    line: int
    message: str
    path: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class LineMap(dict[Any, Any]):
    """A YAML mapping that knows its own line and the line of each key."""

    line: int = 0
    key_lines: dict[Any, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines = {}


class LineList(list[Any]):
    """A YAML sequence that knows its own line and the line of each item."""

    line: int = 0
    item_lines: list[int]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines = []


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that builds LineMap/LineList and reports duplicate keys instead of hiding them."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[int, str]] = []


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> Any:
    data = LineMap()
    data.line = node.start_mark.line + 1
    yield data
    loader.flatten_mapping(node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            loader.duplicates.append((line, "a mapping key must be a plain value, not a list or mapping"))
            continue
        if key in data:
            loader.duplicates.append(
                (line, f"duplicate key {key!r} (first on line {data.key_lines[key]}); keep one")
            )
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = line


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> Any:
    data = LineList()
    data.line = node.start_mark.line + 1
    yield data
    for item in node.value:
        data.append(loader.construct_object(item, deep=True))
        data.item_lines.append(item.start_mark.line + 1)


_LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def load_yaml(path: str | Path) -> tuple[Any, list[ConfigIssue]]:
    """Parse one YAML file safely, keeping line numbers.

    Returns:
        The document (``None`` when it could not be read or parsed) and the
        problems found while reading it: a missing file, a syntax error with its
        line, duplicate keys.
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, [ConfigIssue(file, 0, "file not found")]
    except (OSError, UnicodeDecodeError) as exc:
        return None, [ConfigIssue(file, 0, f"cannot read the file: {exc}")]
    loader = _LineLoader(text)
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        return None, [ConfigIssue(file, line, f"invalid YAML: {problem}")]
    except yaml.YAMLError as exc:
        return None, [ConfigIssue(file, 0, f"invalid YAML: {exc}")]
    finally:
        loader.dispose()
    return data, [ConfigIssue(file, line, msg) for line, msg in loader.duplicates]


def line_of(root: Any, path: Sequence[Any]) -> int:
    """Line of the deepest element of ``path`` (keys and indexes) that the document records."""
    line = getattr(root, "line", 0)
    node = root
    for step in path:
        if isinstance(node, LineMap) and step in node:
            line = node.key_lines.get(step, line)
            node = node[step]
        elif isinstance(node, LineList) and isinstance(step, int) and 0 <= step < len(node):
            line = node.item_lines[step]
            node = node[step]
        else:
            break
    return line


def dotted(path: Iterable[Any]) -> str:
    """``("a", 0, "b")`` -> ``a[0].b``."""
    out = ""
    for step in path:
        out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
    return out


def unknown_key_message(key: Any, known: Iterable[str]) -> str:
    """'unknown key ...' with a did-you-mean suggestion and the list of known keys."""
    known = sorted(known)
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; known keys: {', '.join(known)}"


def issues_error(what: str, issues: Sequence[ConfigIssue]) -> ConfigFileError:
    """One error carrying every issue, one per line, for ``raise``."""
    files = sorted({i.file for i in issues})
    head = f"{len(issues)} error(s) in {what} {', '.join(files)}:"
    return ConfigFileError("\n  ".join([head, *map(str, issues)]), list(issues))
