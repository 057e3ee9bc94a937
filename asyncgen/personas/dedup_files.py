"""Deduplicating persona shards: :func:`dedup_files` streams them through
:class:`~asyncgen.personas.dedup.Deduplicator` and writes the kept lines, byte for byte, and a
report of every line left out (an exact or near copy, or a bad line)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import msgspec

from asyncgen.core.errors import ConfigError
from asyncgen.personas.reader import BadLine, PersonaReader, refuse_overwrite
from asyncgen.storage.formats import Input
from asyncgen.storage.shards import LinesWriter
from asyncgen.storage.sources import shard_name

__all__ = [
    "DedupSummary",
    "DropRecord",
    "LineKeys",
    "bad_line_reporter",
    "dedup_files",
    "default_report_path",
    "peak_rss_mb",
]

_LINE_BITS = 40  # dedup keys: input index << 40 | line number


class LineKeys:
    """Integer keys for the personas of ``paths`` (input index << 40 | line number), and
    back to ``shard:line`` for the report."""

    def __init__(self, paths: Sequence[Input]) -> None:
        self._index = {str(p): i for i, p in enumerate(paths)}
        self._shards = [shard_name(p) for p in paths]

    def key(self, path: str, lineno: int) -> int:
        return self._index[path] << _LINE_BITS | lineno

    def ident(self, key: int) -> str:
        return f"{self._shards[key >> _LINE_BITS]}:{key & ((1 << _LINE_BITS) - 1)}"


class DropRecord(msgspec.Struct):
    """One line of a dedup report: an input line that is not in the output."""

    id: str
    reason: str
    """``exact``, ``near`` or ``bad``."""
    duplicate_of: str | None
    similarity: float | None
    error: str | None = None


class DedupSummary(msgspec.Struct, frozen=True):
    read: int
    kept: int
    exact: int
    near: int
    bad_lines: int
    seconds: float
    peak_rss_mb: float | None
    output: str
    report: str


def default_report_path(output: str | Path) -> Path:
    """``out/p.jsonl.zst`` -> ``out/p.dedup-report.jsonl``."""
    out = Path(output)
    return out.with_name(f"{shard_name(out)}.dedup-report.jsonl")


def dedup_files(
    inputs: Sequence[str],
    output: str | Path,
    *,
    report: str | Path | None = None,
    field: str = "persona",
    threshold: float = 0.9,
    num_perm: int = 128,
    near: bool = True,
    strict: bool = False,
    on_bad: Callable[[BadLine], None] | None = None,
) -> DedupSummary:
    """Write the first of each group of exact or near duplicates to ``output``, one report line
    for every other input line (dropped copies and bad lines) to ``report``."""
    started = time.perf_counter()
    report_path = Path(report) if report is not None else default_report_path(output)
    from asyncgen.personas.dedup import (
        Deduplicator,  # numpy and datasketch load only for the commands using them
    )

    try:
        dedup = Deduplicator(threshold=threshold, num_perm=num_perm, near=near)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    reader = PersonaReader(inputs, field=field, strict=strict)
    refuse_overwrite(reader.paths, output, report_path)
    keying = LineKeys(reader.paths)
    ident = keying.ident
    encoder = msgspec.json.Encoder()
    with LinesWriter(output) as out, LinesWriter(report_path) as rep:
        reader.on_bad = bad_line_reporter(rep, encoder, on_bad)
        for batch in reader.batches():
            keys = [keying.key(p.line.path, p.line.lineno) for p in batch]
            verdicts = dedup.check_batch([p.text for p in batch], keys)
            for persona, key, verdict in zip(batch, keys, verdicts, strict=True):
                if verdict.reason == "keep":
                    out.write(persona.line.raw)
                    continue
                assert verdict.duplicate_of is not None
                drop = DropRecord(
                    ident(key), verdict.reason, ident(verdict.duplicate_of), verdict.similarity
                )
                rep.write(encoder.encode(drop))
    s = dedup.statistics()
    return DedupSummary(
        read=s.seen,
        kept=s.kept,
        exact=s.exact,
        near=s.near,
        bad_lines=reader.bad,
        seconds=round(time.perf_counter() - started, 3),
        peak_rss_mb=peak_rss_mb(),
        output=str(output),
        report=str(report_path),
    )


def bad_line_reporter(
    rep: LinesWriter, encoder: msgspec.json.Encoder, on_bad: Callable[[BadLine], None] | None
) -> Callable[[BadLine], None]:
    """What a dedup does with a bad line: a ``bad`` report line, then ``on_bad``."""

    def bad(line: BadLine) -> None:
        where = line.shard if line.lineno is None else f"{line.shard}:{line.lineno}"
        rep.write(encoder.encode(DropRecord(where, "bad", None, None, line.reason)))
        if on_bad is not None:
            on_bad(line)

    return bad


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where it cannot be known)."""
    if sys.platform == "win32":
        return None
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1 << 20) if sys.platform == "darwin" else rss / 1024, 1)
