"""The JSON Schema subset LLM workers use for their input and output.

Supported keywords: ``type`` (one name or a list), ``enum``, ``const``,
``properties``, ``required``, ``additionalProperties`` (bool or schema),
``items``, ``minItems``, ``maxItems``, ``uniqueItems``, ``minLength``,
``maxLength``, ``pattern``, ``minimum``, ``maximum``, ``exclusiveMinimum``,
``exclusiveMaximum``, ``anyOf``, plus the annotations ``title``,
``description``, ``default``, ``examples``, ``format`` and ``$comment``. Any
other keyword is an error when the config is checked, so a typo never turns
into a constraint that is silently ignored.

JSON types are strict: ``true`` is a boolean, never an integer or a number;
``1.0`` is an integer (as JSON Schema says) and ``1`` is a number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Schema", "SchemaViolation", "check_schema", "describe_value"]

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "format", "$comment", "$schema"})
KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "uniqueItems",
        "minLength",
        "maxLength",
        "pattern",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "anyOf",
    }
)
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")

Path = tuple[Any, ...]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list | tuple):
        return "array"
    if isinstance(v, Mapping):
        return "object"
    return type(v).__name__


def _has_type(v: Any, t: str) -> bool:
    actual = _json_type(v)
    return actual == t or (t == "number" and actual == "integer")


def _json_equal(a: Any, b: Any) -> bool:
    """Equality as JSON sees it: ``true`` is not ``1``, ``1`` is ``1.0``."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def describe_value(v: Any, limit: int = 60) -> str:
    """A short description for messages: its JSON type and a clipped repr."""
    text = repr(v)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{_json_type(v)} {text}"


