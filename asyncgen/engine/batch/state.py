"""What a job's batches are on disk, under ``OUT/batch/``: the job's token, the parts
(``NAME.items.jsonl``), the journal of what happened to them, and the names of retry parts.
Synchronous; the backend calls it from threads where it reads or writes much."""

from __future__ import annotations

import contextlib
import os
import signal
import uuid
from pathlib import Path

import msgspec

from asyncgen.core.records import WorkItem
from asyncgen.storage.files import atomic_write, fsync_path

__all__ = [
    "BATCH_DIR",
    "JOURNAL",
    "META_JOB",
    "META_PART",
    "TERMINAL",
    "TOKEN",
    "Event",
    "JobBatches",
    "Journal",
    "Part",
    "Token",
    "crash_point",
    "job_token",
    "retry_name",
    "round_of",
]

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
BATCH_DIR = "batch"
JOURNAL = "journal.jsonl"
TOKEN = "job.json"
META_JOB = "asyncgen_job"
META_PART = "asyncgen_part"
CRASH_ENV = "ASYNCGEN_BATCH_CRASH"
"""Tests only: ``uploaded``, ``journaled``, ``created``, ``ingest`` or
``retried`` (a retry part written, its parent not yet logged as ingested) makes the
process SIGKILL itself at that point (once the flag file named by the value after ``:``
does not exist, which it then creates), so that a crash test can stop it exactly there."""


class Event(msgspec.Struct, omit_defaults=True):
    part: str
    event: str
    """``uploaded``, ``created`` or ``ingested``."""
    file_id: str | None = None
    batch_id: str | None = None


class Token(msgspec.Struct):
    job: str


_item_decoder = msgspec.json.Decoder(WorkItem)
_event_decoder = msgspec.json.Decoder(Event)


def crash_point(point: str) -> None:
    wanted = os.environ.get(CRASH_ENV)
    if not wanted:
        return
    name, _, flag = wanted.partition(":")
    if name != point or (flag and os.path.exists(flag)):
        return
    if flag:
        Path(flag).touch()
    os.kill(os.getpid(), signal.SIGKILL)


def job_token(root: Path) -> str:
    """The job's name in its batches' metadata: made once, kept in ``OUT/batch/job.json``
    (two output directories running the same spec are two jobs)."""
    path = root / BATCH_DIR / TOKEN
    with contextlib.suppress(FileNotFoundError):
        return msgspec.json.decode(path.read_bytes(), type=Token).job
    (root / BATCH_DIR).mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    with atomic_write(path) as f:
        f.write(msgspec.json.encode(Token(token)))
    return token


class Journal:
    """The append-only journal: one fsynced JSON line per event; a torn last line is cut."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.events: list[Event] = []
        data = path.read_bytes() if path.exists() else b""
        keep = data.rfind(b"\n") + 1
        for raw in data[:keep].splitlines():
            self.events.append(_event_decoder.decode(raw))
        self._file = open(path, "ab")  # noqa: SIM115 - held open for the run
        if keep != len(data):
            self._file.truncate(keep)
        fsync_path(path.parent)

    def append(self, event: Event) -> None:
        self._file.write(msgspec.json.encode(event) + b"\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.events.append(event)

    def close(self) -> None:
        self._file.close()


class Part(msgspec.Struct, kw_only=True):
    name: str
    round: int
    file_id: str | None = None
    batch_id: str | None = None
    ingested: bool = False


def round_of(name: str) -> int:
    base, _, retry = name.rpartition("-r")
    return int(retry) if base and retry.isdigit() else 0


def retry_name(name: str) -> str:
    base, _, retry = name.rpartition("-r")
    if base and retry.isdigit():
        return f"{base}-r{int(retry) + 1}"
    return f"{name}-r1"


class JobBatches:
    """A job's parts as the output directory records them (synchronous, for status tools)."""

    def __init__(self, root: Path) -> None:
        self.dir = root / BATCH_DIR
        self.parts: dict[str, Part] = {}
        for path in sorted(self.dir.glob("*.items.jsonl")) if self.dir.exists() else []:
            name = path.name.removesuffix(".items.jsonl")
            self.parts[name] = Part(name=name, round=round_of(name))
        journal = self.dir / JOURNAL
        if journal.exists():
            data = journal.read_bytes()
            for raw in data[: data.rfind(b"\n") + 1].splitlines():
                self.apply(_event_decoder.decode(raw))

    def apply(self, event: Event) -> None:
        part = self.parts.get(event.part)
        if part is None:
            return
        if event.event == "uploaded":
            part.file_id = event.file_id
        elif event.event == "created":
            part.batch_id = event.batch_id
        elif event.event == "ingested":
            part.ingested = True

    def items_path(self, name: str) -> Path:
        return self.dir / f"{name}.items.jsonl"

    def read_items(self, name: str) -> dict[str, WorkItem]:
        items: dict[str, WorkItem] = {}
        with open(self.items_path(name), "rb") as f:
            for raw in f:
                item = _item_decoder.decode(raw)
                items[item.custom_id] = item
        return items

    def write_items(self, name: str, items: list[WorkItem]) -> None:
        encoder = msgspec.json.Encoder()
        with atomic_write(self.items_path(name)) as f:
            for item in items:
                f.write(encoder.encode(item) + b"\n")
        self.parts[name] = Part(name=name, round=round_of(name))
