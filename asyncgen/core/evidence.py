"""What an endpoint's replies show, sans-IO: how many were refused, and whether it queues.

:class:`Refusals` tells a budget that is spent from a request that was unlucky; :class:`Latency`
tells a server that queues (vLLM past its capacity sends no refusal, its replies slow down)
from one that keeps up. The flow control decides what to do about either.
"""

from __future__ import annotations

import math

__all__ = ["Latency", "Refusals"]


class Refusals:
    """The share of an endpoint's recent replies that were refusals (429, 503).

    An exponentially weighted mean over about :attr:`SPAN` replies; the first replies count
    fully (the first reply, refused, is all the evidence there is). Sans-IO, no clock.
    """

    __slots__ = ("replies", "share")

    SPAN = 256
    SPENT = 0.4
    """A share at or above this means the budget is spent (or the server overloaded), not
    that a request was unlucky: sporadic refusal rates far above a few per cent are rare,
    and at 30 % the mean over 256 replies stays below 0.4 by five deviations. (At 0.5 a
    budget without headers, whose 429s say only how soon the request would fit, kept 45 %
    of requests refused and the window unshrunk.)"""

    def __init__(self) -> None:
        self.replies = 0
        self.share = 0.0

    def observe(self, refused: bool) -> float:
        self.replies += 1
        alpha = max(1.0 / self.replies, 1.0 / self.SPAN)
        self.share += alpha * (float(refused) - self.share)
        return self.share

    def ok(self) -> None:
        """A reply that was no refusal (the common case, kept cheap: nothing to decay once
        the share has faded out)."""
        self.replies += 1
        share = self.share
        if share:
            share -= max(1.0 / self.replies, 1.0 / self.SPAN) * share
            self.share = share if share > 1e-6 else 0.0


class Latency:
    """Is the endpoint queueing? Replies' pace (seconds per output token, or per reply when
    usage is unknown) against the fastest pace seen lately.

    ``pace`` is a short mean (about ten replies); ``base`` the minimum over the last one to
    two :attr:`PERIOD` s, so a lasting change of the workload is learned within a minute.
    :meth:`observe` answers ``pace / base``: past :attr:`TOLERANCE` the endpoint queues.
    """

    __slots__ = ("_current", "_period_end", "_previous", "base", "pace")

    PERIOD = 30.0
    TOLERANCE = 2.0
    MIN_EXCESS = 0.25
    """Seconds a reply must be slower than its unloaded pace before it counts as queueing:
    a busy client (its own event loop, a commit's thread, a collection on two shared cores)
    delays replies by tens of milliseconds, which is not the server's queue; a model server's
    queue adds seconds."""

    def __init__(self) -> None:
        self.pace = 0.0
        self.base = self._current = self._previous = math.inf
        self._period_end = -math.inf

    def observe(self, seconds: float, tokens: int | None, now: float) -> float:
        """Take one reply's time; return how many times slower than unloaded replies are
        now (1.0 when too little slower to tell a queue from noise). Runs once per reply."""
        scale = tokens if tokens and tokens > 1 else 1
        pace = seconds / scale
        if now >= self._period_end:
            self._previous, self._current = self._current, pace
            self._period_end = now + self.PERIOD
            self.base = min(self._previous, pace)
        elif pace < self._current:
            self._current = pace
            if pace < self.base:
                self.base = pace
        self.pace = mean = pace if self.pace == 0.0 else self.pace + 0.1 * (pace - self.pace)
        base = self.base
        if (mean - base) * scale < self.MIN_EXCESS or base <= 0.0:
            return 1.0
        return mean / base
