"""Flow control, sans-IO: which endpoint gets the next request, and when.

:class:`FlowControl` holds the job's own RPM/TPM budgets; per endpoint, the limits the job
gives it (:class:`~asyncgen.core.limits.EndpointLimits`: its own RPM/TPM buckets beside the
job-wide ones, and a ceiling on its window) and what that endpoint has told us: budgets
announced in ``x-ratelimit-*`` headers, refusals (429, 503), a concurrency window that adapts,
and a circuit breaker (ejected after consecutive failures, re-admitted by a successful probe).
Two seams live in modules of their own, as functions over one
:class:`~asyncgen.core.endpoint.EndpointState`: :mod:`~asyncgen.core.flow_budgets` learns
budgets (announced in headers, or kept hidden and found in the refused share) and
:mod:`~asyncgen.core.flow_health` is the circuit breaker. What stays here runs per attempt:
routing, pacing, and the window.

Refusals are told apart by the evidence there is (:class:`Refusals`). When most recent
replies of an endpoint were refusals, its budget is spent or it is overloaded: the endpoint
pauses for the server's ``retry-after`` (or a backoff), and its window shrinks (a 429 only
when no budget paces the endpoint). A refusal among mostly successes is this request's: the
endpoint goes on, and :meth:`FlowControl.release` tells the caller to let that one item wait
the ``retry-after`` on its own (a gateway that refuses a share of requests at random would
otherwise pause every sender and halve the window on each refusal). A server's
``retry-after`` is never shortened, by a probe or anything else.

The window grows by about one per window of successes (slow start back to the last good
window after a re-admission) and halves, at most once per round trip, on timeouts and on a
high refused share. It also follows latency (:class:`Latency`, in the spirit of the gradient
limiters): a server that queues instead of refusing (vLLM past its batch capacity) shows it
by replies slowing well beyond their unloaded pace; the window then stops growing and, when
they take more than twice as long, shrinks in proportion.

:meth:`FlowControl.try_acquire` answers with a :class:`Lease` (send now, to this endpoint) or
a :class:`Wait`: the seconds until a budget or a pause allows one, and whether a release (or
a re-admitted endpoint) could allow one sooner. :meth:`FlowControl.release` takes the
:class:`Feedback` of the attempt. No clock and no I/O here: the caller passes ``now``;
:class:`~asyncgen.engine.gate.Gate` is the async shell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from asyncgen.core import flow_budgets, flow_health
from asyncgen.core.endpoint import EndpointState, budget_delay
from asyncgen.core.evidence import Latency, Refusals
from asyncgen.core.leases import (
    HELD,
    NOT_EXCUSED,
    EndpointStats,
    Feedback,
    Lease,
    Released,
    Signal,
    Wait,
)
from asyncgen.core.limits import EndpointLimits, RateBucket, TokenEstimate

__all__ = ["FlowControl"]


class FlowControl:
    """Routing, pacing and adaptation for one job over one or more endpoints."""

    RETURN_TO = 0.85
    """After a decrease the window returns quickly to this share of what was in flight."""
    PACE_EVERY = 0.01
    """Seconds between two replies whose pace is taken (see :meth:`release`)."""
    GROW_BELOW = 1.5
    """The window grows only while replies take less than this many times their unloaded
    pace (and shrinks past :attr:`Latency.TOLERANCE`)."""

    def __init__(
        self,
        urls: list[str],
        *,
        concurrency: int,
        min_concurrency: int = 1,
        rpm: float | None = None,
        tpm: float | None = None,
        now: float = 0.0,
        upfront: bool = False,
        limits: Sequence[EndpointLimits | None] = (),
    ) -> None:
        if not urls:
            raise ValueError("at least one endpoint is needed")
        if not 1 <= min_concurrency <= concurrency:
            raise ValueError("need 1 <= min_concurrency <= concurrency")
        if limits and len(limits) != len(urls):
            raise ValueError("limits, when given, are one per endpoint")
        self.cap = float(concurrency)
        self.floor = float(min_concurrency)
        owns = list(limits) or [None] * len(urls)
        self._own_caps = [_own_cap(own) for own in owns]
        self._endpoints = [
            self._endpoint(url, own, now) for url, own in zip(urls, owns, strict=True)
        ]
        self._rpm = RateBucket(rpm, now=now) if rpm else None
        self._tpm = RateBucket(tpm, now=now) if tpm else None
        self.estimate = TokenEstimate(upfront=upfront)
        """``upfront``: reserve ``max_tokens`` in full (see :class:`TokenEstimate`); set
        from the start for servers known to charge so, and on the first 429 that says the
        tokens ran out."""

    def set_share(
        self,
        *,
        concurrency: int,
        rpm: float | None,
        tpm: float | None,
        now: float,
        limits: Sequence[EndpointLimits | None] = (),
    ) -> None:
        """Change the job-wide limits kept here, and (``limits``, one per endpoint) the
        endpoints' own: a worker's share of a job's budgets, which grows as other workers
        finish. Windows above the new caps come down to them; a bucket keeps what was
        charged to it, so a change never grants a burst."""
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if limits and len(limits) != len(self._endpoints):
            raise ValueError("limits, when given, are one per endpoint")
        self.cap = float(concurrency)
        self.floor = min(self.floor, self.cap)
        for index, own in enumerate(limits):
            ep = self._endpoints[index]
            self._own_caps[index] = _own_cap(own)
            ep.own_rpm = flow_budgets.rebucket(ep.own_rpm, own.rpm if own else None, now)
            ep.own_tpm = flow_budgets.rebucket(ep.own_tpm, own.tpm if own else None, now)
        for ep, own_cap in zip(self._endpoints, self._own_caps, strict=True):
            ep.cap = min(self.cap, own_cap)  # an endpoint's own concurrency stays its ceiling
            ep.window = min(ep.window, ep.cap)
        self._rpm = flow_budgets.rebucket(self._rpm, rpm, now)
        self._tpm = flow_budgets.rebucket(self._tpm, tpm, now)

    def _endpoint(self, url: str, own: EndpointLimits | None, now: float) -> EndpointState:
        if own is None:
            return EndpointState(url, self.cap)
        cap = self.cap if own.concurrency is None else min(self.cap, float(own.concurrency))
        if cap < self.floor:
            raise ValueError(f"{url}: its concurrency is below min_concurrency")
        return EndpointState(
            url,
            cap,
            own_rpm=RateBucket(own.rpm, now=now) if own.rpm else None,
            own_tpm=RateBucket(own.tpm, now=now) if own.tpm else None,
        )

    # --- acquiring ----------------------------------------------------------------------------

    def try_acquire(self, now: float, prompt_estimate: int, max_output: int | None) -> Lease | Wait:
        """A lease to send now, or how long to wait before asking again."""
        tokens = self.estimate.reserve(prompt_estimate, max_output)
        rpm, tpm = self._rpm, self._tpm
        if rpm is not None or tpm is not None:
            wait = budget_delay(rpm, tpm, tokens, now)
            if wait > 0:
                return Wait(wait, False)
        best: EndpointState | None = None
        best_index = -1
        wait = math.inf
        busy = False
        for index, ep in enumerate(self._endpoints):
            if not ep.up or ep.outstanding >= max(1, int(ep.window)):
                busy = True
                continue
            delay = ep.paused_until - now
            if ep.rpm is not None or ep.tpm is not None:
                delay = max(delay, budget_delay(ep.rpm, ep.tpm, tokens, now))
            if ep.own_rpm is not None or ep.own_tpm is not None:
                delay = max(delay, budget_delay(ep.own_rpm, ep.own_tpm, tokens, now))
            if delay > 0:
                wait = min(wait, delay)
            elif best is None or (ep.tokens, ep.outstanding) < (best.tokens, best.outstanding):
                best, best_index = ep, index
        if best is None:
            return Wait(wait, busy)
        # (Spelled out: this runs for every attempt, and most jobs set no budget at all.)
        if rpm is not None:
            rpm.charge(1.0, now)
        if tpm is not None:
            tpm.charge(tokens, now)
        if best.rpm is not None:
            best.rpm.charge(1.0, now)
        if best.tpm is not None:
            best.tpm.charge(tokens, now)
        if best.own_rpm is not None:
            best.own_rpm.charge(1.0, now)
        if best.own_tpm is not None:
            best.own_tpm.charge(tokens, now)
        best.outstanding += 1
        best.tokens += tokens
        best.requests += 1
        return Lease(best_index, tokens, prompt_estimate, now)

    # --- feedback -----------------------------------------------------------------------------

    def release(self, lease: Lease, feedback: Feedback, now: float) -> Released:
        """Account for a finished attempt, adapt to what it says, and say what it means for
        the item (see :class:`Released`).

        Excused (not counted against the item's attempts) are failures that are the
        endpoint's: a refusal (a 429, or a 503 with ``retry-after``), no connection at all,
        or a dropped connection while other requests to the endpoint are failing too (a
        server going away cuts everything in flight; one request that kills its connection
        alone still counts, so a request that crashes the server cannot be retried forever).
        """
        ep = self._endpoints[lease.endpoint]
        ep.outstanding -= 1
        ep.tokens -= lease.tokens
        signal = feedback.signal
        self._correct_tokens(ep, lease, feedback, now)
        if signal is Signal.CANCELLED:
            ep.requests -= 1
            return NOT_EXCUSED
        exhausted = feedback.hints is not None and flow_budgets.apply_hints(
            ep, feedback.hints, lease.tokens, now
        )
        refusals = ep.refusals
        if signal is Signal.OK:
            # The common case first, and spelled out: it runs for every reply.
            if refusals.share or refusals.replies < Refusals.SPAN:
                refusals.ok()  # (once the share has faded out, a success changes nothing)
            ep.succeeded += 1
            ep.failures = ep.throttle_streak = 0
            seconds = now - lease.started
            # The first reply replaces the initial guess (it bounds how often the window may
            # shrink, and a guess of a second would keep it from shrinking for long).
            ep.latency = seconds if ep.succeeded == 1 else ep.latency + 0.1 * (seconds - ep.latency)
            if now >= ep.pace_due:
                # The pace is sampled (a reply every PACE_EVERY seconds at most): at
                # thousands of replies a second, taking every one would cost the loop and
                # tell no more.
                ep.pace_due = now + self.PACE_EVERY
                flow_budgets.review(ep, self._rpm is not None or self._tpm is not None, now)
                slowdown = ep.pace.observe(seconds, feedback.completion_tokens, now)
                ep.queueing = queueing = slowdown >= self.GROW_BELOW
                if queueing and ep.ssthresh > ep.window:
                    # The end of slow start: a round trip later it would have doubled again.
                    ep.ssthresh = ep.window
                rate = ep.count_rate(now)
                if slowdown >= Latency.TOLERANCE:
                    # Replies take more than TOLERANCE times their unloaded pace: the server
                    # queues. By Little's law it serves ``rate x unloaded time`` at once; the
                    # window goes to GROW_BELOW times that (where growth stops), so the
                    # queue drains and the pace returns while the server stays busy.
                    unloaded = ep.pace.base * max(feedback.completion_tokens or 1, 1)
                    self._queueing(ep, rate * unloaded, slowdown, now)
                    return NOT_EXCUSED
            if not ep.queueing:
                # Below the last known good window, grow fast (doubling per round trip, as
                # TCP's slow start does after a restart); above it, about one slot per window
                # of successes. Not while replies are already well slower than unloaded.
                step = 1.0 if ep.window < ep.ssthresh else 1.0 / max(ep.window, 1.0)
                ep.window = min(ep.cap, ep.window + step)
            return NOT_EXCUSED
        if signal is Signal.THROTTLED or signal is Signal.OVERLOADED:
            return self._refused(ep, feedback, exhausted, now)
        if signal is not Signal.UNREACHABLE:
            refusals.ok()
        if signal is Signal.TIMEOUT:
            self._decrease(ep, now)
        return flow_health.failed(ep, signal, now)  # counted, perhaps ejected

    def _refused(
        self, ep: EndpointState, feedback: Feedback, exhausted: bool, now: float
    ) -> Released:
        """A 429 or 503: the endpoint's budget is spent, or this request was unlucky."""
        if feedback.signal is Signal.THROTTLED:
            ep.throttled += 1
            if feedback.tokens_ran_out:
                self.estimate.upfront = True
        else:
            ep.failed += 1
        ep.refused += 1
        job_paced = self._rpm is not None or self._tpm is not None
        flow_budgets.review(ep, job_paced, now)
        share = ep.refusals.observe(True)
        spent = exhausted or share >= Refusals.SPENT
        if feedback.signal is Signal.OVERLOADED and feedback.retry_after is None:
            # A bare 503 is a failure of the server's, which the item's own attempts and
            # backoff bound; many of them say it is overloaded.
            if spent:
                self._decrease(ep, now)
            return NOT_EXCUSED
        # A 429, or a 503 that says when to come back: the server pacing us.
        if not spent:
            # One refusal among mostly successes: this item waits, the others go on.
            return Released(True, feedback.retry_after)
        ep.throttle_streak += 1
        wait = feedback.retry_after
        if wait is None:
            wait = min(30.0, 0.5 * 2.0 ** min(ep.throttle_streak - 1, 6))
        ep.paused_until = max(ep.paused_until, now + wait)
        if feedback.signal is Signal.OVERLOADED or not flow_budgets.paced(ep, job_paced):
            # Without a known budget the window is the only lever against a rate limit.
            # With one, the pause and the pacing handle it, and shrinking the window
            # would cap throughput at window / latency for a long time.
            self._decrease(ep, now)
        return HELD

    def _correct_tokens(
        self, ep: EndpointState, lease: Lease, feedback: Feedback, now: float
    ) -> None:
        prompt, completion = feedback.prompt_tokens, feedback.completion_tokens
        if feedback.signal is Signal.OK and prompt is not None and completion is not None:
            self.estimate.observe(lease.prompt_estimate, prompt, completion)
            delta = prompt + completion - lease.tokens
        elif feedback.signal in (Signal.THROTTLED, Signal.UNREACHABLE, Signal.CANCELLED):
            delta = -lease.tokens  # refused, never sent or abandoned: count no tokens
        else:
            return
        for bucket in (self._tpm, ep.tpm, ep.own_tpm):
            if bucket is not None:
                bucket.adjust(delta, now)

    def _decrease(self, ep: EndpointState, now: float, factor: float = 0.5) -> None:
        # One congestion event per round trip: the other replies of the same burst carry no
        # new news, and shrinking for each would collapse the window to the floor.
        if now - ep.last_decrease < max(ep.latency, 0.1):
            return
        ep.last_decrease = now
        # What was really in flight is what the server refused or queued at; the window
        # drops below it, then grows back fast (doubling per round trip) to just under it
        # and slowly beyond: a cut to half with one slot per round trip back would leave a
        # server that sheds load at its capacity idle a quarter of the time.
        effective = min(ep.window, ep.outstanding + 1.0)
        ep.window = max(self.floor, effective * factor)
        ep.ssthresh = max(ep.window, effective * self.RETURN_TO)

    def _queueing(self, ep: EndpointState, serving: float, slowdown: float, now: float) -> None:
        """Shrink the window of an endpoint that queues to GROW_BELOW times what it serves at
        once (``serving``). Unlike a cut in proportion to the slowdown, this does not go on
        shrinking while replies still come back from a backlog the window has already cut
        (a server running 64 was cut to 31 and left idle half the time): what the server
        serves is measured by its reply rate, which stays at the capacity while it drains."""
        if serving <= 0.0:  # no reply rate yet: in proportion, once per round trip
            self._decrease(ep, now, max(0.5, Latency.TOLERANCE / slowdown))
            return
        target = max(self.floor, self.GROW_BELOW * serving)
        if target < ep.window:
            ep.window = target
            ep.ssthresh = min(ep.ssthresh, target)
            ep.last_decrease = now

    # --- health -------------------------------------------------------------------------------

    def probes_due(self, now: float) -> list[int]:
        """Ejected endpoints whose next health probe is due."""
        return [i for i, ep in enumerate(self._endpoints) if not ep.up and ep.next_probe <= now]

    def next_probe_in(self, now: float) -> float:
        waits = [ep.next_probe - now for ep in self._endpoints if not ep.up]
        return max(0.0, min(waits)) if waits else math.inf

    def probe_result(
        self, index: int, healthy: bool, now: float, *, error: str | None = None
    ) -> None:
        """What a probe of an ejected endpoint found; ``error``: it answered, with a server
        error (status and body), rather than not at all."""
        flow_health.probe_result(self._endpoints[index], healthy, error, self.floor, now)

    def broken(self) -> str | None:
        """Why the job cannot go on, when no endpoint is up and every one has answered its
        last :data:`~asyncgen.core.flow_health.PROBE_BUDGET` probes with a server error (it
        is up, but cannot serve: waiting would be for ever); None otherwise. An endpoint that
        does not answer at all may come back, and is waited for."""
        return flow_health.broken(self._endpoints)

    def mark_down(self, index: int, now: float) -> None:
        """Start with an endpoint ejected (it failed its start-up check)."""
        ep = self._endpoints[index]
        if ep.up:
            flow_health.eject(ep, now)

    # --- observing ----------------------------------------------------------------------------

    @property
    def any_up(self) -> bool:
        return any(ep.up for ep in self._endpoints)

    def endpoint_stats(self, now: float) -> list[EndpointStats]:
        return [
            EndpointStats(
                url=ep.url,
                up=ep.up,
                window=int(ep.window),
                outstanding=ep.outstanding,
                paused_for=round(max(0.0, ep.paused_until - now), 3),
                requests=ep.requests,
                succeeded=ep.succeeded,
                throttled=ep.throttled,
                failed=ep.failed,
                ejections=ep.ejections,
                rpm_limit=None if ep.rpm is None else ep.rpm.per_minute,
                tpm_limit=None if ep.tpm is None else ep.tpm.per_minute,
                refused_share=round(ep.refusals.share, 3),
            )
            for ep in self._endpoints
        ]

    def __repr__(self) -> str:
        up = sum(ep.up for ep in self._endpoints)
        return f"<FlowControl endpoints={up}/{len(self._endpoints)} up {self.estimate!r}>"


def _own_cap(own: EndpointLimits | None) -> float:
    return math.inf if own is None or own.concurrency is None else float(own.concurrency)
