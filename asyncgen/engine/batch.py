"""The Batch API backend: the same job, sent as OpenAI Batch files through the openai SDK.

The items are written into *parts* (``OUT/batch/NAME.items.jsonl``, at most
``batch_max_requests`` each, one endpoint per part), durably, before anything is sent. Each
part then goes through upload (``files.create``), ``batches.create`` (tagged with
``metadata`` naming the job and the part), polling, and ingest: its output and error files
are downloaded and every line committed as a result or failure through the store and its
ledger, exactly as the online backend commits. Items that need another go (a batch that
failed, expired or was cancelled; ids missing from the output; retryable errors; replies
failing ``[output]``) go into a retry part, ``NAME-rK``, sent the same way, up to
``max_attempts`` (``max_invalid`` for invalid replies) rounds.

Crash safety: every step is recorded in an append-only journal (``OUT/batch/journal.jsonl``,
each line fsynced) after it happened and before anything relies on it:

- a part file exists (atomic write) before its ids are sent, so a rerun finds the same parts;
- ``uploaded`` (its file id) is logged before the batch is created; a crash before that
  uploads the file again (the orphan costs nothing);
- ``created`` (the batch id) is logged before polling; a crash before that is covered by
  the lookup a rerun makes before creating anything: ``batches.list``, all pages, for the
  job's batches by their metadata, so no part gets a second batch;
- ``ingested`` is logged after the whole output is committed and the retry part written; a
  crash mid-ingest ingests the same files again, and the ledger skips what was committed.

A finished job (every part ingested, every id committed) sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from asyncgen._version import __version__
from asyncgen.core.errors import AsyncgenError, ConfigError, InputError, TransportError, job_error
from asyncgen.core.ledger import bad_line_key
from asyncgen.core.records import (
    NO_LINE,
    BadLine,
    Completion,
    ErrorInfo,
    Line,
    Result,
    Source,
    WorkItem,
)
from asyncgen.core.redact import redact_text, redact_url
from asyncgen.core.validate import OutputSpec
from asyncgen.engine.record import build_result, check_reply, output_spec, reply_text
from asyncgen.engine.stats import Counts, Statistics
from asyncgen.job.config import JobConfig, job_record, job_spec
from asyncgen.job.items import Expander
from asyncgen.job.prompts import Template, load_template
from asyncgen.storage.files import atomic_write, fsync_path
from asyncgen.storage.formats import Input
from asyncgen.storage.sources import ShardReader, expand_inputs
from asyncgen.storage.store import Store

__all__ = ["TERMINAL", "BatchBackend", "BatchInfo", "JobBatches", "job_batches", "job_token"]

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_DIR = "batch"
_JOURNAL = "journal.jsonl"
_TOKEN = "job.json"
_META_JOB = "asyncgen_job"
_META_PART = "asyncgen_part"
_RETRYABLE_CODES = frozenset(
    {"batch_expired", "batch_cancelled", "missing", "batch_failed", "batch_file_gone"}
)
_MAX_FILE_BYTES = 190 * 2**20
"""A request file's size at most (OpenAI takes up to 200 MB)."""
_INGEST_CHUNK = 1024
"""Output lines committed at a time: a crash mid-file loses no more than this."""
_CRASH_ENV = "ASYNCGEN_BATCH_CRASH"
"""Tests only: ``uploaded``, ``journaled``, ``created``, ``polling``, ``ingest`` or
``retried`` (a retry part written, its parent not yet logged as ingested) makes the
process SIGKILL itself at that point (once the flag file named by the value after ``:``
does not exist, which it then creates), so that a crash test can stop it exactly there."""


class _Event(msgspec.Struct, omit_defaults=True):
    part: str
    event: str
    """``uploaded``, ``created`` or ``ingested``."""
    file_id: str | None = None
    batch_id: str | None = None


class _Token(msgspec.Struct):
    job: str


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


_completion = msgspec.json.Decoder(Completion)
_item_decoder = msgspec.json.Decoder(WorkItem)
_event_decoder = msgspec.json.Decoder(_Event)


def _crash_point(point: str) -> None:
    wanted = os.environ.get(_CRASH_ENV)
    if not wanted:
        return
    name, _, flag = wanted.partition(":")
    if name != point or (flag and os.path.exists(flag)):
        return
    if flag:
        Path(flag).touch()
    os.kill(os.getpid(), signal.SIGKILL)


