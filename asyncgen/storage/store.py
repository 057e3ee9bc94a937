"""The output directory: manifest, lock, ledger log, result/failure/error shards, recovery.

Layout::

    OUT/manifest.json                  the job spec this directory belongs to (no secrets)
    OUT/ledger.zst                     one line per committed frame: (file, end offset, ids)
    OUT/results-000001.jsonl.zst       successes   (error is null)
    OUT/failures-000001.jsonl.zst      permanent failures (error is an object)
    OUT/errors-000001.jsonl.zst        input lines that could not become requests
    OUT/.lock                          held (flock) while a process writes here

Commit protocol: a batch is appended to the data shards as complete zstd frames (one, or a
few compressed at once for a large batch) and synced; only then is its ledger line appended,
and its ids marked done. The ledger is an index of the shards, so it is not synced: what a
power loss takes from it is rebuilt from the shards. Recovery after a crash: the ledger's torn
or lost tail is cut; every shard is compared with the end offset the ledger last recorded for
it; complete frames past that offset (not, or no longer, in the ledger) are synced, read back
and added to the ledger; an incomplete frame is cut off. Every method blocks: the
engine calls them from a thread.
"""

from __future__ import annotations

import operator
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from asyncgen.core.errors import OutputError
from asyncgen.core.ledger import Ledger, bad_line_key, pack_ids
from asyncgen.core.records import BadLine, Result
from asyncgen.storage.files import DirLock, fsync_path
from asyncgen.storage.manifest import (
    MANIFEST_NAME,
    fingerprint,
    other_job,
    read_manifest,
    write_manifest,
)
from asyncgen.storage.shards import ZSTD_MAGIC, FrameWriter, repair_tail, scan_frames

__all__ = ["KINDS", "SHARD_RE", "Store"]

KINDS = ("results", "failures", "errors")
SHARD_RE = re.compile(r"^(results|failures|errors)-(\d{6})\.jsonl\.zst$")
"""The name of a result, failure or error shard: kind and sequence number."""
_LEDGER = "ledger.zst"
_PLAN = "partitions.json"
"""A partitioned job's plan (:mod:`asyncgen.storage.partitions`): such a directory's records
are in its partitions' stores, never in one at the top."""
DEFAULT_SHARD_BYTES = 512 << 20
_PIECE_RECORDS = 256
"""Fewest records in a frame of a batch spread over several frames (one per thread)."""
_custom_id = operator.attrgetter("custom_id")
_replaces_failure = operator.attrgetter("replaces_failure")


class _Entry(msgspec.Struct, array_like=True, omit_defaults=True):
    """One ledger line: ``file`` holds these ids in its bytes before ``end``. Persona ids
    are mostly packed into ``runs`` (bitmaps; see :func:`asyncgen.core.ledger.pack_ids`), so a
    job with a billion results resumes without parsing a billion strings."""

    file: str
    end: int
    ids: list[str]
    runs: list[tuple[str, str, str, int, bytes]] = []
    replaced: int = 0
    """How many of these records supersede an earlier failure (``asyncgen retry-failed``)."""

    def count(self) -> int:
        return len(self.ids) + sum(int.from_bytes(r[4], "little").bit_count() for r in self.runs)


class _IdView(msgspec.Struct):
    custom_id: str
    replaces_failure: bool = False


_T = TypeVar("_T")
_entry_decoder = msgspec.json.Decoder(_Entry)
_id_decoder = msgspec.json.Decoder(_IdView)


