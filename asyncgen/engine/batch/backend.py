"""The lifecycle of a job's parts through the Batch API: upload, create (found again in
``batches.list`` after a crash), poll, ingest (:mod:`.ingest`), then the retry part; see
the package's doc for the order that makes it crash-safe."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from asyncgen._version import __version__
from asyncgen.core.errors import AsyncgenError, ConfigError, TransportError, job_error
from asyncgen.core.records import WorkItem
from asyncgen.core.redact import redact_text, redact_url
from asyncgen.engine.batch.ingest import Ingest
from asyncgen.engine.batch.plan import plan_parts, request_file
from asyncgen.engine.batch.state import (
    JOURNAL,
    META_JOB,
    META_PART,
    TERMINAL,
    Event,
    JobBatches,
    Journal,
    crash_point,
    job_token,
)
from asyncgen.engine.stats import Counts, Statistics
from asyncgen.job.config import JobConfig, job_record, job_spec
from asyncgen.job.prompts import Template, load_template
from asyncgen.storage.formats import Input
from asyncgen.storage.sources import expand_inputs
from asyncgen.storage.store import Store

__all__ = ["BatchBackend"]


class BatchBackend:
    """Runs a job through the Batch API (see the package doc):
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
        self.counts = Counts()
        self._started = time.monotonic()
        self._finished = False
        self._stopping = False
        self._stopped = asyncio.Event()
        self._endpoint = redact_url(config.base_urls[0])
        self._template: Template | None = None
        self._paths: list[Input] = []
        self._store_: Store | None = None
        self._journal: Journal | None = None
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
        self._ingest = Ingest(
            cfg,
            self._store_,
            self._batches,
            self.counts,
            template=template,
            endpoint=self._endpoint,
            warn=self._warn,
        )
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
        await asyncio.to_thread(
            plan_parts,
            self.config,
            self._store,
            batches,
            self._template,
            self._paths,
            self.counts,
        )
        pending = [p for p in batches.parts.values() if not p.ingested]
        if pending:
            self._journal = await asyncio.to_thread(Journal, batches.dir / JOURNAL)
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
            self._ingest.client = self._client
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

    async def _part(self, name: str) -> None:
        """One part from wherever it stands to ingested, then its retry part, if any."""
        while name and not self._stopping:
            part = self._batches.parts[name]
            items = await asyncio.to_thread(self._batches.read_items, name)
            if part.batch_id is None:
                part.batch_id = await self._find_batch(name)
                if part.batch_id is not None:
                    self._log(Event(name, "created", batch_id=part.batch_id))
            if part.batch_id is None:
                if part.file_id is None:
                    part.file_id = await self._upload(name, items)
                    crash_point("uploaded")
                    self._log(Event(name, "uploaded", file_id=part.file_id))
                    crash_point("journaled")
                part.batch_id = await self._create(name, part.file_id, items)
                crash_point("created")
                self._log(Event(name, "created", batch_id=part.batch_id))
            batch = await self._poll(name, part.batch_id)
            if batch is None:
                return
            retry = await self._ingest.part(part, items, batch)
            self._log(Event(name, "ingested"))
            part.ingested = True
            # A rerun may have found the retry part on disk already, and given it a task.
            name = retry if retry is not None and retry not in self._claimed else ""
            self._claimed.add(name)

    def _log(self, event: Event) -> None:
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
                    if meta.get(META_JOB) == self._token and META_PART in meta:
                        found.setdefault(meta[META_PART], batch.id)  # newest first
                self._listed = found
        return self._listed.get(name)

    async def _upload(self, name: str, items: dict[str, WorkItem]) -> str:
        data = await asyncio.to_thread(request_file, items)
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
            metadata={META_JOB: self._token, META_PART: name},
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
            # A stop ends the wait: a Ctrl-C is answered now, not after up to 4 x --batch-poll.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopped.wait(), delay)
            delay = min(delay * 1.5, 4 * self.config.batch_poll)
        return None

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
