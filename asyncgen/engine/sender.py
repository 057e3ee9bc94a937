"""An item's task: attempts, paced and routed by the gate, until it succeeds or fails for
good; then its record, buffered for the committer."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from asyncgen.core.leases import Feedback, Lease, Signal
from asyncgen.core.ledger import Ledger
from asyncgen.core.records import Completion, ErrorInfo, Result, Usage, WorkItem
from asyncgen.core.retry import Outcome, RetryPolicy
from asyncgen.core.validate import Checked
from asyncgen.engine.attempt import Attempter
from asyncgen.engine.clock import Clock
from asyncgen.engine.commit import Committer
from asyncgen.engine.gate import Gate
from asyncgen.engine.record import build_result, check_reply, output_spec, reply_text
from asyncgen.engine.stats import Counts
from asyncgen.job.config import JobConfig
from asyncgen.job.items import group_item
from asyncgen.job.prompts import Template

__all__ = ["UNUSED", "Sender"]

R = TypeVar("R")

UNUSED = Feedback(Signal.CANCELLED)
"""The feedback for a lease given back without an attempt."""


def _plus(total: Usage | None, more: Usage | None) -> Usage | None:
    """``total`` with the counts of ``more`` added (unknown counts as 0)."""
    if more is None:
        return total
    prompt = (more.prompt_tokens or 0) + (total.prompt_tokens or 0 if total else 0)
    completion = (more.completion_tokens or 0) + (total.completion_tokens or 0 if total else 0)
    return Usage(prompt, completion, prompt + completion)


def _shares(usage: Usage | None, weights: list[int]) -> list[Usage | None]:
    """A group's prompt tokens split among its members in proportion to ``weights`` (their
    estimated tokens), in whole tokens that add up to the reply's count."""
    total = usage.prompt_tokens if usage is not None else None
    if total is None:
        return [None] * len(weights)
    whole = sum(weights) or 1
    shares = [total * w // whole for w in weights]
    shares[-1] += total - sum(shares)
    return [Usage(n, None, n) for n in shares]


class _Group:
    """The records of one attempt of a group: :meth:`records` is the ``record`` callback of
    :meth:`Sender._attempts`; members the reply left out stay in :attr:`missing`."""

    def __init__(self, members: list[WorkItem], record: Callable[..., Result]) -> None:
        self._members = members
        self._record = record
        self.missing: list[WorkItem] = []
        self._last: tuple[Any, ...] = ()

    def records(
        self,
        item: WorkItem,
        error: ErrorInfo | None,
        attempts: int,
        latency: float,
        started: float,
        endpoint: int,
        rejected: Usage | None,
        completion: Completion | None = None,
        *unused: Any,
        **unused_by_name: Any,
    ) -> list[Result]:
        """:meth:`Sender._record`'s arguments (those after ``completion``, the time to the
        first token, parsed and rejected output, are no embedding's), a record a member."""
        record, members = self._record, self._members
        self._last = (attempts, latency, started, endpoint)
        if completion is None:
            return [record(m, error, attempts, latency, started, endpoint, None) for m in members]
        # interpret checked the indexes: each names a different member.
        found = {i if e.index is None else e.index: e for i, e in enumerate(completion.data)}
        present = [i for i in range(len(members)) if i in found]
        self.missing = [m for i, m in enumerate(members) if i not in found]
        usages = _shares(completion.usage, [members[i].est_prompt_tokens for i in present])
        return [
            record(
                members[i],
                None,
                attempts,
                latency,
                started,
                endpoint,
                None,
                Completion([], completion.model, usage, [found[i]]),
            )
            for i, usage in zip(present, usages, strict=True)
        ]

    def fail_missing(self, rounds: int) -> list[Result]:
        """Failure records for the members every reply left out, ``rounds`` replies."""
        attempts, latency, started, endpoint = self._last
        error = ErrorInfo(
            "malformed_response",
            f"gave up after {rounds} replies to a request of several inputs: this input "
            "got no vector (the reply left it out)",
            200,
        )
        return [
            self._record(m, error, attempts, latency, started, endpoint, None) for m in self.missing
        ]


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
        self.errors: dict[tuple[int, str, int | None], int] = {}
        """Attempts that did not give a result, by endpoint, error code and HTTP status
        (counted on the failure path only: a success costs nothing here)."""
        self._now = clock.monotonic
        self._wall = clock.wall
        self._sleep = clock.sleep
        self._rng = rng
        self._stream = config.stream
        self._max_invalid = config.max_invalid
        self._accept_length = config.accept_length
        self._deadline = config.deadline
        self._policy = RetryPolicy(
            max_attempts=config.max_attempts,
            base_delay=config.backoff_base,
            max_delay=config.backoff_cap,
            deadline=config.deadline,
        )
        self._output = output_spec(template)
        self._template_sha = template.digest[:16] if template is not None else None
        self._endpoint_names = endpoint_names
        self._redo = redo
        self._encoder = msgspec.json.Encoder()
        self._loop = asyncio.get_running_loop()
        self.tasks: set[asyncio.Task[None]] = set()
        """Items' tasks still running (each takes itself out as it ends: cheaper than a done
        callback, which the loop would schedule and call for every item)."""
        self.stopping = False
        """Set by :meth:`stop`: no attempt starts any more, first or retry."""
        self.abandoned = 0
        """Items that ended without a record (stopped), to be sent by the next run."""
        self._between: set[asyncio.Task[None]] = set()
        """Tasks between two attempts (waiting out a delay, or for a lease)."""
        self._parked: set[asyncio.Task[None]] = set()
        """Tasks whose slot is lent out (see :meth:`Gate.park`)."""

    def stop(self) -> None:
        """Send nothing more: the items between attempts end now, those in flight after
        their attempt (unless it succeeded). Their claims are released."""
        self.stopping = True
        for task in list(self._between):
            task.cancel()

    async def send(self, item: WorkItem, lease: Lease) -> None:
        """An item's task: from its first ``lease`` (and slot) to its buffered record. Its
        claim is released if it ends otherwise (a stop), so the next run sends it."""
        task = asyncio.current_task(self._loop)
        try:
            result = await self._attempts(item, lease, self._record)
            if result is None:  # stopped between two attempts
                self._ledger.release(item.custom_id)
                self.abandoned += 1
                return
            committer = self._committer
            if not committer.space.is_set():  # the commit is behind: wait for it
                await committer.space.wait()
            committer.put_nowait(result)
        except BaseException:
            self._ledger.release(item.custom_id)
            self.abandoned += 1
            raise
        finally:
            # _leave, inline: this runs once per item.
            if self._parked and task in self._parked:
                self._parked.discard(task)
                self._gate.leave_parking()
            else:
                self._gate.release_slot()
            self.tasks.discard(task)

    async def send_group(self, group: WorkItem, members: list[WorkItem], lease: Lease) -> None:
        """A group's task (``--embed-batch``: several texts in one embeddings request, made
        by :func:`~asyncgen.job.items.group_item`): attempts as one item's, then a record
        for each member, buffered together. Members a reply left out are sent again as a
        smaller group (at most ``max_attempts`` rounds); the claims of members without a
        record are released if the task ends otherwise (a stop)."""
        task = asyncio.current_task(self._loop)
        pending = members
        rounds = 0
        try:
            while True:
                rounds += 1
                batch = _Group(pending, self._record)
                records = await self._attempts(group, lease, batch.records, len(pending))
                if records is None:  # stopped between two attempts
                    break
                if batch.missing and rounds >= self._policy.max_attempts:
                    records += batch.fail_missing(rounds)
                    batch.missing = []
                committer = self._committer
                if not committer.space.is_set():
                    await committer.space.wait()
                for record in records:
                    committer.put_nowait(record)
                pending = batch.missing
                if not pending:
                    return
                if self.stopping:
                    break
                group = group_item(pending)
                try:
                    lease = await self._next_lease(group, self._now() + self._deadline)
                except TimeoutError:
                    for record in batch.fail_missing(rounds):
                        self._committer.put_nowait(record)
                    return
                self._counts.retries += 1
            for member in pending:
                self._ledger.release(member.custom_id)
            self.abandoned += len(pending)
        except BaseException:
            for member in pending:
                self._ledger.release(member.custom_id)
            self.abandoned += len(pending)
            raise
        finally:
            self._leave(task)

    def _leave(self, task: asyncio.Task[None] | None) -> None:
        """A task ends: its slot (or parking place) is given back."""
        if self._parked and task in self._parked:
            self._parked.discard(task)
            self._gate.leave_parking()
        else:
            self._gate.release_slot()
        self.tasks.discard(task)

    async def _attempts(
        self, item: WorkItem, first_lease: Lease, record: Callable[..., R], inputs: int = 1
    ) -> R | None:
        """Attempts until ``record`` makes the outcome's record(s) (called as
        :meth:`_record`); None when stopped before the next attempt. ``inputs``: the texts
        of an embeddings request."""
        gate = self._gate
        counts = self._counts
        body = self._encoder.encode(self._request_body(item))
        first = self._now()
        started = self._wall()
        attempt = excused = invalid = 0
        rejected: Usage | None = None
        rejected_text: str | None = None
        lease: Lease | None = first_lease
        endpoint = first_lease.endpoint
        error: ErrorInfo | None = None
        until = first + self._deadline
        while True:
            if lease is None:
                try:
                    lease = await self._next_lease(item, until)
                except TimeoutError:
                    # The endpoints stayed paused or down past the item's deadline.
                    assert error is not None
                    error = ErrorInfo(
                        error.code,
                        f"gave up after {attempt} attempts in {self._now() - first:.1f}s: "
                        f"no endpoint took it again within the deadline; the last: "
                        f"{error.message}",
                        error.status,
                    )
                    return record(
                        item,
                        error,
                        attempt,
                        self._now() - first,
                        started,
                        endpoint,
                        rejected,
                        rejected_text=rejected_text,
                    )
                counts.retries += 1  # counted when sent, not when scheduled
            endpoint = lease.endpoint
            attempt += 1
            counts.requests += 1
            counts.in_flight += 1
            feedback = UNUSED
            try:
                outcome, feedback, ttft = await self._attempt(item, body, lease, inputs)
            finally:
                counts.in_flight -= 1
                # The endpoint's failures (429s, outages) do not use up the item's attempts;
                # the retry deadline bounds them.
                released = gate.release(lease, feedback)
                excused += released.excused
                lease = None
            elapsed = self._now() - first
            if outcome.completion is not None:
                checked = self._check_output(item, outcome.completion)
                if checked.reason is None:
                    return record(
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
                rejected_text = reply_text(outcome.completion)
                invalid += 1
                counts.rejected += 1
                exhausted = invalid >= self._max_invalid
                reason = f"{invalid} invalid replies, the last: {checked.reason}"
                error = ErrorInfo("invalid_output", reason if exhausted else checked.reason, 200)
                outcome = Outcome(None, error, not exhausted)
            assert outcome.error is not None
            key = (endpoint, outcome.error.code, outcome.error.status)
            self.errors[key] = self.errors.get(key, 0) + 1
            if feedback.signal is Signal.THROTTLED:
                counts.throttled += 1
            # A refusal of this request alone brings its own wait (the server's retry-after);
            # one that paused the endpoint leaves the waiting to the gate, and the delay only
            # says whether the item's deadline allows it.
            hint = released.wait if released.wait is not None else feedback.retry_after
            delay = (
                self._policy.next_delay(
                    attempt, elapsed, hint, self._rng, counted=attempt - excused - invalid
                )
                if outcome.retryable
                else None
            )
            error = outcome.error
            if delay is None:
                if outcome.retryable:
                    error = ErrorInfo(
                        error.code,
                        f"gave up after {attempt} attempts in {elapsed:.1f}s: {error.message}",
                        error.status,
                    )
                return record(
                    item,
                    error,
                    attempt,
                    elapsed,
                    started,
                    endpoint,
                    rejected,
                    rejected_text=rejected_text,
                )
            if self.stopping:
                return None
            if not released.held:
                await self._wait(delay)

    async def _wait(self, delay: float) -> None:
        """Wait ``delay`` before the next attempt, parked if the gate has room (the slot
        lent to a new item meanwhile). A stop cancels the wait."""
        task = asyncio.current_task(self._loop)
        assert task is not None
        gate, counts = self._gate, self._counts
        counts.retrying += 1
        self._between.add(task)
        try:
            if gate.park():
                self._parked.add(task)
                await self._sleep(delay)
                await gate.unpark()
                self._parked.discard(task)
            else:
                await self._sleep(delay)
        finally:
            self._between.discard(task)
            counts.retrying -= 1

    async def _next_lease(self, item: WorkItem, until: float) -> Lease:
        """The lease for a retry, by ``until`` on the clock (TimeoutError after); a stop
        cancels the wait for it."""
        gate = self._gate
        lease = gate.lease_nowait(item.est_prompt_tokens, item.max_output_tokens)
        if lease is not None:
            return lease
        task = asyncio.current_task(self._loop)
        assert task is not None
        self._between.add(task)
        try:
            return await gate.lease(item.est_prompt_tokens, item.max_output_tokens, until=until)
        finally:
            self._between.discard(task)

    def _check_output(self, item: WorkItem, c: Completion) -> Checked:
        """The template's ``[output]`` checks on a reply (batch lines have none). A reply that
        fails them still cost tokens, so they are counted here."""
        checked = check_reply(self._output, item, c, accept_length=self._accept_length)
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
        *,
        rejected_text: str | None = None,
    ) -> Result:
        """The record of an item's outcome (a success if ``completion`` is given), its
        tokens counted."""
        if completion is not None and completion.usage is not None:
            self._counts.prompt_tokens += completion.usage.prompt_tokens or 0
            if not completion.data:  # an embedding has no completion tokens
                self._counts.completion_tokens += completion.usage.completion_tokens or 0
        return build_result(
            item,
            error,
            completion,
            attempts=attempts,
            latency=latency,
            created=self._wall(),
            started=started,
            endpoint=self._endpoint_names[endpoint],
            template_sha=self._template_sha,
            ttft=ttft,
            parsed=parsed,
            replaces_failure=self._redo,
            rejected=rejected,
            rejected_text=rejected_text,
        )

    def __repr__(self) -> str:
        return f"<Sender running={len(self.tasks)} {self._counts!r}>"
