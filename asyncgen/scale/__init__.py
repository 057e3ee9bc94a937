"""Beyond one process: a job's partitions run by several workers (local processes or Ray
actors), exactly once, inside job-wide budgets. See :mod:`asyncgen.storage.partitions` for
the layout and docs/ARCHITECTURE.md for why a duplicate cannot arise.

``async with workers_job(config, api_key=key) as job: stats = await job.run()`` runs
``config.workers`` workers, as Ray actors when ``config.ray`` is set.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from asyncgen.core.ledger import Redo
from asyncgen.job.config import JobConfig
from asyncgen.scale.budget import Share, divide
from asyncgen.scale.coordinator import Coordinator, Spawn, WorkerHandle, WorkerLost
from asyncgen.scale.local import LocalWorker
from asyncgen.scale.worker import PartitionWorker, PartResult

__all__ = [
    "Coordinator",
    "LocalWorker",
    "PartResult",
    "PartitionWorker",
    "Share",
    "WorkerHandle",
    "WorkerLost",
    "divide",
    "spawner",
    "workers_job",
]


def spawner(
    config: JobConfig,
    *,
    api_key: str | Mapping[str, str | None] | None = None,
    redo: Redo | None = None,
) -> Spawn:
    """How ``config``'s workers are made: Ray actors if ``config.ray`` is set (connecting to
    it), else processes on this machine."""
    keys = dict(api_key) if isinstance(api_key, Mapping) else api_key
    if config.ray:
        from asyncgen.scale.ray import ray_spawner

        return ray_spawner(config, api_key=keys, redo=redo)

    def spawn(index: int, share: Share) -> LocalWorker:
        return LocalWorker(index, config, share, api_key=keys, redo=redo)

    return spawn


def workers_job(
    config: JobConfig,
    *,
    api_key: str | Mapping[str, str | None] | None = None,
    redo: Redo | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> Coordinator:
    """``config``'s job run by ``config.workers`` workers (an async context manager)."""
    return Coordinator(
        config,
        workers=config.workers,
        spawn=spawner(config, api_key=api_key, redo=redo),
        partition_lines=config.partition_lines,
        say=say,
        counted=redo is None,
    )
