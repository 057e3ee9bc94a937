"""TOML job files: ``asyncgen run job.toml``, every run option as a key.

A job file is read into the options it sets (:func:`read_job_file`: the ``argparse`` names of
the run options, so the command line can override any of them) and written back from a set of
options (:func:`render_job_file`, for ``--print-config``). The layout::

    inputs = ["personas/*.jsonl.zst"]      # top level: what to read, what to ask, where to put it
    output = "out/stories"
    prompt = "persona-story"               # or an inline [template] table
    model = "Qwen/Qwen3-8B"
    [sampling]                             # max_tokens, temperature, top_p, extra_body
    [limits]                               # concurrency, rpm, tpm, attempts, timeouts, embed_batch
    [[endpoints]]                          # base_url, the variable holding its key, and
                                           # its own rpm, tpm and concurrency
    [batch], [log], [metrics], [progress]

An unknown key is an error that names the key and its line; a value of the wrong kind is an
error that names the key; ranges are checked where every job's settings are
(:meth:`~asyncgen.job.config.JobConfig.validate`).
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from asyncgen.core.errors import ConfigError

__all__ = ["JobFile", "read_job_file", "render_job_file"]


class _Key(NamedTuple):
    dest: str
    """The run option's ``argparse`` name."""
    kind: str
    """str, int, number, bool, strings (a list of them), table, nobool (a bool stored negated)."""
    choices: tuple[str, ...] = ()
    """For a str: the values allowed (as the option's ``choices``)."""


# section -> key -> option; "" is the top level. The order is the order --print-config writes.
_SCHEMA: dict[str, dict[str, _Key]] = {
    "": {
        "inputs": _Key("input", "strings"),
        "output": _Key("output", "str"),
        "prompt": _Key("prompt", "str"),
        "model": _Key("model", "str"),
        "samples": _Key("samples", "int"),
        "persona_field": _Key("persona_field", "str"),
        "strict": _Key("strict", "bool"),
        "stream": _Key("stream", "bool"),
        "check_endpoint": _Key("no_check", "nobool"),
        "api_key_env": _Key("api_key_env", "str"),
    },
    "sampling": {
        "max_tokens": _Key("max_tokens", "int"),
        "temperature": _Key("temperature", "number"),
        "top_p": _Key("top_p", "number"),
        "extra_body": _Key("extra_body", "table"),
    },
    "limits": {
        "concurrency": _Key("concurrency", "int"),
        "min_concurrency": _Key("min_concurrency", "int"),
        "rpm": _Key("rpm", "number"),
        "tpm": _Key("tpm", "number"),
        "max_attempts": _Key("max_attempts", "int"),
        "max_invalid": _Key("max_invalid", "int"),
        "timeout": _Key("timeout", "number"),
        "idle_timeout": _Key("idle_timeout", "number"),
        "embed_batch": _Key("embed_batch", "int"),
        "deadline": _Key("deadline", "number"),
        "drain_timeout": _Key("drain_timeout", "number"),
    },
    "batch": {
        "backend": _Key("backend", "str", ("online", "batch")),
        "poll": _Key("batch_poll", "number"),
        "max_requests": _Key("batch_max_requests", "int"),
    },
    "workers": {
        "count": _Key("workers", "int"),
        "ray": _Key("ray", "str"),
        "partition_lines": _Key("partition_lines", "int"),
    },
    "log": {
        "format": _Key("log_format", "str", ("text", "json")),
        "level": _Key("log_level", "str", ("debug", "info", "warning", "error")),
    },
    "metrics": {
        "port": _Key("metrics_port", "int"),
        "host": _Key("metrics_host", "str"),
        "price_in": _Key("price_in", "number"),
        "price_out": _Key("price_out", "number"),
    },
    "progress": {
        "interval": _Key("progress_interval", "number"),
        "quiet": _Key("quiet", "bool"),
    },
}
_ENDPOINT_LIMITS = {
    "rpm": _Key("rpm", "number"),
    "tpm": _Key("tpm", "number"),
    "concurrency": _Key("concurrency", "int"),
}
"""An ``[[endpoints]]`` entry's own limits, beside the job-wide ones in ``[limits]``."""
_ENDPOINT_KEYS = {"base_url", "api_key_env", *_ENDPOINT_LIMITS}
_TABLES = {"template", "endpoints", *(s for s in _SCHEMA if s)}

