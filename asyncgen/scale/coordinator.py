"""The coordinator of a job run by several workers: it plans the partitions, hands them out,
divides the budgets among the busy workers, restarts a worker that dies, and sums up what
they report into one job's statistics.

It holds the output directory's lock for the whole run (so no one-process run can write
there meanwhile); each partition is written only under its own store's lock, held by the
worker running it. A worker is reached through a :class:`WorkerHandle`: a local process
(:mod:`asyncgen.scale.local`) or a Ray actor (:mod:`asyncgen.scale.ray`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from asyncgen._version import __version__
from asyncgen.core.errors import AsyncgenError, job_error
from asyncgen.core.leases import EndpointStats
from asyncgen.engine.clock import Clock
from asyncgen.engine.events import event
from asyncgen.engine.stats import Statistics
from asyncgen.job.config import JobConfig, job_record, job_spec
from asyncgen.scale.budget import Share, divide
from asyncgen.scale.stats import combine
from asyncgen.scale.worker import PartResult
from asyncgen.storage.count import RecordCount
from asyncgen.storage.files import DirLock
from asyncgen.storage.formats import Remote
from asyncgen.storage.partitions import Partition, open_partitioned, plan_partitions
from asyncgen.storage.sources import Input, expand_inputs

__all__ = ["Coordinator", "WorkerHandle", "WorkerLost"]


class WorkerLost(Exception):
    """The worker died (killed, crashed) before it answered."""


class WorkerHandle(Protocol):
    """A worker as the coordinator sees it."""

    async def start(self) -> None: ...

    async def run_partition(self, part: Partition, source: str) -> PartResult:
        """Run one partition; raises :class:`WorkerLost` if the worker dies meanwhile, and
        the error that stopped it for an error that stops the job."""
        ...

    def set_share(self, share: Share) -> None: ...

    def statistics(self) -> tuple[str, Statistics] | None:
        """The last statistics the worker reported of the partition it runs (None: none)."""
        ...

    def stop(self, now: bool) -> None: ...

    async def close(self) -> None:
        """Let the worker end (stopping it if it still runs) and free what it holds."""
        ...


Spawn = Callable[[int, Share], WorkerHandle]
"""Makes worker number ``index`` with its first share (not started yet)."""


class Coordinator:
    """Runs ``config``'s job with ``workers`` workers made by ``spawn``.
    ``async with Coordinator(...) as c: stats = await c.run()``."""

    RESTARTS = 10
    RESTART_WINDOW = 600.0
    """A run gives up when its workers died more than :attr:`RESTARTS` times within
    :attr:`RESTART_WINDOW` seconds (a crash loop: a bad input that kills the process, say);
    a death now and then in a job of days is replaced for ever."""
    BUSY_WAIT = 1.0
    BUSY_GIVE_UP = 120.0
    """Seconds a partition may stay held by another process (a worker of an earlier run still
    draining, say) before this run leaves it for the next."""

    def __init__(
        self,
        config: JobConfig,
        *,
        workers: int,
        spawn: Spawn,
        partition_lines: int | None = None,
        say: Callable[[str], None] = lambda _: None,
        clock: Clock | None = None,
        counted: bool = True,
    ) -> None:
        """``counted``: count the input's records beside the job, for the progress line's
        total (a retry run's items are its failures, so it says False)."""
        config.validate()
        if workers < 1:
            raise ValueError("at least one worker is needed")
        self.config = config
        self.workers = workers
        self._spawn_worker = spawn
        self._partition_lines = partition_lines
        self._say = say
        self._clock = clock or Clock()
        self._lock: DirLock | None = None
        self._work: list[tuple[Partition, str]] = []
        self._queue: deque[tuple[Partition, str]] = deque()
        self._busy_since: dict[str, float] = {}
        self._live: dict[int, WorkerHandle] = {}
        self._endpoints: dict[int, list[EndpointStats]] = {}
        """Each slot's worker's endpoints as last seen (its flow control counts across its
        partitions); a retired worker's go to :attr:`_retired`."""
        self._retired: list[list[EndpointStats]] = []
        self._done: list[Statistics] = []
        """Final (or last reported) statistics of each partition run of this run."""
        self._totals: dict[str, tuple[int, int, int]] = {}
        self._finished: set[str] = set()
        self._left: list[str] = []
        self._deaths: deque[float] = deque()
        self._stopping = False
        self._started: float | None = None
        self._counted = counted
        self._count = RecordCount(())

    async def __aenter__(self) -> Coordinator:
        cfg = self.config
        inputs = await asyncio.to_thread(expand_inputs, cfg.inputs)
        template = cfg.load_template()
        root = Path(cfg.output)
        self._lock = await asyncio.to_thread(
            open_partitioned,
            root,
            job_spec(cfg, template),
            version=__version__,
            job=job_record(cfg, inputs, template),
        )
        try:
            _, work = await asyncio.to_thread(
                plan_partitions,
                root,
                inputs,
                workers=self.workers,
                lines=self._partition_lines,
                say=self._say,
            )
        except BaseException:
            self._lock.release()
            raise
        self._work = [(p, _source(i)) for p, i in work]
        self._queue = deque(self._work)
        if self._counted:
            # This run's partitions cover its inputs whole: their records are the total.
            self._count = RecordCount(inputs)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._count.close()
        if self._lock is not None:
            self._lock.release()

    @property
    def handles(self) -> list[WorkerHandle]:
        """The workers running now (tests kill them)."""
        return list(self._live.values())

    @property
    def partitions(self) -> list[Partition]:
        """This run's partitions, in plan order."""
        return [p for p, _ in self._work]

    async def run(self) -> Statistics:
        """Run every partition to its end (or until :meth:`stop`); the job's statistics."""
        self._started = self._clock.monotonic()
        self._count.start()
        slots = min(self.workers, len(self._work))
        try:
            async with asyncio.TaskGroup() as tg:
                for index in range(slots):
                    tg.create_task(self._slot(index))
        except BaseExceptionGroup as group:
            error = job_error(group)
            if error is None:
                raise
            raise error from None
        for name in self._left:
            self._say(f"partition {name} was held by another process all along; rerun to do it")
        return self.statistics()

    def stop(self, now: bool = False) -> None:
        """No partition starts after this; the running ones drain (``now``: stop at once)."""
        self._stopping = True
        for handle in list(self._live.values()):
            handle.stop(now)

    # --- the slots ----------------------------------------------------------------------------

    async def _spawn(self, index: int) -> WorkerHandle:
        handle = self._spawn_worker(index, self._share(len(self._live) + 1))
        self._live[index] = handle
        self._reshare()
        await handle.start()
        return handle

    async def _retire(self, index: int, handle: WorkerHandle) -> None:
        if self._live.get(index) is handle:
            del self._live[index]
        ended = self._endpoints.pop(index, None)
        if ended:
            self._retired.append(ended)
        await handle.close()
        self._reshare()

    def _share(self, busy: int) -> Share:
        cfg = self.config
        return divide(cfg.concurrency, cfg.rpm, cfg.tpm, busy, cfg.endpoint_limits)

    def _reshare(self) -> None:
        share = self._share(len(self._live))
        for handle in self._live.values():
            handle.set_share(share)

    async def _slot(self, index: int) -> None:
        handle = await self._spawn(index)
        try:
            while True:
                item = await self._next()
                if item is None:
                    return
                part, source = item
                try:
                    result = await handle.run_partition(part, source)
                except WorkerLost as lost:
                    self._queue.appendleft(item)
                    handle = await self._replace(index, handle, part, lost)
                    continue
                self._record(index, result, item)
        except BaseException:
            # Another slot's error, or the job's: the others stop now, and what they
            # committed stays committed.
            self.stop(now=True)
            raise
        finally:
            await self._retire(index, handle)

    async def _replace(
        self, index: int, handle: WorkerHandle, part: Partition, lost: WorkerLost
    ) -> WorkerHandle:
        last = handle.statistics()
        if last is not None:
            self._done.append(last[1])
            self._endpoints[index] = last[1].endpoints
        await self._retire(index, handle)
        now = self._clock.monotonic()
        deaths = self._deaths
        deaths.append(now)
        while deaths and deaths[0] < now - self.RESTART_WINDOW:
            deaths.popleft()
        if len(deaths) > self.RESTARTS:
            raise AsyncgenError(
                f"workers died {len(deaths)} times in {self.RESTART_WINDOW / 60:g} minutes "
                f"(last: {lost}); stopping the job; "
                "rerun to resume from what was committed"
            )
        event(
            logging.WARNING,
            "worker_lost",
            f"worker {index} died running partition {part.describe()} ({lost}); a new one "
            "resumes it from what was committed",
            worker=index,
            partition=part.name,
        )
        self._say(f"worker {index} died ({lost}); restarting it")
        return await self._spawn(index)

    async def _next(self) -> tuple[Partition, str] | None:
        """The next partition to run: the first not found busy lately; when every one left
        was, the first of them after a short wait (None: nothing left, or stopping)."""
        queue = self._queue
        while queue and not self._stopping:
            for item in queue:
                if item[0].name not in self._busy_since:
                    queue.remove(item)
                    return item
            item = queue.popleft()
            if self._clock.monotonic() - self._busy_since[item[0].name] > self.BUSY_GIVE_UP:
                self._left.append(item[0].name)
                continue
            await self._clock.sleep(self.BUSY_WAIT)
            return None if self._stopping else item
        return None

    def _record(self, index: int, result: PartResult, item: tuple[Partition, str]) -> None:
        name = result.name
        if result.busy:
            if name not in self._busy_since:
                self._busy_since[name] = self._clock.monotonic()
                self._say(
                    f"partition {item[0].describe()} is held by another process (a worker "
                    "of an earlier run still draining?); trying it again shortly"
                )
            self._queue.append(item)
            return
        self._busy_since.pop(name, None)
        stats = result.stats
        if stats is None:
            return
        self._done.append(stats)
        self._endpoints[index] = stats.endpoints
        self._totals[name] = (stats.succeeded_total, stats.failed_total, stats.bad_lines_total)
        if stats.finished:
            self._finished.add(name)

    # --- observing ----------------------------------------------------------------------------

    def statistics(self) -> Statistics:
        """The job's progress: every worker's counts of this run summed, totals over the
        partitions seen so far (every one, once the run has ended)."""
        endpoints = dict(self._endpoints)
        current: list[tuple[str, Statistics]] = []
        for index, handle in self._live.items():
            now = handle.statistics()
            if now is not None:
                current.append(now)
                endpoints[index] = now[1].endpoints
        totals = dict(self._totals)
        running = 0.0
        for name, stats in current:
            totals[name] = (stats.succeeded_total, stats.failed_total, stats.bad_lines_total)
            running += stats.input_fraction if name not in self._finished else 0.0
        parts = len(self._work)
        complete = bool(self._work) and len(self._finished) == parts and not self._stopping
        fraction = 1.0 if not parts else min(1.0, (len(self._finished) + running) / parts)
        records = self._count.total
        return combine(
            [*self._done, *(s for _, s in current)],
            total_items=None if records is None else records * self.config.samples,
            endpoints=[*self._retired, *endpoints.values()],
            elapsed=0.0 if self._started is None else self._clock.monotonic() - self._started,
            totals=list(totals.values()),
            fraction=1.0 if complete else fraction,
            finished=complete or (not self._work and self._started is not None),
            stopped=self._stopping,
            waiting=any(s.waiting_for_endpoint for _, s in current),
        )

    def __repr__(self) -> str:
        return (
            f"<Coordinator {self.config.output!r} workers={len(self._live)}/{self.workers} "
            f"partitions={len(self._finished)}/{len(self._work)} done>"
        )


def _source(each: Input) -> str:
    """How a worker names an input (a URL with what it needs to be read, credentials too:
    it goes to the worker over a pipe, never to a log)."""
    return each.url if isinstance(each, Remote) else str(each)
