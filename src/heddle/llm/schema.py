"""JSON Schema (draft 2020-12) for LLM workers' input and output, validated by ``jsonschema``.

Every keyword of draft 2020-12 is accepted: ``$defs``/``$ref``,
``oneOf``/``anyOf``/``allOf``/``not``, ``if``/``then``/``else``, ``enum``,
``const``, ``pattern``, numeric bounds and ``multipleOf``, length and size
bounds, ``prefixItems``, ``patternProperties``, ``dependentRequired``... plus
the annotations (``title``, ``description``, ``format``...). ``format`` is an
annotation, as 2020-12 says: it is shown to the model, not asserted.

:func:`check_schema` is stricter than the metaschema in three ways, so a typo
never turns into a constraint that is silently ignored: an unknown keyword is
an error (with a did-you-mean), a ``$ref`` must point inside the schema
(Heddle never fetches schemas over the network), and a ``required`` name
missing from the same object's ``properties`` is an error.

Violations come out in the order of the instance (the first broken field of
a reply comes first), each with its JSON path (``$.points[1].label``), the
keyword it broke and a message in plain words. JSON types are strict:
``true`` is a boolean, never an integer or a number; ``1.0`` is an integer.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

__all__ = ["Schema", "SchemaViolation", "check_schema", "describe_value", "is_recursive", "json_path"]

TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")
ANNOTATIONS = frozenset(
    {
        "title", "description", "default", "examples", "format", "$comment", "$schema", "$id", "$anchor",
        "$vocabulary", "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType",
    }
)
# Draft 2020-12's assertion and applicator keywords ("definitions" is draft 7's
# $defs; local references into it resolve the same way).
KEYWORDS = frozenset(
    {
        "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
        "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "maxContains", "minContains",
        "maxProperties", "minProperties", "required", "dependentRequired",
        "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "dependentSchemas", "prefixItems", "items",
        "contains", "properties", "patternProperties", "additionalProperties", "propertyNames",
        "unevaluatedItems", "unevaluatedProperties", "contentSchema",
        "$ref", "$defs", "definitions", "$dynamicRef", "$dynamicAnchor",
    }
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SCHEMA_ONE = ("not", "if", "then", "else", "items", "contains", "additionalProperties", "propertyNames",
               "unevaluatedItems", "unevaluatedProperties", "contentSchema")
_COUNTS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties", "minContains",
           "maxContains")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_META = Draft202012Validator(Draft202012Validator.META_SCHEMA)

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


def describe_value(v: Any, limit: int = 60) -> str:
    """A short description for messages: its JSON type and a clipped repr."""
    text = repr(v)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{_json_type(v)} {text}"


def json_path(path: Sequence[Any]) -> str:
    """``("points", 1, "label")`` -> ``$.points[1].label`` (odd keys quoted: ``$['a b']``)."""
    out = "$"
    for step in path:
        if isinstance(step, int):
            out += f"[{step}]"
        elif isinstance(step, str) and step.isidentifier():
            out += f".{step}"
        else:
            out += f"[{step!r}]"
    return out


# -- checking a schema -----------------------------------------------------------------


def check_schema(schema: Any, path: Path = ()) -> list[tuple[Path, str]]:
    """Check that ``schema`` is a JSON Schema (draft 2020-12) Heddle can validate with.

    Returns:
        ``(path, message)`` for every problem; ``path`` is the location inside the
        schema (keys and list indexes), so callers can find its line.
    """
    if isinstance(schema, bool):
        return []
    if not isinstance(schema, Mapping):
        return [(path, f"a schema must be a mapping, got {describe_value(schema)}")]
    out: list[tuple[Path, str]] = []
    _check_node(schema, path, out)
    _check_refs(schema, schema, path, out)
    reported = [p for p, _ in out]
    for err in _META.iter_errors(schema):
        where = (*path, *err.absolute_path)
        if any(where[: len(p)] == p for p in reported):
            continue
        reported.append(where)
        out.append((where, f"not valid JSON Schema: {err.message}"))
    return out


def _check_node(s: Any, path: Path, out: list[tuple[Path, str]]) -> None:
    if isinstance(s, bool):
        return
    if not isinstance(s, Mapping):
        out.append((path, f"a schema must be a mapping (or true/false), got {describe_value(s)}"))
        return
    for key in s:
        if key not in KEYWORDS and key not in ANNOTATIONS:
            close = difflib.get_close_matches(str(key), sorted(KEYWORDS | ANNOTATIONS), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else " (see docs/llm.md for the keywords)"
            out.append(((*path, key), f"unsupported schema keyword {key!r}: not JSON Schema 2020-12{hint}"))
    if "type" in s:
        t = s["type"]
        names = t if isinstance(t, list) else [t]
        if not names or not all(isinstance(n, str) and n in TYPES for n in names):
            out.append(((*path, "type"), f"type must be one of {', '.join(TYPES)} (or a list of them), got {t!r}"))
    if "required" in s:
        req = s["required"]
        if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
            out.append(((*path, "required"), f"required must be a list of property names, got {req!r}"))
        else:
            props = s.get("properties")
            if isinstance(props, Mapping) and "patternProperties" not in s:
                for i, r in enumerate(req):
                    if r not in props:
                        close = difflib.get_close_matches(r, [str(p) for p in props], n=1)
                        hint = f"; did you mean {close[0]!r}?" if close else ""
                        out.append(((*path, "required", i), f"required property {r!r} is not in properties{hint}"))
            if len(set(req)) != len(req):
                out.append(((*path, "required"), "required lists a property twice"))
    if "enum" in s:
        enum = s["enum"]
        if not isinstance(enum, list) or not enum:
            out.append(((*path, "enum"), f"enum must be a non-empty list of allowed values, got {enum!r}"))
    for key in _COUNTS:
        if key in s:
            v = s[key]
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                out.append(((*path, key), f"{key} must be an integer >= 0, got {v!r}"))
    for key in _BOUNDS:
        if key in s and not _is_number(s[key]):
            out.append(((*path, key), f"{key} must be a number, got {s[key]!r}"))
    if "multipleOf" in s and not (_is_number(s["multipleOf"]) and s["multipleOf"] > 0):
        out.append(((*path, "multipleOf"), f"multipleOf must be a number > 0, got {s['multipleOf']!r}"))
    if "uniqueItems" in s and not isinstance(s["uniqueItems"], bool):
        out.append(((*path, "uniqueItems"), "uniqueItems must be true or false"))
    if "pattern" in s:
        _check_regex(s["pattern"], (*path, "pattern"), "pattern", out)
    if isinstance(s.get("patternProperties"), Mapping):
        for pat in s["patternProperties"]:
            _check_regex(pat, (*path, "patternProperties", pat), "a patternProperties key", out)
    if isinstance(s.get("items"), list):
        out.append(((*path, "items"), "items must be one schema; for a tuple, list the schemas under prefixItems"))
    for key in _SCHEMA_MAPS:
        sub = s.get(key)
        if key in s and not isinstance(sub, Mapping):
            out.append(((*path, key), f"{key} must map names to schemas, got {describe_value(sub)}"))
        elif isinstance(sub, Mapping):
            for name, child in sub.items():
                _check_node(child, (*path, key, name), out)
    for key in _SCHEMA_LISTS:
        sub = s.get(key)
        if key in s and (not isinstance(sub, list) or not sub):
            out.append(((*path, key), f"{key} must be a non-empty list of schemas"))
        elif isinstance(sub, list):
            for i, child in enumerate(sub):
                _check_node(child, (*path, key, i), out)
    for key in _SCHEMA_ONE:
        if key in s and not (key == "items" and isinstance(s[key], list)):
            _check_node(s[key], (*path, key), out)


def _check_regex(pat: Any, path: Path, what: str, out: list[tuple[Path, str]]) -> None:
    if not isinstance(pat, str):
        out.append((path, f"{what} must be a regular expression string, got {pat!r}"))
        return
    try:
        re.compile(pat)
    except re.error as exc:
        out.append((path, f"{what} is not a valid regular expression: {exc}"))


def _subschemas(s: Mapping[str, Any], path: Path) -> Iterator[tuple[Any, Path]]:
    for key in _SCHEMA_MAPS:
        if isinstance(s.get(key), Mapping):
            for name, child in s[key].items():
                yield child, (*path, key, name)
    for key in _SCHEMA_LISTS:
        if isinstance(s.get(key), list):
            for i, child in enumerate(s[key]):
                yield child, (*path, key, i)
    for key in _SCHEMA_ONE:
        if key in s:
            yield s[key], (*path, key)


def _anchors(s: Any) -> set[str]:
    if not isinstance(s, Mapping):
        return set()
    found = {s["$anchor"]} if isinstance(s.get("$anchor"), str) else set()
    for child, _ in _subschemas(s, ()):
        found |= _anchors(child)
    return found


def _check_refs(root: Mapping[str, Any], s: Any, path: Path, out: list[tuple[Path, str]]) -> None:
    if not isinstance(s, Mapping):
        return
    ref = s.get("$ref")
    if "$ref" in s:
        problem = _ref_problem(root, ref)
        if problem:
            out.append(((*path, "$ref"), problem))
    for child, where in _subschemas(s, path):
        _check_refs(root, child, where, out)


def _ref_problem(root: Mapping[str, Any], ref: Any) -> str | None:
    if not isinstance(ref, str):
        return f"$ref must be a string such as '#/$defs/Name', got {ref!r}"
    if not ref.startswith("#"):
        return f"$ref {ref!r} points outside this schema; only local references ('#/$defs/Name') are supported"
    if ref != "#" and not ref.startswith("#/"):
        anchors = sorted(_anchors(root))
        if ref[1:] not in anchors:
            close = difflib.get_close_matches(ref[1:], anchors, n=1)
            hint = f"; did you mean '#{close[0]}'?" if close else ""
            return f"$ref {ref!r} names no $anchor of this schema{hint}"
        return None
    node, missing = _follow(root, ref)
    if missing is not None:
        names = [str(k) for k in node] if isinstance(node, Mapping) else []
        close = difflib.get_close_matches(missing, names, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"$ref {ref!r} does not resolve: there is no {missing!r} there{hint}"
    return None


def _follow(root: Any, ref: str) -> tuple[Any, str | None]:
    """Follow a local JSON pointer ``ref`` (``#/a/b``) from ``root``.

    Returns the node it names and None, or the last node reached and the step
    that is not there.
    """
    node: Any = root
    for raw in ref[1:].split("/")[1:] if ref != "#" else []:
        step = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and step in node:
            node = node[step]
        elif isinstance(node, list) and step.isdigit() and int(step) < len(node):
            node = node[int(step)]
        else:
            return node, step
    return node, None


def is_recursive(schema: Mapping[str, Any]) -> bool:
    """Whether following the schema's local ``$ref`` s can lead back to where it started."""

    def target(ref: str) -> Any:
        node, missing = _follow(schema, ref)
        return None if missing is not None else node

    def walk(s: Any, expanding: tuple[str, ...]) -> bool:
        if not isinstance(s, Mapping):
            return False
        ref = s.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            if ref in expanding:
                return True
            if walk(target(ref), (*expanding, ref)):
                return True
        return any(walk(child, expanding) for child, _ in _subschemas(s, ()))

    return walk(schema, ())


# -- validating instances ---------------------------------------------------------------


@dataclass(frozen=True)
class SchemaViolation:
    """One way an instance fails its schema.

    Attributes:
        path: JSON path of the offending value (``$.items[2].name``).
        message: What is wrong with it.
        rule: The schema keyword it broke (``maxLength``, ``required``, ``type``...), or
            for a Pydantic model the error type (``string_too_long``, ``value_error``).
    """

    path: str
    message: str
    rule: str = field(default="", compare=False)
    order: tuple[int, ...] = field(default=(), compare=False, repr=False)

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _order(instance: Any, path: Sequence[Any]) -> tuple[int, ...]:
    """Where ``path`` is in ``instance``, in document order (a missing key sorts after its siblings)."""
    out: list[int] = []
    node = instance
    for step in path:
        if isinstance(node, Mapping):
            keys = list(node)
            out.append(keys.index(step) if step in node else len(keys))
            node = node.get(step)
        elif isinstance(node, list | tuple) and isinstance(step, int) and step < len(node):
            out.append(step)
            node = node[step]
        else:
            out.append(1 << 30)
            node = None
    return tuple(out)


class Schema:
    """A checked JSON Schema that validates instances (draft 2020-12, by ``jsonschema``).

    Args:
        schema: A JSON Schema; check it with :func:`check_schema` first.

    Example:
        >>> Schema({"type": "object", "required": ["n"], "properties": {"n": {"type": "integer"}}}).errors({"n": True})
        [SchemaViolation(path='$.n', message='expected integer, got boolean True')]
    """

    def __init__(self, schema: Mapping[str, Any]) -> None:
        self.schema = schema
        self._validator = Draft202012Validator(schema)

    def __repr__(self) -> str:
        kind = self.schema.get("title") or self.schema.get("type", "any")
        return f"<Schema {kind}>"

    def errors(self, instance: Any) -> list[SchemaViolation]:
        """Every violation of the schema by ``instance`` (empty when it is valid), first broken field first."""
        out: list[SchemaViolation] = []
        for err in self._validator.iter_errors(instance):
            out.extend(_violations(err, instance))
        out.sort(key=lambda v: v.order)
        return out

    def parse(self, instance: Any) -> tuple[Any, list[SchemaViolation]]:
        """``(value, [])`` when ``instance`` is valid (the value the task returns), else ``(None, violations)``."""
        errors = self.errors(instance)
        return (None, errors) if errors else (instance, [])

    def is_valid(self, instance: Any) -> bool:
        """Whether ``instance`` matches the schema."""
        return not self.errors(instance)


def _violations(err: ValidationError, root: Any) -> list[SchemaViolation]:
    """Plain-words violations for one ``jsonschema`` error (one per missing or unexpected property)."""
    steps = list(err.absolute_path)
    rule = str(err.validator) if err.validator is not None else "false"
    v, want = err.instance, err.validator_value

    def one(message: str, at: Sequence[Any] = steps) -> list[SchemaViolation]:
        return [SchemaViolation(json_path(at), message, rule, _order(root, at))]

    if rule == "type":
        names = want if isinstance(want, list) else [want]
        return one(f"expected {' or '.join(names)}, got {describe_value(v)}")
    if rule == "enum":
        return one(f"{v!r} is not one of {want!r}")
    if rule == "const":
        return one(f"must be {want!r}, got {describe_value(v)}")
    if rule == "required" and isinstance(v, Mapping):
        # jsonschema reports each missing name as its own error, "'name' is a required property".
        name = next((n for n in want if n not in v and err.message == f"{n!r} is a required property"), None)
        if name is not None:
            return [SchemaViolation(json_path(steps), f"missing required property {name!r}", rule,
                                    _order(root, [*steps, name]))]
    if rule == "additionalProperties" and want is False and isinstance(v, Mapping):
        props = err.schema.get("properties") or {} if isinstance(err.schema, Mapping) else {}
        patterns = [re.compile(p) for p in (err.schema.get("patternProperties") or {})]
        allowed = ", ".join(map(repr, props)) or "none"
        extras = [k for k in v if k not in props and not any(p.search(str(k)) for p in patterns)]
        return [SchemaViolation(json_path(steps), f"unexpected property {k!r} (allowed: {allowed})", rule,
                                _order(root, [*steps, k])) for k in extras]
    if rule in ("minItems", "maxItems") and isinstance(v, list | tuple):
        word = "fewer" if rule == "minItems" else "more"
        return one(f"has {len(v)} item(s), {word} than {rule} {want}")
    if rule == "uniqueItems" and isinstance(v, list | tuple):
        seen: list[Any] = []
        for i, item in enumerate(v):
            if any(_json_equal(item, other) for other in seen):
                return one("repeats an earlier item (uniqueItems)", [*steps, i])
            seen.append(item)
    if rule in ("minLength", "maxLength") and isinstance(v, str):
        word = "shorter" if rule == "minLength" else "longer"
        return one(f"is {len(v)} characters, {word} than {rule} {want}")
    if rule == "pattern":
        return one(f"{v!r} does not match pattern {want!r}")
    if rule == "minimum":
        return one(f"{v!r} is less than minimum {want!r}")
    if rule == "maximum":
        return one(f"{v!r} is greater than maximum {want!r}")
    if rule == "exclusiveMinimum":
        return one(f"{v!r} must be greater than {want!r} (exclusiveMinimum)")
    if rule == "exclusiveMaximum":
        return one(f"{v!r} must be less than {want!r} (exclusiveMaximum)")
    if rule == "multipleOf":
        return one(f"{v!r} is not a multiple of {want!r}")
    if rule in ("anyOf", "oneOf"):
        if rule == "oneOf" and not err.context:
            return one("matches more than one branch of oneOf (it must match exactly one)")
        return one(f"matches none of {rule}: {_branches(err, root, steps)}")
    if rule == "not":
        return one(f"{describe_value(v)} must not match the schema under 'not'")
    if rule == "false":
        return one("is not allowed here (its schema is false)")
    return one(err.message)


def _branches(err: ValidationError, root: Any, steps: Sequence[Any]) -> str:
    """What each branch of a failed anyOf/oneOf said, branch by branch."""
    by_branch: dict[Any, list[str]] = {}
    for sub in err.context or ():
        branch = sub.relative_schema_path[0] if sub.relative_schema_path else 0
        for violation in _violations(sub, root):
            here = violation.path == json_path(steps)
            by_branch.setdefault(branch, []).append(violation.message if here else str(violation))
    ordered = sorted(by_branch.items(), key=lambda kv: (not isinstance(kv[0], int), kv[0] if isinstance(kv[0], int)
                                                         else 0, str(kv[0])))
    return " | ".join("; ".join(messages) for _, messages in ordered)


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
