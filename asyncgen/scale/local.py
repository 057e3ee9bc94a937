"""Workers as processes on this machine: each runs its own event loop and a
:class:`~asyncgen.scale.worker.PartitionWorker`, and talks to the coordinator over a pipe.

Messages are pickled tuples. Coordinator to worker: ``("run", partition, source)``,
``("share", share)``, ``("stop", now)``. Worker to coordinator: ``("stats", name,
statistics)`` twice a second while a partition runs, ``("done", result)``, ``("error",
kind, message)`` for an error that stops the job, ``("crash", traceback)`` for a bug.

The worker ignores SIGINT (a Ctrl-C in the terminal reaches the whole process group; the
coordinator decides), and when the coordinator goes away (its end of the pipe closes:
killed, say) it stops as on a first Ctrl-C: what is in flight drains and is committed, and
it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any, NamedTuple

from asyncgen.core import errors
from asyncgen.core.errors import AsyncgenError
from asyncgen.core.ledger import Redo
from asyncgen.engine.runtime import tune_gc
from asyncgen.engine.stats import Statistics
from asyncgen.job.config import JobConfig
from asyncgen.scale.budget import Share
from asyncgen.scale.coordinator import WorkerLost
from asyncgen.scale.worker import PartitionWorker, PartResult
from asyncgen.storage.partitions import Partition

__all__ = ["LocalWorker"]

_REPORT_EVERY = 0.5
_CLOSE_WAIT = 60.0
"""Seconds :meth:`LocalWorker.close` waits for a stopped worker to exit before killing it
(a drain is bounded by the job's ``drain_timeout``, 30 s by default)."""


class LocalWorker:
    """A worker process (see the module's docstring); implements the coordinator's
    :class:`~asyncgen.scale.coordinator.WorkerHandle`."""

    def __init__(
        self,
        index: int,
        config: JobConfig,
        share: Share,
        *,
        api_key: str | dict[str, str | None] | None = None,
        redo: Redo | None = None,
    ) -> None:
        self.index = index
        self._config = config
        self._keys = (api_key, redo)
        self._share = share
        self._process: Any = None
        self._conn: Connection | None = None
        self._pending: asyncio.Future[PartResult] | None = None
        self._current: tuple[str, Statistics] | None = None
        self._exited = asyncio.Event()

    async def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process with a running loop
        parent, child = ctx.Pipe()
        started = self._share
        process = ctx.Process(
            target=_main,
            args=(child, _Setup(self._config, started, *self._keys)),
            name=f"asyncgen-worker-{self.index}",
        )
        await asyncio.to_thread(process.start)
        child.close()
        self._process, self._conn = process, parent
        if self._share != started:  # the share changed while the process started
            self._send(("share", self._share))
        loop = asyncio.get_running_loop()
        loop.add_reader(parent.fileno(), self._readable)
        loop.add_reader(process.sentinel, self._died)

    def _send(self, message: tuple[Any, ...]) -> None:
        if self._conn is not None and not self._exited.is_set():
            with contextlib.suppress(OSError):
                self._conn.send(message)

    def _readable(self) -> None:
        assert self._conn is not None
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            self._died()
            return
        kind = message[0]
        pending = self._pending
        if kind == "stats":
            self._current = (message[1], message[2])
        elif kind == "done" and pending is not None and not pending.done():
            self._current = None
            pending.set_result(message[1])
        elif kind == "error" and pending is not None and not pending.done():
            cls = getattr(errors, message[1], AsyncgenError)
            if not (isinstance(cls, type) and issubclass(cls, AsyncgenError)):
                cls = AsyncgenError
            pending.set_exception(cls(message[2]))
        elif kind == "crash" and pending is not None and not pending.done():
            pending.set_exception(RuntimeError(f"worker {self.index} failed:\n{message[1]}"))

    def _died(self) -> None:
        if self._exited.is_set():
            return
        self._exited.set()
        loop = asyncio.get_running_loop()
        if self._conn is not None:
            loop.remove_reader(self._conn.fileno())
        if self._process is not None:
            loop.remove_reader(self._process.sentinel)
        pending = self._pending
        if pending is not None and not pending.done():
            code = self._process.exitcode if self._process is not None else None
            why = f"signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            pending.set_exception(WorkerLost(f"worker process {self.index} ended: {why}"))

    async def run_partition(self, part: Partition, source: str) -> PartResult:
        if self._exited.is_set():
            raise WorkerLost(f"worker process {self.index} has ended")
        self._pending = asyncio.get_running_loop().create_future()
        self._send(("run", part, source))
        try:
            return await self._pending
        finally:
            self._pending = None

    def set_share(self, share: Share) -> None:
        if share != self._share:
            self._share = share
            self._send(("share", share))

    def statistics(self) -> tuple[str, Statistics] | None:
        return self._current

    def stop(self, now: bool) -> None:
        self._send(("stop", now))

    async def close(self) -> None:
        process = self._process
        if process is None:
            return
        if not self._exited.is_set():
            self._send(("stop", False))
            if self._conn is not None:
                asyncio.get_running_loop().remove_reader(self._conn.fileno())
                self._conn.close()  # the worker sees its coordinator leave, and ends
                self._conn = None
            try:
                await asyncio.wait_for(self._exited.wait(), _CLOSE_WAIT)
            except TimeoutError:
                process.kill()
                await self._exited.wait()
        await asyncio.to_thread(process.join)
        process.close()
        self._process = None

    def __repr__(self) -> str:
        state = "ended" if self._exited.is_set() else "running"
        return f"<LocalWorker {self.index} {state}>"


# --- the worker's side --------------------------------------------------------------------------


class _Setup(NamedTuple):
    """What a worker process is started with (pickled through the pipe, never argv)."""

    config: JobConfig
    share: Share
    api_key: str | dict[str, str | None] | None
    redo: Redo | None


def _main(conn: Connection, setup: _Setup) -> None:
    """A worker process's entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tune_gc()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        asyncio.run(_serve(conn, setup))
    else:
        uvloop.run(_serve(conn, setup))


async def _serve(conn: Connection, setup: _Setup) -> None:
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()

    def send(message: tuple[Any, ...]) -> None:
        if not gone.is_set():
            try:
                conn.send(message)
            except OSError:
                leave()

    def leave() -> None:
        if not gone.is_set():
            gone.set()
            loop.remove_reader(conn.fileno())
            worker.stop()

    async def run(part: Partition, source: str) -> None:
        reporter = asyncio.ensure_future(report())
        try:
            result = await worker.run_partition(part, source)
        except AsyncgenError as exc:
            send(("error", type(exc).__name__, str(exc)))
            return
        except Exception:  # a bug: the coordinator stops the job and shows where
            send(("crash", traceback.format_exc()))
            return
        except asyncio.CancelledError:
            send(("done", PartResult(part.name)))
            return
        finally:
            reporter.cancel()
        send(("done", result))

    async def report() -> None:
        while True:
            await asyncio.sleep(_REPORT_EVERY)
            now = worker.statistics()
            if now is not None:
                send(("stats", *now))

    def readable() -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            leave()
            return
        kind = message[0]
        if kind == "run":
            task = loop.create_task(run(message[1], message[2]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif kind == "share":
            worker.set_share(message[1])
        elif kind == "stop":
            worker.stop()
            if message[1]:
                for task in tasks:
                    task.cancel()

    async with PartitionWorker(
        setup.config, share=setup.share, api_key=setup.api_key, redo=setup.redo
    ) as worker:
        loop.add_reader(conn.fileno(), readable)
        await gone.wait()
        if tasks:
            await asyncio.wait(tasks)