class Store:
    """An open output directory. Use :meth:`open`; :meth:`close` releases the lock."""

    def __init__(self, root: Path, lock: DirLock, max_shard_bytes: int) -> None:
        self.root = root
        self.ledger = Ledger()
        self.counts = dict.fromkeys(KINDS, 0)
        """Records per kind in the shards, across all runs into this directory."""
        self.replaced = 0
        """Records that supersede an earlier failure: ``counts["failures"] - replaced``
        failures are still standing."""
        self.recovered_bytes = 0
        """Bytes of torn frames cut off while opening."""
        self._lock = lock
        self._max_shard_bytes = max_shard_bytes
        self._seq = 0
        self._writers: dict[str, FrameWriter] = {}
        self._ledger_writer: FrameWriter | None = None
        self._encoder = msgspec.json.Encoder()
        # Commits and close take turns: a commit's thread cannot be stopped, so one that a
        # cancelled caller left running must end before the next commit or close begins.
        self._turn = threading.Lock()

    # --- opening ------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: Path,
        spec: Mapping[str, Any],
        *,
        version: str,
        job: Mapping[str, Any] | None = None,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    ) -> Store:
        """Open (or create) ``root`` for the job ``spec``, recovering from any earlier crash.

        ``job`` (the settings of this run, without secrets) is recorded in the manifest next
        to the spec, so that tools (``asyncgen retry-failed``) can run the job again."""
        store = cls(root, DirLock(root), max_shard_bytes)
        try:
            store._check_manifest(spec, version, job)
            store._recover()
        except BaseException:
            store.close()
            raise
        return store

    def _holds_records(self) -> bool:
        return any(
            (SHARD_RE.match(p.name) or p.name == _LEDGER) and p.stat().st_size > 0
            for p in self.root.iterdir()
        )

    def _check_manifest(
        self, spec: Mapping[str, Any], version: str, job: Mapping[str, Any] | None
    ) -> None:
        if (self.root / _PLAN).exists():
            raise OutputError(
                f"{self.root} holds a job run by several workers (--workers); run it again "
                "with --workers (any number), or use a new --output directory"
            )
        if (self.root / MANIFEST_NAME).exists():
            old = read_manifest(self.root, dict)  # the job settings are not the store's concern
            if old.fingerprint != fingerprint(spec) and self._holds_records():
                raise OutputError(other_job(self.root, old.spec, spec))
            # A job that stopped before committing anything (a typo in the model, say) leaves
            # a manifest but no records: the directory is free for the corrected job.
        elif any(SHARD_RE.match(p.name) for p in self.root.iterdir()):
            raise OutputError(
                f"{self.root} holds result shards but no {MANIFEST_NAME}; refusing to mix"
            )
        write_manifest(self.root, spec, version=version, job=job)

    def _recover(self) -> None:
        ledger_path = self.root / _LEDGER
        ends: dict[str, int] = {}
        if ledger_path.exists():
            valid_end = 0
            for end, payload in scan_frames(ledger_path):
                valid_end = end
                for line in payload.splitlines():
                    entry = _decode_or_refuse(_entry_decoder, line, ledger_path)
                    self._count(entry.file, entry.count())
                    self.replaced += entry.replaced
                    self.ledger.recover(_ledger_keys(entry.file, entry.ids))
                    self.ledger.recover_runs(entry.runs)
                    ends[entry.file] = max(ends.get(entry.file, 0), entry.end)
            self.recovered_bytes += repair_tail(ledger_path, valid_end)
        missing = sorted(f for f in ends if not (self.root / f).is_file())
        if missing:
            # Its ids count as done; carrying on would lose those records silently.
            raise OutputError(
                f"{self.root / missing[0]} is missing, but {_LEDGER} records results in it; "
                "restore it, or start over in a new --output directory"
            )
        # The ledger is an index of the shards: its lines are written after their frames are
        # durable, but not synced themselves. Lines a power loss takes with it are rebuilt
        # from the shards' frames past the last end it recorded, just above and below.
        self._ledger_writer = FrameWriter(ledger_path, sync=False)
        for path in sorted(self.root.iterdir()):
            match = SHARD_RE.match(path.name)
            if not match:
                continue
            self._seq = max(self._seq, int(match.group(2)))
            known = ends.get(path.name, 0)
            size = path.stat().st_size
            if size < known:
                raise OutputError(
                    f"{path} is shorter ({size} bytes) than the ledger records ({known}); "
                    "it was modified outside asyncgen"
                )
            if size == known:
                continue
            with open(path, "rb") as f:
                f.seek(known)
                head = f.read(4)
            if not ZSTD_MAGIC.startswith(head):
                # Past the recorded end there may only be whole or torn frames of ours.
                raise OutputError(
                    f"{path} does not continue with a zstd frame at byte {known}, where "
                    f"{_LEDGER} says its last commit ended; was it rewritten outside asyncgen?"
                )
            # What lies past the recorded end was written by a process that may have died
            # before syncing it: sync it now, before ledger lines name it.
            fsync_path(path)
            end = known
            for end, payload in scan_frames(path, known):
                views = [
                    _decode_or_refuse(_id_decoder, line, path) for line in payload.splitlines()
                ]
                ids = [v.custom_id for v in views]
                replaced = sum(v.replaces_failure for v in views)
                self.replaced += replaced
                self._log(path.name, end, ids, replaced)
                self._count(path.name, len(ids))
                self.ledger.recover(_ledger_keys(path.name, ids))
            self.recovered_bytes += repair_tail(path, end)

    def _count(self, file: str, n: int) -> None:
        self.counts[file.split("-", 1)[0]] += n

    # --- committing ---------------------------------------------------------------------------

    def commit(self, results: Iterable[Result], bad_lines: Iterable[BadLine] = ()) -> list[str]:
        """Durably append a batch; return its ledger keys (the caller commits them in
        :attr:`ledger`: custom_ids, and :func:`bad_line_key` of bad lines)."""
        with self._turn:
            if self._ledger_writer is None:
                raise OutputError(f"the store for {self.root} is closed")
            try:
                return self._commit(results, bad_lines)
            except OSError as exc:
                raise OutputError(f"cannot write to {self.root}: {exc.strerror or exc}") from exc

    def _commit(self, results: Iterable[Result], bad_lines: Iterable[BadLine]) -> list[str]:
        results = results if isinstance(results, list) else list(results)
        failed = [r for r in results if r.error is not None]
        groups: dict[str, list[Result] | list[BadLine]] = {
            "results": [r for r in results if r.error is None] if failed else results,
            "failures": failed,
            "errors": list(bad_lines),
        }
        entries: list[_Entry] = []
        ids: list[str] = []
        for kind, records in groups.items():
            if not records:
                continue
            writer = self._writer(kind)
            end = writer.append_frames(self._encoded(records, writer.threads))
            keys = list(map(_custom_id, records))
            replaced = 0 if kind == "errors" else sum(map(_replaces_failure, records))
            entries.append(_entry(writer.path.name, end, keys, replaced))
            self._count(writer.path.name, len(records))
            self.replaced += replaced
            ids.extend(_ledger_keys(writer.path.name, keys))
        if entries:
            assert self._ledger_writer is not None
            self._ledger_writer.append(self._encoder.encode_lines(entries))
        return ids

    def _encoded(self, records: list[Result] | list[BadLine], threads: int) -> Iterator[bytes]:
        """The records as JSON lines, in one payload per frame: a large batch is spread over
        up to ``threads`` frames, compressed at once while the next is encoded."""
        pieces = min(threads, len(records) // _PIECE_RECORDS)
        if pieces < 2:
            yield self._encoder.encode_lines(records)
            return
        step = -(-len(records) // pieces)
        for start in range(0, len(records), step):
            yield self._encoder.encode_lines(records[start : start + step])

    def _log(self, file: str, end: int, ids: list[str], replaced: int) -> None:
        assert self._ledger_writer is not None
        entry = _entry(file, end, ids, replaced)
        self._ledger_writer.append(self._encoder.encode(entry) + b"\n")

    def _writer(self, kind: str) -> FrameWriter:
        writer = self._writers.get(kind)
        if writer is None or writer.size >= self._max_shard_bytes:
            if writer is not None:
                writer.close()
            self._seq += 1
            path = self.root / f"{kind}-{self._seq:06d}.jsonl.zst"
            try:
                writer = FrameWriter(path)
                fsync_path(self.root)
            except OSError as exc:
                raise OutputError(f"cannot create {path}: {exc.strerror}") from exc
            self._writers[kind] = writer
        return writer

    def close(self) -> None:
        """Close the files (after a commit still running in another thread) and unlock."""
        with self._turn:
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()
            if self._ledger_writer is not None:
                self._ledger_writer.close()
                self._ledger_writer = None
            self._lock.release()

    def __repr__(self) -> str:
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items())
        return f"<Store {self.root} {counts}>"


def _entry(file: str, end: int, ids: list[str], replaced: int = 0) -> _Entry:
    if file.startswith("errors-"):
        return _Entry(file, end, ids)  # bad-line ids are not persona ids
    rest, runs = pack_ids(ids)
    return _Entry(file, end, rest, runs, replaced)


def _ledger_keys(file: str, ids: list[str]) -> list[str]:
    return [bad_line_key(i) for i in ids] if file.startswith("errors-") else ids


def _decode_or_refuse(decoder: msgspec.json.Decoder[_T], line: bytes, path: Path) -> _T:
    try:
        return decoder.decode(line)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise OutputError(
            f"{path} holds a line that asyncgen did not write ({exc}); "
            "was it modified outside asyncgen?"
        ) from exc
