"""The mock server's structured replies: JSON that fits a request's ``response_format``.

``json_schema`` replies follow the schema (objects with all their properties, arrays of one to
three items, strings of a few words, integers, numbers, booleans, enums, ``anyOf`` /
``oneOf`` taking the first non-null branch, local ``$ref`` resolved); ``json_object`` replies
are a small object. Deterministic for a given rng. :func:`break_json` turns a reply into an
invalid one, the two ways real models fail: cut short, or a required field left out.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec

__all__ = ["break_json", "requested_schema", "sample_json"]

_OBJECT = {"type": "object", "properties": {"text": {"type": "string"}}}
_MAX_DEPTH = 12


def requested_schema(response_format: Any) -> dict[str, Any] | None:
    """The schema a request's ``response_format`` asks for: None for plain text, a small
    object's schema for ``json_object``. ValueError (a 400 for the client) when malformed."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ValueError("'response_format' must be an object.")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return _OBJECT
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ValueError("'response_format.json_schema.schema' must be an object.")
        return schema
    raise ValueError(
        f"Invalid 'response_format.type': {kind!r}; expected 'text', 'json_object' or "
        "'json_schema'."
    )


def sample_json(schema: Mapping[str, Any], rng: random.Random, words: Sequence[str]) -> Any:
    """A value that fits ``schema``; strings are made of ``words``."""
    return _sample(schema, rng, words, schema, 0)


def _sample(node: Any, rng: random.Random, words: Sequence[str], root: Any, depth: int) -> Any:
    if not isinstance(node, Mapping) or depth > _MAX_DEPTH:
        return None
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        return _sample(target, rng, words, root, depth + 1)
    if "const" in node:
        return node["const"]
    if isinstance(node.get("enum"), list) and node["enum"]:
        return rng.choice(node["enum"])
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and options:
            real = [o for o in options if isinstance(o, Mapping) and o.get("type") != "null"]
            chosen = real[0] if real else options[0]
            return _sample(chosen, rng, words, root, depth + 1)
    kind = node.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in node:
        properties = node.get("properties") or {}
        return {k: _sample(v, rng, words, root, depth + 1) for k, v in properties.items()}
    if kind == "array":
        low = max(1, int(node.get("minItems", 1)))
        count = rng.randint(low, max(low, min(3, int(node.get("maxItems", 3)))))
        return [_sample(node.get("items", {}), rng, words, root, depth + 1) for _ in range(count)]
    if kind == "integer":
        low = int(node.get("minimum", 1))
        return rng.randint(low, max(low, int(node.get("maximum", 100))))
    if kind == "number":
        return round(rng.uniform(0.0, 100.0), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return " ".join(rng.choice(words) for _ in range(rng.randint(2, 8)))


def break_json(value: Any, rng: random.Random) -> tuple[str, bool]:
    """An invalid rendering of ``value``, and whether it was cut short (a truncated reply)."""
    if isinstance(value, dict) and value and rng.random() < 0.5:
        missing = dict(value)
        del missing[next(iter(missing))]
        return msgspec.json.encode(missing).decode(), False
    text = msgspec.json.encode(value).decode()
    return text[: len(text) // 2], True
