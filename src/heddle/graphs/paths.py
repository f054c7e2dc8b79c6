"""Paths and conditions of pipeline stages.

A *path* names a value the orchestrator knows when a stage becomes ready:

* ``goal.context`` and below (``goal.context.text``): the input given at submission;
* ``goal.id``: the goal's id;
* ``STAGE.output`` and below (``extract.output.claims.0``): a finished stage's output.

Segments after ``context`` / ``output`` are dict keys, or list indexes when
they are whole numbers. In an ``input_mapping`` a string is a path unless it is
quoted (``"'English'"``): then it is a literal string, or, when its content is a
JSON array or object (``'["a", "b"]'``), that value. Other YAML values
(numbers, booleans, lists, mappings) are literals as written.

A *condition* is an expression over paths, a small and safe subset of Python's
syntax: comparisons (``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, ``in``,
``not in``), ``and`` / ``or`` / ``not``, literals (strings, numbers,
``true``/``false``/``null`` or ``True``/``False``/``None``, lists),
``len(path)`` and ``path[0]``. A bare path is true when its value is truthy.
Nothing else is accepted, so a pipeline file can never run code.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from heddle.errors import ConfigError

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONSTANTS = {"true": True, "false": False, "null": None, "none": None, "True": True, "False": False, "None": None}
RESERVED_NAMES = frozenset({"goal", "len", *_CONSTANTS})


class PathError(ConfigError, ValueError):
    """Raised when a path or condition is malformed, or names a value that is not there."""


@dataclass(frozen=True)
class Ref:
    """A path: ``root`` is ``goal`` or a stage name; ``segments`` follow ``context``/``output``/``id``."""

    root: str
    field: str  # "context", "id" or "output"
    segments: tuple[str, ...] = ()

    @property
    def stage(self) -> str | None:
        """The stage this path reads from, or None for ``goal.*``."""
        return None if self.root == "goal" else self.root

    def __str__(self) -> str:
        return ".".join((self.root, self.field, *self.segments))


@dataclass(frozen=True)
class Literal:
    """A value written in the pipeline file."""

    value: Any


Mapped = Ref | Literal


def is_identifier(name: str) -> bool:
    """True if ``name`` can be a stage name (and so the root of a path)."""
    return bool(_IDENT_RE.match(name)) and name not in RESERVED_NAMES


def parse_path(text: str) -> Ref:
    """Parse ``goal.context.x`` / ``stage.output.y``; raise PathError naming the fix."""
    parts = text.strip().split(".")
    if len(parts) < 2 or any(p == "" for p in parts):
        raise PathError(
            f"{text!r} is not a path; write goal.context.NAME or STAGE.output.NAME"
        )
    root, fld, rest = parts[0], parts[1], tuple(parts[2:])
    if root == "goal":
        if fld not in ("context", "id"):
            raise PathError(f"{text!r}: after 'goal.' comes 'context' (the submitted input) or 'id'")
        if fld == "id" and rest:
            raise PathError(f"{text!r}: goal.id has no fields")
        return Ref(root, fld, rest)
    if not _IDENT_RE.match(root):
        raise PathError(f"{text!r}: {root!r} is not a stage name (letters, digits and '_')")
    if fld != "output":
        raise PathError(f"{text!r}: after a stage name comes 'output', as in {root}.output.NAME")
    return Ref(root, fld, rest)


def parse_mapped(value: Any) -> Mapped:
    """An ``input_mapping`` / ``output_mapping`` value: a path, or a literal."""
    if not isinstance(value, str):
        return Literal(value)
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        inner = text[1:-1]
        if inner[:1] in ("[", "{"):
            try:
                return Literal(json.loads(inner))
            except ValueError:
                pass
        return Literal(inner)
    try:
        return parse_path(text)
    except PathError as exc:
        raise PathError(f"{exc}; for literal text use quotes, e.g. \"'{text}'\"") from None


def resolve(ref: Ref, scope: dict[str, Any]) -> Any:
    """The value at ``ref``; raise PathError saying what is there instead."""
    if ref.root == "goal":
        value: Any = scope["goal"][ref.field]
    else:
        if ref.root not in scope:
            raise PathError(f"{ref}: stage {ref.root!r} has no output")
        value = scope[ref.root]
    where = f"{ref.root}.{ref.field}"
    for seg in ref.segments:
        if isinstance(value, dict):
            if seg not in value:
                keys = ", ".join(map(str, list(value)[:20])) or "none"
                raise PathError(f"{ref}: {where} has no key {seg!r} (keys: {keys})")
            value = value[seg]
        elif isinstance(value, list | tuple):
            if not seg.lstrip("-").isdigit() or not -len(value) <= int(seg) < len(value):
                raise PathError(f"{ref}: {where} is a list of {len(value)}; {seg!r} is not an index in it")
            value = value[int(seg)]
        else:
            raise PathError(f"{ref}: {where} is {type(value).__name__} ({value!r:.60}), not a mapping or list")
        where = f"{where}.{seg}"
    return value


def value_of(mapped: Mapped, scope: dict[str, Any]) -> Any:
    """Resolve a mapped value."""
    return mapped.value if isinstance(mapped, Literal) else resolve(mapped, scope)


# -- conditions -------------------------------------------------------------------------

_CMP = {
    ast.Eq: lambda a, b: a == b,
    ast.NotEq: lambda a, b: a != b,
    ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b,
    ast.Gt: lambda a, b: a > b,
    ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
    ast.Is: lambda a, b: a is b,
    ast.IsNot: lambda a, b: a is not b,
}


@dataclass(frozen=True)
class Condition:
    """A compiled condition: its source, checked syntax tree, and the paths it reads."""

    source: str
    tree: ast.expr
    refs: tuple[Ref, ...] = field(default=())

    @property
    def stages(self) -> set[str]:
        """Stages whose outputs the condition reads."""
        return {r.root for r in self.refs if r.stage is not None}

    def evaluate(self, scope: dict[str, Any]) -> bool:
        """True if the stage should run."""
        try:
            return bool(_eval(self.tree, scope))
        except PathError:
            raise
        except Exception as exc:  # e.g. comparing a str with an int
            raise PathError(f"condition {self.source!r} failed: {type(exc).__name__}: {exc}") from None


def compile_condition(source: str) -> Condition:
    """Parse and check a condition; raise PathError naming what is not allowed."""
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except SyntaxError as exc:
        raise PathError(f"condition {source!r} is not a valid expression: {exc.msg}") from None
    refs: list[Ref] = []
    _check(tree, source, refs)
    return Condition(source, tree, tuple(refs))


def _dotted(node: ast.expr) -> list[str] | None:
    """``a.b[0].c`` as ["a", "b", "0", "c"], or None if it is not a plain path."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else [*base, node.attr]
    if isinstance(node, ast.Subscript):
        base = _dotted(node.value)
        key = node.slice
        if base is None or not isinstance(key, ast.Constant) or not isinstance(key.value, int | str):
            return None
        return [*base, str(key.value)]
    return None


