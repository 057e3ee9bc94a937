"""Workers as Ray actors: the same partitions, leases and budgets as local processes, on the
nodes of a Ray cluster (``pip install 'asyncgen[ray]'``).

Each actor holds a :class:`~asyncgen.scale.worker.PartitionWorker`; the coordinator (in
the driver) calls ``run_partition`` on it, one partition at a time. An actor that dies is
restarted by Ray (``max_restarts``) and the call retried on the new one
(``max_task_retries``); the partition's lease (its store's lock, dropped with the dead
process) and ledger make the retry resume exactly where the commits stopped. Only when Ray
gives up does the coordinator see :class:`~asyncgen.scale.coordinator.WorkerLost`.

The output directory must be one filesystem every node mounts, with ``flock`` that a live
holder does not lose silently and atomic ``rename`` (a local disk for a one-node cluster,
NFSv4, CephFS, Lustre with ``flock``); object stores mounted as files (s3fs, gcsfuse) have
neither and are not supported.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from asyncgen.core.errors import AsyncgenError, ConfigError
from asyncgen.core.ledger import Redo
from asyncgen.engine.stats import Statistics
from asyncgen.job.config import JobConfig
from asyncgen.scale.budget import Share
from asyncgen.scale.coordinator import Spawn, WorkerLost
from asyncgen.scale.worker import PartitionWorker, PartResult
from asyncgen.storage.partitions import Partition

__all__ = ["RayWorker", "ray_spawner"]

RESTARTS = 8
"""Restarts Ray may make of one actor, and retries of the call it was running."""
_POLL = 0.5


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'asyncgen[ray]'") from None
    return ray


class _Actor:
    """The actor's side (Ray wraps it with :func:`ray.remote`): an async actor, so that
    ``statistics`` and ``stop`` are answered while ``run_partition`` runs."""

    def __init__(
        self,
        config: JobConfig,
        share: Share,
        api_key: str | dict[str, str | None] | None,
        redo: Redo | None,
    ) -> None:
        self._worker = PartitionWorker(config, share=share, api_key=api_key, redo=redo)
        self._entered = False

    async def run_partition(self, part: Partition, source: str) -> PartResult:
        if not self._entered:
            await self._worker.__aenter__()
            self._entered = True
        return await self._worker.run_partition(part, source)

    async def set_share(self, share: Share) -> None:
        self._worker.set_share(share)

    async def statistics(self) -> tuple[str, Statistics] | None:
        return self._worker.statistics()

    async def stop(self) -> None:
        self._worker.stop()

    async def close(self) -> None:
        if self._entered:
            self._entered = False
            await self._worker.__aexit__(None, None, None)


def ray_spawner(
    config: JobConfig,
    *,
    api_key: str | dict[str, str | None] | None,
    redo: Redo | None,
) -> Spawn:
    """Connect to ``config.ray`` (``auto``, an address, or ``local`` to start a cluster on
    this machine; an already initialised Ray is used as it is) and make actors there."""
    ray = _ray()
    if not ray.is_initialized():
        address = None if config.ray == "local" else config.ray
        ray.init(address=address, log_to_driver=False)
    actor = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS)(_Actor)

    def spawn(index: int, share: Share) -> RayWorker:
        return RayWorker(index, actor, share, (config, api_key, redo))

    return spawn


class RayWorker:
    """A worker actor as the coordinator sees it (a
    :class:`~asyncgen.scale.coordinator.WorkerHandle`)."""

    def __init__(
        self, index: int, actor_class: Any, share: Share, args: tuple[Any, Any, Any]
    ) -> None:
        self.index = index
        self._class = actor_class
        self._share = share
        self._args = args
        self._actor: Any = None
        self._current: tuple[str, Statistics] | None = None
        self._poller: asyncio.Task[None] | None = None
        self._running: Any = None

    @property
    def actor(self) -> Any:
        """The Ray actor handle (tests kill it with ``ray.kill``)."""
        return self._actor

    async def start(self) -> None:
        config, api_key, redo = self._args
        self._actor = self._class.options(name=None).remote(config, self._share, api_key, redo)
        self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        ray = _ray()
        while True:
            await asyncio.sleep(_POLL)
            try:
                self._current = await self._actor.statistics.remote()
            except ray.exceptions.RayError:
                continue  # the actor is being restarted

    async def run_partition(self, part: Partition, source: str) -> PartResult:
        ray = _ray()
        self._running = self._actor.run_partition.remote(part, source)
        try:
            return await self._running  # type: ignore[no-any-return]
        except ray.exceptions.TaskCancelledError:
            return PartResult(part.name)  # stopped at once (a second Ctrl-C): not finished
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause
            if isinstance(cause, AsyncgenError):
                raise cause from None
            raise
        except ray.exceptions.RayActorError as exc:
            raise WorkerLost(f"Ray actor {self.index} died and was not restarted: {exc}") from None
        finally:
            self._running = None
            self._current = None

    def set_share(self, share: Share) -> None:
        self._share = share
        if self._actor is not None:
            self._actor.set_share.remote(share)

    def statistics(self) -> tuple[str, Statistics] | None:
        return self._current

    def stop(self, now: bool) -> None:
        if self._actor is None:
            return
        self._actor.stop.remote()
        if now and self._running is not None:
            _ray().cancel(self._running)

    async def close(self) -> None:
        ray = _ray()
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._actor is None:
            return
        with contextlib.suppress(ray.exceptions.RayError):
            await self._actor.close.remote()
        ray.kill(self._actor, no_restart=True)
        self._actor = None

    def __repr__(self) -> str:
        return f"<RayWorker {self.index} {'running' if self._running else 'idle'}>"
