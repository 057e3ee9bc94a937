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
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import msgspec

from . import __version__
from .errors import (
    AsyncgenError,
    ConfigError,
    ConnectError,
    InputError,
    RequestTimeout,
    TransportError,
)
from .items import Expander
from .ledger import Claim, bad_line_key
from .limits import Gate
from .prompts import Template, load_template
from .records import BadLine, Completion, ErrorInfo, Result, Source, WorkItem
from .retry import Outcome, RetryPolicy, interpret, parse_retry_after
from .sources import ShardReader, expand_inputs
from .store import Store
from .transport import AiohttpTransport, Transport

__all__ = ["DEFAULT_BASE_URL", "Engine", "JobConfig", "Statistics"]

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
_READ_BATCH = 1024

Record = Result | BadLine
Emit = Callable[[list[Record]], Awaitable[None]]


class _ModelId(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_ModelId]


def _served_models(body: bytes) -> set[str] | None:
    """Model ids of a ``GET /models`` reply, or None when it is not the OpenAI list shape."""
    try:
        return {m.id for m in msgspec.json.decode(body, type=_ModelList).data}
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None


def _leaf_errors(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaf_errors(exc))
        elif not isinstance(exc, asyncio.CancelledError):
            leaves.append(exc)
    return leaves


_RESERVED_BODY = frozenset({"model", "messages", "prompt", "stream", "n"})


class JobConfig(msgspec.Struct, kw_only=True, frozen=True):
    """Everything a job needs except the API key (which is never stored or printed)."""

    inputs: list[str]
    output: str
    prompt: str | None = None
    """Template name or path; ``None`` when every input line is an OpenAI Batch request."""
    model: str | None = None
    base_url: str = DEFAULT_BASE_URL
    samples: int = 1
    max_tokens: int | None = None
    persona_field: str = "persona"
    extra_body: dict[str, Any] = {}
    """Merged into every request body (sampling parameters, vLLM extras)."""
    concurrency: int = 256
    rpm: float | None = None
    tpm: float | None = None
    max_attempts: int = 6
    timeout: float = 600.0
    """Seconds for one attempt."""
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
            (self.max_attempts >= 1, "max attempts must be at least 1"),
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
        reserved = sorted(_RESERVED_BODY & self.extra_body.keys())
        if reserved:
            raise ConfigError(
                f"extra body may not set {', '.join(reserved)}: the template and --model "
                "decide the prompt and model, --samples asks for more outputs (one choice is "
                "kept per request), and streaming is not supported"
            )


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


