"""Decoders for the input formats: each turns one file into its records' bytes, streamed.

A byte format (plain, zstd, gzip, xz JSON lines) yields decoded chunks, cut anywhere; the
reader splits them into lines. Parquet yields one JSON-encoded row at a time, so every format
reaches the job as JSON lines, and a row's number is its line number. The format is told by
the file's first bytes (a ``.jsonl`` that is really gzip is read as gzip), Parquet also by its
name. Every decoder bounds what it holds (a chunk, a batch of rows), never the whole file.

A truncated or corrupt file raises :class:`CorruptFile` naming the byte offset and the
decoder's own error; what was decoded before it has been yielded already.

An input is a local :class:`~pathlib.Path` or a :class:`Remote` URL read through fsspec (the
``remote`` extra); both are opened by :func:`open_input`.
"""

from __future__ import annotations

import gzip
import lzma
import urllib.parse
import zlib
from collections.abc import Callable, Iterator
from io import BufferedIOBase
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, TypeAlias

import msgspec
import zstandard

from asyncgen.core.errors import ConfigError
from asyncgen.core.redact import redact_url
from asyncgen.storage.shards import ZSTD_MAGIC

__all__ = ["CHUNK", "CorruptFile", "Decoder", "Input", "Remote", "open_decoder", "open_input"]

CHUNK = 1 << 20
# Compressed bytes fed to the zstd decoder at a time. Its output is not bounded per call, so
# the input is: persona text compresses 10-60x, and a 1 MiB read could inflate to 60 MB at once.
_ZSTD_CHUNK = 1 << 14
_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_PARQUET_MAGIC = b"PAR1"
_ROWS = 1024
"""Parquet rows decoded at a time (a row group is read in batches of this many)."""


class CorruptFile(Exception):
    """A file that cannot be decoded further; the message names where and why."""


class _Size(NamedTuple):
    st_size: int


class Remote:
    """An input named by a URL (``s3://``, ``gs://``, ``hf://``, ``https://``, ``file://``),
    read as a stream through fsspec. ``str()`` is the URL without credentials or query: it
    is what records, errors and the manifest name."""

    @staticmethod
    def filesystem(url: str) -> tuple[Any, str]:
        """fsspec's filesystem for ``url`` and the path in it; ConfigError without fsspec
        (or the filesystem's own package, such as s3fs for ``s3://``)."""
        try:
            import fsspec
        except ImportError:
            raise ConfigError(
                f"input {redact_url(url)} is a URL: remote inputs need fsspec, "
                "pip install 'asyncgen[remote]'"
            ) from None
        try:
            fs, path = fsspec.core.url_to_fs(url)
        except ImportError as exc:  # fsspec names the package the protocol needs
            raise ConfigError(f"input {redact_url(url)}: {exc}") from None
        except Exception as exc:  # an unknown protocol, a malformed URL
            raise ConfigError(f"input {redact_url(url)}: {type(exc).__name__}: {exc}") from None
        return fs, path

    def __init__(self, url: str) -> None:
        fs, path = self.filesystem(url)
        self.url = url
        self.name = urllib.parse.urlsplit(url).path.rstrip("/").rpartition("/")[2]
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise ConfigError(f"input not found: {self}") from None
        except Exception as exc:  # each filesystem has its own errors
            raise ConfigError(f"cannot read input {self}: {type(exc).__name__}: {exc}") from None
        if info.get("type") == "directory":
            raise ConfigError(
                f"input {self} is a remote directory; end it with / to read its files"
            )
        self._fs, self._path = fs, path
        self._size = int(info.get("size") or 0)

    def stat(self) -> _Size:
        return _Size(self._size)

    def resolve(self) -> Remote:
        return self

    def open(self) -> BinaryIO:
        f: BinaryIO = self._fs.open(self._path, "rb")
        return f

    def __str__(self) -> str:
        return redact_url(self.url)

    def __repr__(self) -> str:
        return f"<Remote {self}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


Input: TypeAlias = Path | Remote
"""A local file or a URL: what :func:`open_input` opens."""


def open_input(path: Input) -> BinaryIO:
    """``path`` opened for reading bytes."""
    return path.open() if isinstance(path, Remote) else open(path, "rb")


class Decoder:
    """Plain JSON lines: the file's bytes as they are. ``position`` counts the file's bytes
    consumed (compressed ones, for a compressed file), for progress."""

    rows = False
    """True when :meth:`records` yields whole records rather than chunks to split."""

    def __init__(self, path: Input) -> None:
        self.path = path
        self.position = 0

    def records(self) -> Iterator[bytes]:
        with open_input(self.path) as f:
            while chunk := f.read(CHUNK):
                self.position += len(chunk)
                yield chunk


