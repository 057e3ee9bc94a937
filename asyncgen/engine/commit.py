"""The buffer between the senders and the store, and the single loop that commits it.

Outcomes are buffered as they come back; one committer writes them (shard frames, then the
ledger line, both fsynced) and only then marks their ids done and hands them on. The buffer
is bounded: past four flushes' worth, :attr:`Committer.space` clears and senders wait for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from asyncgen.core.ledger import Claim, bad_line_key
from asyncgen.core.records import BadLine, ErrorInfo, Result, Source
from asyncgen.engine.events import event
from asyncgen.engine.stats import Counts
from asyncgen.storage.store import Store

__all__ = ["Committer", "Emit", "Record"]

Record = Result | BadLine
Emit = Callable[[list[Record]], Awaitable[None]]


class Committer:
    """Buffers results and bad lines; :meth:`run` commits them, every ``flush_records`` or
    ``flush_interval`` seconds, until :meth:`close` and the buffer is empty."""

    def __init__(
        self, store: Store, counts: Counts, *, flush_records: int, flush_interval: float
    ) -> None:
        self._store = store
        self._counts = counts
        self._flush_records = flush_records
        self._flush_interval = flush_interval
        self._results: list[Result] = []
        self._bad: list[BadLine] = []
        self._flush_wanted = asyncio.Event()
        self.space = asyncio.Event()
        """Set while the buffer takes more; wait for it before :meth:`put_nowait`."""
        self.space.set()
        self._closing = False
        self.observe: Callable[[list[Result]], None] | None = None
        """Shown each committed batch of results (the metrics' histograms), on the loop."""

    def put_nowait(self, result: Result) -> None:
        """Buffer an item's outcome (its id stays claimed until it is committed)."""
        self._results.append(result)
        self._buffered()

    async def put_bad(
        self, custom_id: str, path: str, source: Source, error: ErrorInfo, raw: bytes
    ) -> None:
        """Buffer a bad input line's record, unless an earlier run (or this one) has it."""
        if self._store.ledger.claim(bad_line_key(custom_id)) is not Claim.SEND:
            return
        await self.space.wait()
        self._bad.append(
            BadLine(custom_id, path, source, error, raw[:2000].decode("utf-8", "replace"))
        )
        self._buffered()

    def _buffered(self) -> None:
        pending = len(self._results) + len(self._bad)
        if pending >= self._flush_records:
            self._flush_wanted.set()
        if pending >= 4 * self._flush_records:
            self.space.clear()

    def close(self) -> None:
        """Nothing more comes: :meth:`run` commits what is buffered and returns."""
        self._closing = True
        self._flush_wanted.set()

    async def run(self, emit: Emit) -> None:
        """Commit until closed and empty, handing each committed batch to ``emit``."""
        try:
            while True:
                if self._closing and not (self._results or self._bad):
                    return
                if not self._flush_wanted.is_set():
                    try:
                        async with asyncio.timeout(self._flush_interval):
                            await self._flush_wanted.wait()
                    except TimeoutError:
                        pass
                self._flush_wanted.clear()
                batch = await self._commit_pending()
                if batch:
                    await emit(batch)
        except asyncio.CancelledError:
            # Hard stop: what already came back is still worth keeping.
            await self._commit_pending()
            raise

    async def _commit_pending(self) -> list[Record]:
        results, bad = self._results, self._bad
        if not (results or bad):
            return []
        self._results, self._bad = [], []
        self.space.set()
        ids = await asyncio.to_thread(self._store.commit, results, bad)
        self._store.ledger.commit(ids)
        counts = self._counts
        if self.observe is not None:
            self.observe(results)
        for r in results:
            if r.error is None:
                counts.succeeded += 1
            else:
                counts.failed += 1
        counts.bad_lines += len(bad)
        for b in bad:
            event(
                logging.WARNING,
                "bad_input_line",
                f"{b.path}:{b.source.line}: {b.error.message}",
                path=b.path,
                line=b.source.line,
                code=b.error.code,
                cause=b.error.message,
            )
        return [*results, *bad]

    def __repr__(self) -> str:
        state = "closing" if self._closing else "open"
        full = "" if self.space.is_set() else " full"
        return (
            f"<Committer {state}{full} buffered={len(self._results)} results, "
            f"{len(self._bad)} bad lines>"
        )
