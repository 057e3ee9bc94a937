"""Semantic dedup of persona shards: :func:`semantic_dedup_files` reads the vectors of an
embedding job over the same shards, streams the shards through
:class:`~asyncgen.personas.semantic.SemanticDeduplicator`, and writes the kept lines, byte
for byte, and a report line for every line left out."""

from __future__ import annotations

import contextlib
import itertools
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec

from asyncgen.core.errors import ConfigError, InputError, OutputError
from asyncgen.personas.dedup_files import (
    DropRecord,
    LineKeys,
    bad_line_reporter,
    default_report_path,
    peak_rss_mb,
)
from asyncgen.personas.reader import BadLine, PersonaReader, refuse_overwrite
from asyncgen.personas.semantic import NPROBE, SemanticDeduplicator, modules
from asyncgen.storage.shards import LinesWriter
from asyncgen.storage.vectors import iter_vectors

__all__ = ["SemanticSummary", "VectorTable", "load_vectors", "semantic_dedup_files"]

_CHUNK = 65_536


class SemanticSummary(msgspec.Struct, frozen=True):
    read: int
    kept: int
    dropped: int
    without_vector: int
    """Personas the embedding job has no vector for (kept: nothing says they are copies)."""
    bad_lines: int
    dimensions: int | None
    seconds: float
    peak_rss_mb: float | None
    output: str
    report: str


class VectorTable:
    """An embedding job's vectors as one float16 matrix, and each source line's row."""

    def __init__(self, matrix: Any, rows: dict[tuple[str, int], int]) -> None:
        self.matrix = matrix
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)


def load_vectors(job_dir: str | Path) -> VectorTable:
    """Every vector of the embedding job in ``job_dir`` (float16: 2 bytes a dimension, ample
    for cosines to three decimals), by ``(shard, line)`` of the line it embeds."""
    import numpy as np

    rows: dict[tuple[str, int], int] = {}
    chunks: list[Any] = []
    pending: list[bytes] = []
    width: int | None = None

    def flush() -> None:
        block = np.frombuffer(b"".join(pending), dtype="<f4").reshape(len(pending), -1)
        chunks.append(block.astype(np.float16))
        pending.clear()

    for source, raw in iter_vectors(Path(job_dir)):
        if width is None:
            width = len(raw)
        elif len(raw) != width:
            raise InputError(
                f"{job_dir}: vectors of {len(raw) // 4} and {width // 4} dimensions in one job"
            )
        key = (source.shard, source.line)
        if key in rows:
            raise InputError(f"{job_dir}: two vectors for {source.shard}:{source.line}")
        rows[key] = len(rows)
        pending.append(raw)
        if len(pending) >= _CHUNK:
            flush()
    if pending:
        flush()
    if not chunks:
        raise InputError(f"{job_dir}: the embedding job has no vectors yet")
    matrix = np.concatenate(chunks) if len(chunks) > 1 else chunks[0]
    return VectorTable(matrix, rows)


def semantic_dedup_files(
    inputs: Sequence[str],
    output: str | Path,
    *,
    embeddings: str | Path,
    report: str | Path | None = None,
    field: str = "persona",
    threshold: float = 0.9,
    nprobe: int | None = None,
    index_shard_size: int | None = None,
    strict: bool = False,
    on_bad: Callable[[BadLine], None] | None = None,
) -> SemanticSummary:
    """Write every persona of ``inputs`` whose vector (from the embedding job in
    ``embeddings``) is below ``threshold`` cosine to all kept before it; one report line for
    every other input line (a semantic copy or a bad line). ``index_shard_size``: keep the
    index in shards of that many vectors, each full one written beside ``output`` (a
    temporary directory, removed at the end) and searched memory-mapped."""
    started = time.perf_counter()
    report_path = Path(report) if report is not None else default_report_path(output)

    with contextlib.ExitStack() as stack:
        spill = None
        if index_shard_size is not None:
            parent = Path(output).resolve().parent
            where = Path(
                stack.enter_context(
                    tempfile.TemporaryDirectory(dir=parent, prefix=".semantic-index-")
                )
            )
            spill = _spiller(where)
        try:
            dedup = SemanticDeduplicator(
                threshold=threshold,
                nprobe=NPROBE if nprobe is None else nprobe,
                shard_size=index_shard_size,
                spill=spill,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return _dedup(
            dedup, inputs, output, embeddings, report_path, field, strict, on_bad, started
        )


def _spiller(where: Path) -> Callable[[Any], Any]:
    """Write a full index shard into ``where`` and give back its memory-mapped copy."""
    _, faiss = modules()
    numbers = itertools.count()

    def spill(index: Any) -> Any:
        path = where / f"shard-{next(numbers):05d}.faiss"
        try:
            faiss.write_index(index, str(path))
        except RuntimeError as exc:
            raise OutputError(f"cannot write the index shard {path}: {exc}") from None
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)

    return spill


def _dedup(
    dedup: SemanticDeduplicator,
    inputs: Sequence[str],
    output: str | Path,
    embeddings: str | Path,
    report_path: Path,
    field: str,
    strict: bool,
    on_bad: Callable[[BadLine], None] | None,
    started: float,
) -> SemanticSummary:
    reader = PersonaReader(inputs, field=field, strict=strict)
    refuse_overwrite(reader.paths, output, report_path)
    table = load_vectors(embeddings)
    dedup.expect(len(table))
    keying = LineKeys(reader.paths)
    ident = keying.ident
    missing = 0

    encoder = msgspec.json.Encoder()
    with LinesWriter(output) as out, LinesWriter(report_path) as rep:
        reader.on_bad = bad_line_reporter(rep, encoder, on_bad)
        for batch in reader.batches():
            found = [table.rows.get((p.line.shard, p.line.lineno)) for p in batch]
            with_vector = [i for i, row in enumerate(found) if row is not None]
            missing += len(batch) - len(with_vector)
            keys = [keying.key(batch[i].line.path, batch[i].line.lineno) for i in with_vector]
            vectors = table.matrix[[found[i] for i in with_vector]]
            verdicts = iter(dedup.check_block(vectors, keys))
            for i, persona in enumerate(batch):
                verdict = next(verdicts) if found[i] is not None else None
                if verdict is None or verdict.kept:
                    out.write(persona.line.raw)
                    continue
                assert verdict.neighbour is not None
                drop = DropRecord(
                    f"{persona.line.shard}:{persona.line.lineno}",
                    "semantic",
                    ident(verdict.neighbour),
                    verdict.similarity,
                )
                rep.write(encoder.encode(drop))
    s = dedup.statistics()
    return SemanticSummary(
        read=s.seen + missing,
        kept=s.kept + missing,
        dropped=s.dropped,
        without_vector=missing,
        bad_lines=reader.bad,
        dimensions=s.dimensions,
        seconds=round(time.perf_counter() - started, 3),
        peak_rss_mb=peak_rss_mb(),
        output=str(output),
        report=str(report_path),
    )
