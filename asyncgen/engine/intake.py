"""The intake: read the input shards (reading ahead), expand each line into items, claim them
in the ledger, wait at the gate, and spawn each item's task.

An item is claimed only as it is taken, so whatever is read ahead and dropped on a stop
leaves nothing behind; a claim that never became a task is released. With ``group`` above 1
(``--embed-batch``), items are gathered that many at a time into one embeddings request
(:func:`~asyncgen.job.items.group_item`), across lines and shards, the last group when the
input ends; a gathered group not yet sent when the job stops has its claims released.
"""

from __future__ import annotations

import asyncio
import contextlib

from asyncgen.core.errors import InputError
from asyncgen.core.leases import Lease
from asyncgen.core.ledger import Claim, Ledger, Redo
from asyncgen.core.records import ErrorInfo, Line, Source, WorkItem
from asyncgen.engine.commit import Committer
from asyncgen.engine.gate import Gate
from asyncgen.engine.sender import UNUSED, Sender
from asyncgen.engine.stats import Counts
from asyncgen.job.items import Expander, group_item
from asyncgen.storage.sources import Input, ShardReader

__all__ = ["Intake"]

_READ_BATCH = 1024


class Intake:
    """Feeds the job's input, shard after shard, to the senders until done or stopped."""

    def __init__(
        self,
        paths: list[Input],
        *,
        ledger: Ledger,
        expander: Expander,
        template: str | None,
        samples: int,
        strict: bool,
        redo: Redo | None,
        gate: Gate,
        sender: Sender,
        committer: Committer,
        counts: Counts,
        lines: tuple[int, int | None] = (1, None),
        group: int = 1,
    ) -> None:
        """``lines``: the first and last line (None: to the end) of each shard to read: a
        partition's range, when several workers share the job."""
        self._paths = paths
        self._lines = lines
        self._ledger = ledger
        self._expander = expander
        self._template = template
        self._samples = samples
        self._strict = strict
        self._redo = redo
        self._gate = gate
        self._sender = sender
        self._committer = committer
        self._counts = counts
        self.stopping = False
        """Set by :meth:`stop`: take no more lines."""
        self._total = sum(p.stat().st_size for p in paths)
        self._done = 0
        self._shards_done = 0
        self._reader: ShardReader | None = None
        self._waiter: asyncio.Future[Lease] | None = None
        """The wait for a lease, when the gate has none at once."""
        self.read_all = False
        """Every line of every shard was taken."""
        self._group_size = group
        self._group: list[WorkItem] | None = [] if group > 1 else None
        """Items claimed and gathered for the next group request (None: one item a request)."""

    def stop(self) -> None:
        """Take no more input (a wait for the next item's lease ends now); what was taken
        goes on."""
        self.stopping = True
        if self._waiter is not None:
            self._waiter.cancel()

    def fraction(self) -> float:
        """Share of the input's bytes read so far (of a bounded line range: its lines), 0..1."""
        first, end = self._lines
        if end is not None and self._paths:
            if self.read_all:
                return 1.0
            reader = self._reader
            line = 0 if reader is None else max(0, reader.lineno - first + 1)
            current = min(1.0, line / max(1, end - first + 1))
            return (self._shards_done + current) / len(self._paths)
        done = self._done + (self._reader.position if self._reader is not None else 0)
        return min(1.0, done / self._total) if self._total else 0.0

    async def run(self, senders: asyncio.TaskGroup) -> None:
        """Take every shard's lines, spawning items' tasks into ``senders``."""
        try:
            done = await self._shards(senders)
            if done and (not self._group or await self._spawn_group(senders)):
                self.read_all = True
        finally:
            if self._group:  # stopped: what was gathered is sent by the next run
                for item in self._group:
                    self._ledger.release(item.custom_id)
                self._group.clear()

    async def _shards(self, senders: asyncio.TaskGroup) -> bool:
        """Take every shard's lines; False if the job was stopped meanwhile."""
        redo = self._redo
        template = self._template
        for path in self._paths:
            first, end = self._lines
            reader = self._reader = ShardReader(path, first=first, last=end)
            last = 0
            if redo is not None:
                # Retrying failures: only the lines that hold one are decoded.
                last = redo.last_line(reader.shard)
                done: bytes | None = redo.skip_bitmap(reader.shard) if last else None
            else:
                # Resuming: lines whose every item is done are counted, never decoded.
                done = (
                    self._ledger.done_lines(reader.shard, template, self._samples)
                    if template
                    else None
                )
            if not await self._shard(senders, reader, done, None if redo is None else last):
                return False
            self._done += reader.size
            self._shards_done += 1
            self._reader = None
        return True

    async def _shard(
        self,
        senders: asyncio.TaskGroup,
        reader: ShardReader,
        done: bytes | None,
        last: int | None,
    ) -> bool:
        """Send one shard's lines; False if the job was stopped meanwhile.

        The next batch is read (in a thread) while this one is sent: waiting for each read
        made the intake pause every batch, and the slots freed meanwhile were then filled in
        one burst, which came back as a burst (against a fixed latency, for ever after).
        The reader is closed only when no read is running."""
        samples = self._samples
        counts = self._counts

        def more() -> bool:
            return not self.stopping and (last is None or reader.lineno < last)

        def read_ahead() -> tuple[asyncio.Future[list[Line]], int]:
            return asyncio.ensure_future(
                asyncio.to_thread(reader.read_batch, _READ_BATCH, done)
            ), reader.skipped

        reading: tuple[asyncio.Future[list[Line]], int] | None = read_ahead() if more() else None
        ended = False
        """The shard was read to its end (a stop that came after its last line was taken
        leaves it complete)."""
        try:
            while reading is not None:
                read, before = reading
                reading = None
                try:
                    batch = await read
                except InputError as exc:
                    counts.bad_files += (str(exc),)
                    if self._strict:
                        raise
                    await self._committer.put_bad(
                        f"{reader.shard}:file",
                        str(reader.path),
                        Source(reader.shard, reader.lineno),
                        ErrorInfo("corrupt_input", exc.reason),
                        b"",
                    )
                    ended = True
                    break
                finally:
                    passed = reader.skipped - before
                    counts.lines_read += passed
                    counts.skipped += passed * samples
                if not batch and not passed:
                    ended = True
                    break
                if more():
                    reading = read_ahead()
                for line in batch:
                    if self.stopping or not await self._take(senders, line):
                        return False
            if self.stopping and not ended:
                return False
        finally:
            if reading is not None:
                # A read is still running in its thread: let it end before closing the file.
                with contextlib.suppress(Exception):
                    await asyncio.shield(reading[0])
        reader.close()
        return True

    async def _take(self, senders: asyncio.TaskGroup, line: Line) -> bool:
        """Expand one line, claim its items and send those not done; False if stopped."""
        ledger = self._ledger
        redo = self._redo
        counts = self._counts
        group = self._group
        counts.lines_read += 1
        try:
            items = self._expander.expand(line)
        except InputError as exc:
            if self._strict:
                raise
            await self._committer.put_bad(
                f"{line.shard}:{line.lineno}",
                line.path,
                Source(line.shard, line.lineno),
                ErrorInfo("bad_input", exc.reason),
                line.raw,
            )
            return True
        for item in items:
            if redo is not None and item.custom_id not in redo.ids:
                counts.skipped += 1
                continue
            claim = ledger.claim(item.custom_id)
            if claim is Claim.DONE:
                counts.skipped += 1
            elif claim is Claim.DUPLICATE:
                message = f"custom_id {item.custom_id!r} appears twice"
                if self._strict:
                    raise InputError(message, path=line.path, line=line.lineno)
                await self._committer.put_bad(
                    f"{line.shard}:{line.lineno}",
                    line.path,
                    item.source,
                    ErrorInfo("duplicate_custom_id", message),
                    line.raw,
                )
            elif group is None:
                if not await self._spawn(senders, item):
                    return False
            else:
                group.append(item)
                if len(group) >= self._group_size and not await self._spawn_group(senders):
                    return False
        return True

    async def _spawn_group(self, senders: asyncio.TaskGroup) -> bool:
        """Send the gathered items as one request (see :meth:`_spawn`)."""
        assert self._group
        members = self._group[:]
        self._group.clear()
        return await self._spawn(senders, group_item(members), members)

    async def _spawn(
        self, senders: asyncio.TaskGroup, item: WorkItem, members: list[WorkItem] | None = None
    ) -> bool:
        """Wait at the gate, then start the item's task (the group's, for ``members``);
        False (and the claims released) if the job was stopped meanwhile."""
        gate = self._gate
        await gate.acquire_slot()
        try:
            lease = gate.lease_nowait(item.est_prompt_tokens, item.max_output_tokens)
            if lease is None:
                lease = await self._wait_for_lease(item)
        except BaseException:
            gate.release_slot()
            self._release(item, members)
            raise
        if lease is None or self.stopping:
            if lease is not None:
                gate.release(lease, UNUSED)
            gate.release_slot()
            self._release(item, members)
            return False
        sender = self._sender
        if members is None:
            sender.tasks.add(senders.create_task(sender.send(item, lease)))
        else:
            sender.tasks.add(senders.create_task(sender.send_group(item, members, lease)))
        return True

    def _release(self, item: WorkItem, members: list[WorkItem] | None) -> None:
        for each in (item,) if members is None else members:
            self._ledger.release(each.custom_id)

    async def _wait_for_lease(self, item: WorkItem) -> Lease | None:
        """Wait at the gate for an item's first lease; None if :meth:`stop` ended the wait.
        (A task of its own only here, off the fast path, so that a stop can end it.)"""
        if self.stopping:
            return None
        waiter = self._waiter = asyncio.ensure_future(
            self._gate.lease(item.est_prompt_tokens, item.max_output_tokens)
        )
        try:
            return await waiter
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if waiter.cancelled() and self.stopping and not (task and task.cancelling()):
                return None
            raise
        finally:
            self._waiter = None

    def __repr__(self) -> str:
        state = "stopping" if self.stopping else "taking"
        return f"<Intake {state} {len(self._paths)} shards read={self.fraction():.0%}>"
