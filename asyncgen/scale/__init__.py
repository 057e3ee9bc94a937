"""Beyond one process: a job's partitions run by several workers (local processes or Ray
actors), exactly once, inside job-wide budgets. See :mod:`asyncgen.storage.partitions` for
the layout and docs/ARCHITECTURE.md for why a duplicate cannot arise."""

from asyncgen.scale.budget import Share, divide
from asyncgen.scale.coordinator import Coordinator, WorkerLost
from asyncgen.scale.worker import PartitionWorker, PartResult

__all__ = ["Coordinator", "PartResult", "PartitionWorker", "Share", "WorkerLost", "divide"]
