"""Append-only files of complete zstd frames, and the repair of a torn tail.

A shard is a concatenation of independent zstd frames, each holding whole JSON lines, so
``zstdcat``, ``zstandard`` and any multi-frame zstd reader read it as it is. The frames of one
append (one, or a few for a large batch) are written with one ``write`` and synced before
anything refers to them; a crash can therefore leave at most one incomplete frame at the end,
which :func:`scan_frames` detects and :func:`repair_tail` cuts off, after complete frames that
nothing refers to yet (the store's recovery reads those back). :class:`LinesWriter` is the
other kind of output file: written whole (an export, a persona shard), then renamed into
place. All functions here block: call them from a thread.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

import zstandard

from asyncgen.core.errors import OutputError
from asyncgen.storage.files import AtomicFile

__all__ = [
    "ZSTD_MAGIC",
    "FrameWriter",
    "LinesWriter",
    "iter_lines",
    "repair_tail",
    "scan_frames",
    "usable_cpus",
]

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
"""The first four bytes of every zstd frame."""
_READ_CHUNK = 1 << 20
_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


class FrameWriter:
    """Appends compressed frames to one file; each :meth:`append` is durable when it returns
    (unless the writer was made with ``sync=False``, for a file that is only an index)."""

    def __init__(
        self, path: Path, *, level: int = 1, threads: int | None = None, sync: bool = True
    ) -> None:
        """``threads``: how many frames of one append may be compressed at once (by default
        one per usable core, up to four): zstd releases the GIL, so helper threads compress
        while the caller produces the next payload, where cores are free."""
        self.path = path
        self.threads = max(1, threads if threads is not None else min(4, usable_cpus()))
        self._level = level
        self._sync = sync
        # One compressor per frame of an append: a compression context is not thread-safe.
        self._compressors: list[zstandard.ZstdCompressor] = []
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.size = os.fstat(self._fd).st_size

    def append(self, payload: bytes) -> int:
        """Compress ``payload`` into one frame and append it; return the new file size."""
        return self.append_frames((payload,))

    def append_frames(self, payloads: Iterable[bytes]) -> int:
        """Compress each payload (whole lines) into a frame of its own, append them all with
        one write and make them durable; return the new file size.

        ``payloads`` may be a generator: with more than one thread, each payload but the
        last is handed to a helper thread as soon as the next one is asked for, so producing
        and compressing overlap."""
        frames: list[bytes | concurrent.futures.Future[bytes]] = []
        last: bytes | None = None
        try:
            for payload in payloads:
                if last is not None:
                    compress = self._compressor(len(frames)).compress
                    frames.append(
                        self._helpers().submit(compress, last)
                        if self.threads > 1
                        else compress(last)
                    )
                last = payload
            if last is not None:
                frames.append(self._compressor(len(frames)).compress(last))
            data = b"".join(f if isinstance(f, bytes) else f.result() for f in frames)
        except BaseException:
            # No compressor may be left in use by a helper when the next append starts.
            concurrent.futures.wait([f for f in frames if not isinstance(f, bytes)])
            raise
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self._sync and data:
            # fdatasync writes the data and the metadata needed to read it back, the file
            # size included (all that an append changes); fsync would add the timestamps.
            _datasync(self._fd)
        self.size += len(data)
        return self.size

    def _compressor(self, index: int) -> zstandard.ZstdCompressor:
        while len(self._compressors) <= index:
            self._compressors.append(
                zstandard.ZstdCompressor(level=self._level, write_checksum=True)
            )
        return self._compressors[index]

    def _helpers(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.threads - 1, thread_name_prefix="asyncgen-zstd"
            )
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"<FrameWriter {self.path} size={self.size}>"


def scan_frames(path: Path, start: int = 0) -> Iterator[tuple[int, bytes]]:
    """Yield ``(end_offset, payload)`` for each complete, valid frame from ``start`` on.

    Stops silently at the first incomplete or corrupt frame; the last ``end_offset`` yielded
    (or ``start``) is where the valid data ends.
    """
    dctx = zstandard.ZstdDecompressor()
    with open(path, "rb") as f:
        f.seek(start)
        offset = start
        pending = b""
        obj = dctx.decompressobj()
        parts: list[bytes] = []
        consumed = 0  # bytes of `pending` fed to the current frame
        while True:
            chunk = f.read(_READ_CHUNK)
            if not chunk:
                return
            pending = chunk
            while pending:
                try:
                    out = obj.decompress(pending)
                except zstandard.ZstdError:
                    return
                if out:
                    parts.append(out)
                if not obj.eof:
                    consumed += len(pending)
                    pending = b""
                    break
                rest = obj.unused_data
                consumed += len(pending) - len(rest)
                offset += consumed
                yield offset, b"".join(parts)
                parts, consumed, pending = [], 0, rest
                obj = dctx.decompressobj()


def repair_tail(path: Path, valid_end: int) -> int:
    """Cut ``path`` to ``valid_end`` bytes if it is longer; return how many bytes were cut."""
    size = path.stat().st_size
    if size <= valid_end:
        return 0
    with open(path, "r+b") as f:
        f.truncate(valid_end)
        f.flush()
        os.fsync(f.fileno())
    return size - valid_end


def iter_lines(path: Path) -> Iterator[bytes]:
    """Yield the JSON lines (without newline) of every complete frame of a shard."""
    for _, payload in scan_frames(path):
        yield from payload.splitlines()


class LinesWriter:
    """Writes lines to a new version of ``path``: complete at :meth:`commit`, or not at all.

    zstd-compressed (one frame, with checksum) when the name ends in ``.zst`` or ``.zstd``.
    Used as a context manager it commits on success and discards the new version on error;
    the temporary file, sync and rename are :class:`~asyncgen.storage.files.AtomicFile`'s.
    Failures to write raise :class:`OutputError`.
    """

    def __init__(self, path: str | Path) -> None:
        self._atomic = AtomicFile(path)
        self.path = self._atomic.path
        self._out: IO[bytes] = self._atomic.file
        if self.path.suffix in (".zst", ".zstd"):
            cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
            self._out = cctx.stream_writer(self._atomic.file, closefd=False)
        self._buffer: list[bytes] = []
        self._buffered = 0
        self.lines = 0

    def write(self, raw: bytes) -> None:
        """Append one line (``raw`` without its newline)."""
        self._buffer.append(raw)
        self._buffered += len(raw) + 1
        self.lines += 1
        if self._buffered >= 1 << 20:
            self._flush()

    def commit(self) -> None:
        """Finish the file, make it durable and move it over ``path`` in one step."""
        self._flush()
        if self._out is not self._atomic.file:
            self._write(self._out.close)  # ends the zstd frame; the file stays open
        self._atomic.commit()

    def discard(self) -> None:
        """Remove the temporary file; ``path`` is left as it was."""
        self._atomic.discard()

    def _flush(self) -> None:
        if self._buffer:
            self._buffer.append(b"")
            data = b"\n".join(self._buffer)
            self._write(lambda: self._out.write(data))
            self._buffer, self._buffered = [], 0

    def _write(self, step: Callable[[], object]) -> None:
        try:
            step()
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc

    def __enter__(self) -> LinesWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.discard()
            return
        try:
            self.commit()
        except BaseException:
            self.discard()
            raise
