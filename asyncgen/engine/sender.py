"""An item's task: attempts, paced and routed by the gate, until it succeeds or fails for
good; then its record, buffered for the committer."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec

from asyncgen.core.flow import Feedback, Lease, Signal
from asyncgen.core.ledger import Ledger
from asyncgen.core.records import Completion, ErrorInfo, Result, Usage, WorkItem
from asyncgen.core.retry import Outcome, RetryPolicy
from asyncgen.core.validate import Checked
from asyncgen.engine.attempt import Attempter
from asyncgen.engine.clock import Clock
from asyncgen.engine.commit import Committer
from asyncgen.engine.gate import Gate
from asyncgen.engine.stats import Counts
from asyncgen.job.config import JobConfig
from asyncgen.job.items import NOT_SAMPLING
from asyncgen.job.prompts import Template

__all__ = ["UNUSED", "Sender"]

UNUSED = Feedback(Signal.CANCELLED)
"""The feedback for a lease given back without an attempt."""
_UNCHECKED = Checked(None)


def _plus(total: Usage | None, more: Usage | None) -> Usage | None:
    """``total`` with the counts of ``more`` added (unknown counts as 0)."""
    if more is None:
        return total
    prompt = (more.prompt_tokens or 0) + (total.prompt_tokens or 0 if total else 0)
    completion = (more.completion_tokens or 0) + (total.completion_tokens or 0 if total else 0)
    return Usage(prompt, completion, prompt + completion)


class Sender:
    """Runs items' tasks (:meth:`send`); :attr:`tasks` holds those still running."""

    def __init__(
        self,
        config: JobConfig,
        *,
        gate: Gate,
        attempter: Attempter,
        committer: Committer,
        ledger: Ledger,
        counts: Counts,
        clock: Clock,
        rng: random.Random,
        template: Template | None,
        endpoint_names: list[str],
        redo: bool,
    ) -> None:
        self._gate = gate
        self._attempt = attempter.attempt
        self._committer = committer
        self._ledger = ledger
        self._counts = counts
        self._now = clock.monotonic
        self._wall = clock.wall
        self._sleep = clock.sleep
        self._rng = rng
        self._stream = config.stream
        self._max_invalid = config.max_invalid
        self._policy = RetryPolicy(
            max_attempts=config.max_attempts,
            base_delay=config.backoff_base,
            max_delay=config.backoff_cap,
            deadline=config.deadline,
        )
        self._output = template.output if template is not None else None
        self._template_sha = template.digest[:16] if template is not None else None
        self._endpoint_names = endpoint_names
        self._redo = redo
        self._encoder = msgspec.json.Encoder()
        self._loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        """Items' tasks still running (each takes itself out as it ends: cheaper than a done
        callback, which the loop would schedule and call for every item)."""

    async def send(self, item: WorkItem, lease: Lease) -> None:
        """An item's task: from its first ``lease`` (and slot) to its buffered record. Its
        claim is released if it ends otherwise (a hard stop), so the next run sends it."""
        try:
            result = await self._attempts(item, lease)
            committer = self._committer
            if not committer.space.is_set():  # the commit is behind: wait for it
                await committer.space.wait()
            committer.put_nowait(result)
        except BaseException:
            self._ledger.release(item.custom_id)
            raise
        finally:
            self._gate.release_slot()
            self.tasks.discard(asyncio.current_task(self._loop))

    async def _attempts(self, item: WorkItem, first_lease: Lease) -> Result:
        gate = self._gate
        counts = self._counts
        body = self._encoder.encode(self._request_body(item))
        first = self._now()
        started = self._wall()
        attempt = excused = invalid = 0
        rejected: Usage | None = None
        lease: Lease | None = first_lease
        while True:
            if lease is None:
                lease = await gate.lease(item.est_prompt_tokens, item.max_output_tokens)
            endpoint = lease.endpoint
            attempt += 1
            counts.requests += 1
            counts.in_flight += 1
            feedback = UNUSED
            try:
                outcome, feedback, ttft = await self._attempt(item, body, lease)
            finally:
                counts.in_flight -= 1
                # The endpoint's failures (429s, outages) do not use up the item's attempts;
                # the retry deadline bounds them.
                excused += gate.release(lease, feedback).excused
                lease = None
            elapsed = self._now() - first
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
                exhausted = invalid >= self._max_invalid
                reason = f"{invalid} invalid replies, the last: {checked.reason}"
                error = ErrorInfo("invalid_output", reason if exhausted else checked.reason, 200)
                outcome = Outcome(None, error, not exhausted)
            assert outcome.error is not None
            if feedback.signal is Signal.THROTTLED:
                counts.throttled += 1
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
            counts.retries += 1
            if feedback.signal is Signal.THROTTLED:
                # The 429 paused its endpoint for as long as the server asked (the deadline
                # above counted that wait): the gate holds the item meanwhile or routes it to
                # another endpoint at once.
                continue
            counts.retrying += 1
            try:
                await self._sleep(delay)
            finally:
                counts.retrying -= 1

    def _check_output(self, item: WorkItem, c: Completion) -> Checked:
        """The template's ``[output]`` checks on a reply (batch lines have none). A reply that
        fails them still cost tokens, so they are counted here."""
        spec = self._output
        if spec is None or item.template is None:
            return _UNCHECKED
        choice = c.choices[0]
        text = choice.message.content if choice.message is not None else choice.text
        checked = spec.check(text, choice.finish_reason)
        if checked.reason is not None and c.usage is not None:
            self._counts.prompt_tokens += c.usage.prompt_tokens or 0
            self._counts.completion_tokens += c.usage.completion_tokens or 0
        return checked

    def _request_body(self, item: WorkItem) -> dict[str, Any]:
        if not self._stream:
            return item.body
        # Usage arrives on a last chunk only when asked for; it corrects the token budget.
        # Options of the user's (vLLM's continuous_usage_stats, say) are kept beside it.
        own = item.body.get("stream_options")
        options = {"include_usage": True, **(own if isinstance(own, dict) else {})}
        return {**item.body, "stream": True, "stream_options": options}

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
                self._counts.prompt_tokens += usage.prompt_tokens or 0
                self._counts.completion_tokens += usage.completion_tokens or 0
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
            self._wall(),
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
            self._redo,
            parsed,
            rejected,
        )

    def __repr__(self) -> str:
        return f"<Sender running={len(self.tasks)} {self._counts!r}>"
