"""The JSON Schema validator (draft 2020-12, by jsonschema) and JSON extraction from model replies."""

from __future__ import annotations

import pytest

from heddle.llm.extract import NoJSONFound, extract_json
from heddle.llm.schema import Schema, check_schema

ORDER = {
    "type": "object",
    "required": ["id", "paid", "items", "customer"],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "paid": {"type": "boolean"},
        "total": {"type": "number", "exclusiveMinimum": 0},
        "status": {"enum": ["new", "shipped"]},
        "note": {"type": ["string", "null"], "maxLength": 5},
        "code": {"type": "string", "pattern": "^[A-Z]{3}$"},
        "customer": {
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string", "minLength": 1}, "vip": {"const": True}},
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "uniqueItems": True,
            "items": {"type": "object", "required": ["sku"], "properties": {"sku": {"type": "string"}}},
        },
        "ref": {"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 2}]},
    },
}
VALID = {"id": 7, "paid": False, "items": [{"sku": "a"}], "customer": {"name": "Ada"}}


def errors(instance):
    return [str(e) for e in Schema(ORDER).errors(instance)]


def test_a_valid_instance_has_no_errors():
    assert check_schema(ORDER) == []
    assert errors(VALID) == []
    assert errors({**VALID, "total": 1.5, "status": "new", "note": None, "code": "ABC", "ref": "xy",
                   "customer": {"name": "Ada", "vip": True}}) == []
    assert errors({**VALID, "id": 3.0}) == []  # JSON Schema: 3.0 is an integer


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"id": True}, "$.id: expected integer, got boolean True"),
        ({"id": 1.5}, "$.id: expected integer, got number 1.5"),
        ({"paid": 0}, "$.paid: expected boolean, got integer 0"),
        ({"total": True}, "$.total: expected number, got boolean True"),
        ({"total": 0}, "$.total: 0 must be greater than 0"),
        ({"id": 0}, "$.id: 0 is less than minimum 1"),
        ({"status": "lost"}, "$.status: 'lost' is not one of ['new', 'shipped']"),
        ({"note": "too long"}, "$.note: is 8 characters, longer than maxLength 5"),
        ({"note": 3}, "$.note: expected string or null, got integer 3"),
        ({"code": "abc"}, "$.code: 'abc' does not match pattern '^[A-Z]{3}$'"),
        ({"customer": {}}, "$.customer: missing required property 'name'"),
        ({"customer": {"name": ""}}, "$.customer.name: is 0 characters, shorter than minLength 1"),
        ({"customer": {"name": "x", "vip": 1}}, "$.customer.vip: must be True, got integer 1"),
        ({"items": []}, "$.items: has 0 item(s), fewer than minItems 1"),
        ({"items": [{"sku": "a"}] * 2}, "$.items[1]: repeats an earlier item (uniqueItems)"),
        ({"items": [{"sku": "a"}, {"sku": 5}]}, "$.items[1].sku: expected string, got integer 5"),
        ({"items": [{"sku": str(i)} for i in range(4)]}, "$.items: has 4 item(s), more than maxItems 3"),
        ({"ref": "x"}, "$.ref: matches none of anyOf"),
        ({"extra": 1}, "$: unexpected property 'extra'"),
    ],
)
def test_each_violation_is_reported_with_its_json_path(change, expected):
    found = errors({**VALID, **change})
    assert any(e.startswith(expected) for e in found), found


def test_every_violation_is_reported_not_only_the_first():
    found = errors({"id": "7", "paid": None, "items": "x"})
    assert "$: missing required property 'customer'" in found
    assert "$.id: expected integer, got string '7'" in found
    assert "$.paid: expected boolean, got null None" in found
    assert "$.items: expected array, got string 'x'" in found


def test_an_enum_of_numbers_does_not_accept_booleans():
    schema = Schema({"enum": [0, 1]})
    assert schema.is_valid(1) and schema.is_valid(1.0)
    assert not schema.is_valid(True) and not schema.is_valid(False)


