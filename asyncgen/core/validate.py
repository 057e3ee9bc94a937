"""Output checks, sans-IO: what a template's replies must look like, and how to ask for it.

A template's optional ``[output]`` table::

    [output]
    format = "json"          # "text" (default), "json" (needs a schema) or "json_object"
    schema = { problem = "str", answer = "str", difficulty = "int?", tags = "list[str]" }
    must_start_with = "..."  # the reply, leading whitespace stripped, starts with this
    regex = "..."            # re.search over the reply (anchor with \\A / \\Z for all of it)
    accept_length = false    # a reply cut at max_tokens (finish_reason "length") is invalid
    accept_empty = false     # an empty reply (or only whitespace) is invalid (the default)

The schema's type language: ``str``, ``int``, ``float``, ``bool``, ``list[T]``, a trailing
``?`` for "may be null" (``"int?"``, ``"list[str]?"``), a table for a nested object and an
array of strings for "one of these" (``level = ["easy", "hard"]``); a long schema reads better
as an ``[output.schema]`` table of its own. Field names are JSON keys, any non-empty string.
Every field is required
(a ``?`` field must be present, and may be null: OpenAI's strict mode works that way); fields
the schema does not name make a reply invalid, matching ``additionalProperties: false``.

``json`` sends ``response_format = {"type": "json_schema", ...}`` with ``strict: true``: OpenAI
reads it on ``/chat/completions``, vLLM on ``/chat/completions`` and (recent versions)
``/completions``, enforcing it with guided decoding. vLLM's older ``guided_json`` extra field
was removed in v0.12, so ``response_format`` is the one request field both servers share.
``json_object`` sends ``{"type": "json_object"}`` and only checks that the reply is a JSON
object. Before a JSON reply is decoded, one pair of Markdown code fences around the whole
reply (```` ```json ... ``` ````) is removed, since models add them even when told not to.
The decoded object becomes the result's ``parsed``; the text stays in ``output``.

Every template's replies are checked for emptiness (a template without ``[output]`` too): an
empty completion with finish_reason "stop" is what a gateway passes on for a stream cut
upstream. ``accept_length`` not given, the job decides (``JobConfig.accept_length``: true,
false in the persona stages, where a persona cut mid-sentence is not a persona). A reply with
tool calls is not empty.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import msgspec

__all__ = ["Checked", "OutputSpec", "parse_output", "strip_fences"]

_FORMATS = ("text", "json", "json_object")
_KEYS = {"format", "schema", "must_start_with", "regex", "accept_length", "accept_empty"}
_SCALARS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
_FENCED = re.compile(r"\A\s*```[\w+-]*[ \t]*\n(.*?)\n?[ \t]*```\s*\Z", re.DOTALL)
_SCHEMA_NAME = re.compile(r"[^A-Za-z0-9_-]")
_SHOWN = 60  # characters of a reply or an expected prefix quoted in a reason


class Checked(msgspec.Struct, frozen=True, gc=False):
    """A reply checked: ``reason`` is None when it passed; ``parsed`` is the decoded JSON."""

    reason: str | None
    parsed: Any = None


def strip_fences(text: str) -> str:
    """The text inside one pair of Markdown code fences enclosing all of ``text``, else it."""
    match = _FENCED.match(text)
    return match.group(1) if match else text


def _short(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


class _Schema:
    """Turns the TOML type map into msgspec Structs; ``errors`` collects what is wrong."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self._count = 0

    def struct(self, table: Mapping[str, Any], path: str) -> type[msgspec.Struct]:
        if not table:
            self.errors.append(f"{path or 'schema'} has no fields")
        fields: list[tuple[str, Any]] = []
        names: dict[str, str] = {}
        for index, (name, spec) in enumerate(table.items()):
            where = f"{path}.{name}" if path else name
            if not name:
                self.errors.append(f"{path or 'schema'} has a field with an empty name")
            kind, nullable = self.type(spec, where)
            # Attribute names are placeholders; the JSON keys may be anything ("final-answer").
            fields.append((f"f{index}", kind | None if nullable else kind))
            names[f"f{index}"] = name
        self._count += 1
        return msgspec.defstruct(
            f"Output{self._count}",
            fields,
            kw_only=True,
            forbid_unknown_fields=True,
            rename=names,
        )

    def type(self, spec: Any, where: str) -> tuple[Any, bool]:
        """The Python type for ``spec`` and whether it may be null."""
        if isinstance(spec, dict):
            return self.struct(spec, where), False
        if isinstance(spec, list):
            if not spec or not all(isinstance(v, str) for v in spec):
                self.errors.append(f"{where}: a choice must be a non-empty list of strings")
                return str, False
            return Literal[tuple(spec)], False
        if not isinstance(spec, str):
            self.errors.append(f"{where}: expected a type name, got {spec!r}")
            return str, False
        text = spec.replace(" ", "")
        nullable = text.endswith("?")
        return self._name(text.removesuffix("?"), where, spec), nullable

    def _name(self, text: str, where: str, spec: str) -> Any:
        if text in _SCALARS:
            return _SCALARS[text]
        if text.startswith("list[") and text.endswith("]"):
            inner = text[5:-1]
            nullable = inner.endswith("?")
            item = self._name(inner.removesuffix("?"), where, spec)
            return list[item | None] if nullable else list[item]  # type: ignore[valid-type]
        self.errors.append(
            f"{where}: unknown type {spec!r} (types: str, int, float, bool, list[T], T?)"
        )
        return str


