"""Output checks: the schema type language, fences, prefixes and regexes, and the JSON Schema
sent to the server."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from asyncgen.core.errors import ConfigError
from asyncgen.core.validate import OutputSpec, parse_output, strip_fences
from asyncgen.job.prompts import parse_template
from asyncgen.mock.jsonreply import break_json, requested_schema, sample_json


def spec(schema: dict[str, Any] | None = None, **table: Any) -> OutputSpec:
    if schema is not None:
        table = {"format": "json", "schema": schema, **table}
    return parse_output(table)


def test_type_language_maps_to_json_schema() -> None:
    s = spec(
        {
            "name": "str",
            "count": "int",
            "score": "float",
            "ok": "bool",
            "tags": "list[str]",
            "grid": "list[list[int]]",
            "note": "str?",
            "maybe": "list[ int? ]",
            "level": ["easy", "hard"],
            "inner": {"x": "int", "y": "str?"},
        }
    )
    assert s.json_schema == {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "count": {"type": "integer"},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "grid": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}},
            "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            "maybe": {
                "type": "array",
                "items": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            },
            "level": {"enum": ["easy", "hard"], "type": "string"},
            "inner": {
                "type": "object",
                "properties": {
                    "x": {"type": "integer"},
                    "y": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                },
                "required": ["x", "y"],
                "additionalProperties": False,
            },
        },
        "required": [
            "name",
            "count",
            "score",
            "ok",
            "tags",
            "grid",
            "note",
            "maybe",
            "level",
            "inner",
        ],
        "additionalProperties": False,
    }
    good = (
        '{"name": "n", "count": 2, "score": 1, "ok": true, "tags": [], "grid": [[1]], '
        '"note": null, "maybe": [null, 3], "level": "easy", "inner": {"x": 1, "y": null}}'
    )
    checked = s.check(good)
    assert checked.reason is None
    assert checked.parsed["score"] == 1.0 and checked.parsed["inner"] == {"x": 1, "y": None}


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"a": "x"}', "missing required field `b`"),
        ('{"a": "x", "b": "2"}', "Expected `int`, got `str` - at `$.b`"),
        ('{"a": "x", "b": 2.5}', "Expected `int`, got `float`"),
        ('{"a": "x", "b": 2, "c": 3}', "unknown field `c`"),
        ('{"a": null, "b": 2}', "Expected `str`, got `null` - at `$.a`"),
        ("[1, 2]", "Expected `object`, got `array`"),
        ('{"a": "x", "b": 2', "not JSON: Input data was truncated"),
        ("Sure! Here it is.", "not JSON: "),
        ("", "empty output"),
        ("   \n", "empty output"),
        (None, "empty output"),
    ],
)
def test_schema_failures_say_why(text: str | None, reason: str) -> None:
    checked = spec({"a": "str", "b": "int"}).check(text)
    assert checked.reason is not None and reason in checked.reason
    assert checked.parsed is None


def test_field_names_are_json_keys() -> None:
    s = spec({"final-answer": "str", "class": "int", "two words": "bool"})
    assert s.json_schema is not None
    assert list(s.json_schema["properties"]) == ["final-answer", "class", "two words"]
    text = '{"final-answer": "7", "class": 1, "two words": false}'
    assert s.check(text).parsed == {"final-answer": "7", "class": 1, "two words": False}
    reason = s.check('{"final-answer": "7", "class": 1}').reason
    assert reason is not None and "missing required field `two words`" in reason


def test_nullable_fields_must_still_be_present() -> None:
    s = spec({"a": "str?"})
    assert s.check('{"a": null}').parsed == {"a": None}
    reason = s.check("{}").reason
    assert reason is not None and "missing required field `a`" in reason


def test_truncated_replies_say_so() -> None:
    s = spec({"a": "str"})
    reason = s.check('{"a": "unfinis', finish_reason="length").reason
    assert reason is not None and reason.startswith("truncated at max_tokens")
    assert "not JSON" in reason
    assert s.check('{"a": "fine"}', finish_reason="length").reason is None


@pytest.mark.parametrize(
    ("text", "inside"),
    [
        ('```json\n{"a": 1}\n```', '{"a": 1}'),
        ('  ```\n{"a": 1}\n```  \n', '{"a": 1}'),
        ('```JSON\n{\n  "a": 1\n}```', '{\n  "a": 1\n}'),
        ('{"a": 1}', '{"a": 1}'),
        ('Here:\n```json\n{"a": 1}\n```', 'Here:\n```json\n{"a": 1}\n```'),  # not the whole reply
        ('```json\n{"a": 1}\n``` and more', '```json\n{"a": 1}\n``` and more'),
    ],
)
def test_strip_fences_only_around_the_whole_reply(text: str, inside: str) -> None:
    assert strip_fences(text) == inside


def test_fenced_json_validates_and_the_output_keeps_the_fences() -> None:
    assert spec({"a": "int"}).check('```json\n{"a": 1}\n```').parsed == {"a": 1}


def test_json_object_accepts_any_object_only() -> None:
    s = parse_output({"format": "json_object"})
    assert s.response_format("t") == {"type": "json_object"}
    assert s.check('{"anything": [1, 2]}').parsed == {"anything": [1, 2]}
    assert s.check("[1]").reason == "not a JSON object but list"
    assert s.check('"text"').reason == "not a JSON object but str"


def test_must_start_with_ignores_leading_whitespace() -> None:
    s = parse_output({"must_start_with": "Problem:"})
    assert s.response_format("t") is None
    assert s.check("\n  Problem: add two numbers").reason is None
    assert s.check("Problem:").parsed is None
    reason = s.check("Sure! Problem: ...").reason
    assert reason == "does not start with 'Problem:': 'Sure! Problem: ...'"


def test_regex_searches_the_reply() -> None:
    s = parse_output({"regex": r"Answer: \d+"})
    assert s.check("Some working.\nAnswer: 42\n").reason is None
    assert s.check("Answer: forty-two").reason == "does not match regex 'Answer: \\\\d+'"
    whole = parse_output({"regex": r"\A\d+\Z"})
    assert whole.check("42").reason is None
    assert whole.check("42 apples").reason is not None


def test_text_checks_combine_with_json() -> None:
    s = spec({"a": "int"}, must_start_with="{")
    assert s.check('{"a": 1}').parsed == {"a": 1}
    reason = s.check('```json\n{"a": 1}\n```').reason
    assert reason is not None and reason.startswith("does not start with '{'")


def test_response_format_name_is_sanitized() -> None:
    s = spec({"a": "str"})
    rf = s.response_format("my template.v2/" + "x" * 80)
    assert rf is not None
    named = rf["json_schema"]
    assert named["name"] == "my_template_v2_" + "x" * 49 and len(named["name"]) == 64
    assert named["strict"] is True and named["schema"] == s.json_schema


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([1], "must be a table"),
        ({"fromat": "json"}, "unknown keys"),
        ({"format": "xml"}, "format must be one of"),
        ({"format": "json"}, "needs a schema"),
        ({"format": "json_object", "schema": {"a": "str"}}, "needs format"),
        ({"format": "json", "schema": "str"}, "schema must be a table"),
        ({"format": "json", "schema": {}}, "schema has no fields"),
        ({"format": "json", "schema": {"a": "string"}}, "a: unknown type 'string'"),
        ({"format": "json", "schema": {"a": "list[str"}}, "unknown type"),
        ({"format": "json", "schema": {"a": "dict"}}, "unknown type"),
        ({"format": "json", "schema": {"a": 3}}, "expected a type name"),
        ({"format": "json", "schema": {"a": []}}, "non-empty list of strings"),
        ({"format": "json", "schema": {"a": {"b": "nope"}}}, "a.b: unknown type"),
        ({"format": "json", "schema": {"": "str"}}, "a field with an empty name"),
        ({"regex": "(x"}, "does not compile"),
        ({"regex": ""}, "non-empty string"),
        ({"must_start_with": 5}, "non-empty string"),
    ],
)
def test_bad_output_tables(table: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_output(table)


def test_template_errors_name_the_file_and_the_digest_follows_the_spec() -> None:
    head = 'user = "{persona}"\n[output]\nformat = "json"\n'
    with pytest.raises(ConfigError, match=r"template my\.toml: \[output\] schema: a: unknown"):
        parse_template(head + 'schema = {a = "txt"}\n', name="my", path="my.toml")
    a = parse_template(head + 'schema = {a = "str"}\n', name="t")
    b = parse_template(head + 'schema = {a = "int"}\n', name="t")
    assert a.digest != b.digest
    assert a.output is not None and a.output.format == "json"
    body = a.render({"persona": "p"})
    assert body["response_format"]["json_schema"]["schema"] == a.output.json_schema
    # Templates built in code get a digest from their parts, the output spec among them.
    from asyncgen.job.prompts import Template

    plain = Template(name="t", user="{persona}")
    checked = Template(name="t", user="{persona}", output=parse_output({"regex": "x"}))
    assert plain.digest != checked.digest
    assert "response_format" not in checked.render({"persona": "p"})


def test_completions_templates_send_response_format_too() -> None:
    t = parse_template(
        'endpoint = "completions"\nuser = "{persona}:"\n[output]\nformat = "json_object"\n',
        name="base",
    )
    assert t.render({"persona": "p"}) == {
        "prompt": "p:",
        "response_format": {"type": "json_object"},
    }


# --- the mock's side: JSON that fits a schema, and the ways to break it ----------------------


def test_sample_json_fits_the_schema_it_was_built_from() -> None:
    s = spec({"a": "str", "n": "int?", "xs": "list[float]", "k": ["p", "q"], "o": {"b": "bool"}})
    assert s.json_schema is not None
    for seed in range(20):
        value = sample_json(s.json_schema, random.Random(seed), ["w"])
        assert s.check(json.dumps(value)).parsed == value


def test_sample_json_follows_refs_and_type_lists() -> None:
    schema = {
        "$ref": "#/$defs/Top",
        "$defs": {"Top": {"type": "object", "properties": {"v": {"type": ["null", "integer"]}}}},
    }
    value = sample_json(schema, random.Random(0), ["w"])
    assert isinstance(value, dict) and isinstance(value["v"], int)


def test_break_json_truncates_or_drops_a_field() -> None:
    s = spec({"a": "str", "b": "str"})
    kinds = set()
    for seed in range(20):
        text, cut = break_json({"a": "x y", "b": "z"}, random.Random(seed))
        reason = s.check(text).reason
        assert reason is not None
        kinds.add(cut)
        assert ("not JSON" in reason) if cut else ("missing required field" in reason)
    assert kinds == {True, False}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ({"type": "text"}, None),
        ({"type": "json_object"}, {"type": "object", "properties": {"text": {"type": "string"}}}),
        (
            {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}},
            {"type": "integer"},
        ),
    ],
)
def test_requested_schema(value: Any, expected: Any) -> None:
    assert requested_schema(value) == expected


@pytest.mark.parametrize(
    "value",
    ["json", {"type": "yaml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}}],
)
def test_requested_schema_rejects_malformed(value: Any) -> None:
    with pytest.raises(ValueError, match="response_format"):
        requested_schema(value)