def test_unknown_keywords_are_schema_errors_with_their_path_and_a_hint():
    problems = check_schema({"type": "object", "properties": {"a": {"type": "string", "format": "email",
                                                                     "maxLenght": 3}}})
    assert problems == [(("properties", "a", "maxLenght"), problems[0][1])]
    assert "unsupported schema keyword 'maxLenght'" in problems[0][1]
    assert "did you mean 'maxLength'?" in problems[0][1]


# Full JSON Schema 2020-12: $defs/$ref, oneOf/anyOf/allOf, const, prefixItems, patternProperties...
CHART = {
    "$defs": {
        "point": {
            "type": "object",
            "required": ["x", "label"],
            "additionalProperties": False,
            "properties": {
                "x": {"type": "number", "multipleOf": 0.5},
                "label": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 8},
            },
        },
        "id": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": "^id-"}]},
    },
    "type": "object",
    "required": ["kind", "points"],
    "properties": {
        "kind": {"const": "chart"},
        "id": {"$ref": "#/$defs/id"},
        "points": {"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1},
        "size": {"allOf": [{"type": "integer"}, {"exclusiveMinimum": 0}, {"maximum": 100}]},
        "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        "tags": {"type": "object", "patternProperties": {"^t_": {"type": "boolean"}},
                 "additionalProperties": False},
        "shape": {"anyOf": [{"enum": ["dot", "bar"]}, {"type": "null"}]},
        "color": {"type": "string", "not": {"const": "red"}},
    },
}
CHART_OK = {"kind": "chart", "id": "id-7", "points": [{"x": 1.5, "label": "a"}, {"x": 2, "label": "bee"}],
            "size": 3, "pair": ["a", 1], "tags": {"t_x": True}, "shape": None, "color": "blue"}


def chart_errors(change):
    return [str(e) for e in Schema(CHART).errors({**CHART_OK, **change})]


def test_a_full_json_schema_with_refs_and_combinators_is_accepted_and_validates():
    assert check_schema(CHART) == []
    assert chart_errors({}) == []
    assert chart_errors({"id": 3, "shape": "bar"}) == []


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"kind": "table"}, "$.kind: must be 'chart', got string 'table'"),
        ({"points": [{"x": 1, "label": "a"}, {"x": 1, "label": "Bad"}]},
         "$.points[1].label: 'Bad' does not match pattern '^[a-z]+$'"),
        ({"points": [{"x": 1, "label": "abcdefghi"}]},
         "$.points[0].label: is 9 characters, longer than maxLength 8"),
        ({"points": [{"x": 0.3, "label": "a"}]}, "$.points[0].x: 0.3 is not a multiple of 0.5"),
        ({"points": [{"x": 1}]}, "$.points[0]: missing required property 'label'"),
        ({"points": [{"x": 1, "label": "a", "y": 2}]}, "$.points[0]: unexpected property 'y'"),
        ({"id": 0}, "$.id: matches none of oneOf: 0 is less than minimum 1 | expected string, got integer 0"),
        ({"size": 0}, "$.size: 0 must be greater than 0 (exclusiveMinimum)"),
        ({"size": 101}, "$.size: 101 is greater than maximum 100"),
        ({"pair": ["a", "b"]}, "$.pair[1]: expected integer, got string 'b'"),
        ({"pair": ["a", 1, 2]}, "$.pair: Expected at most 2 items but found 1 extra: 2"),
        ({"tags": {"t_x": 1}}, "$.tags.t_x: expected boolean, got integer 1"),
        ({"tags": {"x": True}}, "$.tags: unexpected property 'x'"),
        ({"shape": "pie"}, "$.shape: matches none of anyOf: 'pie' is not one of ['dot', 'bar'] | expected null"),
        ({"color": "red"}, "$.color: string 'red' must not match the schema under 'not'"),
    ],
)
def test_each_json_schema_rule_is_enforced_with_its_path_and_rule(change, expected):
    assert check_schema(CHART) == []
    found = chart_errors(change)
    assert any(e.startswith(expected) for e in found), found