_HEADER = re.compile(r"\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_ASSIGN = re.compile(r"\s*(\"[^\"]*\"|'[^']*'|[A-Za-z0-9_.-]+)\s*=")
_BARE = re.compile(r"[A-Za-z0-9_-]+")


class JobFile(NamedTuple):
    """A job file read: the options it sets, and what identifies it."""

    options: dict[str, Any]
    """Run options by ``argparse`` name; ``endpoint_key_envs`` holds one key variable (or
    None) per ``[[endpoints]]`` entry, ``endpoint_limits`` (when any entry has some) one
    table of ``rpm``/``tpm``/``concurrency`` (or None) per entry, and ``template`` an inline
    template."""
    path: str
    sha256: str


def read_job_file(path: str) -> JobFile:
    """Read a TOML job file; ConfigError names the file, and the line of an unknown key."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read job file {path}: {exc.strerror or exc}") from exc
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"job file {path}: not valid TOML: {exc}") from exc
    lines = _key_lines(text)

    def unknown(section: str, key: str, known: set[str] | dict[str, _Key]) -> ConfigError:
        name = f"{section}.{key}" if section else key
        line = lines.get((section, key))
        where = f"{path}:{line}" if line else path
        return ConfigError(
            f"job file {where}: unknown key {name!r}; known here: {', '.join(sorted(known))}"
        )

    options: dict[str, Any] = {}
    top_known = set(_SCHEMA[""]) | _TABLES
    for key, value in data.items():
        if key not in top_known:
            raise unknown("", key, top_known)
        if key == "template":
            if not isinstance(value, dict):
                raise ConfigError(f"job file {path}: 'template' must be a table")
            options["template"] = value
        elif key == "endpoints":
            _read_endpoints(path, value, options, unknown)
        elif key in _SCHEMA[""]:
            _put(path, key, _SCHEMA[""][key], value, options)
        else:
            if not isinstance(value, dict):
                raise ConfigError(f"job file {path}: {key!r} must be a table ([{key}])")
            section = _SCHEMA[key]
            for sub, subvalue in value.items():
                if sub not in section:
                    raise unknown(key, sub, section)
                _put(path, f"{key}.{sub}", section[sub], subvalue, options)
    return JobFile(options, path, hashlib.sha256(raw).hexdigest())


def _read_endpoints(path: str, value: Any, options: dict[str, Any], unknown: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise ConfigError(f"job file {path}: 'endpoints' must be tables ([[endpoints]])")
    urls: list[str] = []
    envs: list[str | None] = []
    limits: list[dict[str, Any] | None] = []
    for entry in value:
        own: dict[str, Any] = {}
        for key, sub in entry.items():
            if key not in _ENDPOINT_KEYS:
                raise unknown("endpoints", key, _ENDPOINT_KEYS)
            if key in _ENDPOINT_LIMITS:
                _put(path, f"endpoints.{key}", _ENDPOINT_LIMITS[key], sub, own)
        url, env = entry.get("base_url"), entry.get("api_key_env")
        if not isinstance(url, str):
            raise ConfigError(f"job file {path}: each [[endpoints]] needs a base_url string")
        if env is not None and not isinstance(env, str):
            raise ConfigError(f"job file {path}: endpoints.api_key_env must be a string")
        urls.append(url)
        envs.append(env)
        limits.append(own or None)
    options["base_url"] = urls
    options["endpoint_key_envs"] = envs
    if any(limits):
        options["endpoint_limits"] = limits


def _put(path: str, name: str, key: _Key, value: Any, options: dict[str, Any]) -> None:
    kind = key.kind
    ok = {
        "str": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "nobool": isinstance(value, bool),
        "strings": isinstance(value, str)
        or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
        "table": isinstance(value, dict),
    }[kind]
    if not ok:
        wanted = {
            "str": "a string",
            "int": "a whole number",
            "number": "a number",
            "bool": "true or false",
            "nobool": "true or false",
            "strings": "a list of strings",
            "table": "a table",
        }[kind]
        raise ConfigError(f"job file {path}: {name} must be {wanted}, got {value!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(
            f"job file {path}: {name} must be one of {', '.join(key.choices)}, got {value!r}"
        )
    if kind == "nobool":
        value = not value
    elif kind == "strings" and isinstance(value, str):
        value = [value]
    elif kind == "number":
        value = float(value)
    options[key.dest] = value


def _key_lines(text: str) -> dict[tuple[str, str], int]:
    """Where each key is first set, by (table, key): tomllib keeps no positions."""
    found: dict[tuple[str, str], int] = {}
    section = ""
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            section = header.group(1).strip().strip("\"'")
            found.setdefault(("", section.split(".")[0]), number)
            continue
        assign = _ASSIGN.match(line)
        if assign:
            key = assign.group(1).strip("\"'").split(".")[0]
            found.setdefault((section, key), number)
    return found


def render_job_file(options: Mapping[str, Any]) -> str:
    """The job file that sets ``options`` (run options by ``argparse`` name): what
    ``--print-config`` shows; reading it back gives the same options. None is left out."""
    out: list[str] = []
    for section, keys in _SCHEMA.items():
        body = []
        for key, spec in keys.items():
            value = options.get(spec.dest)
            if spec.kind == "nobool":
                value = None if value is None else not value
            if value is None or (spec.kind == "table" and not value):
                continue
            body.append(f"{_toml_key(key)} = {_toml_value(value)}")
        if body:
            out.extend(["", f"[{section}]"] if section else [])
            out.extend(body)
    urls = options.get("base_url") or []
    envs = options.get("endpoint_key_envs") or [None] * len(urls)
    limits = options.get("endpoint_limits") or [None] * len(urls)
    for url, env, own in zip(urls, envs, limits, strict=True):
        out.extend(["", "[[endpoints]]", f"base_url = {_toml_value(url)}"])
        if env is not None:
            out.append(f"api_key_env = {_toml_value(env)}")
        set_here = {k: v for k, v in (own or {}).items() if v is not None}
        out.extend(f"{k} = {_toml_value(set_here[k])}" for k in _ENDPOINT_LIMITS if k in set_here)
    template = options.get("template")
    if template:
        out.extend(["", "[template]"])
        out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in template.items())
    return "\n".join(out).lstrip("\n") + "\n"


def _toml_key(key: str) -> str:
    return key if _BARE.fullmatch(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a TOML basic string (same escapes; TOML has no "\/", JSON never
        # writes one).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise ConfigError(f"cannot write {value!r} in a job file")
