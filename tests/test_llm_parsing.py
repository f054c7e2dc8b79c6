"""The JSON Schema subset validator and JSON extraction from model replies."""

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


def test_unsupported_keywords_are_schema_errors_with_their_path():
    problems = check_schema({"type": "object", "properties": {"a": {"type": "string", "format": "email",
                                                                     "oneOf": []}}})
    assert problems == [(("properties", "a", "oneOf"), problems[0][1])]
    assert "unsupported schema keyword 'oneOf'" in problems[0][1]


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
