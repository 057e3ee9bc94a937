"""Why the client paces with its own bucket (``core.limits.RateBucket``) and not with
``aiolimiter.AsyncLimiter``, the project's chosen pacing library: what each admits, and what
an admission costs.

1. *Burst.* ``AsyncLimiter(600, 60)`` holds a minute's worth: it admits 600 requests at
   once, then one every 0.1 s. Pacing within half a second needs ``AsyncLimiter(5, 0.5)``.
2. *A charge larger than the bucket.* With that half-second bucket a 1 300-token request
   against a 60 000 TPM budget (500 tokens of bucket) raises ``ValueError``: such a request
   can never be sent. ``RateBucket`` admits it once the bucket is empty and lets the debt
   hold back what follows.
3. *Corrections.* A token reservation is corrected to the reply's ``usage`` and refunded on
   a 429; the limiter's level is private, with no way to give capacity back.
4. *Asking without waiting.* The flow control must answer "how long until this request
   fits both the job's budget and this endpoint's" for several endpoints at once, without
   awaiting (it is sans-IO and runs on an injected clock); ``AsyncLimiter`` can only be
   awaited, on the loop's own clock.
5. *Cost.* Seconds per admission when there is room, ``RateBucket.delay`` + ``charge``
   against ``await AsyncLimiter.acquire()``.

Usage::

    python benchmarks/bench_pacing.py
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiolimiter

from asyncgen.core.limits import RateBucket

N = 200_000


def burst() -> tuple[int, int]:
    """Requests admitted at one instant under a 600/min budget: aiolimiter, RateBucket."""

    async def count() -> int:
        limiter = aiolimiter.AsyncLimiter(600, 60)
        admitted = 0
        while limiter.has_capacity():
            await limiter.acquire()
            admitted += 1
        return admitted

    bucket = RateBucket(600, now=0.0)
    ours = 0
    while bucket.delay(1, 0.0) == 0:
        bucket.charge(1, 0.0)
        ours += 1
    return asyncio.run(count()), ours


def large_charge() -> tuple[str, float]:
    """A 1 300-token request against 60 000 TPM paced within half a second."""

    async def attempt() -> str:
        limiter = aiolimiter.AsyncLimiter(60_000 / 120, 0.5)
        try:
            await limiter.acquire(1_300)
        except ValueError as exc:
            return f"ValueError: {exc}"
        return "admitted"

    bucket = RateBucket(60_000, now=0.0)
    delay = bucket.delay(1_300, 0.0)
    return asyncio.run(attempt()), delay


def cost() -> tuple[float, float]:
    """Seconds per admission with room to spare: aiolimiter, RateBucket."""

    async def limiter_loop() -> float:
        limiter = aiolimiter.AsyncLimiter(1e12, 60)
        started = time.perf_counter()
        for _ in range(N):
            await limiter.acquire()
        return (time.perf_counter() - started) / N

    bucket = RateBucket(1e12, now=0.0)
    clock = time.monotonic
    started = time.perf_counter()
    for _ in range(N):
        now = clock()
        if bucket.delay(1.0, now) == 0:
            bucket.charge(1.0, now)
    ours = (time.perf_counter() - started) / N
    return asyncio.run(limiter_loop()), ours


def main() -> None:
    theirs, ours = burst()
    print(f"burst at one instant, 600/min: aiolimiter {theirs}, RateBucket {ours}")
    outcome, delay = large_charge()
    print(
        f"1 300 tokens, 60 000 TPM, half-second bucket: aiolimiter {outcome}; "
        f"RateBucket admits it now (delay {delay:g} s)"
    )
    theirs_s, ours_s = cost()
    print(
        f"per admission: aiolimiter {theirs_s * 1e9:.0f} ns, RateBucket {ours_s * 1e9:.0f} ns "
        f"({theirs_s / ours_s:.1f}x)"
    )


if __name__ == "__main__":
    main()