def _check(node: ast.expr, source: str, refs: list[Ref]) -> None:
    if isinstance(node, ast.Constant):
        return
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return
    if isinstance(node, ast.Name | ast.Attribute | ast.Subscript):
        parts = _dotted(node)
        if parts is None:
            raise PathError(f"condition {source!r}: only plain paths like stage.output.key or x[0] are allowed")
        refs.append(parse_path(".".join(parts)))
        return
    if isinstance(node, ast.BoolOp):
        for v in node.values:
            _check(v, source, refs)
        return
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        _check(node.operand, source, refs)
        return
    if isinstance(node, ast.Compare):
        if not all(type(op) in _CMP for op in node.ops):
            raise PathError(f"condition {source!r}: unsupported comparison")
        for v in [node.left, *node.comparators]:
            _check(v, source, refs)
        return
    if isinstance(node, ast.List | ast.Tuple):
        for v in node.elts:
            _check(v, source, refs)
        return
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "len"
        and len(node.args) == 1
        and not node.keywords
    ):
        _check(node.args[0], source, refs)
        return
    raise PathError(
        f"condition {source!r}: {type(node).__name__} is not allowed; use paths, literals, "
        f"comparisons, and/or/not, len() and [index]"
    )


def _eval(node: ast.expr, scope: dict[str, Any]) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.Name | ast.Attribute | ast.Subscript):
        parts = _dotted(node)
        assert parts is not None  # checked at compile time
        return resolve(parse_path(".".join(parts)), scope)
    if isinstance(node, ast.BoolOp):
        if isinstance(node.op, ast.And):
            out: Any = True
            for v in node.values:
                out = _eval(v, scope)
                if not out:
                    return out
            return out
        out = False
        for v in node.values:
            out = _eval(v, scope)
            if out:
                return out
        return out
    if isinstance(node, ast.UnaryOp):
        val = _eval(node.operand, scope)
        return (not val) if isinstance(node.op, ast.Not) else -val
    if isinstance(node, ast.Compare):
        left = _eval(node.left, scope)
        for op, comp in zip(node.ops, node.comparators, strict=True):
            right = _eval(comp, scope)
            compare: Callable[[Any, Any], bool] = _CMP[type(op)]
            if not compare(left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.List | ast.Tuple):
        return [_eval(v, scope) for v in node.elts]
    if isinstance(node, ast.Call):
        return len(_eval(node.args[0], scope))
    raise PathError(f"cannot evaluate {type(node).__name__}")  # pragma: no cover - rejected at compile


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
