"""The async pipeline: source → expand → skip done → gate → send → commit.

:class:`Engine` is an async context manager. Entering opens (and if needed repairs) the output
directory and the HTTP session; :meth:`Engine.results` runs the job and yields every record as
it becomes durable; :meth:`Engine.run` runs it to the end. :meth:`Engine.stop` stops intake,
lets in-flight requests finish within ``drain_timeout`` and flushes, so a later run resumes.

Exactly once: an id is *claimed* in the ledger before its request is spawned, its outcome is
buffered, the buffer is committed by a single committer (shard frames, then ledger line, both
fsynced), and only then is the id marked done. A crash loses at most the buffered and in-flight
outcomes; their ids were never committed, so the next run sends them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from asyncgen._version import __version__
from asyncgen.core.errors import (
    AsyncgenError,
    ConfigError,
    ConnectError,
    InputError,
    TransportError,
)
from asyncgen.core.flow import EndpointStats, Feedback, FlowControl, Lease, Signal
from asyncgen.core.hints import parse_ratelimit, parse_retry_after
from asyncgen.core.ledger import Claim, Redo, bad_line_key
from asyncgen.core.records import (
    BadLine,
    Completion,
    ErrorInfo,
    Line,
    Result,
    Source,
    Usage,
    WorkItem,
)
from asyncgen.core.retry import Outcome, RetryPolicy, interpret
from asyncgen.core.sse import (
    SSEParser,
    StreamAssembler,
    StreamError,
    StreamIncomplete,
    StreamServerError,
)
from asyncgen.core.validate import Checked
from asyncgen.engine.gate import Gate
from asyncgen.engine.transport import AiohttpTransport, Transport, check_models, redact_url
from asyncgen.job.items import NOT_SAMPLING, Expander
from asyncgen.job.prompts import RESERVED_BODY, Template, load_template
from asyncgen.storage.sources import ShardReader, expand_inputs
from asyncgen.storage.store import Store

__all__ = ["DEFAULT_BASE_URL", "Engine", "JobConfig", "Statistics"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
_READ_BATCH = 1024
_AFTER_DONE = 1.0  # seconds a stream may idle after [DONE] before it is closed

Record = Result | BadLine
Emit = Callable[[list[Record]], Awaitable[None]]


def _leaf_errors(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaf_errors(exc))
        elif not isinstance(exc, asyncio.CancelledError):
            leaves.append(exc)
    return leaves


_UNUSED = Feedback(Signal.CANCELLED)
_TIMEOUT = Feedback(Signal.TIMEOUT)
_ERROR = Feedback(Signal.ERROR)
_DROPPED = Feedback(Signal.DROPPED)
_UNREACHABLE = Feedback(Signal.UNREACHABLE)
_UNCHECKED = Checked(None)


def job_spec(cfg: JobConfig, template: Template | None = None) -> dict[str, Any]:
    """What decides the meaning of a job's results (its output directory serves one spec
    only); ``template`` is ``cfg.prompt`` loaded, loaded here if not given."""
    if template is None and cfg.prompt:
        template = load_template(cfg.prompt)
    return {
        "template": None
        if template is None
        else {"name": template.name, "sha256": template.digest},
        "model": cfg.model,
        "samples": cfg.samples,
        "max_tokens": cfg.max_tokens,
        "persona_field": cfg.persona_field,
        "extra_body": cfg.extra_body,
    }


def _plus(total: Usage | None, more: Usage | None) -> Usage | None:
    """``total`` with the counts of ``more`` added (unknown counts as 0)."""
    if more is None:
        return total
    prompt = (more.prompt_tokens or 0) + (total.prompt_tokens or 0 if total else 0)
    completion = (more.completion_tokens or 0) + (total.completion_tokens or 0 if total else 0)
    return Usage(prompt, completion, prompt + completion)


def _signal(status: int) -> Signal:
    """What an HTTP status that is not a good reply says about the endpoint."""
    if status == 429:
        return Signal.THROTTLED
    if status == 503:
        return Signal.OVERLOADED
    if status == 408:
        return Signal.TIMEOUT
    if status >= 500 or status in (200, 409):
        return Signal.ERROR  # a 200 here is a broken reply
    return Signal.REJECTED


class JobConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Everything a job needs except the API key (which is never stored or printed)."""

    inputs: list[str]
    output: str
    prompt: str | None = None
    """Template name or path; ``None`` when every input line is an OpenAI Batch request."""
    model: str | None = None
    base_url: str | list[str] = DEFAULT_BASE_URL
    """One endpoint, or several serving the same model (replicas, gateways)."""
    samples: int = 1
    max_tokens: int | None = None
    persona_field: str = "persona"
    extra_body: dict[str, Any] = {}
    """Merged into every request body (sampling parameters, vLLM extras)."""
    concurrency: int = 256
    """Requests in flight at most, over all endpoints."""
    min_concurrency: int = 1
    """The floor each endpoint's adaptive window never goes below."""
    rpm: float | None = None
    tpm: float | None = None
    stream: bool = False
    """Ask for server-sent events; record time to first token; time out on silence."""
    idle_timeout: float = 60.0
    """Streaming: seconds without a byte from the server after which an attempt is retried."""
    max_attempts: int = 6
    max_invalid: int = 3
    """Replies failing the template's ``[output]`` checks an item may get before it fails
    (counted apart from ``max_attempts``)."""
    timeout: float = 600.0
    """Seconds for one attempt (a streamed one included)."""
    deadline: float = 3600.0
    """Seconds from an item's first attempt after which it is not retried again."""
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    strict: bool = False
    """Fail on the first bad input line instead of recording it and going on."""
    flush_records: int = 1024
    flush_interval: float = 1.0
    drain_timeout: float = 30.0
    check_endpoint: bool = True

    def validate(self) -> None:
        """Raise ConfigError for settings that cannot work (wrong types included)."""
        try:
            msgspec.convert(msgspec.structs.asdict(self), type(self))
        except msgspec.ValidationError as exc:
            raise ConfigError(f"invalid job configuration: {exc}") from None
        checks = [
            (self.samples >= 1, "samples must be at least 1"),
            (self.concurrency >= 1, "concurrency must be at least 1"),
            (
                1 <= self.min_concurrency <= self.concurrency,
                "min concurrency must be between 1 and concurrency",
            ),
            (self.idle_timeout > 0, "idle timeout must be positive"),
            (bool(self.base_urls), "no base URL given"),
            (
                len(set(self.base_urls)) == len(self.base_urls),
                "the same base URL is given twice",
            ),
            (self.max_attempts >= 1, "max attempts must be at least 1"),
            (self.max_invalid >= 1, "max invalid must be at least 1"),
            (self.timeout > 0, "timeout must be positive"),
            (self.deadline > 0, "deadline must be positive"),
            (self.rpm is None or self.rpm > 0, "rpm must be positive"),
            (self.tpm is None or self.tpm > 0, "tpm must be positive"),
            (self.max_tokens is None or self.max_tokens >= 1, "max tokens must be at least 1"),
            (self.flush_records >= 1, "flush records must be at least 1"),
            (bool(self.inputs), "no input files given"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.prompt is not None and self.model is None:
            raise ConfigError("a --model is required with --prompt")
        reserved = sorted(RESERVED_BODY & self.extra_body.keys())
        if reserved:
            raise ConfigError(
                f"extra body may not set {', '.join(reserved)}: the template and --model "
                "decide the prompt and model, --samples asks for more outputs (one choice is "
                "kept per request), and --stream asks for streaming"
            )

    @property
    def base_urls(self) -> list[str]:
        return [self.base_url] if isinstance(self.base_url, str) else list(self.base_url)


class Statistics(msgspec.Struct, frozen=True, kw_only=True):
    """An immutable snapshot of a job's progress. ``*_total`` include earlier runs."""

    elapsed: float
    lines_read: int
    skipped: int
    """Items already committed by an earlier run."""
    in_flight: int
    retrying: int
    succeeded: int
    failed: int
    bad_lines: int
    requests: int
    """HTTP attempts made by this run."""
    retries: int
    throttled: int
    """Attempts answered 429 in this run."""
    prompt_tokens: int
    completion_tokens: int
    succeeded_total: int
    failed_total: int
    bad_lines_total: int
    input_fraction: float
    """Share of input bytes consumed, 0..1 (for an ETA)."""
    finished: bool
    """The whole input was read and every item committed."""
    stopped: bool
    endpoints: list[EndpointStats] = []
    waiting_for_endpoint: bool = False
    """No endpoint is up: the job waits for one to come back."""


class Engine:
    """Runs one job. ``async with Engine(config) as engine: await engine.run()``."""

    def __init__(
        self,
        config: JobConfig,
        *,
        api_key: str | None = None,
        transport: Transport | Sequence[Transport] | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        redo: Redo | None = None,
    ) -> None:
        config.validate()
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
        self._sleep = sleep
        self._clock = clock
        self._policy = RetryPolicy(
            max_attempts=config.max_attempts,
            base_delay=config.backoff_base,
            max_delay=config.backoff_cap,
            deadline=config.deadline,
        )
        self._template: Template | None = None
        self._template_sha: str | None = None
        self._endpoint_names: list[str] = []
        self._redo = redo
        """A retry run: send only these recorded failures again (``asyncgen retry-failed``)."""
        self._expander = Expander(None, model=config.model)
        self._paths: list[Path] = []
        self._store: Store | None = None
        self._gate: Gate | None = None
        self._encoder = msgspec.json.Encoder()
        # pipeline state
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_time: Callable[[], float] = time.monotonic  # the loop's, once entered
        self._loop: asyncio.AbstractEventLoop | None = None
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        """Open non-streamed attempts, by task, and when each must end (_expire_overdue)."""
        self._expired: set[asyncio.Task[Any]] = set()
        """Their tasks the sweep has cancelled, until the attempt has seen it."""
        self._results: list[Result] = []
        self._bad: list[BadLine] = []
        self._flush_wanted = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._closing = False
        self._stopping = False
        self._finished = False
        self._drain_timer: asyncio.TimerHandle | None = None
        self._pipeline_task: asyncio.Task[None] | None = None
        self._started: float | None = None
        self._input_total = 0
        self._input_done = 0
        self._reader: ShardReader | None = None
        # counters
        self._lines_read = 0
        self._skipped = 0
        self._in_flight = 0
        self._retrying = 0
        self._succeeded = 0
        self._failed = 0
        self._bad_lines = 0
        self._requests = 0
        self._retries = 0
        self._throttled = 0
        self._prompt_tokens = 0
        self._completion_tokens = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        cfg = self.config
        self._template = load_template(cfg.prompt) if cfg.prompt else None
        self._template_sha = self._template.digest[:16] if self._template else None
        overrides = dict(cfg.extra_body)
        if cfg.max_tokens is not None:
            overrides["max_tokens"] = cfg.max_tokens
        self._expander = Expander(
            self._template,
            model=cfg.model,
            samples=cfg.samples,
            persona_field=cfg.persona_field,
            overrides=overrides,
        )
        self._paths = expand_inputs(cfg.inputs)
        self._input_total = sum(p.stat().st_size for p in self._paths)
        self._store = await asyncio.to_thread(
            Store.open,
            Path(cfg.output),
            self.job_spec(),
            version=__version__,
            job=self._job_record(),
        )
        if self._redo is not None:
            self._store.ledger.reopen(self._redo.ids)
        if self._owns_transport:
            try:
                self._transports = [
                    AiohttpTransport(url, api_key=self._api_key, limit=cfg.concurrency)
                    for url in cfg.base_urls
                ]
            except BaseException:
                await asyncio.to_thread(self._store.close)
                raise
        # Transports keep credentials out of base_url: it is what results record.
        self._endpoint_names = [t.base_url for t in self._transports]
        flow = FlowControl(
            self._endpoint_names,
            concurrency=cfg.concurrency,
            min_concurrency=cfg.min_concurrency,
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            now=self._clock(),
        )
        self._gate = Gate(flow, concurrency=cfg.concurrency, clock=self._clock, sleep=self._sleep)
        self._loop = asyncio.get_running_loop()
        self._loop_time = self._loop.time
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving the block while results() is still running (a consumer that broke out of
        # the loop) stops the job: what came back is committed, in-flight requests are
        # abandoned to the next run. Nothing may touch the store once it is closed.
        pipeline = self._pipeline_task
        if pipeline is not None and not pipeline.done():
            pipeline.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pipeline
        try:
            if self._owns_transport:
                for transport in self._transports:
                    await transport.aclose()
        finally:
            if self._store is not None:
                await asyncio.to_thread(self._store.close)

    def job_spec(self) -> dict[str, Any]:
        """What decides the meaning of a result; an output directory serves one spec only."""
        return job_spec(self.config, self._template)

    def _job_record(self) -> dict[str, Any]:
        """This run's settings as the manifest records them: enough to run the job again
        from anywhere (absolute input paths), never a secret (no key, no URL credentials)."""
        cfg = self.config
        record: dict[str, Any] = msgspec.to_builtins(cfg)
        record["inputs"] = [str(p.resolve()) for p in self._paths]
        record["output"] = str(Path(cfg.output).resolve())
        record["base_url"] = [redact_url(u) for u in cfg.base_urls]
        if cfg.prompt is not None and os.path.isfile(cfg.prompt):
            record["prompt"] = str(Path(cfg.prompt).resolve())
        record["template_endpoint"] = self._template.endpoint if self._template else None
        return record

    def stop(self) -> None:
        """Stop reading input; in-flight requests get ``drain_timeout`` seconds to finish."""
        if self._stopping:
            return
        self._stopping = True
        # A sender cancelled before its first step never ran the finally that removes it.
        self._tasks = {task for task in self._tasks if not task.done()}
        if self._tasks:
            loop = asyncio.get_running_loop()
            self._drain_timer = loop.call_later(self.config.drain_timeout, self._abandon_in_flight)

    def _abandon_in_flight(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    # --- running ------------------------------------------------------------------------------

    async def run(self) -> Statistics:
        """Run the job to its end (or until :meth:`stop`); return the final statistics."""
        async for _ in self.results():
            pass
        return self.statistics()

    async def results(self) -> AsyncIterator[Record]:
        """Run the job, yielding each record (result, failure or bad line) once it is durable."""
        if self._store is None:
            raise RuntimeError("use 'async with Engine(...)' before running it")
        if self._started is not None:
            raise RuntimeError("an Engine runs one job once")
        self._started = self._clock()
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
            if not pipeline.done():
                pipeline.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await pipeline

    async def check_endpoint(self) -> None:
        """Fail fast, with a clear message, when no endpoint can be reached or one rejects us.

        An endpoint that cannot be reached while another can starts ejected; it is probed
        and joins when it answers.
        """
        assert self._gate is not None
        errors = await asyncio.gather(
            *(self._check_one(t) for t in self._transports), return_exceptions=True
        )
        for error in errors:
            if isinstance(error, BaseException) and not isinstance(error, TransportError):
                raise error
        if all(errors):
            first = errors[0]
            assert isinstance(first, BaseException)
            raise first
        now = self._clock()
        for index, error in enumerate(errors):
            if error is not None:
                self._gate.flow.mark_down(index, now)

    async def _check_one(self, transport: Transport) -> None:
        await check_models(transport, self.config.model)

    async def _probe(self, index: int) -> bool:
        """Is an ejected endpoint answering again? Any reply below 500 says it is."""
        try:
            async with asyncio.timeout(min(5.0, self.config.timeout)):
                resp = await self._transports[index].get("/models")
        except (TimeoutError, TransportError):
            return False
        return resp.status < 500

    async def _pipeline(self, emit: Emit) -> None:
        try:
            await self._run_stages(emit)
        except BaseExceptionGroup as group:
            # Task groups wrap what stopped the job; callers want the error itself.
            # Several senders may hit the same job-level error at once (a 401 for all): one
            # is enough. Anything unexpected keeps the whole group, so no bug is hidden.
            leaves = _leaf_errors(group)
            if len(leaves) == 1 or (leaves and all(isinstance(e, AsyncgenError) for e in leaves)):
                raise leaves[0] from None
            raise

    async def _run_stages(self, emit: Emit) -> None:
        assert self._gate is not None
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._commit_loop(emit))
            prober = tg.create_task(self._gate.probe_forever(self._probe))
            sweeper = tg.create_task(self._expire_overdue())
            try:
                async with asyncio.TaskGroup() as senders:
                    await self._intake(senders)
                self._finished = not self._stopping
            finally:
                prober.cancel()
                sweeper.cancel()
                if self._drain_timer is not None:
                    self._drain_timer.cancel()
                self._closing = True
                self._flush_wanted.set()

    async def _expire_overdue(self) -> None:
        """Expire the attempts that outlived ``timeout``: cancel their tasks, which
        :meth:`_attempt` turns into TimeoutError. One sweep a fraction of the timeout apart
        instead of a timer (or an ``asyncio.timeout``) per attempt: at thousands of requests
        a second, their set-up was a measurable part of the loop's work. An attempt ends at
        most an eighth of the timeout (half a second at most) late."""
        every = min(0.5, self.config.timeout / 8)
        while True:
            await asyncio.sleep(every)
            now = self._loop_time()
            overdue = [task for task, when in self._deadlines.items() if when <= now]
            for task in overdue:
                del self._deadlines[task]
                self._expired.add(task)
                task.cancel()

    async def _intake(self, senders: asyncio.TaskGroup) -> None:
        assert self._store is not None
        ledger = self._store.ledger
        template = self._template.name if self._template is not None else None
        samples = self.config.samples
        redo = self._redo
        for path in self._paths:
            reader = self._reader = ShardReader(path)
            last = 0
            if redo is not None:
                # Retrying failures: only the lines that hold one are decoded.
                last = redo.last_line(reader.shard)
                done: bytes | None = redo.skip_bitmap(reader.shard) if last else None
            else:
                # Resuming: lines whose every item is done are counted, never decoded.
                done = ledger.done_lines(reader.shard, template, samples) if template else None
            if not await self._intake_shard(senders, reader, done, None if redo is None else last):
                return
            self._input_done += reader.size
            self._reader = None

    async def _intake_shard(
        self,
        senders: asyncio.TaskGroup,
        reader: ShardReader,
        done: bytes | None,
        last: int | None,
    ) -> bool:
        """Send one shard's lines; False if the job was stopped meanwhile.

        The next batch is read (in a thread) while this one is sent: waiting for each read
        made the intake pause every batch, and the slots freed meanwhile were then filled in
        one burst, which came back as a burst (against a fixed latency, for ever after).
        Lines are claimed only here, as they are taken, so a batch read ahead and dropped on
        a stop leaves nothing behind. The reader is closed only when no read is running."""
        samples = self.config.samples

        def more() -> bool:
            return not self._stopping and (last is None or reader.lineno < last)

        def read_ahead() -> tuple[asyncio.Future[list[Line]], int]:
            return asyncio.ensure_future(
                asyncio.to_thread(reader.read_batch, _READ_BATCH, done)
            ), reader.skipped

        reading: tuple[asyncio.Future[list[Line]], int] | None = read_ahead() if more() else None
        try:
            while reading is not None:
                read, before = reading
                reading = None
                try:
                    batch = await read
                except InputError as exc:
                    if self.config.strict:
                        raise
                    await self._record_bad(
                        f"{reader.shard}:file",
                        str(reader.path),
                        Source(reader.shard, reader.lineno),
                        ErrorInfo("corrupt_input", exc.reason),
                        b"",
                    )
                    break
                finally:
                    passed = reader.skipped - before
                    self._lines_read += passed
                    self._skipped += passed * samples
                if not batch and not passed:
                    break  # the end of the shard
                if more():
                    reading = read_ahead()
                for line in batch:
                    if self._stopping or not await self._take(senders, line):
                        return False
            if self._stopping:
                return False
        finally:
            if reading is not None:
                # A read is still running in its thread: let it end before closing the file.
                with contextlib.suppress(Exception):
                    await asyncio.shield(reading[0])
        reader.close()
        return True

    async def _take(self, senders: asyncio.TaskGroup, line: Line) -> bool:
        """Expand one line, claim its items and send those not done; False if stopped."""
        assert self._store is not None
        ledger = self._store.ledger
        redo = self._redo
        self._lines_read += 1
        try:
            items = self._expander.expand(line)
        except InputError as exc:
            if self.config.strict:
                raise
            await self._record_bad(
                f"{line.shard}:{line.lineno}",
                line.path,
                Source(line.shard, line.lineno),
                ErrorInfo("bad_input", exc.reason),
                line.raw,
            )
            return True
        for item in items:
            if redo is not None and item.custom_id not in redo.ids:
                self._skipped += 1
                continue
            claim = ledger.claim(item.custom_id)
            if claim is Claim.DONE:
                self._skipped += 1
            elif claim is Claim.DUPLICATE:
                if self.config.strict:
                    raise InputError(
                        f"custom_id {item.custom_id!r} appears twice",
                        path=line.path,
                        line=line.lineno,
                    )
                await self._record_bad(
                    f"{line.shard}:{line.lineno}",
                    line.path,
                    item.source,
                    ErrorInfo(
                        "duplicate_custom_id",
                        f"custom_id {item.custom_id!r} appears twice",
                    ),
                    line.raw,
                )
            elif not await self._spawn(senders, item):
                return False
        return True

    async def _spawn(self, senders: asyncio.TaskGroup, item: WorkItem) -> bool:
        """Wait at the gate, then start the item's task; False (and the claim released) if
        the job was stopped meanwhile."""
        assert self._store is not None and self._gate is not None
        gate = self._gate
        await gate.acquire_slot()
        try:
            lease = await gate.lease(item.est_prompt_tokens, item.max_output_tokens)
        except BaseException:
            gate.release_slot()
            self._store.ledger.release(item.custom_id)
            raise
        if self._stopping:
            gate.release(lease, _UNUSED)
            gate.release_slot()
            self._store.ledger.release(item.custom_id)
            return False
        # The task takes itself out of _tasks when it ends (see _send): cheaper than a done
        # callback, which the loop would schedule and call for every item.
        self._tasks.add(senders.create_task(self._send(item, lease)))
        return True

    # --- sending ------------------------------------------------------------------------------

    async def _send(self, item: WorkItem, lease: Lease) -> None:
        assert self._store is not None and self._gate is not None
        try:
            result = await self._attempts(item, lease)
            if not self._space.is_set():  # the commit is behind: wait for it
                await self._space.wait()
            self._results.append(result)
            self._buffered()
        except BaseException:
            self._store.ledger.release(item.custom_id)
            raise
        finally:
            self._gate.release_slot()
            self._tasks.discard(asyncio.current_task(self._loop))

    async def _attempts(self, item: WorkItem, first_lease: Lease) -> Result:
        assert self._gate is not None
        gate = self._gate
        body = self._encoder.encode(self._request_body(item))
        first = self._clock()
        started = time.time()
        attempt = excused = invalid = 0
        rejected: Usage | None = None
        lease: Lease | None = first_lease
        while True:
            if lease is None:
                lease = await gate.lease(item.est_prompt_tokens, item.max_output_tokens)
            endpoint = lease.endpoint
            attempt += 1
            self._requests += 1
            self._in_flight += 1
            feedback = _UNUSED
            try:
                outcome, feedback, ttft = await self._attempt(item, body, lease)
            finally:
                self._in_flight -= 1
                # The endpoint's failures (429s, outages) do not use up the item's attempts;
                # the retry deadline bounds them.
                excused += gate.release(lease, feedback).excused
                lease = None
            elapsed = self._clock() - first
            if outcome.completion is not None:
                checked = self._check_output(item, outcome.completion)
                if checked.reason is None:
                    return self._record(
                        item,
                        None,
                        attempt,
                        elapsed,
                        started,
                        endpoint,
                        rejected,
                        outcome.completion,
                        ttft,
                        checked.parsed,
                    )
                # The server answered (flow control saw an OK); the reply is what failed.
                rejected = _plus(rejected, outcome.completion.usage)
                invalid += 1
                exhausted = invalid >= self.config.max_invalid
                reason = f"{invalid} invalid replies, the last: {checked.reason}"
                error = ErrorInfo("invalid_output", reason if exhausted else checked.reason, 200)
                outcome = Outcome(None, error, not exhausted)
            assert outcome.error is not None
            if feedback.signal is Signal.THROTTLED:
                self._throttled += 1
            delay = (
                self._policy.next_delay(
                    attempt,
                    elapsed,
                    feedback.retry_after,
                    self._rng,
                    counted=attempt - excused - invalid,
                )
                if outcome.retryable
                else None
            )
            if delay is None:
                error = outcome.error
                if outcome.retryable:
                    error = ErrorInfo(
                        error.code,
                        f"gave up after {attempt} attempts in {elapsed:.1f}s: {error.message}",
                        error.status,
                    )
                return self._record(item, error, attempt, elapsed, started, endpoint, rejected)
            self._retries += 1
            if feedback.signal is Signal.THROTTLED:
                # The 429 paused its endpoint for as long as the server asked (the deadline
                # above counted that wait): the gate holds the item meanwhile or routes it to
                # another endpoint at once.
                continue
            self._retrying += 1
            try:
                await self._sleep(delay)
            finally:
                self._retrying -= 1

    def _check_output(self, item: WorkItem, c: Completion) -> Checked:
        """The template's ``[output]`` checks on a reply (batch lines have none). A reply that
        fails them still cost tokens, so they are counted here."""
        spec = self._template.output if self._template is not None else None
        if spec is None or item.template is None:
            return _UNCHECKED
        choice = c.choices[0]
        text = choice.message.content if choice.message is not None else choice.text
        checked = spec.check(text, choice.finish_reason)
        if checked.reason is not None and c.usage is not None:
            self._prompt_tokens += c.usage.prompt_tokens or 0
            self._completion_tokens += c.usage.completion_tokens or 0
        return checked

    def _request_body(self, item: WorkItem) -> dict[str, Any]:
        if not self.config.stream:
            return item.body
        # Usage arrives on a last chunk only when asked for; it corrects the token budget.
        # Options of the user's (vLLM's continuous_usage_stats, say) are kept beside it.
        own = item.body.get("stream_options")
        options = {"include_usage": True, **(own if isinstance(own, dict) else {})}
        return {**item.body, "stream": True, "stream_options": options}

    async def _attempt(
        self, item: WorkItem, body: bytes, lease: Lease
    ) -> tuple[Outcome, Feedback, float | None]:
        """One HTTP attempt: its outcome, what it says about the endpoint, and (streaming)
        the seconds to its first token."""
        transport = self._transports[lease.endpoint]
        ttft: float | None = None
        headers: Mapping[str, str] = {}
        try:
            if self.config.stream:
                status, headers, outcome, ttft = await self._streamed(transport, item.url, body)
            else:
                # A limit without a timer of its own: _expire_overdue sweeps them. The
                # task is registered only while it waits here, so the sweep's cancellation
                # lands here (as asyncio.timeout's would).
                task = asyncio.current_task(self._loop)
                assert task is not None
                self._deadlines[task] = self._loop_time() + self.config.timeout
                try:
                    resp = await transport.post(item.url, body)
                except asyncio.CancelledError:
                    # Ours unless someone else cancelled the task too (a hard stop).
                    if task in self._expired and task.uncancel() == 0:
                        raise TimeoutError from None
                    raise
                else:
                    if task in self._expired:  # a transport that swallowed the cancellation
                        task.uncancel()
                finally:
                    self._deadlines.pop(task, None)  # the sweep may have taken it
                    self._expired.discard(task)
                status, headers = resp.status, resp.headers
                outcome = interpret(resp.status, resp.body)
        except TimeoutError as exc:
            message = str(exc) or f"no complete response within {self.config.timeout:g}s"
            return Outcome(None, ErrorInfo("timeout", message), True), _TIMEOUT, None
        except ConnectError as exc:
            outcome = Outcome(None, ErrorInfo("connection_error", str(exc)), True)
            return outcome, _DROPPED if exc.sent else _UNREACHABLE, None
        except TransportError as exc:
            return Outcome(None, ErrorInfo("connection_error", str(exc)), True), _ERROR, None
        hints = parse_ratelimit(headers) if headers else None
        completion = outcome.completion
        if completion is not None:
            usage = completion.usage
            feedback = Feedback(
                Signal.OK,
                hints,
                prompt_tokens=usage.prompt_tokens if usage else None,
                completion_tokens=usage.completion_tokens if usage else None,
            )
            return outcome, feedback, ttft
        self._raise_if_job_level(transport, item, outcome)
        return outcome, Feedback(_signal(status), hints, parse_retry_after(headers)), ttft

    async def _streamed(
        self, transport: Transport, path: str, body: bytes
    ) -> tuple[int, Mapping[str, str], Outcome, float | None]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        total = started + self.config.timeout
        idle = self.config.idle_timeout
        parser, assembler = SSEParser(), StreamAssembler()
        ttft: float | None = None
        status: int = 0
        headers: Mapping[str, str] = {}
        try:
            # Until the first bytes of the stream only the total limit holds: a queued
            # request (vLLM under load) gets nothing before its first token. From then on,
            # no more than the idle limit between reads.
            async with asyncio.timeout_at(total) as limit:
                async with transport.stream(path, body) as reply:
                    status, headers = reply.status, reply.headers
                    if status != 200:
                        return status, headers, interpret(status, await reply.read()), None
                    async for data in reply.chunks():
                        if assembler.done:
                            continue  # what follows [DONE] changes nothing
                        for payload in parser.feed(data):
                            assembler.add(payload)
                            if ttft is None and assembler.got_token:
                                ttft = loop.time() - started
                            if assembler.done:
                                break
                        # After [DONE], read on only briefly: the reply is complete, and
                        # reading to the end lets the connection be reused.
                        wait = _AFTER_DONE if assembler.done else idle
                        limit.reschedule(min(total, loop.time() + wait))
        except StreamServerError as exc:
            # A 429 or 503 inside the stream says what the status would have said.
            status = exc.status if exc.status is not None else status
            return status, headers, Outcome(None, exc.error, exc.retryable), ttft
        except StreamError as exc:
            error = ErrorInfo("malformed_response", f"bad event stream: {exc}", status)
            return status, headers, Outcome(None, error, True), ttft
        except TimeoutError:
            if not assembler.done:  # a server that idles after [DONE] still answered
                now = loop.time()
                if now >= total:
                    raise TimeoutError(
                        f"no complete response within {self.config.timeout:g}s"
                    ) from None
                raise TimeoutError(
                    f"stream stalled: nothing for {idle:g}s after {assembler.chunks} chunks"
                ) from None
        try:
            completion = assembler.completion()
        except StreamIncomplete as exc:
            error = ErrorInfo("stream_cut", f"the stream ended early: {exc}", status)
            return status, headers, Outcome(None, error, True), ttft
        return status, headers, Outcome(completion, None, False), ttft

    def _raise_if_job_level(self, transport: Transport, item: WorkItem, outcome: Outcome) -> None:
        """Stop the job on an answer every request would get: a refused key, or a 404 for the
        job's one model or URL. Recording it per item would burn the whole input as failures."""
        error = outcome.error
        if outcome.retryable or error is None or error.status is None:
            return
        if error.status in (401, 403) or (error.status == 404 and self.config.model is not None):
            raise ConfigError(
                f"endpoint {transport.base_url} answered HTTP {error.status} to "
                f"POST {item.url}: {error.message}; stopping, since every request would get "
                "the same answer (the item is not recorded and will be sent by the next run)"
            )

    def _record(
        self,
        item: WorkItem,
        error: ErrorInfo | None,
        attempts: int,
        latency: float,
        started: float,
        endpoint: int,
        rejected: Usage | None,
        completion: Completion | None = None,
        ttft: float | None = None,
        parsed: Any = None,
    ) -> Result:
        """The record of an item's outcome, with its provenance: a success if ``completion``
        is given, else a failure."""
        body = item.body
        model = body.get("model")
        output = finish_reason = reasoning = tool_calls = usage = None
        if completion is not None:
            choice = completion.choices[0]
            message = choice.message
            usage = completion.usage
            if usage is not None:
                self._prompt_tokens += usage.prompt_tokens or 0
                self._completion_tokens += usage.completion_tokens or 0
            output = message.content if message is not None else choice.text
            finish_reason = choice.finish_reason
            model = completion.model or model
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
            time.time(),
            usage,
            item.meta,
            reasoning,
            tool_calls,
            None if ttft is None else round(ttft, 4),
            started,
            self._endpoint_names[endpoint],
            item.persona_sha256,
            self._template_sha if item.template else None,
            item.sampling
            if item.sampling is not None
            else {k: v for k, v in body.items() if k not in NOT_SAMPLING},
            self._redo is not None,
            parsed,
            rejected,
        )

    # --- committing ---------------------------------------------------------------------------

    async def _record_bad(
        self, custom_id: str, path: str, source: Source, error: ErrorInfo, raw: bytes
    ) -> None:
        assert self._store is not None
        if self._store.ledger.claim(bad_line_key(custom_id)) is not Claim.SEND:
            return  # recorded by an earlier run (or already in this one)
        await self._space.wait()
        self._bad.append(
            BadLine(custom_id, path, source, error, raw[:2000].decode("utf-8", "replace"))
        )
        self._buffered()

    def _buffered(self) -> None:
        pending = len(self._results) + len(self._bad)
        if pending >= self.config.flush_records:
            self._flush_wanted.set()
        if pending >= 4 * self.config.flush_records:
            self._space.clear()

    async def _commit_loop(self, emit: Emit) -> None:
        try:
            while True:
                if self._closing and not (self._results or self._bad):
                    return
                if not self._flush_wanted.is_set():
                    try:
                        async with asyncio.timeout(self.config.flush_interval):
                            await self._flush_wanted.wait()
                    except TimeoutError:
                        pass
                self._flush_wanted.clear()
                batch = await self._commit_pending()
                if batch:
                    await emit(batch)
        except asyncio.CancelledError:
            # Hard stop: what already came back is still worth keeping.
            await self._commit_pending()
            raise

    async def _commit_pending(self) -> list[Record]:
        assert self._store is not None
        results, bad = self._results, self._bad
        if not (results or bad):
            return []
        self._results, self._bad = [], []
        self._space.set()
        ids = await asyncio.to_thread(self._store.commit, results, bad)
        self._store.ledger.commit(ids)
        for r in results:
            if r.error is None:
                self._succeeded += 1
            else:
                self._failed += 1
        self._bad_lines += len(bad)
        return [*results, *bad]

    # --- observing ----------------------------------------------------------------------------

    def statistics(self) -> Statistics:
        store = self._store
        counts = store.counts if store is not None else {}
        done = self._input_done + (self._reader.position if self._reader is not None else 0)
        fraction = 1.0 if self._finished else done / self._input_total if self._input_total else 0.0
        return Statistics(
            elapsed=0.0 if self._started is None else self._clock() - self._started,
            lines_read=self._lines_read,
            skipped=self._skipped,
            in_flight=self._in_flight,
            retrying=self._retrying,
            succeeded=self._succeeded,
            failed=self._failed,
            bad_lines=self._bad_lines,
            requests=self._requests,
            retries=self._retries,
            throttled=self._throttled,
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            succeeded_total=counts.get("results", 0),
            # A failure that a retry run's record supersedes is no longer a failure.
            failed_total=counts.get("failures", 0) - (store.replaced if store else 0),
            bad_lines_total=counts.get("errors", 0),
            input_fraction=min(1.0, fraction),
            finished=self._finished,
            stopped=self._stopping,
            endpoints=[] if self._gate is None else self._gate.endpoint_stats(),
            waiting_for_endpoint=self._gate is not None and self._gate.waiting_for_endpoint,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        state = "finished" if s.finished else "stopping" if s.stopped else "running"
        return (
            f"<Engine {state} output={self.config.output!r} succeeded={s.succeeded} "
            f"failed={s.failed} in_flight={s.in_flight}>"
        )
