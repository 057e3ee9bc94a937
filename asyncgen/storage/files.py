"""The one place for durable file operations: fsync, write-then-rename, the directory lock.

Everything that must be complete-or-absent on disk (the manifest, persona shards, exports)
goes through :class:`AtomicFile`: written to a temporary file beside its destination, synced,
renamed over it, and the directory synced, so a crash leaves the old file or the whole new
one. A directory that one process writes at a time (an output directory, a persona pipeline)
is held with :class:`DirLock`, an ``flock`` on ``DIR/.lock`` that the kernel drops when the
process dies, so no stale lock ever needs cleaning up.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from asyncgen.core.errors import BusyError, OutputError

__all__ = ["LOCK_NAME", "AtomicFile", "DirLock", "atomic_write", "fsync_path", "is_locked"]

LOCK_NAME = ".lock"


def fsync_path(path: Path) -> None:
    """Make a file's contents, or a directory's entries (a created or renamed file),
    durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cannot(path: Path, exc: OSError, what: str = "write") -> OutputError:
    return OutputError(f"cannot {what} {path}: {exc.strerror or exc}")


class AtomicFile:
    """A temporary file beside ``path`` that :meth:`commit` moves over it in one step.

    :attr:`file` is open for binary writing. :meth:`commit` syncs it, renames it into place
    and syncs the directory; :meth:`discard` removes it and leaves ``path`` as it was. As a
    context manager it commits on success and discards on any exception. Failures to write
    raise :class:`~asyncgen.core.errors.OutputError` naming ``path``.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
            )
        except OSError as exc:
            raise _cannot(self.path, exc) from exc
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide results from the user's group
        self.tmp = Path(tmp)
        self.file: BinaryIO = os.fdopen(fd, "wb")

    def commit(self) -> None:
        """Make the new content durable and put it at ``path``."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
            fsync_path(self.path.parent)
        except OSError as exc:
            self.discard()
            raise _cannot(self.path, exc) from exc

    def discard(self) -> None:
        """Remove the temporary file; ``path`` is left as it was."""
        with contextlib.suppress(OSError):
            self.file.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[BinaryIO]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` is the whole new content
    after the block, or unchanged if it raised. An ``OSError`` while writing becomes
    :class:`~asyncgen.core.errors.OutputError` naming ``path``."""
    with AtomicFile(path) as atomic:
        try:
            yield atomic.file
        except OSError as exc:
            raise _cannot(atomic.path, exc) from exc


class DirLock:
    """An exclusive, non-blocking ``flock`` on ``root/.lock`` (``root`` is created).

    Held until :meth:`release` (or the end of the ``with`` block, or the process). A second
    holder, in this process or another, gets :class:`~asyncgen.core.errors.OutputError`.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
            fd = os.open(root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot use output directory {root}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise BusyError(
                f"output directory {root} is in use by another asyncgen process"
            ) from exc
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self) -> DirLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"<DirLock {self.root} {'held' if self._fd is not None else 'released'}>"


def is_locked(root: Path) -> bool:
    """Does a process (another one, or this one through another descriptor) hold
    ``root``'s lock? Reading tools use it to say that a job is running."""
    try:
        fd = os.open(root / LOCK_NAME, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return False
