"""YAML config files that remember line numbers, so every error names its file and line.

Every Heddle YAML file (worker configs, pipelines, router rules, price tables)
is read here, under the same limits: :func:`read_config_text` reads at most
:data:`MAX_CONFIG_BYTES`, and :class:`SafeConfigLoader` (a ``yaml.SafeLoader``)
refuses documents that use too many aliases, expand too far through them, or
nest too deep. A file over a limit is a config error like any other, with its
file, line and fix.

``load_yaml`` parses with a ``SafeConfigLoader`` subclass whose mappings and
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

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_YAML_ALIASES",
    "MAX_YAML_DEPTH",
    "MAX_YAML_VALUES",
    "ConfigIssue",
    "LineList",
    "LineMap",
    "SafeConfigLoader",
    "YAMLLimitError",
    "issues_error",
    "line_of",
    "load_yaml",
    "read_config_text",
    "unknown_key_message",
    "yaml_issue",
]

# Limits on every config file. Hand-written configs are a few KiB, use a handful
# of anchors (a shared schema fragment, `<<: *defaults`) and nest a dozen levels;
# the limits sit far above that and far below what hurts. Without them a small
# file stalls whoever loads it: PyYAML shares an aliased node instead of copying
# it, but every check that walks, copies or prints the data visits it once per
# alias path, so nine lines of nested aliases ("billion laughs") are 387 million
# values to a validator (40 s and more, with gigabytes of memory).

#: Largest config file read, in bytes (1 MiB). Checked before parsing, which in
#: pure-Python PyYAML costs about a second per MiB.
MAX_CONFIG_BYTES = 1024 * 1024
#: Most aliases (``*name``) one document may use.
MAX_YAML_ALIASES = 200
#: Most values (scalars, lists and mappings) a document may hold once its aliases
#: are expanded. The alias count alone does not bound this: 30 lists of two aliases
#: each to the list before expand to 2**30 values.
MAX_YAML_VALUES = 100_000
#: Deepest nesting of lists and mappings, aliases expanded. Parsing and every
#: validator recurse per level; past Python's recursion limit they would crash.
MAX_YAML_DEPTH = 64

_FIX_ALIASES = "write the repeated parts out, or use fewer anchors (&name) and aliases (*name)"


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


class YAMLLimitError(yaml.MarkedYAMLError):
    """Raised by :class:`SafeConfigLoader` when a document is over one of the limits; ``problem`` says which."""


class SafeConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that enforces the config limits while it composes the document.

    Every node's size and depth with its aliases expanded are worked out as the
    node is finished (children first), so a bomb is refused at the first node
    that goes over, before anything walks it. A text longer than
    :data:`MAX_CONFIG_BYTES` characters is refused before parsing.

    Raises:
        YAMLLimitError: With the line of the node that went over a limit.
    """

    def __init__(self, stream: Any) -> None:
        if isinstance(stream, str | bytes) and len(stream) > MAX_CONFIG_BYTES:
            raise YAMLLimitError(problem=_too_big_message())
        super().__init__(stream)
        self.alias_count = 0
        self._depth = 0
        # id(node) -> (values, depth) with aliases expanded; a node is in it once
        # finished, so an alias to a node not in it refers to one of its own parents.
        self._expanded: dict[int, tuple[int, int]] = {}

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            alias: Any = self.peek_event()  # type: ignore[no-untyped-call]
            mark = alias.start_mark
            self.alias_count += 1
            if self.alias_count > MAX_YAML_ALIASES:
                raise YAMLLimitError(problem=f"the document uses more than {MAX_YAML_ALIASES} aliases (*name); "
                                             f"{_FIX_ALIASES}", problem_mark=mark)
            node = super().compose_node(parent, index)
            if node is not None and id(node) not in self._expanded:
                raise YAMLLimitError(problem=f"alias *{alias.anchor} is used inside its own "
                                             f"anchor, which would repeat forever; {_FIX_ALIASES}",
                                     problem_mark=mark)
            return node
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                event: Any = self.peek_event()  # type: ignore[no-untyped-call]
                raise YAMLLimitError(problem=_too_deep_message(), problem_mark=event.start_mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is None:
            return None
        values, depth = 1, 1
        if isinstance(node, yaml.SequenceNode):
            children: Iterable[yaml.Node] = node.value
        elif isinstance(node, yaml.MappingNode):
            children = (n for pair in node.value for n in pair)
        else:
            children = ()
        for child in children:
            child_values, child_depth = self._expanded[id(child)]
            values += child_values
            depth = max(depth, child_depth + 1)
        if values > MAX_YAML_VALUES:
            raise YAMLLimitError(problem=f"the document holds more than {MAX_YAML_VALUES:,} values once its aliases "
                                         f"are expanded; {_FIX_ALIASES}", problem_mark=node.start_mark)
        if depth > MAX_YAML_DEPTH:
            raise YAMLLimitError(problem=_too_deep_message(aliases=True), problem_mark=node.start_mark)
        self._expanded[id(node)] = (values, depth)
        return node


def _too_big_message() -> str:
    return (f"the file is larger than {MAX_CONFIG_BYTES // (1024 * 1024)} MiB, the limit for a config file; "
            f"split it into several files, or move large text (prompts, data) out of it")


def _too_deep_message(aliases: bool = False) -> str:
    how = " once its aliases are expanded" if aliases else ""
    return f"lists and mappings are nested more than {MAX_YAML_DEPTH} levels deep{how}; flatten the document"


def yaml_issue(exc: yaml.YAMLError, file: str, syntax: str = "invalid YAML") -> ConfigIssue:
    """The issue to report for an error raised while parsing ``file``.

    Args:
        exc: What PyYAML or :class:`SafeConfigLoader` raised.
        file: The file, as given.
        syntax: Prefix for syntax errors (a limit error needs none: it says what it is).
    """
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 0
        if isinstance(exc, YAMLLimitError):
            return ConfigIssue(file, line, exc.problem or "")
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        return ConfigIssue(file, line, f"{syntax}: {problem}")
    return ConfigIssue(file, 0, f"{syntax}: {exc}")


def read_config_text(path: str | Path) -> tuple[str | None, list[ConfigIssue]]:
    """Read a config file as UTF-8 text, at most :data:`MAX_CONFIG_BYTES` of it.

    Returns:
        The text (``None`` when it could not be read or is too large) and the
        problem found, if any.
    """
    file = str(path)
    try:
        with open(path, "rb") as f:
            # Read one byte past the limit, never the whole file: a config path may
            # name a log, a dump or a device that never ends.
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return None, [ConfigIssue(file, 0, "file not found")]
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        return None, [ConfigIssue(file, 0, f"cannot read the file: {exc}")]
    if len(raw) > MAX_CONFIG_BYTES:
        return None, [ConfigIssue(file, 0, _too_big_message())]
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        return None, [ConfigIssue(file, 0, f"cannot read the file: {exc}")]


class _LineLoader(SafeConfigLoader):
    """SafeConfigLoader that builds LineMap/LineList and reports duplicate keys instead of hiding them."""

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
    """Parse one YAML file safely, within the config limits, keeping line numbers.

    Returns:
        The document (``None`` when it could not be read or parsed) and the
        problems found while reading it: a missing file, a syntax error with its
        line, a limit exceeded (size, aliases, nesting), duplicate keys.
    """
    file = str(path)
    text, issues = read_config_text(path)
    if text is None:
        return None, issues
    try:
        # The reader checks the text when the loader is made: a control character fails here.
        loader = _LineLoader(text)
    except yaml.YAMLError as exc:
        return None, [yaml_issue(exc, file)]
    try:
        data = loader.get_single_data()
    except yaml.YAMLError as exc:
        return None, [yaml_issue(exc, file)]
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
