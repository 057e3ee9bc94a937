"""How many records the inputs hold, counted beside the job (for progress: done / total, ETA).

A Parquet file says it in its footer; a local JSON-lines file (plain or compressed) is read
once more and its lines counted. A remote JSON-lines file is not: that would fetch it twice,
so the total stays unknown (None) and progress falls back to the share of bytes read.

:class:`RecordCount` counts in a daemon thread of its own, at the lowest CPU priority the
system grants it, and never makes the job wait: the total is None until every input is
counted, and a job that ends first simply stops the count (:meth:`RecordCount.close`). The
decoders release the GIL while they inflate, and counting a chunk's newlines is a C call, so
the event loop is hardly held up (benchmarks/README.md, progress).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Sequence

from asyncgen.storage.formats import CorruptFile, Input, Remote, open_decoder

__all__ = ["RecordCount", "count_records"]


def count_records(path: Input, stop: threading.Event | None = None) -> int | None:
    """Records in ``path`` (lines that are not blank may be a few fewer: blank lines are
    counted too); None when it cannot be known cheaply, the file is damaged (the job names
    it), or ``stop`` was set."""
    try:
        decoder = open_decoder(path)
        if decoder.rows:
            return _parquet_rows(path)
        if isinstance(path, Remote):
            return None
        lines = 0
        last = b"\n"
        for chunk in decoder.records():
            if stop is not None and stop.is_set():
                return None
            lines += chunk.count(b"\n")
            last = chunk
        return lines + (not last.endswith(b"\n"))
    except (CorruptFile, OSError, ValueError):
        return None


def _parquet_rows(path: Input) -> int | None:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    with path.open() if isinstance(path, Remote) else open(path, "rb") as f:
        try:
            rows: int = pq.ParquetFile(f).metadata.num_rows
        except Exception:  # pyarrow's errors have no common base; the job reports the damage
            return None
    return rows


class RecordCount:
    """The records of ``paths``, counted in a background thread once :meth:`start` is called;
    :attr:`total` is None until all are counted (or for ever, when one cannot be)."""

    def __init__(self, paths: Sequence[Input]) -> None:
        self._paths = list(paths)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.total: int | None = None

    def start(self) -> None:
        if self._thread is None and self._paths:
            # A daemon thread: a job (or an interpreter) that ends first is not held up.
            self._thread = threading.Thread(target=self._count, name="asyncgen-count")
            self._thread.daemon = True
            self._thread.start()

    def close(self) -> None:
        """Stop counting (the thread ends at its next chunk)."""
        self._stop.set()

    def _count(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            # Linux gives each thread its own nice value: the count takes only idle CPU.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        total = 0
        for path in self._paths:
            n = count_records(path, self._stop)
            if n is None:
                return
            total += n
        self.total = total

    def __repr__(self) -> str:
        state = "counting" if self.total is None else f"total={self.total}"
        return f"<RecordCount {len(self._paths)} inputs {state}>"
