"""``asyncgen bench``: a serving benchmark against an OpenAI-compatible deployment.

The benchmark decides every request's *scheduled* send time before it starts (fixed intervals
or Poisson arrivals at ``rate``) and measures latencies from that time, not from when the client
got round to sending: a request that waits for a concurrency slot, or behind a late event loop,
is charged for the wait (no coordinated omission), and the wait is reported on its own as
queueing time. Without a rate it is a closed loop: ``concurrency`` requests in flight, each
scheduled the moment a slot frees.

::

    async with Bench(BenchConfig(base_url=..., model=..., rate=20.0)) as bench:
        result = await bench.run()
    print(format_report(result.report))

The statistics are in :mod:`asyncgen.bench.stats`; this module builds the workload, keeps the
schedule and times the requests.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import time
from typing import Any, Literal, NamedTuple

import msgspec

from asyncgen.bench.stats import SLO_METRICS, Report, RequestRecord, summarize
from asyncgen.core.errors import AsyncgenError, ConfigError, ConnectError, TransportError
from asyncgen.core.records import Completion
from asyncgen.core.retry import interpret
from asyncgen.core.sse import (
    SSEParser,
    StreamAssembler,
    StreamError,
    StreamIncomplete,
    StreamServerError,
)
from asyncgen.engine.transport import AiohttpTransport, Transport, check_models
from asyncgen.job.items import Expander
from asyncgen.job.prompts import RESERVED_BODY, Template, load_template
from asyncgen.storage.sources import ShardReader, expand_inputs

__all__ = [
    "Bench",
    "BenchConfig",
    "BenchProgress",
    "BenchResult",
    "arrival_offsets",
]

_PATHS = {"chat": "/chat/completions", "completions": "/completions"}
_POOL = 10_000
"""Distinct prompts rendered from input files; more requests cycle through them."""
_MAX_REQUESTS = 10_000_000
_DEFAULT_INPUT_LEN, _DEFAULT_OUTPUT_LEN = 256, 128
_encode = msgspec.json.encode
# Short, common words: about one token each (with the leading space) in the usual BPE
# vocabularies, so N words make a prompt of about N tokens.
_VOCABULARY = (
    "the of and to in is was for on are with as at be by this had not but from or have an they"
    " which one you were her all she there would their we him been has when who will more no if"
    " out so said what up its about into than them can only other new some could time these two"
    " may then do first any my now such like our over man me even most made after also did many"
    " before must through back years where much your way well down should because each just"
    " those people how too little state good very make world still own see men work long get"
    " here between both life being under never day same another know while last might us great"
    " old year off come since against go came right used take three"
)
_WORDS = tuple(_VOCABULARY.split())


class BenchConfig(msgspec.Struct, kw_only=True, frozen=True):
    """What to send, how fast, and when to stop. Times are in seconds."""

    base_url: str
    model: str | None = None
    """None: the first model the endpoint lists under ``GET /models``."""
    endpoint: Literal["chat", "completions"] | None = None
    """None: the template's, or chat for synthetic prompts."""
    prompt: str | None = None
    """A template name or path; then ``inputs`` are persona shards rendered through it."""
    inputs: list[str] = []
    persona_field: str = "persona"
    input_len: int | None = None
    """Synthetic prompts of random words, about this many tokens (default 256)."""
    output_len: int | None = None
    """Sets ``max_tokens`` (default 128 for synthetic prompts)."""
    ignore_eos: bool = False
    max_tokens: int | None = None
    extra_body: dict[str, Any] = {}
    rate: float | None = None
    """Requests per second; None for a closed loop at ``concurrency``."""
    poisson: bool = False
    concurrency: int | None = None
    """Requests in flight at most; None: unlimited with a rate, else 64."""
    num_requests: int | None = None
    """Measured requests (warmup comes on top); with neither this nor ``duration``, 200."""
    duration: float | None = None
    """Seconds of measured arrivals; with ``num_requests``, whichever ends first."""
    warmup: int = 0
    stream: bool = True
    timeout: float = 600.0
    seed: int = 0
    slo: dict[str, float] = {}
    check_endpoint: bool = True

    def __post_init__(self) -> None:
        checks = (
            (self.model is None or bool(self.model), "the model name is empty"),
            (
                self.model is not None or self.check_endpoint,
                "--no-check needs --model (the model is otherwise picked from GET /models)",
            ),
            (self.prompt is None or bool(self.inputs), "--prompt needs --input files"),
            (self.prompt is not None or not self.inputs, "--input needs --prompt"),
            (
                self.prompt is None or self.input_len is None,
                "--input-len is for synthetic "
                "prompts; with --prompt the prompts come from the inputs",
            ),
            (self.input_len is None or self.input_len >= 1, "--input-len must be at least 1"),
            (self.output_len is None or self.output_len >= 1, "--output-len must be at least 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be at least 1"),
            (
                self.output_len is None or self.max_tokens is None,
                "--output-len sets max_tokens; give --output-len or --max-tokens, not both",
            ),
            (self.rate is None or 0 < self.rate < math.inf, "--rate must be a positive number"),
            (not self.poisson or self.rate is not None, "--poisson needs --rate"),
            (self.concurrency is None or self.concurrency >= 1, "--concurrency must be >= 1"),
            (self.num_requests is None or self.num_requests >= 1, "--num-requests must be >= 1"),
            (self.duration is None or 0 < self.duration < math.inf, "--duration must be > 0"),
            (self.warmup >= 0, "--warmup must not be negative"),
            (0 < self.timeout < math.inf, "--timeout must be positive"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        reserved = sorted(RESERVED_BODY & self.extra_body.keys())
        if reserved:
            raise ConfigError(
                f"--extra-body may not set {', '.join(reserved)} (use --model, --no-stream)"
            )
        for metric, bound in self.slo.items():
            if metric not in SLO_METRICS:
                raise ConfigError(
                    f"--slo {metric}: unknown metric; known: {', '.join(SLO_METRICS)}"
                )
            if not 0 < bound < math.inf:
                raise ConfigError(f"--slo {metric}: the bound must be a positive number of seconds")
            if metric != "e2e" and not self.stream:
                raise ConfigError(f"--slo {metric} needs streaming (drop --no-stream)")

    @property
    def total(self) -> int | None:
        """Requests to send, warmup included; None when only the duration bounds them."""
        if self.num_requests is None and self.duration is not None:
            return None
        return self.warmup + (self.num_requests or 200)

    @property
    def max_tokens_sent(self) -> int | None:
        """``max_tokens`` in each request, unless a template sets its own."""
        sent = self.max_tokens or self.output_len
        return sent or (_DEFAULT_OUTPUT_LEN if self.prompt is None else None)

    @property
    def max_in_flight(self) -> int | None:
        if self.concurrency is not None:
            return self.concurrency
        return None if self.rate is not None else 64


def arrival_offsets(
    rate: float,
    *,
    poisson: bool,
    total: int | None,
    warmup: int = 0,
    duration: float | None = None,
    rng: random.Random | None = None,
) -> list[float]:
    """Scheduled send times, in seconds from the start: every ``1/rate``, or with exponential
    gaps of mean ``1/rate``. Stops after ``total`` or once ``duration`` seconds have passed
    since the first request after the ``warmup`` ones, whichever comes first."""
    if total is None and duration is None:
        raise ValueError("give total or duration")
    rng = rng or random.Random(0)
    offsets: list[float] = []
    t = 0.0
    for i in itertools.count():
        if total is not None and i >= total:
            break
        if duration is not None and i > warmup and t - offsets[warmup] >= duration:
            break
        if i >= _MAX_REQUESTS:
            raise ConfigError(f"more than {_MAX_REQUESTS} requests scheduled; lower the rate")
        offsets.append(t)
        t = t + rng.expovariate(rate) if poisson else (i + 1) / rate
    return offsets


# --- workload -------------------------------------------------------------------------------


class _Workload:
    """The request bodies, encoded ahead of their send time."""

    def __init__(self, config: BenchConfig, model: str, count: int | None) -> None:
        self._seed = config.seed
        self._bodies: list[bytes] = []
        self.skipped = 0
        self.first_error: str | None = None
        overrides: dict[str, Any] = {}
        max_tokens = config.max_tokens_sent
        if max_tokens is not None:
            overrides["max_tokens"] = max_tokens
        if config.ignore_eos:
            overrides["ignore_eos"] = True
        overrides.update(config.extra_body)
        if config.stream:
            overrides["stream"] = True
            options = overrides.get("stream_options")
            overrides["stream_options"] = {
                **(options if isinstance(options, dict) else {}),
                "include_usage": True,
            }
        self._overrides = overrides
        self._model = model
        self.input_len = config.input_len or _DEFAULT_INPUT_LEN
        self.endpoint: str = config.endpoint or "chat"
        if config.prompt is None:
            return
        template = load_template(config.prompt)
        if config.endpoint is not None and config.endpoint != template.endpoint:
            raise ConfigError(
                f"template {template.name!r} is for the {template.endpoint} endpoint, "
                f"not {config.endpoint}"
            )
        self.endpoint = template.endpoint
        self._load(config, template, min(count or _POOL, _POOL))

    def _load(self, config: BenchConfig, template: Template, wanted: int) -> None:
        expander = Expander(
            template,
            model=self._model,
            persona_field=config.persona_field,
            overrides=self._overrides,
        )
        for path in expand_inputs(config.inputs):
            reader = ShardReader(path)
            while len(self._bodies) < wanted and (batch := reader.read_batch(256)):
                for line in batch:
                    try:
                        (item,) = expander.expand(line)
                    except AsyncgenError as exc:
                        self.skipped += 1
                        self.first_error = self.first_error or str(exc)
                        continue
                    self._bodies.append(_encode(item.body))
                    if len(self._bodies) >= wanted:
                        break
            if len(self._bodies) >= wanted:
                break
        if not self._bodies:
            raise ConfigError(
                "no usable input line in "
                + ", ".join(config.inputs)
                + (f" (first problem: {self.first_error})" if self.first_error else "")
            )

    @property
    def path(self) -> str:
        return _PATHS[self.endpoint]

    def body(self, index: int) -> bytes:
        """The encoded body of request ``index``: rendered inputs in turn, or random words
        that are the same for the same seed and index."""
        if self._bodies:
            return self._bodies[index % len(self._bodies)]
        rng = random.Random(f"{self._seed}:{index}")
        text = " ".join(rng.choices(_WORDS, k=self.input_len))
        body: dict[str, Any] = {"model": self._model}
        if self.endpoint == "chat":
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        body.update(self._overrides)
        return _encode(body)


# --- running --------------------------------------------------------------------------------


class BenchProgress(NamedTuple):
    elapsed: float
    done: int
    failed: int
    in_flight: int


class BenchResult(NamedTuple):
    model: str
    endpoint: str
    report: Report
    records: list[RequestRecord]
    """Every finished request, warmup included, by index."""
    interrupted: bool
    skipped_inputs: int


class _Failure(Exception):
    """A request that ended without a completion; kept as a record, never raised further."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Bench:
    """One benchmark run. An async context manager that owns its transport unless given one."""

    def __init__(
        self,
        config: BenchConfig,
        *,
        api_key: str | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self._own_transport = transport is None
        self._transport: Transport = transport or AiohttpTransport(
            config.base_url, api_key=api_key, limit=config.max_in_flight or 0
        )
        self._records: list[RequestRecord] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._t0: float | None = None
        self._in_flight = self._failed = self._next = 0
        self._measure_start: float | None = None
        self._stopping = self._started = False

    def __repr__(self) -> str:
        p = self.progress()
        return (
            f"<Bench {self._transport.base_url} done={p.done} failed={p.failed} "
            f"in_flight={p.in_flight} stopping={self._stopping}>"
        )

    async def __aenter__(self) -> Bench:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._own_transport:
            await self._transport.aclose()

    def progress(self) -> BenchProgress:
        elapsed = 0.0 if self._t0 is None else self._now()
        return BenchProgress(elapsed, len(self._records), self._failed, self._in_flight)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        """Send nothing more and abandon the requests in flight; ``run`` reports the rest."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()

    async def run(self) -> BenchResult:
        if self._started:
            raise RuntimeError("a Bench runs once")
        self._started = True
        config = self.config
        served = await self.check_endpoint() if config.check_endpoint else None
        model = config.model
        if model is None:
            if not served:
                raise ConfigError("no --model given and the endpoint lists no model to pick")
            model = served[0]
        workload = await asyncio.to_thread(_Workload, config, model, config.total)
        offsets = None
        if config.rate is not None:
            rng = random.Random(f"{config.seed}:arrivals")
            offsets = arrival_offsets(
                config.rate,
                poisson=config.poisson,
                total=config.total,
                warmup=config.warmup,
                duration=config.duration,
                rng=rng,
            )
        self._t0 = time.perf_counter()
        try:
            async with asyncio.TaskGroup() as tg:
                if offsets is not None:
                    self._spawn(tg, self._open_loop(tg, workload, offsets))
                else:
                    for _ in range(config.max_in_flight or 1):
                        self._spawn(tg, self._closed_loop(workload))
        except BaseExceptionGroup as group:
            # A refused key or an unknown model stops the run: one error, not a group.
            errors = [e for e in group.exceptions if isinstance(e, AsyncgenError)]
            if errors and len(errors) == len(group.exceptions):
                raise errors[0] from None
            raise
        records = sorted(self._records, key=lambda r: r.index)
        return BenchResult(
            model,
            workload.endpoint,
            summarize(records, slo=config.slo),
            records,
            self._stopping,
            workload.skipped,
        )

    async def check_endpoint(self) -> list[str] | None:
        """``GET /models`` (see :func:`~asyncgen.engine.transport.check_models`)."""
        return await check_models(self._transport, self.config.model)

    def _spawn(self, tg: asyncio.TaskGroup, coro: Any) -> None:
        task = tg.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _now(self) -> float:
        """Seconds since the start, to the microsecond. The clock is perf_counter, not the
        loop's: uvloop's ticks in milliseconds, too coarse for inter-token gaps."""
        assert self._t0 is not None
        return round(time.perf_counter() - self._t0, 6)

    async def _open_loop(
        self, tg: asyncio.TaskGroup, workload: _Workload, offsets: list[float]
    ) -> None:
        limit = self.config.max_in_flight
        slots = asyncio.Semaphore(limit) if limit is not None else None
        for index, offset in enumerate(offsets):
            if self._stopping:
                return
            body = workload.body(index)  # before the due time, so it costs nothing measured
            delay = offset - self._now()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                # Gate before spawning: later arrivals wait here, in order, and their
                # latency clock (the scheduled time) is already running.
                await slots.acquire()
            self._spawn(tg, self._request(index, offset, body, workload.path, slots))

    async def _closed_loop(self, workload: _Workload) -> None:
        config = self.config
        total = config.total
        while not self._stopping:
            index = self._next
            if total is not None and index >= total:
                return
            start, limit = self._measure_start, config.duration
            if start is not None and limit is not None and self._now() - start >= limit:
                return
            self._next += 1
            body = workload.body(index)
            scheduled = self._now()
            if index == config.warmup:
                self._measure_start = scheduled
            await self._request(index, scheduled, body, workload.path, None)

    async def _request(
        self,
        index: int,
        scheduled: float,
        body: bytes,
        path: str,
        slots: asyncio.Semaphore | None,
    ) -> None:
        self._in_flight += 1
        try:
            record = await self._timed(index, scheduled, body, path)
        finally:
            self._in_flight -= 1
            if slots is not None:
                slots.release()
        self._records.append(record)
        if record.error is not None:
            self._failed += 1
            status = record.status
            if status in (401, 403, 404):
                what = "refused the API key" if status != 404 else "does not know the model or URL"
                raise ConfigError(
                    f"endpoint {self._transport.base_url} {what}: HTTP {status} to POST {path}: "
                    f"{record.message}; stopping, since every request would get the same answer"
                )

    async def _timed(self, index: int, scheduled: float, body: bytes, path: str) -> RequestRecord:
        config = self.config
        record = RequestRecord(
            index=index, warmup=index < config.warmup, scheduled=scheduled, sent=self._now(), end=0
        )
        try:
            async with asyncio.timeout(config.timeout):
                if config.stream:
                    completion = await self._streamed(path, body, record)
                else:
                    completion = await self._plain(path, body, record)
        except _Failure as exc:
            record.error, record.message = exc.kind, str(exc)[:500]
        except TimeoutError:
            record.error, record.message = "timeout", f"not complete after {config.timeout:g}s"
        except TransportError as exc:
            record.error, record.message = "connection_error", str(exc)[:500]
        record.end = self._now()
        if record.error is None:
            usage = completion.usage
            record.prompt_tokens = usage.prompt_tokens if usage else None
            record.output_tokens = usage.completion_tokens if usage else None
            if not record.output_tokens:  # no usage: count chunks, or estimate from the text
                record.output_tokens = len(record.token_times) or _estimate_tokens(completion)
        return record

    async def _plain(self, path: str, body: bytes, record: RequestRecord) -> Completion:
        resp = await self._transport.post(path, body)
        record.status = resp.status
        outcome = interpret(resp.status, resp.body)
        if outcome.completion is None:
            assert outcome.error is not None
            kind = f"http_{resp.status}" if resp.status != 200 else outcome.error.code
            raise _Failure(kind, outcome.error.message)
        return outcome.completion

    async def _streamed(self, path: str, body: bytes, record: RequestRecord) -> Completion:
        """The completion; the arrival of each chunk carrying output goes to
        ``record.token_times`` (chunks read from the network together share a time, as the
        client saw them)."""
        parser, assembler = SSEParser(), StreamAssembler()
        token_times = record.token_times = []
        try:
            async with self._transport.stream(path, body) as reply:
                record.status = status = reply.status
                if status != 200:
                    outcome = interpret(status, await reply.read())
                    raise _Failure(f"http_{status}", outcome.error.message if outcome.error else "")
                async for data in reply.chunks():
                    now = self._now()
                    for payload in parser.feed(data):
                        before = assembler.token_chunks
                        assembler.add(payload)
                        if assembler.token_chunks != before:
                            token_times.append(now)
            parser.close()
            return assembler.completion()
        except StreamServerError as exc:
            raise _Failure(exc.error.code, exc.error.message) from None
        except StreamIncomplete as exc:
            if not assembler.chunks:  # not cut: it never was an event stream
                raise _Failure("malformed_response", f"200 without events: {exc}") from None
            raise _Failure("stream_cut", f"the stream ended early: {exc}") from None
        except StreamError as exc:
            raise _Failure("malformed_response", f"bad event stream: {exc}") from None
        except ConnectError as exc:
            if record.status == 200:  # the reply had begun: the stream was cut
                raise _Failure("stream_cut", str(exc)) from None
            raise


def _estimate_tokens(completion: Completion) -> int:
    """Output tokens at about four characters each, for replies without ``usage``."""
    choice = completion.choices[0]
    text = (choice.message.content if choice.message else None) or choice.text or ""
    return max(1, len(text) // 4) if text else 0
