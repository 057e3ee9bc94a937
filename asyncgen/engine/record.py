"""An item's outcome as its :class:`Result`: one builder for both backends (the online
sender and the Batch API's ingest), and the ``[output]`` checks both apply to a reply."""

from __future__ import annotations

from typing import Any

import msgspec

from asyncgen.core.embedding import vector_bytes
from asyncgen.core.records import NO_LINE, Completion, ErrorInfo, Result, Usage, WorkItem
from asyncgen.core.validate import Checked, OutputSpec, parse_output
from asyncgen.job.items import NOT_SAMPLING
from asyncgen.job.prompts import Template

__all__ = ["PLAIN", "build_result", "check_reply", "output_spec", "reply_text"]

PLAIN = parse_output({})
"""The checks of a template without ``[output]``: a reply must not be empty."""
_UNCHECKED = Checked(None)


def output_spec(template: Template | None) -> OutputSpec | None:
    """The checks a job's replies get: its template's (``PLAIN`` without ``[output]``);
    none for batch lines (no template)."""
    return (template.output or PLAIN) if template is not None else None


def reply_text(c: Completion) -> str | None:
    """The text of a completion's first choice (chat or text)."""
    choice = c.choices[0]
    return choice.message.content if choice.message is not None else choice.text


def check_reply(
    spec: OutputSpec | None, item: WorkItem, c: Completion, *, accept_length: bool
) -> Checked:
    """The template's checks on a reply (batch lines and embeddings have none)."""
    if spec is None or item.template is None or not c.choices:
        return _UNCHECKED
    choice = c.choices[0]
    calls = choice.message is not None and bool(choice.message.tool_calls)
    return spec.check(
        reply_text(c), choice.finish_reason, tool_calls=calls, accept_length=accept_length
    )


def build_result(
    item: WorkItem,
    error: ErrorInfo | None,
    completion: Completion | None,
    *,
    attempts: int,
    latency: float,
    created: float,
    started: float | None,
    endpoint: str | None,
    template_sha: str | None,
    ttft: float | None = None,
    parsed: Any = None,
    replaces_failure: bool = False,
    rejected: Usage | None = None,
    rejected_text: str | None = None,
    batch_id: str | None = None,
    batch_line: msgspec.Raw = NO_LINE,
) -> Result:
    """The record of an item's outcome, with its provenance: a success if ``completion``
    is given (a chat or text completion with a choice, or an embedding), else a failure.
    Counting its tokens is the caller's."""
    body = item.body
    model = body.get("model")
    output = finish_reason = reasoning = tool_calls = usage = embedding = None
    if completion is not None:
        usage = completion.usage
        model = completion.model or model
        if completion.data:
            embedding = vector_bytes(completion.data[0].embedding)  # checked by interpret
        else:
            choice = completion.choices[0]
            message = choice.message
            output = message.content if message is not None else choice.text
            finish_reason = choice.finish_reason
            if message is not None:
                reasoning = message.reasoning_content or message.reasoning
                tool_calls = message.tool_calls
    # Positional: a Struct takes them about three times faster than by keyword, and this
    # runs once per item. The order is Result's field order (tests/test_engine.py,
    # test_every_field_of_a_record_holds_its_own_value, checks each field).
    return Result(
        item.custom_id,
        error,
        output,
        finish_reason,
        model,
        item.template,
        item.persona,
        item.source,
        attempts,
        round(latency, 4),
        created,
        usage,
        item.meta,
        reasoning,
        tool_calls,
        None if ttft is None else round(ttft, 4),
        started,
        endpoint,
        item.persona_sha256,
        template_sha if item.template else None,
        item.sampling
        if item.sampling is not None
        else {k: v for k, v in body.items() if k not in NOT_SAMPLING},
        replaces_failure,
        parsed,
        rejected,
        rejected_text,
        item.url,
        batch_id,
        embedding,
        batch_line,
    )