def job_token(root: Path) -> str:
    """The job's name in its batches' metadata: made once, kept in ``OUT/batch/job.json``
    (two output directories running the same spec are two jobs)."""
    path = root / _DIR / _TOKEN
    with contextlib.suppress(FileNotFoundError):
        return msgspec.json.decode(path.read_bytes(), type=_Token).job
    (root / _DIR).mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    with atomic_write(path) as f:
        f.write(msgspec.json.encode(_Token(token)))
    return token


class _Journal:
    """The append-only journal: one fsynced JSON line per event; a torn last line is cut."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[_Event] = []
        data = path.read_bytes() if path.exists() else b""
        keep = data.rfind(b"\n") + 1
        for raw in data[:keep].splitlines():
            self.events.append(_event_decoder.decode(raw))
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the run
        if keep != len(data):
            self._file.truncate(keep)
        fsync_path(path.parent)

    def append(self, event: _Event) -> None:
        self._file.write(msgspec.json.encode(event) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.events.append(event)

    def close(self) -> None:
        self._file.close()


class _Part(msgspec.Struct, kw_only=True):
    name: str
    round: int
    file_id: str | None = None
    batch_id: str | None = None
    ingested: bool = False


def _round_of(name: str) -> int:
    base, _, retry = name.rpartition("-r")
    return int(retry) if base and retry.isdigit() else 0


def _retry_name(name: str) -> str:
    base, _, retry = name.rpartition("-r")
    if base and retry.isdigit():
        return f"{base}-r{int(retry) + 1}"
    return f"{name}-r1"


class JobBatches:
    """A job's parts as the output directory records them (synchronous, for status tools)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / _DIR
        self.parts: dict[str, _Part] = {}
        for path in sorted(self.dir.glob("*.items.jsonl")) if self.dir.exists() else []:
            name = path.name.removesuffix(".items.jsonl")
            self.parts[name] = _Part(name=name, round=_round_of(name))
        journal = self.dir / _JOURNAL
        if journal.exists():
            data = journal.read_bytes()
            for raw in data[: data.rfind(b"\n") + 1].splitlines():
                self.apply(_event_decoder.decode(raw))

    def apply(self, event: _Event) -> None:
        part = self.parts.get(event.part)
        if part is None:
            return
        if event.event == "uploaded":
            part.file_id = event.file_id
        elif event.event == "created":
            part.batch_id = event.batch_id
        elif event.event == "ingested":
            part.ingested = True

    def items_path(self, name: str) -> Path:
        return self.dir / f"{name}.items.jsonl"

    def read_items(self, name: str) -> dict[str, WorkItem]:
        items: dict[str, WorkItem] = {}
        with open(self.items_path(name), "rb") as f:
            for raw in f:
                item = _item_decoder.decode(raw)
                items[item.custom_id] = item
        return items

    def write_items(self, name: str, items: list[WorkItem]) -> None:
        encoder = msgspec.json.Encoder()
        with atomic_write(self.items_path(name)) as f:
            for item in items:
                f.write(encoder.encode(item) + b"\n")
        self.parts[name] = _Part(name=name, round=_round_of(name))