def test_violations_come_in_the_order_of_the_instance_with_the_rule_they_broke():
    value = {"kind": "chart", "points": [{"x": 1, "label": "ok"}, {"x": 1, "label": "NO"}], "size": -1}
    first, *rest = Schema(CHART).errors(value)
    assert (first.path, first.rule) == ("$.points[1].label", "pattern")
    assert [(v.path, v.rule) for v in rest] == [("$.size", "exclusiveMinimum")]


@pytest.mark.parametrize(
    ("schema", "path", "message"),
    [
        ({"type": "object", "properties": {"a": {"$ref": "#/$defs/pont"}}, "$defs": {"point": {}}},
         ("properties", "a", "$ref"), "$ref '#/$defs/pont' does not resolve: there is no 'pont' there; did you "
                                      "mean 'point'?"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},
         ("properties", "a", "$ref"), "points outside this schema; only local references"),
        ({"type": "object", "properties": {"a": {"oneOf": []}}}, ("properties", "a", "oneOf"),
         "oneOf must be a non-empty list of schemas"),
        ({"type": "object", "properties": {"a": {"type": "number", "multipleOf": 0}}},
         ("properties", "a", "multipleOf"), "multipleOf must be a number > 0"),
        ({"type": "object", "patternProperties": {"([": {}}}, ("patternProperties", "(["),
         "a patternProperties key is not a valid regular expression"),
        ({"type": "object", "dependentRequired": {"a": "b"}}, ("dependentRequired", "a"),
         "not valid JSON Schema: 'b' is not of type 'array'"),
        ({"type": "object", "properties": {"a": {"$ref": "#pont"}}, "$defs": {"p": {"$anchor": "point"}}},
         ("properties", "a", "$ref"), "$ref '#pont' names no $anchor of this schema; did you mean '#point'?"),
    ],
    ids=["ref-typo", "ref-remote", "oneOf-empty", "multipleOf-0", "bad-pattern-key", "metaschema", "anchor"],
)
def test_a_broken_schema_is_reported_with_the_place_of_each_problem(schema, path, message):
    problems = check_schema(schema)
    assert [p for p, _ in problems] == [path], problems
    assert message in problems[0][1]


@pytest.mark.parametrize(
    ("reply", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ('  [1, 2]\n', [1, 2]),
        ('```json\n{"a": "b"}\n```', {"a": "b"}),
        ('```\n{"a": "b"}\n```', {"a": "b"}),
        ('Sure! Here is the JSON:\n\n```JSON\n{"a": {"b": [1, 2]}}\n```\n\nLet me know!', {"a": {"b": [1, 2]}}),
        ('The answer is {"label": "spam"} as requested.', {"label": "spam"}),
        ('<think>maybe {"no": 1}</think>{"yes": 2}', {"yes": 2}),
        ('Note {not json} then {"ok": true}', {"ok": True}),
        ('{"text": "braces } and { inside"}', {"text": "braces } and { inside"}),
        ('```json\nHere: {"x": 1} done\n```', {"x": 1}),
    ],
    ids=["bare", "array", "fence", "fence-no-lang", "preamble-fence", "prose", "think", "skip-bad", "braces",
         "prose-in-fence"],
)
def test_json_is_extracted_from_fences_preambles_and_prose(reply, value):
    assert extract_json(reply) == value


@pytest.mark.parametrize("reply", ["", "   ", "I cannot help with that.", '{"a": 1', "{'a': 1}", '{"a": NaN}'])
def test_a_reply_without_json_says_what_it_looked_like(reply):
    with pytest.raises(NoJSONFound, match=r"empty|no JSON object or array found"):
        extract_json(reply)
