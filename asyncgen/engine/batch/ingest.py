"""Ingest: a finished batch's output and error files, downloaded whole (durably) and read
``INGEST_CHUNK`` lines at a time into records committed through the store and its ledger
(memory flat in the file's size); what has no result yet goes into the retry part."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from asyncgen.core.records import NO_LINE, Completion, ErrorInfo, Result, WorkItem
from asyncgen.core.redact import redact_text
from asyncgen.core.retry import interpret
from asyncgen.engine.batch.state import JobBatches, Part, crash_point, retry_name, round_of
from asyncgen.engine.record import build_result, check_reply, output_spec, reply_text
from asyncgen.engine.stats import Counts
from asyncgen.job.config import JobConfig
from asyncgen.job.prompts import Template
from asyncgen.storage.files import fsync_path
from asyncgen.storage.store import Store

__all__ = ["INGEST_CHUNK", "Ingest"]

RETRYABLE_CODES = frozenset(
    {"batch_expired", "batch_cancelled", "missing", "batch_failed", "batch_file_gone"}
)
"""Codes of the errors that send an item again (with 5xx, 408 and 429 statuses, and
``invalid_output`` up to ``max_invalid``)."""
INGEST_CHUNK = 1024
"""Output lines committed at a time: a crash mid-file loses no more than this."""


class _Line(msgspec.Struct):
    """One line of a batch output or error file (the fields asyncgen reads)."""

    custom_id: str | None = None
    response: _Response | None = None
    error: _LineError | None = None


class _Response(msgspec.Struct):
    status_code: int = 0
    body: msgspec.Raw = msgspec.Raw(b"null")
    """Decoded only once the status says what it is (a completion, or an error)."""


class _LineError(msgspec.Struct):
    code: str | None = None
    message: str | None = None


_line_decoder = msgspec.json.Decoder(_Line)


class _Again(NamedTuple):
    """Why an item of an ingested batch has no result yet: it is sent again, or failed."""

    error: ErrorInfo
    line: msgspec.Raw = NO_LINE
    """The output or error file's line that said so, as the server wrote it."""
    rejected: str | None = None
    """The text of a reply the ``[output]`` checks rejected."""


class _OddLines:
    """Lines of an output file that commit nothing, told once per file: a few named, the
    rest counted (a file of 50 000 strange lines must not print 50 000 warnings)."""

    _NAMED = 3

    def __init__(self, where: str) -> None:
        self._where = where
        self._counts: dict[str, int] = {}
        self._named: list[str] = []

    def _add(self, kind: str, detail: str) -> None:
        n = self._counts[kind] = self._counts.get(kind, 0) + 1
        if n <= self._NAMED:
            self._named.append(f"{self._where}: {detail}")

    def malformed(self, lineno: int, why: str) -> None:
        self._add("not a batch output line", f"line {lineno} is not a batch output line ({why})")

    def unknown(self, lineno: int, custom_id: str | None) -> None:
        self._add(
            "for an id not in the part",
            f"line {lineno} is for custom_id {custom_id!r}, not in the part",
        )

    def repeated(self, lineno: int, custom_id: str) -> None:
        self._add("repeating an id", f"line {lineno} repeats custom_id {custom_id!r}")

    def warnings(self) -> list[str]:
        if not self._counts:
            return []
        total = ", ".join(f"{n:,} {kind}" for kind, n in self._counts.items())
        return [
            *(f"{named}; ignored" for named in self._named),
            f"{self._where}: {total}: ignored, nothing committed for them",
        ]


