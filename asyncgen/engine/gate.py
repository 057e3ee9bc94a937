"""The gate, async shell over :class:`~asyncgen.core.flow.FlowControl`: wait for a lease, give it
back with feedback, and probe ejected endpoints until they answer again.

The engine takes a *slot* before it spawns an item's task (so memory is bounded by the
concurrency cap, however large the input) and a *lease* before each attempt (so every attempt,
retries included, is paced and routed). Waiters queue on one lock, first come first served:
only the head of the queue polls the flow control, the rest sleep; while anyone waits, a
newcomer queues too.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import msgspec

from asyncgen.core.errors import ConfigError
from asyncgen.core.flow import FlowControl
from asyncgen.core.leases import EndpointStats, Feedback, Lease, Released
from asyncgen.engine.clock import Clock

__all__ = ["Gate", "GateStatistics"]

Probe = Callable[[int], Awaitable[tuple[bool, str | None]]]
"""Is endpoint ``i`` answering again: (healthy, the server error it answered with, if any)."""


class GateStatistics(msgspec.Struct, frozen=True, kw_only=True):
    """An immutable snapshot of the gate."""

    concurrency: int
    waiting: int
    """Callers waiting for a lease."""
    parked: int
    """Items waiting out a retry delay with their slot lent out."""
    waiting_for_endpoint: bool
    """The head of the queue waits because no endpoint is up."""
    endpoints: tuple[EndpointStats, ...]


class Gate:
    """Concurrency slots plus leases from a flow control.

    An item holds a slot from its spawn to its record, except while it waits out a retry
    delay on its own (a refusal's ``retry-after``, a backoff): then it may *park*, lending its
    slot to a new item, so items waiting for their turn do not starve the endpoints. At most
    :attr:`PARK_PER_SLOT` times ``concurrency`` items (and at least :attr:`PARK_MIN`) park at
    once, which keeps memory bounded (a parked item is its request and a task: a few kB).
    How many need to park is the rate times the wait: 30 % refused with a Retry-After of a
    second, at 3 000 items/s, keeps about 2 000 waiting.
    """

    PARK_PER_SLOT = 8
    PARK_MIN = 4096

    def __init__(
        self,
        flow: FlowControl,
        *,
        concurrency: int,
        clock: Clock | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.flow = flow
        self.concurrency = concurrency
        self._clock = clock = clock or Clock()
        self._now = clock.monotonic
        self._slots = asyncio.Semaphore(concurrency)
        self._queue = asyncio.Lock()
        self._queued = 0
        """Callers waiting for a lease (in the queue or at its head)."""
        self._changed = asyncio.Event()
        self.waiting_for_endpoint = False
        """True while the head of the queue waits because no endpoint is up."""
        self.parked = 0
        self._park_limit = max(self.PARK_PER_SLOT * concurrency, self.PARK_MIN)

    def acquire_slot(self) -> Coroutine[Any, Any, bool]:
        """Wait for a free slot (the semaphore's own coroutine: one frame less per item)."""
        return self._slots.acquire()

    def release_slot(self) -> None:
        self._slots.release()

    def park(self) -> bool:
        """Lend the caller's slot to a new item while it waits on its own; False (the slot
        kept) when every parking place is taken. Then :meth:`unpark`, or, if the caller ends
        while parked, :meth:`leave_parking`."""
        if self.parked >= self._park_limit:
            return False
        self.parked += 1
        self._slots.release()
        return True

    async def unpark(self) -> None:
        """Take a slot again after :meth:`park` (cancelled: still parked)."""
        await self._slots.acquire()
        self.parked -= 1

    def leave_parking(self) -> None:
        """A parked caller ends without a slot to give back."""
        self.parked -= 1

    def lease_nowait(self, prompt_estimate: int, max_output: int | None) -> Lease | None:
        """A lease now, if nobody queues for one and the flow control grants it."""
        if self._queued:
            return None
        decision = self.flow.try_acquire(self._now(), prompt_estimate, max_output)
        return decision if isinstance(decision, Lease) else None

    async def lease(
        self, prompt_estimate: int, max_output: int | None, *, until: float = math.inf
    ) -> Lease:
        """Wait until an endpoint may take one more attempt of this size; route it there.
        TimeoutError if none does by ``until`` on the clock (only the head of the queue
        watches the time: behind it, a caller waits for the lock)."""
        # Nobody queued: ask at once (the lock costs more than the asking, per attempt).
        lease = self.lease_nowait(prompt_estimate, max_output)
        if lease is not None:
            return lease
        self._queued += 1
        try:
            async with self._queue:
                return await self._wait_for_lease(prompt_estimate, max_output, until)
        finally:
            self._queued -= 1

    async def _wait_for_lease(
        self, prompt_estimate: int, max_output: int | None, until: float
    ) -> Lease:
        """The head of the queue: ask again whenever the answer may have changed."""
        while True:
            now = self._now()
            decision = self.flow.try_acquire(now, prompt_estimate, max_output)
            if isinstance(decision, Lease):
                return decision
            if now >= until:
                raise TimeoutError("no endpoint took the request in time")
            seconds = min(decision.seconds, until - now)
            if not decision.on_release:
                # Only time helps (a budget or a pause): sleep through releases instead of
                # waking up to recompute on each of them.
                await self._clock.sleep(seconds)
                continue
            self._changed.clear()
            self.waiting_for_endpoint = not self.flow.any_up
            try:
                if math.isinf(seconds):
                    await self._changed.wait()
                else:
                    await self._wait_changed(seconds)
            finally:
                self.waiting_for_endpoint = False

    async def _wait_changed(self, seconds: float) -> None:
        """Wait for a release or a re-admission, at most ``seconds`` on the clock."""
        changed = asyncio.ensure_future(self._changed.wait())
        timer = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait((changed, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            changed.cancel()
            timer.cancel()

    def release(self, lease: Lease, feedback: Feedback) -> Released:
        """Return the lease; what the attempt means for its item (see FlowControl.release)."""
        excused = self.flow.release(lease, feedback, self._now())
        self._changed.set()
        return excused

    async def probe_forever(self, probe: Probe, *, idle: float = 0.5) -> None:
        """Probe ejected endpoints when due and re-admit those that answer. Runs until
        cancelled; checks at least every ``idle`` seconds for newly ejected endpoints.
        Raises ConfigError when every endpoint answers only server errors (see
        :meth:`FlowControl.broken`)."""
        while True:
            now = self._now()
            due = self.flow.probes_due(now)
            if due:
                results = await asyncio.gather(*(probe(i) for i in due))
                now = self._now()
                for index, (healthy, error) in zip(due, results, strict=True):
                    self.flow.probe_result(index, healthy, now, error=error)
                if any(healthy for healthy, _ in results):
                    self._changed.set()
                broken = self.flow.broken()
                if broken is not None:
                    raise ConfigError(
                        f"no endpoint can serve: each answers only errors, GET /models "
                        f"included ({broken}); stopping (nothing is lost: rerun once the "
                        "server is fixed)"
                    )
                continue
            await self._clock.sleep(min(idle, self.flow.next_probe_in(now)))

    def statistics(self) -> GateStatistics:
        return GateStatistics(
            concurrency=self.concurrency,
            waiting=self._queued,
            parked=self.parked,
            waiting_for_endpoint=self.waiting_for_endpoint,
            endpoints=tuple(self.flow.endpoint_stats(self._now())),
        )

    def __repr__(self) -> str:
        return f"<Gate concurrency={self.concurrency} {self.flow!r}>"