def _strict(node: Any, defs: Mapping[str, Any]) -> Any:
    """msgspec's JSON Schema with references inlined and titles dropped, every property
    required and no other allowed: the subset OpenAI's strict mode accepts."""
    if isinstance(node, list):
        return [_strict(v, defs) for v in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str):
        return _strict(defs[ref.rsplit("/", 1)[-1]], defs)
    out = {k: _strict(v, defs) for k, v in node.items() if k not in ("title", "$defs")}
    if "enum" in out and "type" not in out:
        out["type"] = "string"  # the choices are strings; OpenAI's examples always say so
    if out.get("type") == "object" and "properties" in node:
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    return out


class OutputSpec:
    """What a template's replies must look like. Immutable; built by :func:`parse_output`."""

    __slots__ = (
        "_decoder",
        "_regex",
        "accept_empty",
        "accept_length",
        "format",
        "json_schema",
        "must_start_with",
        "regex",
        "schema",
    )

    format: str
    schema: Mapping[str, Any] | None
    """The ``schema`` table as written in the template."""
    json_schema: dict[str, Any] | None
    """The JSON Schema sent to the server, derived from the same Struct the reply is checked
    against."""
    must_start_with: str | None
    regex: str | None
    accept_length: bool | None
    """Whether a reply cut at ``max_tokens`` (finish_reason "length") may pass; None: the
    template does not say (the job decides, see :meth:`check`)."""
    accept_empty: bool
    """Whether an empty reply passes (a JSON format never takes one)."""
    _decoder: msgspec.json.Decoder[Any] | None
    _regex: re.Pattern[str] | None

    def __init__(
        self,
        *,
        format: str,
        schema: Mapping[str, Any] | None,
        decoder: msgspec.json.Decoder[Any] | None,
        json_schema: dict[str, Any] | None,
        must_start_with: str | None,
        regex: str | None,
        accept_length: bool | None = None,
        accept_empty: bool = False,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "accept_length", accept_length)
        set_(self, "accept_empty", accept_empty)
        set_(self, "format", format)
        set_(self, "schema", schema)
        set_(self, "json_schema", json_schema)
        set_(self, "must_start_with", must_start_with)
        set_(self, "regex", regex)
        set_(self, "_decoder", decoder)
        set_(self, "_regex", re.compile(regex) if regex is not None else None)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("OutputSpec is immutable")

    def __repr__(self) -> str:
        return f"<OutputSpec format={self.format} fields={list(self.schema or ())}>"

    def canonical(self) -> str:
        """A stable text of everything that decides what passes (for the template digest)."""
        checks: tuple[Any, ...] = (self.format, self.json_schema, self.must_start_with, self.regex)
        if self.accept_length is not None or self.accept_empty:  # defaults: older digests
            checks += (self.accept_length, self.accept_empty)
        return repr(checks)

    def response_format(self, name: str) -> dict[str, Any] | None:
        """The ``response_format`` request field, or None for plain text."""
        if self.format == "json_object":
            return {"type": "json_object"}
        if self.format != "json":
            return None
        # OpenAI: a-z, A-Z, 0-9, underscores and dashes, at most 64 characters.
        safe = _SCHEMA_NAME.sub("_", name)[:64] or "output"
        return {
            "type": "json_schema",
            "json_schema": {"name": safe, "schema": self.json_schema, "strict": True},
        }

    def check(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        tool_calls: bool = False,
        accept_length: bool = True,
    ) -> Checked:
        """Check one reply's text; the reason says what is wrong, and when the reply was cut
        at ``max_tokens`` (``finish_reason`` "length") it says that too. ``tool_calls``: the
        reply calls tools, so an empty text is not an empty reply. ``accept_length``: the
        job's default where the template does not say."""
        if self.accept_length is not None:
            accept_length = self.accept_length
        if finish_reason == "length" and not accept_length:
            return Checked("truncated at max_tokens (finish_reason 'length', accept_length false)")
        if not text or not text.strip():
            if tool_calls or (self.accept_empty and self.format == "text"):
                return Checked(None)
            return Checked(f"empty output (finish_reason {finish_reason!r})")
        checked = self._check(text)
        if checked.reason is not None and finish_reason == "length":
            return Checked(f"truncated at max_tokens (finish_reason 'length'): {checked.reason}")
        return checked

    def _check(self, text: str | None) -> Checked:
        if not text or not text.strip():
            return Checked("empty output")
        prefix = self.must_start_with
        if prefix is not None and not text.lstrip().startswith(prefix):
            return Checked(f"does not start with {_short(prefix)}: {_short(text.lstrip())}")
        if self._regex is not None and self._regex.search(text) is None:
            return Checked(f"does not match regex {_short(self._regex.pattern)}")
        if self.format == "text":
            return Checked(None)
        body = strip_fences(text)
        try:
            if self._decoder is not None:
                return Checked(None, msgspec.to_builtins(self._decoder.decode(body)))
            value = msgspec.json.decode(body)
        except msgspec.ValidationError as exc:
            return Checked(f"does not fit the schema: {exc}")
        except msgspec.DecodeError as exc:
            return Checked(f"not JSON: {exc}")
        if not isinstance(value, dict):
            return Checked(f"not a JSON object but {type(value).__name__}")
        return Checked(None, value)


