"""The schema: every record asyncgen reads or writes, as msgspec Structs, in one place.

The records made per request are ``gc=False``: they hold decoded JSON and strings, never a
reference back to themselves, so the cycle collector need not track them (it was a large
part of the engine's CPU at thousands of requests in flight; see benchmarks/README.md).
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "NO_LINE",
    "BadLine",
    "Completion",
    "ErrorInfo",
    "Line",
    "Result",
    "Source",
    "Usage",
    "WorkItem",
    "bad_utf8",
    "failure_reason",
]


NO_LINE = msgspec.Raw(b"null")
"""A record's ``batch_line`` when it was not read from a Batch API output line."""


class Usage(msgspec.Struct, gc=False):
    """Token counts as reported by the server (OpenAI ``usage`` object); some gateways send
    ``null`` for counts they do not know, or leave them out, and such a reply is still a good
    reply. A count not given is unknown (None), never 0; a record without ``usage`` at all
    had none reported."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None

    @property
    def known(self) -> bool:
        """Are both the prompt and the completion counts reported?"""
        return self.prompt_tokens is not None and self.completion_tokens is not None


# The codes asyncgen itself gives, and the reason each is filed under.
_REASONS = {
    "timeout": "timeout",
    "connection_error": "connection",
    "invalid_output": "invalid_output",
    "insufficient_quota": "quota",
}


def failure_reason(code: str, status: int | None) -> str:
    """The normalised reason of a failure: ``quota``, ``timeout``, ``connection``,
    ``invalid_output``, ``http_NNN`` for any other HTTP error status (whatever code the
    server's body gave), else the code itself (``malformed_response``, ``stream_cut``, ...)."""
    reason = _REASONS.get(code)
    if reason is not None:
        return reason
    if status is not None and status >= 400:
        return f"http_{status}"
    return code


class ErrorInfo(msgspec.Struct, gc=False):
    """Why an item failed; ``code`` is machine-readable (the server's own, when it gave one),
    ``message`` for people, ``reason`` the normalised class (:func:`failure_reason`),
    filled in when not given, so records written before it existed decode with one."""

    code: str
    message: str
    status: int | None = None
    reason: str | None = None

    def __post_init__(self) -> None:
        if self.reason is None:
            self.reason = failure_reason(self.code, self.status)


class Source(msgspec.Struct, gc=False):
    """Where an input item came from: shard name (file name without extensions) and 1-based line."""

    shard: str
    line: int


class WorkItem(msgspec.Struct, gc=False):
    """One request ready to send: the output of *expand*, the input of *send*."""

    custom_id: str
    url: str
    """Path relative to the base URL: ``/chat/completions`` or ``/completions``."""
    body: dict[str, Any]
    source: Source
    template: str | None = None
    persona: str | None = None
    meta: dict[str, Any] = {}
    """Other fields of the input line, carried along into the result."""
    est_prompt_tokens: int = 0
    """Prompt tokens, estimated, for TPM pacing."""
    max_output_tokens: int | None = None
    """The request's output token limit, if it sets one."""
    persona_sha256: str | None = None
    sampling: dict[str, Any] | None = None
    """The body's parameters (all but model, messages, prompt), when known ahead; shared by
    the items of one template, so read only."""


class Result(msgspec.Struct, gc=False):
    """One committed outcome. ``error`` is null for a success, an object for a failure
    (the OpenAI Batch convention); results and failures share this schema."""

    custom_id: str
    error: ErrorInfo | None
    output: str | None
    finish_reason: str | None
    model: str | None
    template: str | None
    persona: str | None
    source: Source
    attempts: int
    latency_s: float
    created: float
    usage: Usage | None = None
    meta: dict[str, Any] = {}
    reasoning: str | None = None
    tool_calls: list[Any] | None = None
    ttft_s: float | None = None
    """Seconds from sending the successful attempt to its first token (streaming only)."""
    # provenance
    started: float | None = None
    """Unix time of the first attempt (``created``: when the outcome was known)."""
    endpoint: str | None = None
    """Base URL of the endpoint that answered last (never credentials or query)."""
    persona_sha256: str | None = None
    """First 16 hex digits of the SHA-256 of the persona text (UTF-8)."""
    template_sha256: str | None = None
    """First 16 hex digits of the template's content hash (``Template.digest``)."""
    sampling: dict[str, Any] = {}
    """The request's parameters other than model, messages and prompt (temperature, ...)."""
    replaces_failure: bool = False
    """Set by ``asyncgen retry-failed``: this record supersedes the item's earlier failure."""
    parsed: Any = None
    """The decoded reply of a template whose ``[output]`` asks for JSON."""
    rejected_usage: Usage | None = None
    """Tokens of the replies before this outcome that failed the template's ``[output]``
    checks: paid for, but not what ``usage`` describes."""
    rejected_output: str | None = None
    """The text of the last reply the template's ``[output]`` checks rejected (kept in an
    ``invalid_output`` failure, so it can be read without sending the item again)."""
    url: str | None = None
    """The request's path (``/chat/completions`` or ``/completions``); None in records
    written before it was kept."""
    batch_id: str | None = None
    """The OpenAI batch whose output this is (``--backend batch``): its tokens are billed
    at the Batch API's rate."""
    embedding: bytes | None = None
    """An embeddings reply's vector as little-endian float32 bytes (base64 in the JSON
    line; see :mod:`asyncgen.core.embedding`)."""
    batch_line: msgspec.Raw = NO_LINE
    """The Batch API output (or error) file's line this record was read from, as the
    server wrote it (without its newline), kept as JSON (null: none):
    ``export --format batch`` gives it back unchanged (its ``id``, ``request_id`` and
    body are nowhere else in the record). Raw, not text: written and read back without
    escaping (a str cost a third of the ingest rate, ``bench_batch_ingest.py``)."""


class BadLine(msgspec.Struct, gc=False):
    """An input line that could not become a request, kept with its location."""

    custom_id: str
    path: str
    source: Source
    error: ErrorInfo
    raw: str


# --- response views: decode only the fields we use -------------------------------------------


class _Message(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[Any] | None = None


class _Choice(msgspec.Struct, gc=False):
    message: _Message | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Embedding(msgspec.Struct, gc=False):
    embedding: list[float] | str | None = None
    index: int | None = None
    """Which of the request's inputs the vector is for (its position in ``data`` when the
    server leaves it out)."""


class Completion(msgspec.Struct, gc=False):
    """The part of a chat or text completion response, or of an embeddings response
    (``data``), that asyncgen keeps."""

    choices: list[_Choice] = []
    model: str | None = None
    usage: Usage | None = None
    data: list[_Embedding] = []


def bad_utf8(raw: bytes, exc: Exception) -> str | None:
    """For a line that failed to decode as JSON: the reason, if it is invalid UTF-8 (msgspec
    reports that as a :class:`UnicodeDecodeError` or, in 0.23, as a plain ``DecodeError``);
    None when the line is text that is not JSON."""
    if not isinstance(exc, UnicodeDecodeError):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as bad:
            exc = bad
        else:
            return None
    return f"not valid UTF-8 at byte {exc.start} ({exc.reason})"


class Line(msgspec.Struct, frozen=True, gc=False):
    """One raw input line (without its newline) and where it came from."""

    path: str
    shard: str
    lineno: int
    raw: bytes
