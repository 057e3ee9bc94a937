"""The async pipeline: source → expand → skip done → gate → send → commit.

:class:`Engine` is an async context manager. Entering opens (and if needed repairs) the output
directory and the HTTP session; :meth:`Engine.results` runs the job and yields every record as
it becomes durable; :meth:`Engine.run` runs it to the end. :meth:`Engine.stop` stops intake,
lets in-flight requests finish within ``drain_timeout`` and flushes, so a later run resumes.

Exactly once: an id is *claimed* in the ledger before its request is spawned, its outcome is
buffered, the buffer is committed by a single committer (shard frames, then ledger line, both
fsynced), and only then is the id marked done. A crash loses at most the buffered and in-flight
outcomes; their ids were never committed, so the next run sends them again.

The parts, each in its module: :class:`~asyncgen.engine.intake.Intake` (read, expand, claim,
gate, spawn), :class:`~asyncgen.engine.sender.Sender` (an item's attempts and its record),
:class:`~asyncgen.engine.attempt.Attempter` (one HTTP attempt),
:class:`~asyncgen.engine.commit.Committer` (the buffer and the committer loop). This module
wires them together and runs them in one task group.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import msgspec

from asyncgen._version import __version__
from asyncgen.core.errors import ConfigError, TransportError, job_error
from asyncgen.core.flow import FlowControl
from asyncgen.core.ledger import Redo
from asyncgen.engine.attempt import Attempter
from asyncgen.engine.clock import Clock
from asyncgen.engine.commit import Committer, Emit, Record
from asyncgen.engine.events import EndpointWatcher, event, listened
from asyncgen.engine.gate import Gate
from asyncgen.engine.intake import Intake
from asyncgen.engine.metrics import Metrics
from asyncgen.engine.sender import Sender
from asyncgen.engine.stats import Counts, ErrorCount, Statistics
from asyncgen.engine.transport import AiohttpTransport, Transport, check_models
from asyncgen.job.config import JobConfig, job_record, job_spec
from asyncgen.job.items import job_expander
from asyncgen.job.prompts import Template
from asyncgen.storage.count import RecordCount
from asyncgen.storage.sources import Input, expand_inputs
from asyncgen.storage.store import Store

__all__ = ["Engine"]


class _Parts(NamedTuple):
    """What a job runs with, made on entering the engine (inside the running loop)."""

    store: Store
    gate: Gate
    attempter: Attempter
    committer: Committer
    sender: Sender
    intake: Intake


class Engine:
    """Runs one job. ``async with Engine(config) as engine: await engine.run()``.

    ``clock`` times everything the engine waits for on its own (see
    :mod:`asyncgen.engine.clock`); tests pass a :class:`~asyncgen.engine.clock.VirtualClock`.
    """

    def __init__(
        self,
        config: JobConfig,
        *,
        api_key: str | Mapping[str, str | None] | None = None,
        transport: Transport | Sequence[Transport] | None = None,
        rng: random.Random | None = None,
        clock: Clock | None = None,
        redo: Redo | None = None,
        warn: Callable[[str], None] | None = None,
        metrics: Metrics | None = None,
        flow: FlowControl | None = None,
        lines: tuple[int, int | None] = (1, None),
        count_input: bool = True,
    ) -> None:
        """``flow``: flow control kept across engines run one after another (a worker's
        partitions: what it learned of the endpoints, and its share of the job's budgets, go
        on); its endpoints must be the transports'. ``lines``: read only this range (first
        and last line, None: to the end) of each input. ``count_input``: count the input's
        records beside the job, for ``Statistics.total_items``."""
        config.validate()
        self._flow = flow
        self._lines = lines
        self._count_input = count_input
        self._metrics = metrics
        """Read at each scrape while the engine is open (see :mod:`asyncgen.engine.metrics`)."""
        self.config = config
        self._api_key = api_key
        if transport is None:
            self._transports: list[Transport] = []
        elif isinstance(transport, Sequence):
            self._transports = list(transport)
        else:
            self._transports = [transport]
        self._owns_transport = transport is None
        self._rng = rng or random.Random()
        self._clock = clock or Clock()
        self._redo = redo
        """A retry run: send only these recorded failures again (``asyncgen retry-failed``)."""
        self._template: Template | None = None
        self._paths: list[Input] = []
        self._counts = Counts()
        self._parts: _Parts | None = None
        self._stop_requested = asyncio.Event()
        self._finished = False
        self._pipeline_task: asyncio.Task[None] | None = None
        self._started: float | None = None
        self._watcher = EndpointWatcher()
        self._record_count = RecordCount(())
        self._warn = warn
        self.notices: list[str] = []
        """Warnings of the start-up check (a model an inconclusive listing lacks, an
        endpoint left out), also given to ``warn`` as they come."""

    def _notice(self, message: str) -> None:
        self.notices.append(message)
        if self._warn is not None:
            self._warn(message)

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        cfg = self.config
        template = self._template = cfg.load_template()
        if template is not None and template.endpoint == "embeddings" and cfg.stream:
            raise ConfigError(f"template {template.name!r} is for embeddings, which do not stream")
        if cfg.embed_batch > 1 and (template is None or template.endpoint != "embeddings"):
            raise ConfigError(
                "embed batch (several texts per request) needs a template with "
                'endpoint = "embeddings"'
            )
        # In a thread: a remote input (fsspec) is looked up over the network.
        self._paths = await asyncio.to_thread(expand_inputs, cfg.inputs)
        if self._redo is None and self._count_input:  # (a retry's items are its failures)
            self._record_count = RecordCount(self._paths)
        store = await asyncio.to_thread(
            Store.open,
            Path(cfg.output),
            self.job_spec(),
            version=__version__,
            job=self._job_record(),
        )
        try:
            self._parts = self._assemble(store, template)
        except BaseException:
            await asyncio.to_thread(store.close)
            raise
        if self._metrics is not None:
            self._metrics.attach(self.statistics, streamed=cfg.stream)
            self._parts.committer.observe = self._metrics.observe
        return self

    def _assemble(self, store: Store, template: Template | None) -> _Parts:
        cfg, clock, counts = self.config, self._clock, self._counts
        if self._redo is not None:
            store.ledger.reopen(self._redo.ids)
        if self._owns_transport:
            self._transports = [
                AiohttpTransport(url, api_key=self._key_for(url), limit=cfg.concurrency)
                for url in cfg.base_urls
            ]
        # Transports keep credentials out of base_url: it is what results record.
        names = [t.base_url for t in self._transports]
        flow = self._flow or FlowControl(
            names,
            concurrency=cfg.concurrency,
            min_concurrency=cfg.min_concurrency,
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            now=clock.monotonic(),
            limits=cfg.endpoint_limits,
        )
        gate = Gate(flow, concurrency=cfg.concurrency, clock=clock)
        attempter = Attempter(
            self._transports,
            timeout=cfg.timeout,
            idle_timeout=cfg.idle_timeout,
            stream=cfg.stream,
            model=cfg.model,
            clock=clock,
        )
        committer = Committer(
            store, counts, flush_records=cfg.flush_records, flush_interval=cfg.flush_interval
        )
        sender = Sender(
            cfg,
            gate=gate,
            attempter=attempter,
            committer=committer,
            ledger=store.ledger,
            counts=counts,
            clock=clock,
            rng=self._rng,
            template=template,
            endpoint_names=names,
            redo=self._redo is not None,
        )
        expander = job_expander(cfg, template)
        intake = Intake(
            self._paths,
            ledger=store.ledger,
            expander=expander,
            template=template.name if template is not None else None,
            samples=cfg.samples,
            strict=cfg.strict,
            redo=self._redo,
            gate=gate,
            sender=sender,
            committer=committer,
            counts=counts,
            lines=self._lines,
            group=cfg.embed_batch,
        )
        if self._stop_requested.is_set():
            intake.stop()
            sender.stop()
        return _Parts(store, gate, attempter, committer, sender, intake)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving the block while results() is still running (a consumer that broke out of
        # the loop) stops the job: what came back is committed, in-flight requests are
        # abandoned to the next run. Nothing may touch the store once it is closed.
        self._record_count.close()
        try:
            await self._cancel_pipeline()
        finally:
            if self._metrics is not None:
                self._metrics.detach()
            try:
                if self._owns_transport:
                    for transport in self._transports:
                        await transport.aclose()
            finally:
                if self._parts is not None:
                    await asyncio.to_thread(self._parts.store.close)

    async def _cancel_pipeline(self) -> None:
        """Hard-stop the pipeline and wait for it (its last commit included). Its own
        cancellation ends there; the caller's, if the caller was cancelled meanwhile, goes on."""
        pipeline = self._pipeline_task
        if pipeline is None or pipeline.done():
            return
        pipeline.cancel()
        try:
            await pipeline
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            if caller is not None and caller.cancelling():
                raise

    def _key_for(self, url: str) -> str | None:
        """The API key for ``url``: the one key, or the endpoint's own from a mapping."""
        if isinstance(self._api_key, Mapping):
            return self._api_key.get(url)
        return self._api_key

    def job_spec(self) -> dict[str, Any]:
        """What decides the meaning of a result; an output directory serves one spec only."""
        return job_spec(self.config, self._template)

    def _job_record(self) -> dict[str, Any]:
        return job_record(self.config, self._paths, self._template)

    def stop(self) -> None:
        """Stop: nothing new is sent (no first attempt, no retry); the attempts in flight
        get ``drain_timeout`` seconds to finish, and the job ends as soon as they have.
        Items stopped before their record are left to the next run."""
        if not self._stop_requested.is_set():
            event(
                logging.WARNING,
                "job_stopping",
                "stopping: no new requests; in-flight ones may finish",
                cause="stop requested",
                drain_timeout=self.config.drain_timeout,
            )
        if self._parts is not None:
            self._parts.intake.stop()
            self._parts.sender.stop()
        self._stop_requested.set()

    async def _drain_on_stop(self, sender: Sender) -> None:
        """After a stop, give the items in flight ``drain_timeout`` seconds, then cancel them."""
        await self._stop_requested.wait()
        await self._clock.sleep(self.config.drain_timeout)
        for task in list(sender.tasks):
            task.cancel()

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> Statistics:
        """Run the job to its end (or until :meth:`stop`); return the final statistics."""
        async for _ in self.results():
            pass
        return self.statistics()

    async def results(self) -> AsyncIterator[Record]:
        """Run the job, yielding each record (result, failure or bad line) once it is durable."""
        if self._parts is None:
            raise RuntimeError("use 'async with Engine(...)' before running it")
        if self._started is not None:
            raise RuntimeError("an Engine runs one job once")
        self._started = self._clock.monotonic()
        self._record_count.start()
        if self.config.check_endpoint:
            await self.check_endpoint()
        queue: asyncio.Queue[list[Record]] = asyncio.Queue(maxsize=8)
        pipeline = self._pipeline_task = asyncio.create_task(self._pipeline(queue.put))
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({getter, pipeline}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    while not queue.empty():
                        for record in queue.get_nowait():
                            yield record
                    await pipeline  # re-raises what ended the pipeline, if anything
                    return
                for record in getter.result():
                    yield record
        finally:
            await self._cancel_pipeline()

    async def check_endpoint(self) -> None:
        """Fail fast, with a clear message, when no endpoint can be reached or every one
        rejects us.

        An endpoint that cannot be reached while another can starts ejected; it is probed
        and joins when it answers. One that refuses the key or lacks the model while another
        passes is left out for the whole run (a warning says so).
        """
        parts = self._parts
        assert parts is not None
        errors = await asyncio.gather(
            *(self._check_one(t) for t in self._transports), return_exceptions=True
        )
        for error in errors:
            if isinstance(error, BaseException) and not isinstance(error, Exception):
                raise error  # a cancellation, say
        failed = [e for e in errors if isinstance(e, Exception)]
        if len(failed) == len(errors):
            # The most telling error: a refusal says more than "cannot reach".
            raise next((e for e in failed if isinstance(e, ConfigError)), failed[0])
        for e in failed:
            if not isinstance(e, TransportError | ConfigError):
                raise e
        now = self._clock.monotonic()
        for index, error in enumerate(errors):
            if error is None:
                continue
            parts.gate.flow.mark_down(index, now)
            if isinstance(error, ConfigError):
                parts.attempter.refuse(index, str(error))
                self._notice(f"{error}; left out, the other endpoints go on")

    async def _check_one(self, transport: Transport) -> None:
        await check_models(transport, self.config.model, warn=self._notice)

    async def _pipeline(self, emit: Emit) -> None:
        try:
            await self._run_stages(emit)
        except BaseExceptionGroup as group:
            # Task groups wrap what stopped the job; callers want the error itself.
            error = job_error(group)
            if error is None:
                raise
            raise error from None

    async def _run_stages(self, emit: Emit) -> None:
        assert self._parts is not None
        parts = self._parts
        async with asyncio.TaskGroup() as tg:
            tg.create_task(parts.committer.run(emit))
            helpers = [
                tg.create_task(parts.gate.probe_forever(parts.attempter.probe)),
                tg.create_task(parts.attempter.expire_overdue()),
                tg.create_task(self._drain_on_stop(parts.sender)),
            ]
            if self._metrics is not None or listened():
                helpers.append(tg.create_task(self._watcher.run(parts.gate.statistics)))
            try:
                async with asyncio.TaskGroup() as senders:
                    await parts.intake.run(senders)
                # A stop that came after the last item was taken may still see every item
                # through: the job is finished then.
                self._finished = parts.intake.read_all and not parts.sender.abandoned
            finally:
                for helper in helpers:
                    helper.cancel()
                parts.committer.close()

    # --- observing ----------------------------------------------------------------------------

    def statistics(self) -> Statistics:
        """An immutable snapshot of the job's progress."""
        parts = self._parts
        counts = parts.store.counts if parts is not None else {}
        gate = parts.gate.statistics() if parts is not None else None
        fraction = 1.0 if self._finished else parts.intake.fraction() if parts else 0.0
        records = self._record_count.total
        return Statistics(
            **msgspec.structs.asdict(self._counts),
            elapsed=0.0 if self._started is None else self._clock.monotonic() - self._started,
            succeeded_total=counts.get("results", 0),
            # A failure that a retry run's record supersedes is no longer a failure.
            failed_total=counts.get("failures", 0) - (parts.store.replaced if parts else 0),
            bad_lines_total=counts.get("errors", 0),
            input_fraction=fraction,
            finished=self._finished,
            stopped=self._stop_requested.is_set(),
            endpoints=[] if gate is None else list(gate.endpoints),
            waiting_for_endpoint=gate is not None and gate.waiting_for_endpoint,
            errors=[] if parts is None else self._error_counts(parts.sender),
            pauses=dict(self._watcher.pauses),
            total_items=None if records is None else records * self.config.samples,
        )

    def _error_counts(self, sender: Sender) -> list[ErrorCount]:
        urls = [t.base_url for t in self._transports]
        return [
            ErrorCount(urls[endpoint], code, status, n)
            for (endpoint, code, status), n in sender.errors.items()
        ]

    def __repr__(self) -> str:
        s = self.statistics()
        state = "finished" if s.finished else "stopping" if s.stopped else "running"
        return (
            f"<Engine {state} output={self.config.output!r} succeeded={s.succeeded} "
            f"failed={s.failed} in_flight={s.in_flight}>"
        )
