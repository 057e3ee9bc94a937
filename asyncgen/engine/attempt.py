"""One HTTP attempt, plain or streamed, and what it says: the outcome for the item, the
feedback for the endpoint's flow control, and the time to the first token.

A plain attempt's ``timeout`` has no timer of its own: :meth:`Attempter.expire_overdue`
sweeps the open attempts a fraction of the timeout apart, on the engine's clock. A streamed
attempt's limits (total and idle) are the loop's timers, as they bound socket reads.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

from asyncgen.core.errors import ConfigError, ConnectError, TransportError
from asyncgen.core.hints import RateLimitHints, parse_ratelimit, parse_retry_after
from asyncgen.core.leases import Feedback, Lease, Signal
from asyncgen.core.records import ErrorInfo, WorkItem
from asyncgen.core.redact import redact_text
from asyncgen.core.retry import QUOTA_CODE, Outcome, Stop, interpret
from asyncgen.core.sse import (
    SSEParser,
    StreamAssembler,
    StreamError,
    StreamIncomplete,
    StreamServerError,
)
from asyncgen.engine.clock import Clock
from asyncgen.engine.transport import Transport

__all__ = ["Attempter"]

_AFTER_DONE = 1.0  # seconds a stream may idle after [DONE] before it is closed

_TIMEOUT = Feedback(Signal.TIMEOUT)
_ERROR = Feedback(Signal.ERROR)
_DROPPED = Feedback(Signal.DROPPED)
_UNREACHABLE = Feedback(Signal.UNREACHABLE)

AttemptResult = tuple[Outcome, Feedback, float | None]


_STOPS = {
    Stop.QUOTA: "the account's quota or spend limit is used up",
    Stop.KEY: "the API key is refused",
    Stop.MODEL: "the model or URL is not served there",
}
_TOKENS = re.compile(r"(?i)\btokens? per min|\bTPM\b")


def _tokens_ran_out(outcome: Outcome, hints: RateLimitHints | None) -> bool:
    """Does a 429 say the token budget, not the request budget, ran out?"""
    if hints is not None and hints.tokens is not None and hints.tokens.remaining is not None:
        requests = hints.requests
        if hints.tokens.remaining < 1 and (requests is None or (requests.remaining or 0) >= 1):
            return True
    error = outcome.error
    return error is not None and _TOKENS.search(error.message) is not None


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


class Attempter:
    """Makes attempts over the job's transports (one per endpoint) and expires overdue ones.

    Create it inside the running loop (it keeps the loop for ``current_task``).
    """

    def __init__(
        self,
        transports: Sequence[Transport],
        *,
        timeout: float,
        idle_timeout: float,
        stream: bool,
        model: str | None,
        clock: Clock,
    ) -> None:
        self._transports = transports
        self._timeout = timeout
        self._idle_timeout = idle_timeout
        self._stream = stream
        self._model = model
        self._clock = clock
        self._now = clock.monotonic
        self._loop = asyncio.get_running_loop()
        self.deadlines: dict[asyncio.Task[Any], float] = {}
        """Open plain attempts, by task, and when each must end."""
        self.expired: set[asyncio.Task[Any]] = set()
        """Their tasks the sweep has cancelled, until the attempt has seen it."""
        self.refused: dict[int, str] = {}
        """Endpoints out for good, by index, and why: they refused the key or do not serve
        the model, while other endpoints may (their probes never re-admit them)."""

    async def attempt(
        self, item: WorkItem, body: bytes, lease: Lease, inputs: int = 1
    ) -> AttemptResult:
        """One HTTP attempt: its outcome, what it says about the endpoint, and (streaming)
        the seconds to its first token. Raises ConfigError for a job-level answer.
        ``inputs``: the texts an embeddings request carries."""
        transport = self._transports[lease.endpoint]
        ttft: float | None = None
        headers: Mapping[str, str] = {}
        try:
            if self._stream:
                status, headers, outcome, ttft = await self._streamed(transport, item.url, body)
            else:
                # The task is registered only while it waits here, so the sweep's
                # cancellation lands here (as asyncio.timeout's would).
                task = asyncio.current_task(self._loop)
                assert task is not None
                self.deadlines[task] = self._now() + self._timeout
                try:
                    resp = await transport.post(item.url, body)
                except asyncio.CancelledError:
                    # Ours unless someone else cancelled the task too (a hard stop).
                    if task in self.expired and task.uncancel() == 0:
                        raise TimeoutError from None
                    raise
                else:
                    if task in self.expired:  # a transport that swallowed the cancellation
                        task.uncancel()
                finally:
                    self.deadlines.pop(task, None)  # the sweep may have taken it
                    self.expired.discard(task)
                status, headers = resp.status, resp.headers
                outcome = interpret(
                    resp.status, resp.body, embeddings=inputs if item.url == "/embeddings" else 0
                )
        except TimeoutError as exc:
            message = str(exc) or f"no complete response within {self._timeout:g}s"
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
        if self._refuses(lease.endpoint, item, outcome):
            # Out for good (UNREACHABLE ejects it at once); the item goes elsewhere.
            return Outcome(None, outcome.error, True), _UNREACHABLE, ttft
        signal = _signal(status)
        tokens_ran_out = signal is Signal.THROTTLED and _tokens_ran_out(outcome, hints)
        feedback = Feedback(
            signal, hints, parse_retry_after(headers), tokens_ran_out=tokens_ran_out
        )
        return outcome, feedback, ttft

    async def _streamed(
        self, transport: Transport, path: str, body: bytes
    ) -> tuple[int, Mapping[str, str], Outcome, float | None]:
        loop = self._loop
        started = loop.time()
        total = started + self._timeout
        idle = self._idle_timeout
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
            # A 429 or 503 inside the stream says what the status would have said; a used-up
            # quota, what it says anywhere.
            status = exc.status if exc.status is not None else status
            stop = Stop.QUOTA if exc.error.code == QUOTA_CODE else None
            return status, headers, Outcome(None, exc.error, exc.retryable, stop), ttft
        except StreamError as exc:
            error = ErrorInfo("malformed_response", f"bad event stream: {exc}", status)
            return status, headers, Outcome(None, error, True), ttft
        except TimeoutError:
            if not assembler.done:  # a server that idles after [DONE] still answered
                if loop.time() >= total:
                    raise TimeoutError(f"no complete response within {self._timeout:g}s") from None
                raise TimeoutError(
                    f"stream stalled: nothing for {idle:g}s after {assembler.chunks} chunks"
                ) from None
        try:
            completion = assembler.completion()
        except StreamIncomplete as exc:
            error = ErrorInfo("stream_cut", f"the stream ended early: {exc}", status)
            return status, headers, Outcome(None, error, True), ttft
        return status, headers, Outcome(completion, None, False), ttft

    def refuse(self, index: int, why: str) -> None:
        """Take endpoint ``index`` out for good (see :attr:`refused`)."""
        self.refused.setdefault(index, why)

    def _refuses(self, index: int, item: WorkItem, outcome: Outcome) -> bool:
        """Is the answer one every request to this endpoint would get: a used-up quota, a
        refused key, an unknown model (for the job's one model; batch lines may name
        several)? Recording it per item would burn the whole input as failures, and retrying
        a quota would send requests for ever. A refused key or model takes the endpoint out
        (True) while another endpoint has not said the same; the job stops (ConfigError) on
        a quota, or when every endpoint has."""
        error, stop = outcome.error, outcome.stop
        if stop is None or error is None or (stop is Stop.MODEL and self._model is None):
            return False
        url = self._transports[index].base_url
        what = _STOPS[stop]
        how = f"HTTP {error.status}" if error.status else "in its event stream"
        answer = f"endpoint {url} answered {how} ({error.code}) to POST {item.url}: {error.message}"
        if stop is not Stop.QUOTA:
            self.refuse(index, f"{answer}: {what}")
            if len(self.refused) < len(self._transports):
                return True
        raise ConfigError(
            f"{answer}; stopping: {what}"
            + (", on every endpoint" if len(self._transports) > 1 else "")
            + ", and every request would get the same answer (the item is not recorded and "
            "will be sent by the next run)"
        )

    async def expire_overdue(self) -> None:
        """Expire the attempts that outlived ``timeout``, until cancelled: cancel their
        tasks, which :meth:`attempt` turns into TimeoutError. One sweep a fraction of the
        timeout apart instead of a timer (or an ``asyncio.timeout``) per attempt: at
        thousands of requests a second, their set-up was a measurable part of the loop's
        work. An attempt ends at most an eighth of the timeout (half a second at most) late."""
        every = min(0.5, self._timeout / 8)
        while True:
            await self._clock.sleep(every)
            now = self._now()
            overdue = [task for task, when in self.deadlines.items() if when <= now]
            for task in overdue:
                del self.deadlines[task]
                self.expired.add(task)
                task.cancel()

    async def probe(self, index: int) -> tuple[bool, str | None]:
        """Is an ejected endpoint answering again? Any reply below 500 says it is; a reply
        of 500 or more is returned as its status and the start of its body (redacted). One
        that refused the key or the model stays out."""
        if index in self.refused:
            return False, None
        try:
            async with asyncio.timeout(min(5.0, self._timeout)):
                resp = await self._transports[index].get("/models")
        except (TimeoutError, TransportError):
            return False, None
        if resp.status < 500:
            return True, None
        body = redact_text(resp.body[:200].decode("utf-8", "replace").strip())
        return False, f"HTTP {resp.status}: {body or '(no body)'}"

    def __repr__(self) -> str:
        kind = "streamed" if self._stream else "plain"
        return f"<Attempter {kind} timeout={self._timeout:g}s open={len(self.deadlines)}>"
