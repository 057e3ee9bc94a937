"""Prompt templates: the shipped ones render, and mistakes are caught when a template loads."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest

from asyncgen.core.errors import ConfigError, InputError
from asyncgen.job.prompts import Template, available_templates, load_template, parse_template
from asyncgen.mock.jsonreply import sample_json

REQUIRED = {"math", "reasoning", "instruction", "knowledge", "npc", "tool"}
PERSONA = "a retired aerospace engineer who restores antique clocks"


def test_required_templates_ship() -> None:
    assert set(available_templates()) >= REQUIRED | {"persona", "text_to_persona"}


@pytest.mark.parametrize("name", available_templates())
def test_every_shipped_template_renders(name: str) -> None:
    template = load_template(name)
    assert template.name == name and template.description
    assert len(template.digest) == 64
    record = {"persona": PERSONA, "text": "Notes on escapement wear in 18th-century clocks."}
    body = template.render(record)
    assert "model" not in body and "stream" not in body
    if template.endpoint == "chat":
        assert template.url == "/chat/completions"
        user = body["messages"][-1]
        assert user["role"] == "user"
        text = "\n".join(m["content"] for m in body["messages"])
    elif template.endpoint == "embeddings":
        assert template.url == "/embeddings"
        assert body == {"input": PERSONA, "encoding_format": "base64"}
        return
    else:
        assert template.url == "/completions"
        text = body["prompt"]
    used = PERSONA if "persona" in template.placeholders else record["text"]
    assert used in text
    assert "{" + "persona}" not in text and "{" + "text}" not in text
    assert isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0
    for stop in body.get("stop", []):
        # A TOML basic string decodes escapes; a doubled backslash would send them literally.
        assert stop.strip() and "\\" not in stop, stop
    if template.output is not None:
        check_output_spec(template.name, body)
    else:
        assert "response_format" not in body


def check_output_spec(name: str, body: dict[str, Any]) -> None:
    """A structured template asks for what it checks: a strict JSON Schema a conforming reply
    passes, and a broken one does not."""
    template = load_template(name)
    spec = template.output
    assert spec is not None
    response_format = body["response_format"]
    if spec.format == "json_object":
        assert response_format == {"type": "json_object"}
        assert spec.check('{"a": 1}').parsed == {"a": 1}
        assert spec.check("[1]").reason is not None
        return
    assert response_format["type"] == "json_schema"
    named = response_format["json_schema"]
    assert named["strict"] is True and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", named["name"])
    schema = named["schema"]
    assert_strict_schema(schema)
    good = sample_json(schema, random.Random(1), ["some", "words"])
    text = msgspec.json.encode(good).decode()
    assert spec.check(text).reason is None and spec.check(text).parsed == good
    assert spec.check(f"```json\n{text}\n```").parsed == good
    first = next(iter(good))
    missing = {k: v for k, v in good.items() if k != first}
    reason = spec.check(msgspec.json.encode(missing).decode()).reason
    assert reason is not None and first in reason
    assert spec.check(text[: len(text) // 2]).reason is not None
    reason = spec.check(text[: len(text) // 2], "length").reason
    assert reason is not None and "truncated" in reason


def assert_strict_schema(schema: dict[str, Any]) -> None:
    """What OpenAI's strict mode demands: no references, objects closed and fully required."""
    assert "$ref" not in schema and "$defs" not in schema
    if schema.get("type") == "object":
        assert schema["additionalProperties"] is False
        assert schema["required"] == list(schema["properties"])
    for value in schema.values():
        children = value if isinstance(value, list) else [value]
        for child in children:
            if isinstance(child, dict):
                assert_strict_schema(child)


def test_render_chat_with_system_and_sampling_copy() -> None:
    template = parse_template(
        'system = "You are terse."\nuser = "As {persona}, ask a question."\n'
        "[sampling]\ntemperature = 0.5\nmax_tokens = 64\n",
        name="t",
    )
    body = template.render({"persona": "a baker"})
    assert body == {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "As a baker, ask a question."},
        ],
        "temperature": 0.5,
        "max_tokens": 64,
    }
    body["temperature"] = 2.0  # a render is a fresh dict; the template is not changed
    assert template.render({"persona": "x"})["temperature"] == 0.5


def test_render_completions_and_custom_persona_field() -> None:
    template = parse_template('endpoint = "completions"\nuser = "{persona} writes:"\n', name="base")
    assert template.render({"who": "a poet"}, persona_field="who") == {"prompt": "a poet writes:"}


def test_literal_braces_and_declared_fields() -> None:
    template = parse_template(
        'fields = ["topic"]\n'
        'user = "As {persona}, about {topic}: answer as {\\"k\\": 1} '
        'and {{persona}} {not a name}"\n',
        name="braces",
    )
    assert template.placeholders == {"persona", "topic"}
    body = template.render({"persona": "a chemist", "topic": 7})
    assert body["messages"][0]["content"] == (
        'As a chemist, about 7: answer as {"k": 1} and {persona} {not a name}'
    )


