"""An endpoint's state as the flow control keeps it, and the budget arithmetic it shares."""

from __future__ import annotations

import math

from asyncgen.core.evidence import Latency, Refusals
from asyncgen.core.limits import RateBucket

__all__ = ["EndpointState", "budget_delay"]


def budget_delay(
    rpm: RateBucket | None, tpm: RateBucket | None, tokens: float, now: float
) -> float:
    """Seconds until one request of ``tokens`` fits both budgets (absent ones always fit)."""
    delay = 0.0 if rpm is None else rpm.delay(1.0, now)
    return delay if tpm is None else max(delay, tpm.delay(tokens, now))


class EndpointState:
    """What the flow control knows of one endpoint (plain slots: read on every attempt)."""

    RATE_EVERY = 1.0

    __slots__ = (
        "broken_probes",
        "cap",
        "down_since",
        "ejections",
        "failed",
        "failures",
        "last_decrease",
        "last_error",
        "latency",
        "learned",
        "next_probe",
        "outstanding",
        "own_rpm",
        "own_tpm",
        "pace",
        "pace_due",
        "paused_until",
        "probe_delay",
        "queueing",
        "random_floor",
        "rate",
        "rate_count",
        "rate_since",
        "refusals",
        "refused",
        "requests",
        "review_ok",
        "review_refused",
        "review_since",
        "reviews",
        "rpm",
        "ssthresh",
        "succeeded",
        "throttle_streak",
        "throttled",
        "tokens",
        "tpm",
        "trial",
        "trial_ok",
        "up",
        "url",
        "window",
    )

    def __init__(
        self,
        url: str,
        window: float,
        *,
        own_rpm: RateBucket | None = None,
        own_tpm: RateBucket | None = None,
    ) -> None:
        self.url = url
        self.cap = window
        """The window's ceiling: the job's concurrency, or the endpoint's own if lower."""
        self.window = window
        self.ssthresh = window
        self.up = True
        self.outstanding = 0
        self.tokens = 0.0
        self.paused_until = 0.0
        self.rpm: RateBucket | None = None
        self.tpm: RateBucket | None = None
        """Budgets the server announced (or, for :attr:`rpm`, one learned from refusals)."""
        self.own_rpm = own_rpm
        self.own_tpm = own_tpm
        """Budgets the job gives this endpoint (:class:`~asyncgen.core.limits.EndpointLimits`):
        kept apart from the announced ones, which a server's headers replace."""
        self.failures = 0
        self.throttle_streak = 0
        self.last_decrease = -math.inf
        self.latency = 1.0
        self.pace = Latency()
        self.pace_due = 0.0
        self.rate = 0.0
        """Replies a second (a mean over spans of at least :attr:`RATE_EVERY` s), 0 until known."""
        self.rate_since = math.nan  # the first sample starts the first span
        self.rate_count = 0
        self.queueing = False
        """The last pace taken was well slower than unloaded: the window does not grow."""
        self.refusals = Refusals()
        self.next_probe = 0.0
        self.probe_delay = 0.0
        self.broken_probes = 0
        self.last_error: str | None = None
        self.down_since = 0.0
        self.requests = self.succeeded = self.throttled = self.failed = self.ejections = 0
        self.refused = 0
        """Replies that were refusals (429s, 503s with ``retry-after``)."""
        self.learned = False
        """:attr:`rpm` is a budget learned from refusals, not told nor announced."""
        self.trial: float | None = None
        """While a learned budget is on trial, the refused share before it was set."""
        self.random_floor = 0.0
        """The share of requests refused whatever the pace (a gateway's random refusals)."""
        self.review_since = math.nan
        self.review_ok = self.review_refused = self.reviews = 0
        self.trial_ok = 0.0
        """The success rate (per minute) before the trial pace."""

    def count_rate(self, now: float) -> float:
        """Update and return :attr:`rate` (called when the pace is sampled, not per reply)."""
        span = now - self.rate_since
        if span != span:  # nan: the first call
            self.rate_since, self.rate_count = now, self.succeeded
        elif span >= self.RATE_EVERY:
            measured = (self.succeeded - self.rate_count) / span
            self.rate = measured if self.rate == 0.0 else 0.5 * (self.rate + measured)
            self.rate_since, self.rate_count = now, self.succeeded
        return self.rate