class BatchBackend:
    """Runs a job through the Batch API (see the module doc):
    ``async with BatchBackend(config, api_key=key) as job: await job.run()``; entering opens
    (and if needed repairs) the output directory, as the online :class:`Engine` does."""

    def __init__(
        self,
        config: JobConfig,
        *,
        api_key: str | None,
        report: Callable[[str], None] = lambda _: None,
        warn: Callable[[str], None] | None = None,
    ) -> None:
        config.validate()
        if len(config.base_urls) != 1:
            raise ConfigError(
                f"the batch backend sends a job to one server: give one --base-url, "
                f"not {len(config.base_urls)} (each server's batches are its own)"
            )
        self.config = config
        self._api_key = api_key
        self._report = report
        self._warn = warn or report
        self._accept_length = config.accept_length
        self._output: OutputSpec | None = None
        self.counts = Counts()
        self._started = time.monotonic()
        self._finished = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._endpoint = redact_url(config.base_urls[0])
        self._template: Template | None = None
        self._template_sha: str | None = None
        self._paths: list[Input] = []
        self._store_: Store | None = None
        self._journal: _Journal | None = None
        self._listed: dict[str, str] | None = None
        self._list_lock = asyncio.Lock()
        self._client: Any = None
        self._token = ""
        self._claimed: set[str] = set()
        """Parts a task of this run has taken on."""
        self.fraction = 0.0

    async def __aenter__(self) -> BatchBackend:
        cfg = self.config
        template = self._template = load_template(cfg.prompt) if cfg.prompt else None
        self._template_sha = template.digest[:16] if template is not None else None
        self._output = output_spec(template)
        # In a thread: a remote input (fsspec) is looked up over the network.
        self._paths = await asyncio.to_thread(expand_inputs, cfg.inputs)
        self._store_ = await asyncio.to_thread(
            Store.open,
            Path(cfg.output),
            job_spec(cfg, template),
            version=__version__,
            job=job_record(cfg, self._paths, template),
        )
        self._batches = JobBatches(self._store_.root)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._store_ is not None:
            await asyncio.to_thread(self._store_.close)

    @property
    def _store(self) -> Store:
        if self._store_ is None:
            raise RuntimeError("use 'async with BatchBackend(...)' before running it")
        return self._store_

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> Statistics:
        """Plan the parts, send every part not yet ingested, and return the statistics."""
        batches = self._batches
        token = await asyncio.to_thread(job_token, self._store.root)
        self._token = token
        await asyncio.to_thread(self._plan)
        pending = [p for p in batches.parts.values() if not p.ingested]
        if pending:
            self._journal = await asyncio.to_thread(_Journal, batches.dir / _JOURNAL)
            try:
                import openai
            except ImportError as exc:  # pragma: no cover - the extra is in [test]
                raise ConfigError(
                    "the batch backend needs the openai SDK: pip install 'asyncgen[batch]'"
                ) from exc
            self._client = openai.AsyncOpenAI(
                base_url=self.config.base_urls[0],
                api_key=self._api_key or "none",
                max_retries=self.config.max_attempts,
                timeout=self.config.timeout,
            )
            self._claimed = {p.name for p in pending}
            try:
                async with asyncio.TaskGroup() as tg:
                    for part in pending:
                        tg.create_task(self._part(part.name))
            except BaseExceptionGroup as group:
                error = job_error(group)
                if error is None:
                    raise
                raise _mapped(error) from None
            finally:
                await self._client.close()
                self._journal.close()
        self._finished = not self._stopping
        self.fraction = 1.0
        return self.statistics()

    def stop(self) -> None:
        """Stop polling: batches already created go on at the server; a rerun picks them up."""
        self._stopping = True
        self._stopped.set()

    def _plan(self) -> None:
        """Write parts for every item neither committed nor in a part still to be ingested."""
        cfg, ledger, batches = self.config, self._store.ledger, self._batches
        assigned: set[str] = set()
        for part in batches.parts.values():
            if not part.ingested:
                assigned.update(batches.read_items(part.name))
        numbers = [int(n[1:6]) for n in batches.parts if n[1:6].isdigit()]
        number = max(numbers, default=0)
        overrides = dict(cfg.extra_body)
        if cfg.max_tokens is not None:
            overrides["max_tokens"] = cfg.max_tokens
        expander = Expander(
            self._template,
            model=cfg.model,
            samples=cfg.samples,
            persona_field=cfg.persona_field,
            overrides=overrides,
        )
        # Per endpoint: the part being filled and its request file's size so far.
        open_parts: dict[str, tuple[list[WorkItem], list[int]]] = {}
        given: set[str] = set()
        """The batch lines' ids read so far (persona items' ids are unique by making)."""
        counts = self.counts
        batches.dir.mkdir(parents=True, exist_ok=True)
        size = msgspec.json.Encoder().encode

        def flush(url: str) -> None:
            nonlocal number
            number += 1
            batches.write_items(f"p{number:05d}", open_parts.pop(url)[0])

        bad: list[BadLine] = []

        def bad_line(line: Line, error: ErrorInfo) -> None:
            key = f"{line.shard}:{line.lineno}"
            if not ledger.is_committed(bad_line_key(key)):
                source = Source(line.shard, line.lineno)
                text = line.raw[:2000].decode("utf-8", "replace")
                bad.append(BadLine(key, line.path, source, error, text))

        for path in self._paths:
            reader = ShardReader(path)
            try:
                while lines := reader.read_batch(1024):
                    for line in lines:
                        counts.lines_read += 1
                        try:
                            expanded = expander.expand(line)
                        except InputError as exc:
                            if cfg.strict:
                                raise
                            bad_line(line, ErrorInfo("bad_input", exc.reason))
                            continue
                        for item in expanded:
                            if item.template is None:
                                # A batch line's id is the input's: it may be given twice.
                                # The first time counts (it is first in every run); the
                                # others are bad lines, as online.
                                if item.custom_id in given:
                                    message = f"custom_id {item.custom_id!r} appears twice"
                                    if cfg.strict:
                                        raise InputError(message, path=line.path, line=line.lineno)
                                    bad_line(line, ErrorInfo("duplicate_custom_id", message))
                                    continue
                                given.add(item.custom_id)
                            if ledger.is_committed(item.custom_id):
                                counts.skipped += 1
                                continue
                            if item.custom_id in assigned:
                                continue
                            bucket, used = open_parts.setdefault(item.url, ([], [0]))
                            line_bytes = len(size(item.body)) + len(item.custom_id) + 64
                            if bucket and used[0] + line_bytes > _MAX_FILE_BYTES:
                                flush(item.url)
                                bucket, used = open_parts.setdefault(item.url, ([], [0]))
                            bucket.append(item)
                            used[0] += line_bytes
                            if len(bucket) >= cfg.batch_max_requests:
                                flush(item.url)
            finally:
                reader.close()
        for url in list(open_parts):
            flush(url)
        if bad:
            ledger.commit(self._store.commit([], bad))
            counts.bad_lines += len(bad)

    async def _part(self, name: str) -> None:
        """One part from wherever it stands to ingested, then its retry part, if any."""
        while name and not self._stopping:
            part = self._batches.parts[name]
            items = await asyncio.to_thread(self._batches.read_items, name)
            if part.batch_id is None:
                part.batch_id = await self._find_batch(name)
                if part.batch_id is not None:
                    self._log(_Event(name, "created", batch_id=part.batch_id))
            if part.batch_id is None:
                if part.file_id is None:
                    part.file_id = await self._upload(name, items)
                    _crash_point("uploaded")
                    self._log(_Event(name, "uploaded", file_id=part.file_id))
                    _crash_point("journaled")
                part.batch_id = await self._create(name, part.file_id, items)
                _crash_point("created")
                self._log(_Event(name, "created", batch_id=part.batch_id))
            batch = await self._poll(name, part.batch_id)
            if batch is None:
                return
            retry = await self._ingest(part, items, batch)
            self._log(_Event(name, "ingested"))
            part.ingested = True
            # A rerun may have found the retry part on disk already, and given it a task.
            name = retry if retry is not None and retry not in self._claimed else ""
            self._claimed.add(name)

    def _log(self, event: _Event) -> None:
        assert self._journal is not None
        self._journal.append(event)

    async def _find_batch(self, name: str) -> str | None:
        """The batch of this job's part ``name`` at the server, if a run created one whose id
        it did not live to record: every page of ``batches.list`` is read, once per run."""
        async with self._list_lock:
            if self._listed is None:
                found: dict[str, str] = {}
                async for batch in self._client.batches.list(limit=100):
                    meta = batch.metadata or {}
                    if meta.get(_META_JOB) == self._token and _META_PART in meta:
                        found.setdefault(meta[_META_PART], batch.id)  # newest first
                self._listed = found
        return self._listed.get(name)

    async def _upload(self, name: str, items: dict[str, WorkItem]) -> str:
        data = await asyncio.to_thread(_request_file, items)
        self.counts.requests += 1
        uploaded = await self._client.files.create(
            file=(f"{name}.jsonl", data, "application/jsonl"), purpose="batch"
        )
        return str(uploaded.id)

    async def _create(self, name: str, file_id: str, items: dict[str, WorkItem]) -> str:
        url = next(iter(items.values())).url
        self.counts.requests += 1
        batch = await self._client.batches.create(
            input_file_id=file_id,
            endpoint="/v1" + url,
            completion_window="24h",
            metadata={_META_JOB: self._token, _META_PART: name},
        )
        self._report(f"batch {name}: created {batch.id} ({len(items):,} requests)")
        return str(batch.id)

    async def _poll(self, name: str, batch_id: str) -> Any:
        """Wait for the batch to end, a progress line per change; None if stopped first."""
        delay = self.config.batch_poll
        seen = ""
        while not self._stopping:
            batch = await self._client.batches.retrieve(batch_id)
            counts = batch.request_counts
            line = (
                f"batch {name}: {batch.status}"
                + (f", {counts.completed:,}/{counts.total:,} done" if counts else "")
                + (f", {counts.failed:,} failed" if counts and counts.failed else "")
            )
            if line != seen:
                self._report(line)
                seen = line
            if batch.status in TERMINAL:
                return batch
            _crash_point("polling")
            # A stop ends the wait: a Ctrl-C is answered now, not after up to 4 x --batch-poll.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), delay)
            delay = min(delay * 1.5, 4 * self.config.batch_poll)
        return None

    async def _ingest(self, part: _Part, items: dict[str, WorkItem], batch: Any) -> str | None:
        """Commit the batch's output and error lines; write the retry part; its name."""
        cfg = self.config
        outcome: dict[str, _Again | None] = {}
        """Ids seen in this ingest: None when committed, else why they go again."""
        gone: list[str] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                lost = await self._ingest_file(part, items, batch, file_id, outcome)
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
                error.code in _RETRYABLE_CODES
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
            await self._commit(final)
        if not again:
            return None
        name = _retry_name(part.name)
        if not self._batches.items_path(name).exists():
            await asyncio.to_thread(self._batches.write_items, name, again)
        else:
            self._batches.parts.setdefault(name, _Part(name=name, round=_round_of(name)))
        self.counts.retries += len(again)
        _crash_point("retried")
        return name

    async def _download(self, file_id: str, path: Path) -> None:
        """The file's content into ``path``, durably (written to ``.part``, then renamed)."""
        partial = path.with_suffix(".part")
        async with self._client.files.with_streaming_response.content(file_id) as response:
            with open(partial, "wb") as f:  # noqa: ASYNC230 - chunks, written as they come
                async for data in response.iter_bytes(1 << 20):
                    f.write(data)
        await asyncio.to_thread(fsync_path, partial)
        partial.rename(path)

    async def _ingest_file(
        self,
        part: _Part,
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
        reading = _read_lines(path, _INGEST_CHUNK)
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
                await self._commit(chunk)
                chunk = []
                _crash_point("ingest")
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
        try:
            completion = _completion.decode(response.body)
            if not completion.choices:
                raise msgspec.ValidationError("no choices")
        except msgspec.DecodeError as exc:
            error = ErrorInfo("malformed_response", f"unexpected reply: {exc}", 200)
            return None, _Again(error)
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

    async def _commit(self, results: list[Result]) -> None:
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

    def statistics(self) -> Statistics:
        counts = self._store.counts
        return Statistics(
            **msgspec.structs.asdict(self.counts),
            elapsed=time.monotonic() - self._started,
            succeeded_total=counts.get("results", 0),
            failed_total=counts.get("failures", 0) - self._store.replaced,
            bad_lines_total=counts.get("errors", 0),
            input_fraction=self.fraction,
            finished=self._finished,
            stopped=self._stopping,
        )


def _mapped(error: BaseException) -> BaseException:
    """An SDK error as asyncgen's own (the message without secrets); others as they are."""
    import openai

    if isinstance(error, AsyncgenError) or not isinstance(error, openai.OpenAIError):
        return error
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return ConfigError(f"the server refused the API key: {redact_text(str(error))}")
    return TransportError(f"Batch API: {redact_text(str(error))}")


def _request_file(items: dict[str, WorkItem]) -> bytes:
    """The OpenAI Batch input file of a part's items."""
    encode = msgspec.json.Encoder().encode
    return b"".join(
        encode({"custom_id": i.custom_id, "method": "POST", "url": "/v1" + i.url, "body": i.body})
        + b"\n"
        for i in items.values()
    )


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


class BatchInfo(msgspec.Struct, frozen=True):
    """One of a job's batches as the server reports it (``asyncgen batches``)."""

    id: str
    part: str
    status: str
    total: int
    completed: int
    failed: int
    created_at: int


async def job_batches(root: Path, *, api_key: str | None, cancel: bool = False) -> list[BatchInfo]:
    """The batches of the job in ``root`` at the server its manifest names (every page of
    ``batches.list``, matched by metadata), oldest first; ``cancel``: cancel those still
    running, and report them as the server answered the cancel."""
    import openai

    from asyncgen.storage.manifest import read_manifest

    manifest = await asyncio.to_thread(read_manifest, root)
    job = manifest.job
    if job is None or len(job.base_url) != 1:
        raise ConfigError(f"{root} does not record one endpoint to ask")
    token_path = root / _DIR / _TOKEN
    if not token_path.exists():
        return []
    token = msgspec.json.decode(token_path.read_bytes(), type=_Token).job
    found: list[BatchInfo] = []
    async with openai.AsyncOpenAI(base_url=job.base_url[0], api_key=api_key or "none") as client:
        async for batch in client.batches.list(limit=100):
            meta = batch.metadata or {}
            if meta.get(_META_JOB) != token:
                continue
            if cancel and batch.status not in TERMINAL and batch.status != "cancelling":
                batch = await client.batches.cancel(batch.id)
            counts = batch.request_counts
            found.append(
                BatchInfo(
                    batch.id,
                    meta.get(_META_PART, "?"),
                    batch.status,
                    counts.total if counts else 0,
                    counts.completed if counts else 0,
                    counts.failed if counts else 0,
                    batch.created_at,
                )
            )
    found.reverse()
    return found
