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

The configuration is in :mod:`asyncgen.bench.config`, the bodies and send times in
:mod:`asyncgen.bench.workload`, the statistics in :mod:`asyncgen.bench.stats`; this module
keeps the schedule and times the requests.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, NamedTuple

from asyncgen.bench.config import BenchConfig
from asyncgen.bench.stats import Report, RequestRecord, summarize
from asyncgen.bench.workload import Workload, schedule
from asyncgen.core.errors import ConfigError, ConnectError, TransportError, job_error
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

__all__ = ["Bench", "BenchConfig", "BenchProgress", "BenchResult"]


class BenchProgress(NamedTuple):
    """An immutable snapshot of a run: seconds since the start, requests finished (failed
    ones included) and in flight."""

    elapsed: float
    done: int
    failed: int
    in_flight: int


class BenchResult(NamedTuple):
    """What a run measured; ``interrupted`` when it was stopped or cancelled before the end."""

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
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._notify = notify
        """Told what the run decided by itself (the model it picked) and the start-up
        check's warnings."""
        self._own_transport = transport is None
        self._transport: Transport = transport or AiohttpTransport(
            config.base_url, api_key=api_key, limit=config.max_in_flight or 0
        )
        self._records: list[RequestRecord] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._t0: float | None = None
        self._in_flight = self._failed = self._next = 0
        self._measure_start: float | None = None
        self._stopping = self._started = self._finished = False
        self._model: str | None = None
        self._workload: Workload | None = None

    def __repr__(self) -> str:
        p = self.statistics()
        return (
            f"<Bench {self._transport.base_url} done={p.done} failed={p.failed} "
            f"in_flight={p.in_flight} stopping={self._stopping}>"
        )

    async def __aenter__(self) -> Bench:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._own_transport:
            await self._transport.aclose()

    def statistics(self) -> BenchProgress:
        """Where the run stands now."""
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
            named = [m for m in served or () if "*" not in m]  # a wildcard is no model name
            if not named:
                raise ConfigError("no --model given and the endpoint lists no model to pick")
            model = named[0]
            if self._notify is not None:
                self._notify(f"no --model given: using {model!r}, the first GET /models lists")
        self._model = model
        self._workload = workload = await asyncio.to_thread(Workload, config, model, config.total)
        offsets = schedule(config)
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
            error = job_error(group)
            if error is None:
                raise
            raise error from None
        self._finished = True
        return self.result()

    def result(self) -> BenchResult:
        """What has finished so far, as :meth:`run` reports it at its end; before then (a run
        still going, or cancelled), ``interrupted``."""
        config, workload = self.config, self._workload
        records = sorted(self._records, key=lambda r: r.index)
        if workload is not None:
            endpoint, skipped = workload.endpoint, workload.skipped
        else:  # not loaded yet: the template would say
            endpoint, skipped = config.endpoint or ("chat" if config.prompt is None else "?"), 0
        return BenchResult(
            self._model or config.model or "?",
            endpoint,
            summarize(records, slo=config.slo),
            records,
            self._stopping or not self._finished,
            skipped,
        )

    async def check_endpoint(self) -> list[str] | None:
        """``GET /models`` (see :func:`~asyncgen.engine.transport.check_models`)."""
        return await check_models(self._transport, self.config.model, warn=self._notify)

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
        self, tg: asyncio.TaskGroup, workload: Workload, offsets: list[float]
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

    async def _closed_loop(self, workload: Workload) -> None:
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
