"""The gate: a concurrency cap plus requests-per-minute and tokens-per-minute pacing.

The engine waits here *before* it spawns a task, so however large the input, at most
``concurrency`` requests exist at once. Rate buckets hold about one second of budget, so a
job neither bursts a minute's worth at start nor idles at minute boundaries.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter

__all__ = ["Gate"]


def _limiter(per_minute: float) -> AsyncLimiter:
    # One second of budget drained at the configured rate: smooth pacing without a start-up
    # burst of a whole minute's worth.
    capacity = max(per_minute / 60.0, 1.0)
    return AsyncLimiter(capacity, capacity * 60.0 / per_minute)


class Gate:
    """Concurrency slots and rate limits."""

    def __init__(
        self, concurrency: int, *, rpm: float | None = None, tpm: float | None = None
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._rpm = _limiter(rpm) if rpm else None
        self._tpm = _limiter(tpm) if tpm else None

    async def acquire_slot(self) -> None:
        await self._slots.acquire()

    def release_slot(self) -> None:
        self._slots.release()

    async def wait_rate(self, tokens: int) -> None:
        """Wait until one more request of about ``tokens`` tokens fits the RPM/TPM budget."""
        if self._rpm is not None:
            await self._rpm.acquire()
        if self._tpm is not None:
            # A request may cost more than the bucket holds: charge it in bucket-sized parts,
            # so the sustained rate never exceeds the limit however large requests are.
            remaining = float(tokens)
            while remaining > 0:
                part = min(remaining, self._tpm.max_rate)
                await self._tpm.acquire(part)
                remaining -= part

    def __repr__(self) -> str:
        return f"<Gate concurrency={self.concurrency} rpm={self._rpm} tpm={self._tpm}>"
