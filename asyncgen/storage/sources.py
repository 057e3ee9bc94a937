"""Streaming readers for input shards: JSON lines (plain, zstd, gzip or xz) and Parquet.

Memory is bounded by the read chunk and the batch size, never by file size. Lines come with
their location (shard, 1-based line number) so errors and ids can name them. Reading blocks:
the engine calls :meth:`ShardReader.read_batch` from a thread.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Generator, Iterator, Sequence
from pathlib import Path

from asyncgen.core.errors import ConfigError, InputError
from asyncgen.core.records import Line
from asyncgen.core.redact import redact_url
from asyncgen.storage.formats import CorruptFile, Decoder, Input, Remote, open_decoder

__all__ = ["Input", "ShardReader", "count_lines", "expand_inputs", "shard_name"]

_MAX_LINE = 256 << 20
_COMPRESSED = (".zst", ".zstd", ".gz", ".xz")
_SUFFIXES = (*_COMPRESSED, ".jsonl", ".ndjson", ".json", ".parquet")


def _supported(name: str) -> bool:
    """Whether a file in an input directory is one to read, by its name (``.json`` files
    are not: beside shards they are usually a manifest or a report, not JSON lines)."""
    if name.startswith("."):
        return False
    base = next((name[: -len(s)] for s in _COMPRESSED if name.endswith(s)), name)
    return base.endswith((".jsonl", ".ndjson")) or name.endswith(".parquet")


def shard_name(path: str | Input) -> str:
    """The file name without compression and format extensions: ids are built from it."""
    name = path.name if isinstance(path, Remote) else Path(path).name
    changed = True
    while changed:
        changed = False
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and len(name) > len(suffix):
                name = name[: -len(suffix)]
                changed = True
    return name


def expand_inputs(patterns: Sequence[str]) -> list[Input]:
    """Resolve files, directories, glob patterns and URLs (through fsspec), in the given
    order (each glob and each directory's supported files sorted), without repeats.

    Two inputs with the same shard name would give the same ids, so that is refused.
    """
    paths: list[Input] = []
    seen: set[Input] = set()

    def add(path: Input) -> None:
        if path.resolve() not in seen:
            seen.add(path.resolve())
            paths.append(path)

    for pattern in patterns:
        if "://" in pattern:
            for remote in _remote_inputs(pattern):
                add(remote)
            continue
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise ConfigError(f"no input file matches {pattern!r}")
        else:
            if not os.path.lexists(pattern):
                raise ConfigError(f"input file not found: {pattern}")
            matches = [pattern]
        for match in matches:
            path = Path(match)
            if path.is_dir():
                inside = sorted(p for p in path.iterdir() if _supported(p.name) and p.is_file())
                if not inside and not glob.has_magic(pattern):
                    raise ConfigError(
                        f"input directory {match} holds no input file "
                        "(.jsonl or .ndjson, plain or .zst/.gz/.xz, or .parquet)"
                    )
                for inner in inside:
                    add(inner)
                continue
            if path.is_symlink() and not path.exists():
                raise ConfigError(f"input {match} is a broken symlink or a symlink loop")
            if not path.is_file():
                # Ids are line numbers in a named file; a pipe cannot be read again on resume.
                raise ConfigError(
                    f"input {match} is not a regular file (a pipe or device?); "
                    "write it to a file first, so a rerun can resume"
                )
            add(path)
    if any(each.name.endswith(".parquet") for each in paths):
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise ConfigError(
                "Parquet inputs need pyarrow: pip install 'asyncgen[parquet]'"
            ) from None
    names: dict[str, Input] = {}
    for each in paths:
        other = names.setdefault(shard_name(each), each)
        if other is not each:
            raise ConfigError(
                f"inputs {other} and {each} have the same shard name {shard_name(each)!r}; "
                "result ids would collide, rename one"
            )
    return paths


def _remote_inputs(url: str) -> list[Remote]:
    """A URL's inputs: the file it names; or, on an object store or any filesystem that
    lists (not HTTP, whose "directories" are web pages), the sorted files a glob pattern
    matches or the supported files in a directory (``s3://bucket/personas/``)."""
    scheme = url.partition("://")[0].lower()
    if scheme in ("http", "https") or not (glob.has_magic(url) or url.endswith("/")):
        return [Remote(url)]
    fs, path = Remote.filesystem(url)
    shown = redact_url(url)
    try:
        if glob.has_magic(path):
            matched = fs.glob(path, detail=True)
            found = sorted(p for p, info in matched.items() if info.get("type") == "file")
            if not found:
                raise ConfigError(f"no input file matches {shown!r}")
        else:
            listed = fs.ls(path.rstrip("/"), detail=True)
            found = sorted(
                info["name"]
                for info in listed
                if info.get("type") == "file" and _supported(info["name"].rpartition("/")[2])
            )
            if not found:
                raise ConfigError(
                    f"input directory {shown} holds no input file "
                    "(.jsonl or .ndjson, plain or .zst/.gz/.xz, or .parquet)"
                )
    except FileNotFoundError:
        raise ConfigError(f"input not found: {shown}") from None
    except ConfigError:
        raise
    except Exception as exc:  # each filesystem has its own errors
        raise ConfigError(f"cannot list input {shown}: {type(exc).__name__}: {exc}") from None
    return [Remote(fs.unstrip_protocol(p)) for p in found]


class ShardReader:
    """Reads one shard in batches of lines; tracks compressed bytes consumed for progress."""

    def __init__(self, path: Input, *, first: int = 1, last: int | None = None) -> None:
        """``first`` and ``last`` (1-based, inclusive; None: to the end) limit the lines
        handed out to a range (a partition of a job run by several workers): lines before
        ``first`` are passed over unread and uncounted, and reading ends after ``last``."""
        self.path = path
        self.shard = shard_name(path)
        self.size = path.stat().st_size
        self.first = first
        self.last = last
        self._lineno = 0
        self.skipped = 0
        """Lines passed over because ``read_batch`` was told they are done."""
        self._failure: InputError | None = None
        self._decoder: Decoder | None = None
        """Chosen at the first read (by the file's first bytes), in the reading thread."""
        self._lines = self._iter_lines()

    def read_batch(self, n: int, done: bytes | None = None) -> list[Line]:
        """Up to ``n`` lines; an empty list at the end. Raises :class:`InputError`.

        ``done`` is a bitmap by line number of lines not to hand out (a resumed job's finished
        work): they are only counted, in :attr:`skipped`. A batch may then hold fewer than
        ``n`` lines; it is returned after ``16 * n`` lines at most, so a caller stays in touch.
        """
        if self._failure is not None:
            raise self._failure
        batch: list[Line] = []
        path = str(self.path)
        budget = 16 * n
        first, last = self.first, self.last
        try:
            for raw in self._lines:
                self._lineno += 1
                lineno = self._lineno
                if lineno < first:
                    budget -= 1
                    if budget <= 0:
                        break
                    continue
                if last is not None and lineno > last:
                    self._lines.close()  # the range is read: the next call returns nothing
                    break
                if (
                    done is not None
                    and lineno >> 3 < len(done)
                    and done[lineno >> 3] >> (lineno & 7) & 1
                ):
                    self.skipped += 1
                    budget -= 1
                    if budget <= 0:
                        break
                    continue
                batch.append(Line(path, self.shard, lineno, raw))
                if len(batch) >= n:
                    break
        except InputError as exc:
            if not batch:
                raise
            self._failure = exc  # hand out the good lines first; fail on the next call
        return batch

    @property
    def position(self) -> int:
        """Bytes of the (possibly compressed) file consumed so far."""
        return self._decoder.position if self._decoder is not None else 0

    @property
    def lineno(self) -> int:
        """Number of the last line read (blank lines included)."""
        return self._lineno

    def close(self) -> None:
        """Close the file before the end (reading to the end closes it too)."""
        self._lines.close()

    def _iter_lines(self) -> Generator[bytes, None, None]:
        try:
            try:
                decoder = self._decoder = open_decoder(self.path)
            except OSError as exc:
                raise CorruptFile(f"cannot read it ({type(exc).__name__}: {exc})") from exc
            if decoder.rows:
                yield from decoder.records()
            else:
                yield from self._split(decoder.records())
        except CorruptFile as exc:
            raise self._error(str(exc)) from exc

    def _split(self, chunks: Iterator[bytes]) -> Generator[bytes, None, None]:
        pending = b""
        partial: list[bytes] = []  # pieces of a line longer than a chunk: joined once, at its end
        partial_size = 0
        for chunk in chunks:
            if b"\n" not in chunk:
                partial.append(chunk)
                partial_size += len(chunk)
                if len(pending) + partial_size > _MAX_LINE:
                    raise self._error(
                        f"line {self._lineno + 1} is longer than {_MAX_LINE >> 20} MiB; "
                        "is this a JSON-lines file?"
                    )
                continue
            if partial:
                chunk = pending + b"".join(partial) + chunk
                pending, partial, partial_size = b"", [], 0
            else:
                chunk = pending + chunk
            lines = chunk.split(b"\n")
            pending = lines.pop()
            for line in lines:
                if line.strip():
                    yield line.rstrip(b"\r")
                else:
                    self._lineno += 1  # blank lines keep their number, but are not records
        pending += b"".join(partial)
        if pending.strip():
            yield pending.rstrip(b"\r")

    def _error(self, message: str) -> InputError:
        n = self._lineno
        kept = f"lines 1-{n} were read" if n else "no line was read before it"
        return InputError(f"{message}; {kept}", path=str(self.path))

    def __repr__(self) -> str:
        return f"<ShardReader {self.path} line={self._lineno} {self.position}/{self.size} bytes>"


def count_lines(path: Input) -> int:
    """The number of the last line of ``path`` (blank lines counted, as line numbers count
    them): one pass over the file, for splitting it into line ranges. A damaged file counts
    up to the damage: the reader that runs its lines names the damage where it is recorded."""
    reader = ShardReader(path)
    try:
        while reader.read_batch(8192):
            pass
    except InputError:
        pass
    finally:
        reader.close()
    return reader.lineno
