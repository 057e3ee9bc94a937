"""A job run by several workers: its partitions, each a full output directory of its own.

Layout (beside a one-process job's files, which a partitioned directory does not have)::

    OUT/manifest.json              the job spec, as for one process
    OUT/.lock                      held by the coordinator while the job runs
    OUT/partitions.json            the plan: every partition, fixed once written
    OUT/parts/p000001/             a partition's store (storage/store.py): its own manifest,
                                   ledger, result/failure/error shards and .lock

A partition is one input shard, or a range of its lines. It is *leased* to a worker by the
lock of its store (``flock``, dropped by the kernel when the holder dies), and everything of
it is written under that lock, through the same store, ledger and recovery as a one-process
job: so a worker that takes over a dead worker's partition resumes from what was committed,
and two workers can never write one partition. Ids do not depend on the plan (they name the
shard and the line), so the job's logical view is the union of its partitions' views.

The plan is written once (atomically) and then only extended: inputs a later run adds get
partitions of their own, and what was planned never moves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from asyncgen.core.errors import OutputError
from asyncgen.storage.files import DirLock, atomic_write
from asyncgen.storage.manifest import (
    MANIFEST_NAME,
    fingerprint,
    other_job,
    read_manifest,
    write_manifest,
)
from asyncgen.storage.sources import Input, count_lines, shard_name

__all__ = [
    "PARTS_DIR",
    "PLAN_NAME",
    "Partition",
    "Plan",
    "is_partitioned",
    "open_partitioned",
    "part_dirs",
    "plan_partitions",
    "read_plan",
]

PLAN_NAME = "partitions.json"
PARTS_DIR = "parts"


class Partition(msgspec.Struct, frozen=True):
    """Lines ``first`` to ``last`` (1-based, inclusive; None: to the end) of the input whose
    shard name is ``shard``, written into ``OUT/parts/NAME``."""

    name: str
    shard: str
    first: int = 1
    last: int | None = None

    def describe(self) -> str:
        if self.first == 1 and self.last is None:
            return self.shard
        return f"{self.shard} lines {self.first}-{'end' if self.last is None else self.last}"


class Plan(msgspec.Struct):
    partitions: list[Partition] = []
    lines: int | None = None
    """Lines per partition of a split input (None: inputs are not split)."""
    version: int = 1


def is_partitioned(root: Path) -> bool:
    """Was the job in ``root`` run by workers (does it have a plan)?"""
    return (root / PLAN_NAME).is_file()


def read_plan(root: Path) -> Plan | None:
    path = root / PLAN_NAME
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        return msgspec.json.decode(data, type=Plan)
    except msgspec.DecodeError as exc:
        raise OutputError(f"{path} is not a partition plan asyncgen wrote ({exc})") from exc


def part_dirs(root: Path) -> list[Path]:
    """Every partition's directory, in plan order (empty for a one-process job)."""
    plan = read_plan(root)
    if plan is None:
        return []
    return [root / PARTS_DIR / p.name for p in plan.partitions]


def open_partitioned(
    root: Path, spec: dict[str, Any], *, version: str, job: dict[str, Any] | None
) -> DirLock:
    """Lock ``root`` for a run by workers and record the job's manifest there; refuses a
    directory of another job, or one a one-process run has written results into (its
    ledger would not be seen by the partitions)."""
    lock = DirLock(root)
    try:
        if (root / MANIFEST_NAME).exists():
            old = read_manifest(root, dict)
            held = _one_process_records(root)
            if old.fingerprint != fingerprint(spec) and (held or is_partitioned(root)):
                raise OutputError(other_job(root, old.spec, spec))
        if _one_process_records(root):
            raise OutputError(
                f"{root} holds results of a run without --workers; continue it without "
                "--workers, or use a new --output directory for a run by several workers"
            )
        write_manifest(root, spec, version=version, job=job)
    except BaseException:
        lock.release()
        raise
    return lock


def _one_process_records(root: Path) -> bool:
    ledger = root / "ledger.zst"
    return ledger.exists() and ledger.stat().st_size > 0


def plan_partitions(
    root: Path,
    inputs: Sequence[Input],
    *,
    workers: int,
    lines: int | None = None,
    say: Callable[[str], None] = lambda _: None,
) -> tuple[Plan, list[tuple[Partition, Input]]]:
    """The job's plan, extended for inputs it does not cover yet (and written), and this
    run's work: the partitions of ``inputs``, each with its input, in plan order.

    ``lines``: split each new input into ranges of that many lines (counting them first); by
    default an input is one partition, unless there are fewer inputs than ``workers``, in
    which case new inputs are split so that there are about four partitions a worker. A
    plan, once written, keeps its partitions whatever the later runs ask."""
    plan = read_plan(root) or Plan(lines=lines)
    planned = {p.shard for p in plan.partitions}
    new = [i for i in inputs if shard_name(i) not in planned]
    if new:
        size = plan.lines if plan.partitions else lines
        counts: dict[str, int] = {}
        if size is None and not plan.partitions and len(new) < workers:
            for each in new:
                say(f"counting the lines of {each} to split it among {workers} workers")
                counts[shard_name(each)] = count_lines(each)
            size = max(1, math.ceil(sum(counts.values()) / (4 * workers)))
        partitions = list(plan.partitions)
        for each in new:
            shard = shard_name(each)
            if size is None:
                partitions.append(Partition(_name(len(partitions)), shard))
                continue
            if shard not in counts:
                say(f"counting the lines of {each} to split it into ranges of {size:,}")
                counts[shard] = count_lines(each)
            total = max(1, counts[shard])
            for first in range(1, total + 1, size):
                last = first + size - 1
                # The last range is open: a shard that grows later is not cut off.
                end = None if last >= total else last
                partitions.append(Partition(_name(len(partitions)), shard, first, end))
        plan = Plan(partitions=partitions, lines=size)
        with atomic_write(root / PLAN_NAME) as f:
            f.write(msgspec.json.format(msgspec.json.encode(plan)) + b"\n")
    by_shard = {shard_name(i): i for i in inputs}
    work = [(p, by_shard[p.shard]) for p in plan.partitions if p.shard in by_shard]
    return plan, work


def _name(index: int) -> str:
    return f"p{index + 1:06d}"
