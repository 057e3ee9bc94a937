"""Expand: turn one input line into the request(s) to send. Pure and synchronous.

A line is either an OpenAI Batch request (``custom_id``, ``method``, ``url``, ``body``), sent
as it is, or a record carrying a persona, rendered through the job's template ``samples``
times. Persona ids are ``{shard}:{line}:{template}:{sample}``, deterministic from the input.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

from asyncgen.core.errors import InputError
from asyncgen.core.records import Line, Source, WorkItem, bad_utf8
from asyncgen.job.config import JobConfig
from asyncgen.job.prompts import Template

__all__ = ["BATCH_URLS", "Expander", "group_item", "job_expander"]

BATCH_URLS = {
    "/v1/chat/completions": "/chat/completions",
    "/v1/completions": "/completions",
    "/chat/completions": "/chat/completions",
    "/completions": "/completions",
    "/v1/embeddings": "/embeddings",
    "/embeddings": "/embeddings",
}
_decoder = msgspec.json.Decoder()
NOT_SAMPLING = frozenset({"model", "messages", "prompt", "input"})
"""Request fields that are content, not parameters (a result's ``sampling`` leaves them out)."""


def _estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens at about four characters each; flow control learns the real ratio."""
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(
                len(str(part.get("text", ""))) for part in content if isinstance(part, dict)
            )
    for key in ("prompt", "input"):
        text = body.get(key)
        if isinstance(text, str):
            chars += len(text)
    return chars // 4 + 1


def _max_output(body: dict[str, Any]) -> int | None:
    out = body.get("max_completion_tokens") or body.get("max_tokens")
    return out if isinstance(out, int) and out > 0 else None


def group_item(members: list[WorkItem]) -> WorkItem:
    """One embeddings request for several items of one template (``--embed-batch``): the
    first member's body with ``input`` the list of the members' texts, in their order, so
    the reply's ``index`` names the member. Its id names the first member and the count;
    only logs and errors see it (each member keeps its own id and record)."""
    first = members[0]
    body = {**first.body, "input": [m.body["input"] for m in members]}
    return WorkItem(
        f"{first.custom_id}+{len(members) - 1}",
        first.url,
        body,
        first.source,
        first.template,
        est_prompt_tokens=sum(m.est_prompt_tokens for m in members),
        max_output_tokens=first.max_output_tokens,
        sampling=first.sampling,
    )


class Expander:
    """Turns :class:`~asyncgen.storage.sources.Line` objects into :class:`WorkItem` lists."""

    def __init__(
        self,
        template: Template | None,
        *,
        model: str | None,
        samples: int = 1,
        persona_field: str = "persona",
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.template = template
        self.model = model
        self.samples = samples
        self.persona_field = persona_field
        self.overrides = dict(overrides or {})
        self._sampling: dict[str, Any] | None = None
        self._max_output: int | None = None

    def expand(self, line: Line) -> list[WorkItem]:
        """The requests for ``line``; raises :class:`InputError` naming file and line."""
        try:
            record = _decoder.decode(line.raw)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            reason = bad_utf8(line.raw, exc) or f"malformed JSON ({exc})"
            raise self._error(line, reason) from exc
        except RecursionError as exc:
            raise self._error(line, f"JSON nested too deeply ({exc})") from exc
        if not isinstance(record, dict):
            raise self._error(line, f"expected a JSON object, got {type(record).__name__}")
        source = Source(line.shard, line.lineno)
        if "custom_id" in record and "body" in record:
            return [self._batch_item(line, record, source)]
        return self._persona_items(line, record, source)

    def _batch_item(self, line: Line, record: dict[str, Any], source: Source) -> WorkItem:
        custom_id, body = record["custom_id"], record["body"]
        if not isinstance(custom_id, str) or not custom_id:
            raise self._error(line, "custom_id must be a non-empty string")
        if not isinstance(body, dict):
            raise self._error(line, "body must be a JSON object")
        method = record.get("method", "POST")
        if method != "POST":
            raise self._error(line, f"method {method!r} is not supported (POST only)")
        url = BATCH_URLS.get(record.get("url", "/v1/chat/completions"))
        if url is None:
            supported = ", ".join(k for k in BATCH_URLS if k.startswith("/v1"))
            raise self._error(line, f"url {record.get('url')!r} is not supported ({supported})")
        body = {**body, **self.overrides}
        if "model" not in body:
            if self.model is None:
                raise self._error(line, "body has no model and no --model was given")
            body["model"] = self.model
        if body.get("stream"):
            raise self._error(line, "stream=true is not supported in batch lines")
        meta = {k: v for k, v in record.items() if k not in ("custom_id", "method", "url", "body")}
        return WorkItem(
            custom_id=custom_id,
            url=url,
            body=body,
            source=source,
            meta=meta,
            est_prompt_tokens=_estimate_prompt_tokens(body),
            max_output_tokens=_max_output(body),
        )

    def _persona_items(self, line: Line, record: dict[str, Any], source: Source) -> list[WorkItem]:
        template = self.template
        if template is None:
            raise self._error(
                line, "not an OpenAI Batch request (custom_id, body) and no --prompt template given"
            )
        try:
            rendered = template.render(record, persona_field=self.persona_field)
        except InputError as exc:
            raise self._error(line, exc.reason) from exc
        body = {"model": self.model, **rendered, **self.overrides}
        persona = record.get(self.persona_field)
        persona = persona if isinstance(persona, str) else None
        digest = (
            hashlib.sha256(persona.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            if persona is not None
            else None
        )
        meta = {k: v for k, v in record.items() if k != self.persona_field}
        sampling = self._sampling
        if sampling is None:
            # The same for every record of the template: computed once, shared.
            sampling = self._sampling = {k: v for k, v in body.items() if k not in NOT_SAMPLING}
            self._max_output = _max_output(body)
        est = _estimate_prompt_tokens(body)
        prefix = f"{line.shard}:{line.lineno}:{template.name}:"
        url, name, max_output = template.url, template.name, self._max_output
        # Positional, in WorkItem's field order: a third of the cost of keywords, per item.
        return [
            WorkItem(
                f"{prefix}{sample}",
                url,
                body,
                source,
                name,
                persona,
                meta,
                est,
                max_output,
                digest,
                sampling,
            )
            for sample in range(self.samples)
        ]

    @staticmethod
    def _error(line: Line, message: str) -> InputError:
        return InputError(message, path=line.path, line=line.lineno)


def job_expander(cfg: JobConfig, template: Template | None) -> Expander:
    """The job's expander: its template (None: batch lines), model, samples and persona
    field, with ``--max-tokens`` and ``extra_body`` over the template's body."""
    overrides = dict(cfg.extra_body)
    if cfg.max_tokens is not None:
        overrides["max_tokens"] = cfg.max_tokens
    return Expander(
        template,
        model=cfg.model,
        samples=cfg.samples,
        persona_field=cfg.persona_field,
        overrides=overrides,
    )