def check_schema(schema: Any, path: Path = ()) -> list[tuple[Path, str]]:
    """Check that ``schema`` is a schema of the supported subset.

    Returns:
        ``(path, message)`` for every problem; ``path`` is the location inside the
        schema (keys and list indexes), so callers can find its line.
    """
    if not isinstance(schema, Mapping):
        return [(path, f"a schema must be a mapping, got {describe_value(schema)}")]
    out: list[tuple[Path, str]] = []
    for key in schema:
        if key not in KEYWORDS and key not in ANNOTATIONS:
            out.append(
                (
                    (*path, key),
                    f"unsupported schema keyword {key!r}; supported: {', '.join(sorted(KEYWORDS))} "
                    f"(and the annotations {', '.join(sorted(ANNOTATIONS))})",
                )
            )
    t = schema.get("type")
    if "type" in schema:
        names = t if isinstance(t, list) else [t]
        if not names or not all(isinstance(n, str) and n in TYPES for n in names):
            out.append(((*path, "type"), f"type must be one of {', '.join(TYPES)} (or a list of them), got {t!r}"))
    if "properties" in schema:
        props = schema["properties"]
        if not isinstance(props, Mapping):
            out.append(((*path, "properties"), "properties must map property names to schemas"))
        else:
            for name, sub in props.items():
                out.extend(check_schema(sub, (*path, "properties", name)))
    if "required" in schema:
        req = schema["required"]
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            out.append(((*path, "required"), f"required must be a list of property names, got {req!r}"))
        else:
            props = schema.get("properties")
            for i, r in enumerate(req):
                if isinstance(props, Mapping) and r not in props:
                    out.append(((*path, "required", i), f"required property {r!r} is not in properties"))
            if len(set(req)) != len(req):
                out.append(((*path, "required"), "required lists a property twice"))
    if "additionalProperties" in schema:
        ap = schema["additionalProperties"]
        if not isinstance(ap, bool):
            out.extend(check_schema(ap, (*path, "additionalProperties")))
    if "items" in schema:
        items = schema["items"]
        if isinstance(items, list):
            out.append(((*path, "items"), "items must be one schema (tuple validation is not supported)"))
        else:
            out.extend(check_schema(items, (*path, "items")))
    if "enum" in schema:
        enum = schema["enum"]
        if not isinstance(enum, list) or not enum:
            out.append(((*path, "enum"), f"enum must be a non-empty list of allowed values, got {enum!r}"))
    for key in _COUNTS:
        if key in schema:
            v = schema[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                out.append(((*path, key), f"{key} must be an integer >= 0, got {v!r}"))
    for key in _BOUNDS:
        if key in schema and not _is_number(schema[key]):
            out.append(((*path, key), f"{key} must be a number, got {schema[key]!r}"))
    if "uniqueItems" in schema and not isinstance(schema["uniqueItems"], bool):
        out.append(((*path, "uniqueItems"), "uniqueItems must be true or false"))
    if "pattern" in schema:
        pat = schema["pattern"]
        if not isinstance(pat, str):
            out.append(((*path, "pattern"), f"pattern must be a regular expression string, got {pat!r}"))
        else:
            try:
                re.compile(pat)
            except re.error as exc:
                out.append(((*path, "pattern"), f"pattern is not a valid regular expression: {exc}"))
    if "anyOf" in schema:
        any_of = schema["anyOf"]
        if not isinstance(any_of, list) or not any_of:
            out.append(((*path, "anyOf"), "anyOf must be a non-empty list of schemas"))
        else:
            for i, sub in enumerate(any_of):
                out.extend(check_schema(sub, (*path, "anyOf", i)))
    return out


@dataclass(frozen=True)
class SchemaViolation:
    """One way an instance fails its schema.

    Attributes:
        path: JSON path of the offending value (``$.items[2].name``).
        message: What is wrong with it.
    """

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class Schema:
    """A checked schema, compiled once (regexes), that validates instances.

    Args:
        schema: A schema of the supported subset; check it with :func:`check_schema` first.

    Example:
        >>> Schema({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}).errors({"n": True})
        [SchemaViolation(path='$.n', message='expected integer, got boolean True')]
    """

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = schema
        self._patterns: dict[str, re.Pattern[str]] = {}
        self._compile(schema)

    def _compile(self, s: Any) -> None:
        if not isinstance(s, Mapping):
            return
        pat = s.get("pattern")
        if isinstance(pat, str):
            self._patterns[pat] = re.compile(pat)
        for sub in (s.get("properties") or {}).values() if isinstance(s.get("properties"), Mapping) else ():
            self._compile(sub)
        for key in ("items", "additionalProperties"):
            self._compile(s.get(key))
        for sub in s.get("anyOf") or ():
            self._compile(sub)

    def __repr__(self) -> str:
        return f"<Schema {self.schema.get('type', 'any')}>"

    def errors(self, instance: Any) -> list[SchemaViolation]:
        """Every violation of the schema by ``instance`` (empty when it is valid)."""
        out: list[SchemaViolation] = []
        self._validate(instance, self.schema, "$", out)
        return out

    def is_valid(self, instance: Any) -> bool:
        """Whether ``instance`` matches the schema."""
        return not self.errors(instance)

    def _validate(self, v: Any, s: Any, path: str, out: list[SchemaViolation]) -> None:
        if not isinstance(s, Mapping):
            return
        t = s.get("type")
        if t is not None:
            names = t if isinstance(t, list) else [t]
            if not any(_has_type(v, n) for n in names):
                out.append(SchemaViolation(path, f"expected {' or '.join(names)}, got {describe_value(v)}"))
                return
        if "const" in s and not _json_equal(v, s["const"]):
            out.append(SchemaViolation(path, f"must be {s['const']!r}, got {describe_value(v)}"))
        if "enum" in s and not any(_json_equal(v, e) for e in s["enum"]):
            out.append(SchemaViolation(path, f"{v!r} is not one of {s['enum']!r}"))
        if "anyOf" in s:
            branches = []
            for sub in s["anyOf"]:
                sub_out: list[SchemaViolation] = []
                self._validate(v, sub, path, sub_out)
                if not sub_out:
                    break
                branches.append("; ".join(e.message for e in sub_out))
            else:
                out.append(SchemaViolation(path, f"matches none of anyOf: {' | '.join(branches)}"))
        if isinstance(v, Mapping):
            self._object(v, s, path, out)
        elif isinstance(v, list | tuple):
            self._array(v, s, path, out)
        elif isinstance(v, str):
            self._string(v, s, path, out)
        elif _is_number(v):
            self._number(v, s, path, out)

    def _object(self, v: Mapping[str, Any], s: Mapping[str, Any], path: str, out: list[SchemaViolation]) -> None:
        props = s.get("properties") or {}
        for name in s.get("required") or ():
            if name not in v:
                out.append(SchemaViolation(path, f"missing required property {name!r}"))
        extra = s.get("additionalProperties", True)
        for key, value in v.items():
            sub_path = f"{path}.{key}" if isinstance(key, str) and key.isidentifier() else f"{path}[{key!r}]"
            if key in props:
                self._validate(value, props[key], sub_path, out)
            elif extra is False:
                allowed = ", ".join(map(repr, props)) or "none"
                out.append(SchemaViolation(path, f"unexpected property {key!r} (allowed: {allowed})"))
            elif isinstance(extra, Mapping):
                self._validate(value, extra, sub_path, out)

    def _array(self, v: Any, s: Mapping[str, Any], path: str, out: list[SchemaViolation]) -> None:
        if "minItems" in s and len(v) < s["minItems"]:
            out.append(SchemaViolation(path, f"has {len(v)} item(s), fewer than minItems {s['minItems']}"))
        if "maxItems" in s and len(v) > s["maxItems"]:
            out.append(SchemaViolation(path, f"has {len(v)} item(s), more than maxItems {s['maxItems']}"))
        if s.get("uniqueItems"):
            for i, item in enumerate(v):
                if any(_json_equal(item, other) for other in v[:i]):
                    out.append(SchemaViolation(f"{path}[{i}]", "repeats an earlier item (uniqueItems)"))
        items = s.get("items")
        if items is not None:
            for i, item in enumerate(v):
                self._validate(item, items, f"{path}[{i}]", out)

    def _string(self, v: str, s: Mapping[str, Any], path: str, out: list[SchemaViolation]) -> None:
        if "minLength" in s and len(v) < s["minLength"]:
            out.append(SchemaViolation(path, f"is {len(v)} characters, shorter than minLength {s['minLength']}"))
        if "maxLength" in s and len(v) > s["maxLength"]:
            out.append(SchemaViolation(path, f"is {len(v)} characters, longer than maxLength {s['maxLength']}"))
        pat = s.get("pattern")
        if isinstance(pat, str) and not self._patterns[pat].search(v):
            out.append(SchemaViolation(path, f"{v!r} does not match pattern {pat!r}"))

    def _number(self, v: float, s: Mapping[str, Any], path: str, out: list[SchemaViolation]) -> None:
        if isinstance(v, float) and not math.isfinite(v):
            out.append(SchemaViolation(path, f"{v!r} is not a finite number"))
            return
        if "minimum" in s and v < s["minimum"]:
            out.append(SchemaViolation(path, f"{v!r} is less than minimum {s['minimum']!r}"))
        if "maximum" in s and v > s["maximum"]:
            out.append(SchemaViolation(path, f"{v!r} is greater than maximum {s['maximum']!r}"))
        if "exclusiveMinimum" in s and v <= s["exclusiveMinimum"]:
            out.append(SchemaViolation(path, f"{v!r} must be greater than {s['exclusiveMinimum']!r}"))
        if "exclusiveMaximum" in s and v >= s["exclusiveMaximum"]:
            out.append(SchemaViolation(path, f"{v!r} must be less than {s['exclusiveMaximum']!r}"))
