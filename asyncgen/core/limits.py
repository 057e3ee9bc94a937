"""Rate budgets, sans-IO: a leaky bucket that paces continuously and can be corrected.

A :class:`RateBucket` holds a fraction of a second of budget and drains at the per-minute
rate, so a job neither bursts a minute's worth at start nor idles at minute boundaries. A
charge made on an estimate (tokens before the reply is known) is corrected afterwards with
:meth:`RateBucket.adjust`; a refund never creates budget that time has not already given.
The rate can change while running, when a server announces its budget.
"""

from __future__ import annotations

import msgspec

__all__ = ["BURST_SECONDS", "EndpointLimits", "RateBucket", "TokenEstimate"]

BURST_SECONDS = 0.5
"""Budget a bucket holds. Less than a server's own window, so the jitter between our send and
its arrival does not push the server over its limit."""


class EndpointLimits(msgspec.Struct, frozen=True, kw_only=True):
    """What one endpoint may be sent, beside the job-wide limits (a job file's
    ``[[endpoints]]``): requests and tokens a minute, and requests in flight at most. None: no
    limit of its own. A budget the server announces paces the endpoint as well; the stricter
    one holds."""

    rpm: float | None = None
    tpm: float | None = None
    concurrency: int | None = None


class RateBucket:
    """``per_minute`` units per minute, paced; all times are the caller's clock in seconds."""

    __slots__ = ("_level", "_updated", "capacity", "per_minute", "rate")

    def __init__(self, per_minute: float, *, now: float, burst: float = BURST_SECONDS) -> None:
        self._level = 0.0
        self._updated = now
        self.per_minute = self.rate = self.capacity = 0.0
        self.set_rate(per_minute, now=now, burst=burst)

    def set_rate(self, per_minute: float, *, now: float, burst: float = BURST_SECONDS) -> None:
        if per_minute <= 0:
            raise ValueError("a rate must be positive")
        self._drain(now)
        self.per_minute = per_minute
        self.rate = per_minute / 60.0
        self.capacity = max(self.rate * burst, 1.0)

    def _drain(self, now: float) -> None:
        if now > self._updated:
            self._level = max(0.0, self._level - (now - self._updated) * self.rate)
            self._updated = now

    def delay(self, units: float, now: float) -> float:
        """Seconds until ``units`` may be charged (0.0: now).

        A charge larger than the bucket is allowed once the bucket is empty; the debt it leaves
        holds back what follows, so the sustained rate is kept however large a charge is.
        """
        self._drain(now)
        over = self._level + units - self.capacity
        # The tolerance absorbs float residue, which would otherwise ask for waits too short
        # to move the clock.
        if over <= 1e-6 or self._level <= 1e-6:
            return 0.0
        return min(over, self._level) / self.rate

    def charge(self, units: float, now: float) -> None:
        self._drain(now)
        self._level += units

    def adjust(self, units: float, now: float) -> None:
        """Correct an earlier charge by ``units`` (negative: a refund)."""
        self._drain(now)
        self._level = max(0.0, self._level + units)

    def level(self, now: float) -> float:
        self._drain(now)
        return self._level

    def __repr__(self) -> str:
        return f"<RateBucket {self.per_minute:g}/min level={self._level:.1f}/{self.capacity:.1f}>"


class TokenEstimate:
    """What a request will cost in tokens before its reply says: prompt characters scaled by
    what replies reported, plus expected output (a running mean, at most ``max_tokens``).

    With :attr:`upfront`, the output part is ``max_tokens`` itself: servers that charge it in
    full when a request arrives (OpenAI's rate limiter does, by its own guide) refuse a
    reservation of the expected output as soon as the budget is tight; the reply's ``usage``
    then refunds the difference."""

    __slots__ = ("_output", "_prompt_scale", "samples", "upfront")

    _ALPHA = 0.05

    def __init__(self, initial_output: float = 256.0, *, upfront: bool = False) -> None:
        self._prompt_scale = 1.0
        self._output = initial_output
        self.samples = 0
        self.upfront = upfront

    def reserve(self, prompt_estimate: int, max_output: int | None) -> float:
        if max_output is None:
            output = self._output
        else:
            output = max_output if self.upfront else min(self._output, max_output)
        return prompt_estimate * self._prompt_scale + output

    def observe(self, prompt_estimate: int, prompt_tokens: int, completion_tokens: int) -> None:
        # The first replies replace the guess outright; later ones move the mean slowly.
        alpha = 1.0 / (self.samples + 1) if self.samples < 20 else self._ALPHA
        if prompt_estimate > 0 and prompt_tokens > 0:
            scale = prompt_tokens / prompt_estimate
            self._prompt_scale += alpha * (scale - self._prompt_scale)
        self._output += alpha * (completion_tokens - self._output)
        self.samples += 1

    def __repr__(self) -> str:
        upfront = " upfront" if self.upfront else ""
        return (
            f"<TokenEstimate output={self._output:.0f} prompt_scale={self._prompt_scale:.2f}"
            f"{upfront}>"
        )
