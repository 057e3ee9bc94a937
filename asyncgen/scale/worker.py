"""One worker of a job run by several: it runs the partitions it is given, one after
another, each with an :class:`~asyncgen.engine.engine.Engine` over the partition's store.

What it learned of the endpoints (windows, paces) and its share of the job's budgets are
kept in one :class:`~asyncgen.core.flow.FlowControl` across its partitions, and its
connections in one set of transports. The lease of a partition is its store's lock:
:class:`~asyncgen.core.errors.BusyError` when another process holds it.
"""

from __future__ import annotations

from pathlib import Path

import msgspec

from asyncgen.core.errors import BusyError
from asyncgen.core.flow import FlowControl
from asyncgen.core.ledger import Redo
from asyncgen.engine.clock import Clock
from asyncgen.engine.engine import Engine
from asyncgen.engine.stats import Statistics
from asyncgen.engine.transport import AiohttpTransport, Transport
from asyncgen.job.config import JobConfig
from asyncgen.scale.budget import Share
from asyncgen.storage.partitions import PARTS_DIR, Partition

__all__ = ["PartResult", "PartitionWorker"]


class PartResult(msgspec.Struct, frozen=True):
    """How a partition's run ended: ``busy`` (another process holds its lease; nothing was
    done), else its engine's final statistics (``finished``: every item of it committed)."""

    name: str
    busy: bool = False
    stats: Statistics | None = None


class PartitionWorker:
    """Runs partitions of ``config``'s job. ``async with PartitionWorker(...) as w:
    await w.run_partition(partition, input)``; :meth:`set_share`, :meth:`statistics` and
    :meth:`stop` may be called meanwhile (from the same loop)."""

    def __init__(
        self,
        config: JobConfig,
        *,
        share: Share,
        api_key: str | dict[str, str | None] | None = None,
        redo: Redo | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self._api_key = api_key
        self._redo = redo
        self._clock = clock or Clock()
        self._share = share
        self._transports: list[Transport] = []
        self._flow: FlowControl | None = None
        self._engine: Engine | None = None
        self._current: str | None = None
        self._stopping = False

    async def __aenter__(self) -> PartitionWorker:
        cfg = self.config
        keys = self._api_key
        self._transports = [
            AiohttpTransport(
                url,
                api_key=keys.get(url) if isinstance(keys, dict) else keys,
                limit=cfg.concurrency,
            )
            for url in cfg.base_urls
        ]
        share = self._share
        self._flow = FlowControl(
            [t.base_url for t in self._transports],
            concurrency=share.concurrency,
            min_concurrency=min(
                cfg.min_concurrency,
                share.concurrency,
                *(own.concurrency for own in share.endpoints if own and own.concurrency),
            ),
            rpm=share.rpm,
            tpm=share.tpm,
            now=self._clock.monotonic(),
            limits=share.endpoints,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for transport in self._transports:
            await transport.aclose()

    async def run_partition(self, part: Partition, source: str) -> PartResult:
        """Run one partition (``source``: its input, as a path or URL) to its end, or until
        :meth:`stop`. Errors that stop a job (a refused key, an unwritable directory)
        propagate."""
        if self._stopping:
            return PartResult(part.name, stats=None)
        cfg = msgspec.structs.replace(
            self.config,
            inputs=[source],
            output=str(Path(self.config.output) / PARTS_DIR / part.name),
        )
        engine = Engine(
            cfg,
            transport=self._transports,
            clock=self._clock,
            redo=self._redo,
            flow=self._flow,
            lines=(part.first, part.last),
            count_input=False,  # the coordinator counts the job's input once
        )
        try:
            async with engine:
                self._engine, self._current = engine, part.name
                if self._stopping:
                    engine.stop()
                stats = await engine.run()
        except BusyError:
            return PartResult(part.name, busy=True)
        finally:
            self._engine = self._current = None
        return PartResult(part.name, stats=stats)

    def set_share(self, share: Share) -> None:
        """Take a new share of the job's budgets (from now on, in flight included)."""
        self._share = share
        if self._flow is not None:
            self._flow.set_share(
                concurrency=share.concurrency,
                rpm=share.rpm,
                tpm=share.tpm,
                now=self._clock.monotonic(),
                limits=share.endpoints,
            )

    def statistics(self) -> tuple[str, Statistics] | None:
        """The partition running now and its engine's statistics (None: none running)."""
        engine, name = self._engine, self._current
        if engine is None or name is None:
            return None
        return name, engine.statistics()

    def stop(self) -> None:
        """Stop: the running partition drains (see :meth:`Engine.stop`) and no other starts."""
        self._stopping = True
        if self._engine is not None:
            self._engine.stop()

    def __repr__(self) -> str:
        state = "stopping" if self._stopping else "running" if self._current else "idle"
        return f"<PartitionWorker {state} {self._current or ''} {self._share}>"