class _Zstd(Decoder):
    """Concatenated zstd frames (what ``zstd`` and asyncgen's own shards write)."""

    def records(self) -> Iterator[bytes]:
        dctx = zstandard.ZstdDecompressor()
        obj = dctx.decompressobj()
        frame = 0  # where the frame being decoded starts
        in_frame = False
        with open_input(self.path) as f:
            while raw := f.read(_ZSTD_CHUNK):
                start = self.position
                self.position += len(raw)
                while raw:
                    try:
                        out = obj.decompress(raw)
                    except zstandard.ZstdError as exc:
                        raise CorruptFile(
                            f"corrupt zstd data in bytes {start}..{self.position} (the frame "
                            f"starting at byte {frame}): zstd error: {exc}"
                        ) from exc
                    in_frame = True
                    if out:
                        yield out
                    if not obj.eof:
                        break
                    raw = obj.unused_data
                    frame = self.position - len(raw)
                    obj = dctx.decompressobj()
                    in_frame = False
        if in_frame:
            raise CorruptFile(
                f"truncated zstd file: the frame starting at byte {frame} is cut off at byte "
                f"{self.position} (end of file; zstd error: incomplete frame)"
            )


class _Stdlib(Decoder):
    """gzip or xz through the standard library's streaming readers (several members or
    streams, one after another, are read as one)."""

    def __init__(
        self, path: Input, name: str, opener: Callable[[BinaryIO], BufferedIOBase]
    ) -> None:
        super().__init__(path)
        self._name = name
        self._open = opener

    def records(self) -> Iterator[bytes]:
        with open_input(self.path) as raw, self._open(raw) as f:
            while True:
                try:
                    # read1: what one step decodes; read() drops what it had at a truncation
                    chunk = f.read1(CHUNK)
                except EOFError as exc:
                    raise CorruptFile(
                        f"truncated {self._name} file: cut off at byte {raw.tell()} inside a "
                        f"compressed stream ({self._name} error: {exc})"
                    ) from exc
                except (OSError, zlib.error, lzma.LZMAError) as exc:
                    raise CorruptFile(
                        f"corrupt {self._name} data before byte {raw.tell()} "
                        f"({self._name} error: {exc})"
                    ) from exc
                self.position = raw.tell()
                if not chunk:
                    return
                yield chunk


class _Parquet(Decoder):
    """Parquet, read by row group in batches; each row a JSON object of its columns (nested
    columns as nested JSON)."""

    rows = True

    def records(self) -> Iterator[bytes]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CorruptFile(
                "a Parquet input needs pyarrow: pip install 'asyncgen[parquet]'"
            ) from None
        encode = msgspec.json.Encoder(decimal_format="number").encode
        size = self.path.stat().st_size
        raw = open_input(self.path)
        try:
            source = pq.ParquetFile(raw)
        except Exception as exc:  # pyarrow's errors have no common base (ArrowException, OSError)
            raw.close()
            raise CorruptFile(f"not a readable Parquet file (arrow error: {exc})") from exc
        with raw, source:
            total = source.metadata.num_rows or 1
            done = 0
            group = 0
            try:
                for group in range(source.num_row_groups):
                    for batch in source.iter_batches(batch_size=_ROWS, row_groups=[group]):
                        rows: list[dict[str, Any]] = batch.to_pylist()
                        done += len(rows)
                        self.position = size * done // total
                        for row in rows:
                            yield encode(row)
            except (msgspec.EncodeError, TypeError) as exc:
                raise CorruptFile(
                    f"a value in row {done} cannot be written as JSON ({exc})"
                ) from exc
            except Exception as exc:
                raise CorruptFile(
                    f"corrupt Parquet data in row group {group} (arrow error: {exc})"
                ) from exc


def open_decoder(path: Input) -> Decoder:
    """The decoder for ``path``, by its first bytes (and a ``.parquet`` name)."""
    with open_input(path) as f:
        head = f.read(6)
    if head.startswith(_PARQUET_MAGIC) or path.name.endswith(".parquet"):
        return _Parquet(path)
    if head.startswith(ZSTD_MAGIC):
        return _Zstd(path)
    if head.startswith(_GZIP_MAGIC):
        return _Stdlib(path, "gzip", lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"))
    if head.startswith(_XZ_MAGIC):
        return _Stdlib(path, "xz", lambda raw: lzma.LZMAFile(raw, "rb"))
    return Decoder(path)