class Engine:
    """Runs one job. ``async with Engine(config) as engine: await engine.run()``."""

    def __init__(
        self,
        config: JobConfig,
        *,
        api_key: str | None = None,
        transport: Transport | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        config.validate()
        self.config = config
        self._api_key = api_key
        self._transport = transport
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
        self._expander = Expander(None, model=config.model)
        self._paths: list[Path] = []
        self._store: Store | None = None
        self._gate = Gate(config.concurrency, rpm=config.rpm, tpm=config.tpm)
        self._encoder = msgspec.json.Encoder()
        # pipeline state
        self._tasks: set[asyncio.Task[None]] = set()
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
        self._prompt_tokens = 0
        self._completion_tokens = 0

    # --- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Engine:
        cfg = self.config
        self._template = load_template(cfg.prompt) if cfg.prompt else None
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
            Store.open, Path(cfg.output), self.job_spec(), version=__version__
        )
        if self._transport is None:
            try:
                self._transport = AiohttpTransport(
                    cfg.base_url, api_key=self._api_key, limit=cfg.concurrency
                )
            except BaseException:
                await asyncio.to_thread(self._store.close)
                raise
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
            if self._owns_transport and self._transport is not None:
                await self._transport.aclose()
        finally:
            if self._store is not None:
                await asyncio.to_thread(self._store.close)

    def job_spec(self) -> dict[str, Any]:
        """What decides the meaning of a result; an output directory serves one spec only."""
        cfg, t = self.config, self._template
        return {
            "template": None if t is None else {"name": t.name, "sha256": t.digest},
            "model": cfg.model,
            "samples": cfg.samples,
            "max_tokens": cfg.max_tokens,
            "persona_field": cfg.persona_field,
            "extra_body": cfg.extra_body,
        }

    def stop(self) -> None:
        """Stop reading input; in-flight requests get ``drain_timeout`` seconds to finish."""
        if self._stopping:
            return
        self._stopping = True
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
        """Fail fast, with a clear message, when the endpoint cannot be reached or rejects us."""
        assert self._transport is not None
        url = self._transport.base_url
        try:
            async with asyncio.timeout(min(30.0, self.config.timeout)):
                resp = await self._transport.get("/models")
        except TimeoutError as exc:
            raise RequestTimeout(f"endpoint {url} did not answer GET /models in time") from exc
        except TransportError as exc:
            raise ConnectError(f"cannot reach endpoint {url}: {exc}") from exc
        if resp.status in (401, 403):
            raise ConfigError(
                f"endpoint {url} refused the API key (HTTP {resp.status}); "
                "check the variable named by --api-key-env"
            )
        if resp.status == 404:
            raise ConfigError(
                f"endpoint {url} has no /models (HTTP 404): is the base URL right? "
                "OpenAI-compatible servers answer under /v1, as in http://HOST:8000/v1 "
                "(--no-check skips this check)"
            )
        model = self.config.model
        served = _served_models(resp.body) if resp.status == 200 else None
        if model is not None and served is not None and model not in served:
            listed = ", ".join(sorted(served)[:10]) + (", ..." if len(served) > 10 else "")
            raise ConfigError(
                f"model {model!r} is not served by {url}; it serves: {listed or 'nothing'} "
                "(--no-check skips this check)"
            )

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
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._commit_loop(emit))
            try:
                async with asyncio.TaskGroup() as senders:
                    await self._intake(senders)
                self._finished = not self._stopping
            finally:
                if self._drain_timer is not None:
                    self._drain_timer.cancel()
                self._closing = True
                self._flush_wanted.set()

    async def _intake(self, senders: asyncio.TaskGroup) -> None:
        assert self._store is not None
        ledger = self._store.ledger
        for path in self._paths:
            reader = self._reader = ShardReader(path)
            while not self._stopping:
                try:
                    batch = await asyncio.to_thread(reader.read_batch, _READ_BATCH)
                except InputError as exc:
                    if self.config.strict:
                        raise
                    await self._record_bad(
                        f"{reader.shard}:file",
                        str(path),
                        Source(reader.shard, reader.lineno),
                        ErrorInfo("corrupt_input", exc.reason),
                        b"",
                    )
                    break
                if not batch:
                    break
                for line in batch:
                    if self._stopping:
                        return
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
                        continue
                    for item in items:
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
                            return
            self._input_done += reader.size
            self._reader = None

    async def _spawn(self, senders: asyncio.TaskGroup, item: WorkItem) -> bool:
        """Wait at the gate, then start the item's task; False (and the claim released) if
        the job was stopped meanwhile."""
        assert self._store is not None
        await self._gate.acquire_slot()
        try:
            await self._gate.wait_rate(item.est_tokens)
        except BaseException:
            self._gate.release_slot()
            self._store.ledger.release(item.custom_id)
            raise
        if self._stopping:
            self._gate.release_slot()
            self._store.ledger.release(item.custom_id)
            return False
        task = senders.create_task(self._send(item))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    # --- sending ------------------------------------------------------------------------------

    async def _send(self, item: WorkItem) -> None:
        assert self._store is not None
        try:
            result = await self._attempts(item)
            await self._space.wait()
            self._results.append(result)
            self._buffered()
        except BaseException:
            self._store.ledger.release(item.custom_id)
            raise
        finally:
            self._gate.release_slot()

    async def _attempts(self, item: WorkItem) -> Result:
        assert self._transport is not None
        body = self._encoder.encode(item.body)
        first = self._clock()
        attempt = throttled = 0
        while True:
            if attempt:
                await self._gate.wait_rate(item.est_tokens)
            attempt += 1
            self._requests += 1
            self._in_flight += 1
            hint: float | None = None
            try:
                async with asyncio.timeout(self.config.timeout):
                    resp = await self._transport.post(item.url, body)
            except TimeoutError:
                message = f"no complete response within {self.config.timeout:g}s"
                outcome = Outcome(None, ErrorInfo("timeout", message), True)
            except TransportError as exc:
                outcome = Outcome(None, ErrorInfo("connection_error", str(exc)), True)
            else:
                outcome = interpret(resp.status, resp.body)
                if outcome.error is not None:
                    hint = parse_retry_after(resp.headers)
                    self._raise_if_job_level(item, outcome)
            finally:
                self._in_flight -= 1
            elapsed = self._clock() - first
            if outcome.completion is not None:
                return self._success(item, outcome.completion, attempt, elapsed)
            assert outcome.error is not None
            if outcome.error.status == 429:
                throttled += 1
            delay = (
                self._policy.next_delay(
                    attempt, elapsed, hint, self._rng, counted=attempt - throttled
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
                return self._failure(item, error, attempt, elapsed)
            self._retries += 1
            self._retrying += 1
            try:
                await self._sleep(delay)
            finally:
                self._retrying -= 1

    def _raise_if_job_level(self, item: WorkItem, outcome: Outcome) -> None:
        """Stop the job on an answer every request would get: a refused key, or a 404 for the
        job's one model or URL. Recording it per item would burn the whole input as failures."""
        error = outcome.error
        if outcome.retryable or error is None or error.status is None:
            return
        if error.status in (401, 403) or (error.status == 404 and self.config.model is not None):
            assert self._transport is not None
            raise ConfigError(
                f"endpoint {self._transport.base_url} answered HTTP {error.status} to "
                f"POST {item.url}: {error.message}; stopping, since every request would get "
                "the same answer (the item is not recorded and will be sent by the next run)"
            )

    def _success(self, item: WorkItem, c: Completion, attempts: int, latency: float) -> Result:
        choice = c.choices[0]
        message = choice.message
        if c.usage is not None:
            self._prompt_tokens += c.usage.prompt_tokens or 0
            self._completion_tokens += c.usage.completion_tokens or 0
        return Result(
            custom_id=item.custom_id,
            error=None,
            output=message.content if message is not None else choice.text,
            finish_reason=choice.finish_reason,
            model=c.model or item.body.get("model"),
            template=item.template,
            persona=item.persona,
            source=item.source,
            attempts=attempts,
            latency_s=round(latency, 4),
            created=time.time(),
            usage=c.usage,
            meta=item.meta,
            reasoning=(message.reasoning_content or message.reasoning) if message else None,
            tool_calls=message.tool_calls if message else None,
        )

    def _failure(self, item: WorkItem, error: ErrorInfo, attempts: int, latency: float) -> Result:
        return Result(
            custom_id=item.custom_id,
            error=error,
            output=None,
            finish_reason=None,
            model=item.body.get("model"),
            template=item.template,
            persona=item.persona,
            source=item.source,
            attempts=attempts,
            latency_s=round(latency, 4),
            created=time.time(),
            meta=item.meta,
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
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            succeeded_total=counts.get("results", 0),
            failed_total=counts.get("failures", 0),
            bad_lines_total=counts.get("errors", 0),
            input_fraction=min(1.0, fraction),
            finished=self._finished,
            stopped=self._stopping,
        )

    def __repr__(self) -> str:
        s = self.statistics()
        state = "finished" if s.finished else "stopping" if s.stopped else "running"
        return (
            f"<Engine {state} output={self.config.output!r} succeeded={s.succeeded} "
            f"failed={s.failed} in_flight={s.in_flight}>"
        )
