"""The one clock the engine times its own waiting by, and a virtual one for tests.

What the clock covers: retry backoff and pacing (the gate's waits for a budget or a paused
endpoint, and for a release bounded by either), the attempt-limit sweep, probing ejected
endpoints, the drain of a graceful stop, an item's deadline and latency, the job's elapsed
time, and records' ``started`` and ``created`` stamps.

What it does not: limits on real input/output, which run on the event loop's own timers
because they bound how long a socket or a disk may take, not how long the engine chooses to
wait. Those are a streamed attempt's limits (``asyncio.timeout_at``: the total ``timeout``
and the ``idle_timeout`` between reads), the timeouts of the start-up check and of each
probe request, and the committer's ``flush_interval``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

__all__ = ["Clock", "VirtualClock"]


class Clock:
    """Real time: ``monotonic()`` for intervals, ``wall()`` for timestamps, ``sleep()``.

    The methods are the standard functions themselves (no frame of their own): the engine
    reads the clock a few times per attempt.
    """

    monotonic = staticmethod(time.monotonic)
    wall = staticmethod(time.time)
    sleep = staticmethod(asyncio.sleep)

    def __repr__(self) -> str:
        return "<Clock real time>"


class VirtualClock(Clock):
    """Virtual time for tests, moved only by sleeps, as trio's ``MockClock`` with autojump.

    Sleepers wait in a timer queue. Whenever the event loop has nothing else ready, the
    clock jumps to the earliest sleeper's wake-up time and wakes it (and any due with it),
    so sleeps end in their order and at their exact times, in no real time at all. What
    the engine does not time on this clock (see the module) still takes real time, and
    virtual time may race on meanwhile: it suits transports that answer in process.
    """

    def __init__(self, start: float = 0.0, *, wall: float = 1_700_000_000.0) -> None:
        self.now = start
        self._wall_offset = wall - start
        self.slept: list[float] = []
        """Every sleep asked for, in order."""
        self._timers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._ticking = False

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self._wall_offset

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()
        heapq.heappush(self._timers, (self.now + max(0.0, seconds), next(self._order), wake))
        if not self._ticking:
            self._ticking = True
            loop.call_soon(self._tick, loop)
        await wake

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        timers = self._timers
        while timers and timers[0][2].done():  # cancelled sleeps
            heapq.heappop(timers)
        if not timers:
            self._ticking = False
            return
        # asyncio's ready queue (not on every loop): jump only once all else has run.
        if not getattr(loop, "_ready", None):
            self.now = max(self.now, timers[0][0])
            while timers and timers[0][0] <= self.now:
                wake = heapq.heappop(timers)[2]
                if not wake.done():
                    wake.set_result(None)
        loop.call_soon(self._tick, loop)

    def __repr__(self) -> str:
        return f"<VirtualClock now={self.now:g} sleeping={len(self._timers)}>"