class Ingest:
    """Turns a part's finished batch into records (:meth:`part`); ``client`` (the openai
    SDK's, for downloads) is the backend's, set once it has one."""

    def __init__(
        self,
        config: JobConfig,
        store: Store,
        batches: JobBatches,
        counts: Counts,
        *,
        template: Template | None,
        endpoint: str,
        warn: Callable[[str], None],
    ) -> None:
        self.config = config
        self._store = store
        self._batches = batches
        self.counts = counts
        self._warn = warn
        self._output = output_spec(template)
        self._accept_length = config.accept_length
        self._template_sha = template.digest[:16] if template is not None else None
        self._endpoint = endpoint
        self.client: Any = None

    async def part(self, part: Part, items: dict[str, WorkItem], batch: Any) -> str | None:
        """Commit the batch's output and error lines; write the retry part; its name."""
        cfg = self.config
        outcome: dict[str, _Again | None] = {}
        """Ids seen in this ingest: None when committed, else why they go again."""
        gone: list[str] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                lost = await self.file(part, items, batch, file_id, outcome)
                if lost is not None:
                    gone.append(lost)
        why = ErrorInfo("missing", f"not in the output of batch {batch.id} ({batch.status})")
        if batch.status == "failed":
            errors = getattr(batch.errors, "data", None) or []
            text = "; ".join(str(e.message) for e in errors if e.message) or "no reason given"
            why = ErrorInfo("batch_failed", f"batch {batch.id} failed: {redact_text(text)}")
        elif batch.status in ("expired", "cancelled"):
            why = ErrorInfo(f"batch_{batch.status}", f"batch {batch.id} {batch.status}")
        elif gone:
            why = ErrorInfo("batch_file_gone", "; ".join(gone))
        unseen = _Again(why)
        again: list[WorkItem] = []
        final: list[Result] = []
        ledger = self._store.ledger
        attempts = part.round + 1
        for custom_id, item in items.items():
            if ledger.is_committed(custom_id):
                continue
            seen = outcome.get(custom_id, unseen)
            if seen is None:
                continue
            error = seen.error
            bound = cfg.max_invalid if error.code == "invalid_output" else cfg.max_attempts
            retryable = (
                error.code in RETRYABLE_CODES
                or error.code == "invalid_output"
                or (
                    error.status is not None and (error.status >= 500 or error.status in (408, 429))
                )
            )
            if retryable and attempts < bound:
                again.append(item)
            else:
                final.append(self._record(item, error, attempts, batch, seen=seen))
        if final:
            await self.commit(final)
        if not again:
            return None
        name = retry_name(part.name)
        if not self._batches.items_path(name).exists():
            await asyncio.to_thread(self._batches.write_items, name, again)
        else:
            self._batches.parts.setdefault(name, Part(name=name, round=round_of(name)))
        self.counts.retries += len(again)
        crash_point("retried")
        return name

    async def _download(self, file_id: str, path: Path) -> None:
        """The file's content into ``path``, durably (written to ``.part``, then renamed)."""
        partial = path.with_suffix(".part")
        async with self.client.files.with_streaming_response.content(file_id) as response:
            with open(partial, "wb") as f:  # noqa: ASYNC230 - chunks, written as they come
                async for data in response.iter_bytes(1 << 20):
                    f.write(data)
        await asyncio.to_thread(fsync_path, partial)
        partial.rename(path)

    async def file(
        self,
        part: Part,
        items: dict[str, WorkItem],
        batch: Any,
        file_id: str,
        outcome: dict[str, _Again | None],
    ) -> str | None:
        """Commit one output or error file's lines; None, or why the file could not be had
        (gone at the server: its items are then missing from the output)."""
        import openai

        path = self._batches.dir / f"{part.name}.{file_id}.jsonl"
        if not path.exists():
            try:
                await self._download(file_id, path)
            except openai.NotFoundError:
                lost = f"file {file_id} of batch {batch.id} is gone at the server (404)"
                self._warn(
                    f"batch {part.name}: {lost}; its requests count as missing from the output"
                )
                return lost
        ledger = self._store.ledger
        attempts = part.round + 1
        chunk: list[Result] = []
        odd = _OddLines(f"batch {part.name}: {path.name}")
        reading = _read_lines(path, INGEST_CHUNK)
        empty: list[tuple[int, bytes]] = []
        while lines := await asyncio.to_thread(next, reading, empty):
            for lineno, raw in lines:
                try:
                    line = _line_decoder.decode(raw)
                except msgspec.DecodeError as exc:
                    odd.malformed(lineno, str(exc))
                    continue
                custom_id = line.custom_id
                item = items.get(custom_id) if custom_id is not None else None
                if item is None:
                    odd.unknown(lineno, custom_id)
                    continue
                if item.custom_id in outcome:
                    odd.repeated(lineno, item.custom_id)
                    continue
                if ledger.is_committed(item.custom_id):
                    outcome[item.custom_id] = None
                    continue
                text = msgspec.Raw(raw.rstrip(b"\r\n"))
                result, again = self._judge(item, line, text, attempts, batch)
                outcome[item.custom_id] = again
                if result is not None:
                    chunk.append(result)
            if chunk:
                await self.commit(chunk)
                chunk = []
                crash_point("ingest")
        for warning in odd.warnings():
            self._warn(warning)
        return None

    def _judge(
        self, item: WorkItem, line: _Line, text: msgspec.Raw, attempts: int, batch: Any
    ) -> tuple[Result | None, _Again | None]:
        """A success's record, or the error that sends the item again (or fails it);
        ``text`` is the line as the server wrote it, kept in the record."""
        response = line.response
        if response is None or response.status_code != 200:
            if line.error is not None:
                error = ErrorInfo(
                    line.error.code or "batch_error", redact_text(line.error.message or ""), None
                )
                return None, _Again(error, text)
            if response is None:
                return None, _Again(ErrorInfo("malformed_line", "neither response nor error"))
            body = msgspec.json.decode(response.body)
            err = body.get("error") if isinstance(body, dict) else None
            message = err.get("message") if isinstance(err, dict) else None
            code = err.get("code") if isinstance(err, dict) else None
            status = response.status_code
            error = ErrorInfo(
                str(code or f"http_{status}"), redact_text(str(message or "")), status
            )
            return None, _Again(error, text)
        # The online path's reading of a 200: a completion with a choice, or (an embeddings
        # line, one input each) a vector; anything else is malformed, and final here.
        embeddings = 1 if item.url == "/embeddings" else 0
        read = interpret(200, bytes(response.body), embeddings=embeddings)
        completion = read.completion
        if completion is None:
            assert read.error is not None
            return None, _Again(read.error)
        checked = check_reply(self._output, item, completion, accept_length=self._accept_length)
        if checked.reason is not None:
            self.counts.rejected += 1
            self._count(completion)
            error = ErrorInfo("invalid_output", checked.reason, 200)
            return None, _Again(error, rejected=reply_text(completion))
        record = self._record(item, None, attempts, batch, completion, checked.parsed, text)
        return record, None

    def _count(self, completion: Completion) -> None:
        usage = completion.usage
        if usage is not None:
            self.counts.prompt_tokens += usage.prompt_tokens or 0
            self.counts.completion_tokens += usage.completion_tokens or 0

    def _record(
        self,
        item: WorkItem,
        error: ErrorInfo | None,
        attempts: int,
        batch: Any,
        completion: Completion | None = None,
        parsed: Any = None,
        text: msgspec.Raw = NO_LINE,
        *,
        seen: _Again | None = None,
    ) -> Result:
        """The item's record: a success from ``completion`` (``text``: its output line),
        else a failure, with the line that said so (``seen``) when there was one."""
        if completion is not None:
            self._count(completion)
        rejected_text = None
        if seen is not None:
            text, rejected_text = seen.line, seen.rejected
        if error is not None and attempts > 1:
            error = ErrorInfo(
                error.code,
                f"gave up after {attempts} batch rounds: {error.message}",
                error.status,
            )
        created = float(batch.created_at)
        ended = batch.completed_at or batch.expired_at or batch.failed_at or batch.cancelled_at
        return build_result(
            item,
            error,
            completion,
            attempts=attempts,
            latency=float(ended) - created if ended else 0.0,
            created=time.time(),
            started=created,
            endpoint=self._endpoint,
            template_sha=self._template_sha,
            parsed=parsed,
            rejected_text=rejected_text,
            batch_id=str(batch.id),
            batch_line=text,
        )

    async def commit(self, results: list[Result]) -> None:
        ledger = self._store.ledger
        fresh = [r for r in results if not ledger.is_committed(r.custom_id)]
        if not fresh:
            return
        ids = await asyncio.to_thread(self._store.commit, fresh)
        ledger.commit(ids)
        for r in fresh:
            if r.error is None:
                self.counts.succeeded += 1
            else:
                self.counts.failed += 1

    # --- observing ----------------------------------------------------------------------------


def _read_lines(path: Path, n: int) -> Iterator[list[tuple[int, bytes]]]:
    """The non-empty lines of ``path`` with their 1-based numbers, ``n`` at a time
    (memory flat in the file's size)."""
    with open(path, "rb") as f:
        lines: list[tuple[int, bytes]] = []
        for lineno, raw in enumerate(f, 1):
            if raw.strip():
                lines.append((lineno, raw))
            if len(lines) >= n:
                yield lines
                lines = []
        if lines:
            yield lines