def parse_output(table: Any) -> OutputSpec:
    """Build an OutputSpec from a template's ``[output]`` table; ValueError says what is wrong
    (the caller names the file)."""
    if not isinstance(table, dict):
        raise ValueError("[output] must be a table")
    unknown = sorted(table.keys() - _KEYS)
    if unknown:
        raise ValueError(f"[output] has unknown keys {unknown}; known: {sorted(_KEYS)}")
    format = table.get("format", "text")
    if format not in _FORMATS:
        raise ValueError(f"[output] format must be one of {', '.join(_FORMATS)}, not {format!r}")
    for key in ("accept_length", "accept_empty"):
        if key in table and not isinstance(table[key], bool):
            raise ValueError(f"[output] {key} must be true or false")
    for key in ("must_start_with", "regex"):
        if key in table and not (isinstance(table[key], str) and table[key]):
            raise ValueError(f"[output] {key} must be a non-empty string")
    regex = table.get("regex")
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as exc:
            raise ValueError(f"[output] regex {regex!r} does not compile: {exc}") from None
    schema = table.get("schema")
    decoder: msgspec.json.Decoder[Any] | None = None
    json_schema: dict[str, Any] | None = None
    if schema is not None:
        if format != "json":
            raise ValueError('[output] a schema needs format = "json"')
        if not isinstance(schema, dict):
            raise ValueError("[output] schema must be a table of field = type")
        builder = _Schema()
        struct = builder.struct(schema, "")
        if builder.errors:
            raise ValueError("[output] schema: " + "; ".join(builder.errors))
        decoder = msgspec.json.Decoder(struct)
        raw = msgspec.json.schema(struct)
        json_schema = _strict(raw, raw.get("$defs", {}))
    elif format == "json":
        raise ValueError(
            '[output] format = "json" needs a schema; format = "json_object" asks for any '
            "JSON object"
        )
    return OutputSpec(
        format=format,
        schema=schema,
        decoder=decoder,
        json_schema=json_schema,
        must_start_with=table.get("must_start_with"),
        regex=regex,
        accept_length=table.get("accept_length"),
        accept_empty=table.get("accept_empty", False),
    )