def test_unknown_placeholder_is_reported_at_load() -> None:
    with pytest.raises(ConfigError, match=r"unknown placeholder \{persnoa\}.*allowed: \{persona\}"):
        parse_template('user = "As {persnoa}, write."\n', name="typo")
    with pytest.raises(ConfigError, match=r"\{topic\} in 'system'"):
        parse_template('system = "{topic}"\nuser = "{persona}"\n', name="sys")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({}, "missing field 'persona'"),
        ({"persona": None}, "missing field 'persona'"),
        ({"persona": "   "}, "empty field 'persona'"),
        ({"persona": ["a", "list"]}, "field 'persona' is list, not text"),
        ({"persona": True}, "field 'persona' is bool, not text"),
    ],
)
def test_bad_records_raise_input_error(record: dict[str, object], message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_template("math").render(record)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('user = "{persona}', "not valid TOML"),
        ('system = "only a system"', "'user' .* is required"),
        ('user = "   "', "'user' is empty"),
        ('user = "no placeholder at all"', "uses no placeholder"),
        ('user = "{persona}"\nendpoint = "images"', "endpoint must be"),
        ('user = "{persona}"\nendpoint = "completions"\nsystem = "s"', "no system message"),
        ('user = "{persona}"\n[sampling]\nmodel = "x"', r"may not set model"),
        ('user = "{persona}"\n[sampling]\nstream = true', r"may not set stream"),
        ('user = "{persona}"\nfields = "topic"', "'fields' must be a list"),
        ('user = "{persona}"\ntemprature = 1', "unknown keys"),
        ('user = "{persona}"\n[output]\nformat = "yaml"', "format must be one of"),
        ('user = "{persona}"\n[output]\nformat = "json"', "needs a schema"),
        ('user = "{persona}"\n[output]\nschema = {a = "str"}', "needs format"),
        ('user = "{persona}"\n[output]\nregex = "(unclosed"', "does not compile"),
        ('user = "{persona}"\n[output]\nformat = "json"\nschema = {a = "string"}', r"a: unknown"),
        (
            'user = "{persona}"\n[output]\nformat = "json_object"\n'
            '[sampling]\nresponse_format = {type = "text"}',
            "both set it",
        ),
    ],
)
def test_invalid_templates(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_template(text, name="bad")


def test_load_by_path_and_unknown_name(tmp_path: Path) -> None:
    own = tmp_path / "mine.toml"
    own.write_text('description = "mine"\nuser = "Dear {persona},"\n', encoding="utf-8")
    template = load_template(str(own))
    assert template.name == "mine" and template.path == str(own)
    with pytest.raises(ConfigError, match=r"unknown template 'maths'.*math"):
        load_template("maths")
    with pytest.raises(ConfigError, match="cannot read template"):
        load_template(str(tmp_path / "absent.toml"))


def test_digest_follows_content_and_template_is_immutable() -> None:
    a = parse_template('user = "{persona} A"', name="t")
    b = parse_template('user = "{persona} B"', name="t")
    assert a.digest != b.digest
    assert a.digest == parse_template('user = "{persona} A"', name="t").digest
    with pytest.raises(AttributeError):
        a.user = "changed"  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.sampling["temperature"] = 1  # type: ignore[index]
    assert "t" in repr(a) and isinstance(a, Template)


def test_expanded_items_carry_every_field_in_its_place() -> None:
    """The expander builds items positionally (for speed): each field must land where it
    belongs, for every sample, with the overrides applied and counted."""
    import hashlib

    from asyncgen.core.records import Line, Source, WorkItem
    from asyncgen.job.items import Expander

    template = load_template("math")
    expander = Expander(template, model="m", samples=2, overrides={"max_tokens": 77})
    raw = msgspec.json.encode({"persona": "A beekeeper", "idx": 4, "lang": "en"})
    for lineno in (3, 4):  # the second line reuses what the first one computed
        items = expander.expand(Line("in.jsonl", "sh", lineno, raw))
        assert [i.custom_id for i in items] == [f"sh:{lineno}:math:0", f"sh:{lineno}:math:1"]
        for item in items:
            assert isinstance(item, WorkItem)
            assert item.url == "/chat/completions" and item.template == "math"
            assert item.source == Source("sh", lineno)
            assert item.persona == "A beekeeper"
            assert item.persona_sha256 == hashlib.sha256(b"A beekeeper").hexdigest()[:16]
            assert item.meta == {"idx": 4, "lang": "en"}
            assert item.body["model"] == "m" and item.body["max_tokens"] == 77
            assert item.max_output_tokens == 77
            chars = sum(len(m["content"]) for m in item.body["messages"])
            assert item.est_prompt_tokens == chars // 4 + 1
            assert item.sampling == {"temperature": 0.9, "max_tokens": 77}


def _reference_render(text: str, values: dict[str, str]) -> str:
    """The documented rules, the slow way: {name} substituted, {{ and }} one brace each,
    any other brace kept as it is."""
    out: list[str] = []
    last = 0
    for match in re.finditer(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}", text):
        out.append(text[last : match.start()])
        out.append(values[match.group(1)] if match.group(1) else match.group(0)[0])
        last = match.end()
    out.append(text[last:])
    return "".join(out)


def test_rendering_follows_the_brace_rules_on_random_texts() -> None:
    rng = random.Random(8)
    atoms = [
        "{persona}",
        "{topic}",
        "{{",
        "}}",
        "{",
        "}",
        "{ persona }",
        "{1x}",
        "ab",
        " ",
        "{{persona}}",
    ]
    values = {"persona": "P{x}", "topic": "T}"}  # braces in values are never interpreted
    checked = 0
    for _ in range(1000):
        user = "".join(rng.choices(atoms, k=rng.randint(1, 12))) + " {persona}"
        system = "".join(rng.choices(atoms, k=rng.randint(0, 6)))
        try:
            template = Template(name="t", user=user, system=system or None, fields=("topic",))
        except ConfigError:
            continue  # the atoms met as an unknown placeholder, such as "{" "ab" "}"
        checked += 1
        body = template.render({"persona": values["persona"], "topic": values["topic"]})
        texts = [m["content"] for m in body["messages"]]
        expected = [_reference_render(system, values)] if system else []
        assert texts == [*expected, _reference_render(user, values)], (user, system)
    assert checked > 300
