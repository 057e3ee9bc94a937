"""What the mock server admits: OpenAI-style rate budgets and vLLM-style running slots.

``RateBudgets`` is sans-IO (callers pass the loop time): a requests-per-minute and a
tokens-per-minute budget, each a continuous leaky bucket that holds ``burst`` seconds of budget
(at least one unit) and drains at ``limit / 60`` units a second. A request is admitted when both
buckets have room for its cost, or a bucket is empty (so a request larger than the bucket is
admitted alone, as OpenAI does); only admitted requests are charged. The verdict carries the
``x-ratelimit-*`` headers and, for a refusal, how long until the request would fit.

``RunningSlots`` lets at most ``limit`` requests generate at once; the rest wait in FIFO
order, like vLLM's waiting queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator
from typing import NamedTuple

__all__ = ["LeakyBucket", "RateBudgets", "RunningSlots", "Verdict", "format_duration"]

# Floating-point slack, in units: a bucket that has drained to within this of the target fits.
_EPSILON = 1e-6


def format_duration(seconds: float) -> str:
    """``seconds`` the way OpenAI writes ``x-ratelimit-reset-*``: a Go duration at millisecond
    precision, rounded up (``0s``, ``12ms``, ``1s``, ``1.5s``, ``6m0s``, ``1m30.5s``)."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs = f"{ms // 1000}" if ms % 1000 == 0 else f"{ms / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


class LeakyBucket:
    """A per-minute budget: fills by each admitted cost, drains at ``per_minute / 60`` a second."""

    __slots__ = ("_updated", "capacity", "level", "per_minute", "rate")

    def __init__(self, per_minute: float, burst: float) -> None:
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * burst, 1.0)
        self.level = 0.0
        self._updated: float | None = None

    def _drain(self, now: float) -> None:
        if self._updated is not None and now > self._updated:
            self.level = max(0.0, self.level - (now - self._updated) * self.rate)
        self._updated = now if self._updated is None else max(now, self._updated)

    def wait(self, cost: float, now: float) -> float:
        """Seconds until ``cost`` is admissible; 0 when it is now."""
        self._drain(now)
        excess = self.level - max(self.capacity - cost, 0.0)
        return excess / self.rate if excess > _EPSILON else 0.0

    def charge(self, cost: float, now: float) -> None:
        self._drain(now)
        self.level += cost

    def remaining(self, now: float) -> int:
        """Whole units admissible now."""
        self._drain(now)
        return max(0, math.floor(self.capacity - self.level + _EPSILON))

    def until_empty(self, now: float) -> float:
        self._drain(now)
        return self.level / self.rate

    def clear(self) -> None:
        self.level = 0.0
        self._updated = None

    def __repr__(self) -> str:
        return f"<LeakyBucket {self.per_minute:g}/min level={self.level:g}/{self.capacity:g}>"


class Verdict(NamedTuple):
    """Whether a request was admitted (and charged); for a refusal, the binding budget
    (``"requests"`` or ``"tokens"``), the seconds until the request fits and a message."""

    admitted: bool
    headers: dict[str, str]
    kind: str = ""
    wait: float = 0.0
    message: str = ""


_NAMES = {"requests": "requests per min (RPM)", "tokens": "tokens per min (TPM)"}


class RateBudgets:
    """The RPM and TPM budgets of one server; either may be absent (None)."""

    def __init__(self, rpm: float | None, tpm: float | None, burst: float) -> None:
        self.buckets: dict[str, LeakyBucket] = {}
        if rpm is not None:
            self.buckets["requests"] = LeakyBucket(rpm, burst)
        if tpm is not None:
            self.buckets["tokens"] = LeakyBucket(tpm, burst)

    def admit(self, tokens: int, now: float) -> Verdict:
        """Admit and charge one request costing ``tokens``, or refuse it without charging."""
        costs = {"requests": 1, "tokens": tokens}
        kind, wait = "", 0.0
        for name, bucket in self.buckets.items():
            needed = bucket.wait(costs[name], now)
            if needed > wait:
                kind, wait = name, needed
        if kind:
            bucket = self.buckets[kind]
            message = (
                f"Rate limit reached for {_NAMES[kind]} on the asyncgen mock: "
                f"Limit {bucket.per_minute:g}, Used {math.ceil(bucket.level - _EPSILON)}, "
                f"Requested {costs[kind]}. Please try again in {format_duration(wait)}."
            )
            return Verdict(False, self.headers(now), kind, wait, message)
        for name, bucket in self.buckets.items():
            bucket.charge(costs[name], now)
        return Verdict(True, self.headers(now))

    def headers(self, now: float) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-{limit,remaining,reset}-*`` for each budget."""
        headers = {}
        for name, bucket in self.buckets.items():
            headers[f"x-ratelimit-limit-{name}"] = str(max(1, round(bucket.per_minute)))
            headers[f"x-ratelimit-remaining-{name}"] = str(bucket.remaining(now))
            headers[f"x-ratelimit-reset-{name}"] = format_duration(bucket.until_empty(now))
        return headers

    def clear(self) -> None:
        for bucket in self.buckets.values():
            bucket.clear()

    def __repr__(self) -> str:
        return f"<RateBudgets {list(self.buckets.values())}>"


class RunningSlots:
    """At most ``limit`` holders at once (None: unbounded); the rest wait in FIFO order.

    ``running`` and ``peak`` are counted either way, since decode slows as the batch grows.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.running = 0
        self.peak = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def full(self, max_waiting: int) -> bool:
        """Would one more holder have to wait behind ``max_waiting`` others already?"""
        return self.limit is not None and self.running >= self.limit and self.waiting >= max_waiting

    async def acquire(self) -> None:
        if self._waiters or (self.limit is not None and self.running >= self.limit):
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.cancelled():
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                else:  # handed a slot just as we were cancelled: pass it on
                    self.release()
                raise
            return  # the releaser handed its slot over; running is unchanged
        self.running += 1
        self.peak = max(self.peak, self.running)

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.running -= 1

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()

    def reset_peak(self) -> None:
        self.peak = self.running

    def __repr__(self) -> str:
        return f"<RunningSlots running={self.running}/{self.limit} waiting={self.waiting}>"
