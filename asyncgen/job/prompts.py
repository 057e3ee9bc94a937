"""Prompt templates: one TOML file each, rendered once per persona record.

A template file looks like this::

    description = "a hard math problem in the persona's voice"
    endpoint = "chat"                # or "completions" for /v1/completions, "embeddings"
                                     # for /v1/embeddings (``user`` is the text embedded)
    fields = ["topic"]               # record fields usable besides {persona}
    system = "You are ..."           # optional
    user = "As {persona}, ..."       # required; becomes the prompt for "completions"

    [sampling]                       # optional request defaults
    temperature = 0.8
    max_tokens = 1024

    [output]                         # optional: what a reply must look like
    format = "json"                  # sends response_format; see asyncgen.core.validate
    schema = { problem = "str", answer = "str" }

Placeholders are ``{identifier}``: ``{persona}`` plus the names listed in ``fields``. Any other
``{identifier}`` is an error when the template is loaded, not when the millionth record meets it.
``{{`` and ``}}`` write literal braces; braces around anything that is not an identifier (JSON
examples, say) are kept as they are.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import msgspec

from asyncgen.core.errors import ConfigError, InputError
from asyncgen.core.validate import OutputSpec, parse_output

__all__ = [
    "RESERVED_BODY",
    "Template",
    "available_templates",
    "load_template",
    "parse_template",
    "template_dir",
    "template_from_table",
]

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ENDPOINTS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
}
_KEYS = {"description", "endpoint", "fields", "system", "user", "sampling", "output"}
RESERVED_BODY = frozenset({"model", "messages", "prompt", "input", "stream", "n"})
"""Request fields that neither a template's ``[sampling]`` nor ``extra_body`` may set: the
model is the job's, the prompt the template's, ``stream`` the job's ``--stream``, and ``n``
would ask for choices of which one is kept per request."""


def _placeholders(text: str) -> set[str]:
    return {m.group(1) for m in _PLACEHOLDER.finditer(text) if m.group(1)}


class _Pattern:
    """A template text cut at its placeholders once, so that rendering a record is a join
    (several times faster than :meth:`str.format_map`, which parses the text every time)."""

    __slots__ = ("literals", "names")

    def __init__(self, text: str) -> None:
        literals: list[str] = []
        names: list[str] = []
        current: list[str] = []
        last = 0
        for match in _PLACEHOLDER.finditer(text):
            current.append(text[last : match.start()])
            name = match.group(1)
            if name:
                literals.append("".join(current))
                names.append(name)
                current = []
            else:
                current.append(match.group(0)[0])  # "{{" or "}}": one literal brace
            last = match.end()
        current.append(text[last:])
        literals.append("".join(current))
        self.literals = tuple(literals)
        """The text between placeholders: one more than :attr:`names`."""
        self.names = tuple(names)

    def fill(self, values: Mapping[str, str]) -> str:
        literals, names = self.literals, self.names
        if not names:
            return literals[0]
        if len(names) == 1:
            return literals[0] + values[names[0]] + literals[1]
        parts = [literals[0]]
        for name, literal in zip(names, literals[1:], strict=True):
            parts.append(values[name])
            parts.append(literal)
        return "".join(parts)


class Template:
    """An immutable, validated prompt template."""

    __slots__ = (
        "_patterns",
        "_placeholders",
        "_sampling",
        "description",
        "digest",
        "endpoint",
        "fields",
        "name",
        "output",
        "path",
        "response_format",
        "sampling",
        "system",
        "user",
    )

    name: str
    description: str
    endpoint: str
    system: str | None
    user: str
    fields: tuple[str, ...]
    sampling: Mapping[str, Any]
    output: OutputSpec | None
    """The checks a reply must pass (the ``[output]`` table), if any."""
    response_format: dict[str, Any] | None
    """What rendering adds as ``response_format``; shared by every rendered body, so read only."""
    path: str | None
    digest: str
    _placeholders: frozenset[str]
    _sampling: dict[str, Any]
    """A private plain copy of ``sampling``: ``dict.update`` from it is several times faster."""
    _patterns: tuple[_Pattern, _Pattern]
    """``user`` and ``system`` cut at their placeholders."""

    def __init__(
        self,
        *,
        name: str,
        user: str,
        description: str = "",
        endpoint: str = "chat",
        system: str | None = None,
        fields: tuple[str, ...] = (),
        sampling: Mapping[str, Any] | None = None,
        output: OutputSpec | None = None,
        path: str | None = None,
        digest: str | None = None,
    ) -> None:
        where = f"template {name!r}" + (f" ({path})" if path else "")
        if endpoint not in _ENDPOINTS:
            raise ConfigError(
                f"{where}: endpoint must be 'chat', 'completions' or 'embeddings', not {endpoint!r}"
            )
        if not user.strip():
            raise ConfigError(f"{where}: 'user' is empty")
        if endpoint in ("completions", "embeddings") and system:
            raise ConfigError(f"{where}: a {endpoint!r} template has no system message")
        if endpoint == "embeddings" and output is not None:
            raise ConfigError(f"{where}: an 'embeddings' template has no [output] checks")
        allowed = {"persona", *fields}
        for part, text in (("system", system or ""), ("user", user)):
            unknown = sorted(_placeholders(text) - allowed)
            if unknown:
                listed = ", ".join("{" + u + "}" for u in unknown)
                raise ConfigError(
                    f"{where}: unknown placeholder {listed} in '{part}'; allowed: "
                    + ", ".join("{" + a + "}" for a in sorted(allowed))
                    + " (declare record fields in 'fields'; write {{ }} for literal braces)"
                )
        if "persona" not in _placeholders(user) | _placeholders(system or "") and not fields:
            raise ConfigError(f"{where}: the template uses no placeholder; add {{persona}}")
        sampling = dict(sampling or {})
        if endpoint == "embeddings":
            # Vectors travel as base64 float32 unless the template asks for floats: a third
            # of the bytes, and decoded without parsing decimals.
            sampling.setdefault("encoding_format", "base64")
        reserved = sorted(RESERVED_BODY & sampling.keys())
        if reserved:
            raise ConfigError(f"{where}: [sampling] may not set {', '.join(reserved)}")
        response_format = output.response_format(name) if output is not None else None
        if response_format is not None and "response_format" in sampling:
            raise ConfigError(f"{where}: [sampling] response_format and [output] both set it")
        set_ = object.__setattr__
        set_(self, "name", name)
        set_(self, "description", description)
        set_(self, "endpoint", endpoint)
        set_(self, "system", system or None)
        set_(self, "user", user)
        set_(self, "fields", tuple(fields))
        set_(self, "sampling", MappingProxyType(sampling))
        set_(self, "output", output)
        set_(self, "response_format", response_format)
        set_(self, "path", path)
        set_(self, "_placeholders", frozenset(_placeholders(user) | _placeholders(system or "")))
        set_(self, "_patterns", (_Pattern(user), _Pattern(system or "")))
        set_(self, "_sampling", dict(sampling))
        if digest is None:
            canonical = repr(
                (
                    endpoint,
                    system or None,
                    user,
                    tuple(fields),
                    sorted(sampling.items()),
                    output.canonical() if output is not None else None,
                )
            )
            digest = hashlib.sha256(canonical.encode()).hexdigest()
        set_(self, "digest", digest)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Template is immutable")

    def __repr__(self) -> str:
        return f"<Template {self.name} endpoint={self.endpoint} sha256={self.digest[:12]}>"

    @property
    def url(self) -> str:
        """Path of the request relative to the base URL."""
        return _ENDPOINTS[self.endpoint]

    @property
    def placeholders(self) -> frozenset[str]:
        return self._placeholders

    def render(
        self, record: Mapping[str, Any], *, persona_field: str = "persona"
    ) -> dict[str, Any]:
        """The request body for one record, without ``model``.

        Raises InputError when a placeholder's field is missing, empty or not text.
        """
        values: dict[str, str] = {}
        for name in self._placeholders:
            key = persona_field if name == "persona" else name
            value = record.get(key)
            if value is None:
                raise InputError(f"missing field {key!r}")
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                raise InputError(f"field {key!r} is {type(value).__name__}, not text")
            text = str(value)
            if not text.strip():
                raise InputError(f"empty field {key!r}")
            values[name] = text
        user_pattern, system_pattern = self._patterns
        user = user_pattern.fill(values)
        body: dict[str, Any]
        if self.endpoint == "completions":
            body = {"prompt": user}
        elif self.endpoint == "embeddings":
            body = {"input": user}
        else:
            message = {"role": "user", "content": user}
            if self.system:
                system = {"role": "system", "content": system_pattern.fill(values)}
                body = {"messages": [system, message]}
            else:
                body = {"messages": [message]}
        body.update(self._sampling)
        if self.response_format is not None:
            body["response_format"] = self.response_format
        return body


def parse_template(text: str, *, name: str, path: str | None = None) -> Template:
    """Build a Template from TOML text; ConfigError says what is wrong and where."""
    where = path or name
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"template {where}: not valid TOML: {exc}") from exc
    return template_from_table(
        data, name=name, path=path, digest=hashlib.sha256(text.encode()).hexdigest()
    )


def template_from_table(
    data: Mapping[str, Any], *, name: str, path: str | None = None, digest: str | None = None
) -> Template:
    """Build a Template from a template's TOML already parsed (a job file's inline
    ``[template]``); ``digest`` defaults to the sha256 of the table's canonical JSON."""
    where = path or name
    if digest is None:
        digest = hashlib.sha256(msgspec.json.encode(data, order="sorted")).hexdigest()
    unknown = sorted(data.keys() - _KEYS)
    if unknown:
        raise ConfigError(f"template {where}: unknown keys {unknown}; known: {sorted(_KEYS)}")
    user = data.get("user")
    if not isinstance(user, str):
        raise ConfigError(f"template {where}: 'user' (the prompt text) is required")
    fields = data.get("fields", [])
    if not isinstance(fields, list) or not all(
        isinstance(f, str) and f.isidentifier() for f in fields
    ):
        raise ConfigError(f"template {where}: 'fields' must be a list of field names")
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise ConfigError(f"template {where}: [sampling] must be a table")
    for key in ("description", "endpoint", "system"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"template {where}: {key!r} must be a string")
    output = None
    if "output" in data:
        try:
            output = parse_output(data["output"])
        except ValueError as exc:
            raise ConfigError(f"template {where}: {exc}") from None
    return Template(
        name=name,
        user=user,
        description=data.get("description", ""),
        endpoint=data.get("endpoint", "chat"),
        system=data.get("system"),
        fields=tuple(fields),
        sampling=sampling,
        output=output,
        path=path,
        digest=digest,
    )


def template_dir() -> Path:
    """Where the shipped templates are: inside the wheel, or ``prompts/`` of a source checkout."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "prompts"
    return packaged if packaged.is_dir() else package.parent / "prompts"


def available_templates() -> list[str]:
    """Names of the shipped templates, sorted."""
    return sorted(p.stem for p in template_dir().glob("*.toml"))


def load_template(name_or_path: str) -> Template:
    """A shipped template by name, or the user's own ``.toml`` file by path."""
    candidate = Path(name_or_path)
    looks_like_path = candidate.suffix == ".toml" or "/" in name_or_path or "\\" in name_or_path
    if not looks_like_path:
        candidate = template_dir() / f"{name_or_path}.toml"
        if not candidate.is_file():
            raise ConfigError(
                f"unknown template {name_or_path!r}; shipped templates: "
                + ", ".join(available_templates())
                + " (or give the path of a .toml file)"
            )
    try:
        text = candidate.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read template {name_or_path}: {exc}") from exc
    return parse_template(text, name=candidate.stem, path=str(candidate))
