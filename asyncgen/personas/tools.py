"""Persona selection and deduplication: ``asyncgen personas sample|filter|stats|dedup``.

Every command streams its input shards (``.jsonl`` or ``.jsonl.zst``) through
:class:`PersonaReader`, so memory does not grow with input size: ``sample`` holds its N
records, ``stats`` a few histograms (and one hash per distinct persona, to count copies),
``dedup`` what :mod:`.dedup` keeps per *kept* persona. Output lines are the input lines
byte for byte (every field kept), written to a temporary file that is renamed over ``--output``
only when the command succeeds; a name ending in ``.zst`` is zstd-compressed.

A bad line (not JSON, not an object, no persona string) is named with file and line on stderr,
counted, and left out; ``--strict`` stops at the first one instead. Exit status: 0 done,
1 done but bad lines were left out, 2 usage or input error (nothing written).
"""

from __future__ import annotations

import argparse
import heapq
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

import msgspec

from asyncgen.cli.args import add_inputs, number, positive_int
from asyncgen.core.errors import ConfigError, InputError
from asyncgen.core.records import Line, bad_utf8
from asyncgen.storage.shards import LinesWriter
from asyncgen.storage.sources import ShardReader, expand_inputs, shard_name

__all__ = [
    "BadLine",
    "DedupSummary",
    "LengthSummary",
    "LinesWriter",
    "Persona",
    "PersonaFilter",
    "PersonaReader",
    "PersonaStats",
    "StatsCollector",
    "add_commands",
    "dedup_files",
    "reservoir_sample",
]

T = TypeVar("T")
EXIT_OK, EXIT_BAD_LINES = 0, 1
_BATCH = 2048
_LINE_BITS = 40  # dedup keys: input index << 40 | line number
_WORD = re.compile(r"\w+")
_STOPWORD_TEXT = (
    "a an and are as at be been but by for from has have he her his i in into is it its me my "
    "not of on or our s she so than that the their them they this to was we were what when "
    "where which who whom with you your"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


class Persona(NamedTuple):
    """One good input line and its persona text."""

    line: Line
    text: str


class BadLine(NamedTuple):
    """An input line (or, with ``lineno`` None, a shard) that was left out, and why."""

    path: str
    shard: str
    lineno: int | None
    reason: str

    def __str__(self) -> str:
        where = self.path if self.lineno is None else f"{self.path}:{self.lineno}"
        return f"{where}: {self.reason}"


class PersonaReader:
    """Streams the personas of several shards in order, in batches; counts what it passes over.

    ``on_bad`` hears of every bad line; with ``strict`` the first one raises
    :class:`InputError` instead. A corrupt or truncated ``.zst`` shard is one bad entry
    (its good lines before the damage are read) and reading goes on with the next shard.
    """

    def __init__(
        self,
        inputs: Sequence[str],
        *,
        field: str = "persona",
        strict: bool = False,
        on_bad: Callable[[BadLine], None] | None = None,
    ) -> None:
        self.paths = expand_inputs(inputs)
        self.field = field
        self.strict = strict
        self.on_bad = on_bad
        self.records = 0
        self.bad = 0
        view = msgspec.defstruct("PersonaView", [("text", object, None)], rename={"text": field})
        self._decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(view)

    def batches(self, size: int = _BATCH) -> Iterator[list[Persona]]:
        for path in self.paths:
            reader = ShardReader(path)
            while True:
                try:
                    lines = reader.read_batch(size)
                except InputError as exc:
                    self._bad(BadLine(str(path), reader.shard, None, exc.reason))
                    break
                if not lines:
                    break
                batch = []
                for line in lines:
                    text = self._text(line)
                    if text is not None:
                        batch.append(Persona(line, text))
                self.records += len(batch)
                if batch:
                    yield batch

    def __iter__(self) -> Iterator[Persona]:
        for batch in self.batches():
            yield from batch

    def _text(self, line: Line) -> str | None:
        try:
            text = self._decoder.decode(line.raw).text
        except msgspec.ValidationError:
            reason = "not a JSON object"
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            reason = bad_utf8(line.raw, exc) or str(exc)  # "JSON is malformed: ... (byte N)"
        else:
            if isinstance(text, str) and text.strip():
                return text
            if text is None:
                reason = f"no {self.field!r} field"
            elif isinstance(text, str):
                reason = f"{self.field!r} is empty"
            else:
                reason = f"{self.field!r} must be a string, not {type(text).__name__}"
        self._bad(BadLine(line.path, line.shard, line.lineno, reason))
        return None

    def _bad(self, bad: BadLine) -> None:
        if self.strict:
            raise InputError(bad.reason, path=bad.path, line=bad.lineno)
        self.bad += 1
        if self.on_bad is not None:
            self.on_bad(bad)


def reservoir_sample(items: Iterable[T], n: int, *, seed: int) -> list[T]:
    """A uniform random sample of ``n`` items (all, if fewer), in input order; O(n) memory.

    Algorithm R: item i (0-based) replaces a random slot with probability n / (i + 1).
    The same items, ``n`` and ``seed`` always give the same sample.
    """
    rng = random.Random(seed)
    reservoir: list[tuple[int, T]] = []
    for i, item in enumerate(items):
        if i < n:
            reservoir.append((i, item))
        else:
            j = rng.randrange(i + 1)
            if j < n:
                reservoir[j] = (i, item)
    reservoir.sort(key=lambda pair: pair[0])
    return [item for _, item in reservoir]


class PersonaFilter:
    """Which personas to keep: each kind of condition given must hold (AND across kinds).

    ``keywords``: any of the words or phrases occurs as a whole word, ignoring case;
    ``regexes``: any pattern matches somewhere in the text (``re.search``);
    ``where``: ``(field, value)`` pairs; a field must equal one of its values (pairs naming the
    same field are alternatives, different fields must all match). A string field is compared
    as it is, any other value as its JSON text (``age=30``, ``verified=true``).
    ``invert`` keeps exactly the personas the conditions reject.
    """

    def __init__(
        self,
        *,
        keywords: Sequence[str] = (),
        regexes: Sequence[str] = (),
        where: Sequence[tuple[str, str]] = (),
        invert: bool = False,
    ) -> None:
        if any(not k.strip() for k in keywords):
            raise ConfigError("--keyword must not be empty")
        self._keyword = None
        if keywords:
            alternatives = "|".join(re.escape(k.strip()) for k in keywords)
            self._keyword = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", re.IGNORECASE)
        self._regexes = []
        for pattern in regexes:
            try:
                self._regexes.append(re.compile(pattern))
            except re.error as exc:
                raise ConfigError(f"--regex {pattern!r} is not a valid pattern: {exc}") from exc
        self._where: dict[str, set[str]] = {}
        for field, value in where:
            self._where.setdefault(field, set()).add(value)
        self.invert = invert

    def __call__(self, persona: Persona) -> bool:
        return self._matches(persona) != self.invert

    def _matches(self, persona: Persona) -> bool:
        if self._keyword is not None and not self._keyword.search(persona.text):
            return False
        if self._regexes and not any(r.search(persona.text) for r in self._regexes):
            return False
        if self._where:
            record = msgspec.json.decode(persona.line.raw)
            for field, values in self._where.items():
                value = record.get(field)
                if value is None and field not in record:
                    return False
                text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
                if text not in values:
                    return False
        return True


class LengthSummary(msgspec.Struct, frozen=True):
    min: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: int


class PersonaStats(msgspec.Struct, frozen=True):
    """What ``asyncgen personas stats`` reports."""

    records: int
    bad_lines: int
    exact_duplicates: int
    """Records whose normalised text (as ``dedup`` sees it) appeared before."""
    chars: LengthSummary | None
    words: LengthSummary | None
    top_terms: list[tuple[str, int]]
    top_terms_exact: bool
    """False once the vocabulary outgrew the counter: counts are then lower bounds."""


class StatsCollector:
    """Streaming statistics: exact length percentiles from histograms; top terms from a bounded
    Misra-Gries counter (exact while the vocabulary stays under ``max_terms``)."""

    def __init__(self, *, top: int = 20, max_terms: int = 100_000) -> None:
        from asyncgen.personas.dedup import exact_key, normalise

        self._key: Callable[[str], bytes] = lambda text: exact_key(normalise(text))
        self.top = top
        self.max_terms = max_terms
        self._chars: Counter[int] = Counter()
        self._words: Counter[int] = Counter()
        self._terms: Counter[str] = Counter()
        self._undercount = 0
        self._seen: set[bytes] = set()
        self._records = 0

    def add(self, text: str) -> None:
        self._records += 1
        self._chars[len(text)] += 1
        self._words[len(text.split())] += 1
        self._seen.add(self._key(text))
        self._terms.update(
            w for w in _WORD.findall(text.casefold()) if w not in _STOPWORDS and not w.isdigit()
        )
        if len(self._terms) > 2 * self.max_terms:
            # Misra-Gries in bulk: take the (max_terms+1)-th count off every term.
            cut = heapq.nlargest(self.max_terms + 1, self._terms.values())[-1]
            self._undercount += cut
            self._terms = Counter({t: c - cut for t, c in self._terms.items() if c > cut})

    def result(self, bad_lines: int = 0) -> PersonaStats:
        return PersonaStats(
            records=self._records,
            bad_lines=bad_lines,
            exact_duplicates=self._records - len(self._seen),
            chars=_summary(self._chars),
            words=_summary(self._words),
            top_terms=self._terms.most_common(self.top),
            top_terms_exact=self._undercount == 0,
        )


def _summary(histogram: Counter[int]) -> LengthSummary | None:
    n = histogram.total()
    if not n:
        return None
    values = sorted(histogram.items())
    mean = sum(v * c for v, c in values) / n
    return LengthSummary(
        min=values[0][0],
        mean=round(mean, 2),
        p50=_percentile(values, n, 50),
        p90=_percentile(values, n, 90),
        p99=_percentile(values, n, 99),
        max=values[-1][0],
    )


def _percentile(values: list[tuple[int, int]], n: int, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), from a histogram."""
    rank = q / 100 * (n - 1)
    low, frac = int(rank), rank - int(rank)

    def at(k: int) -> int:
        seen = 0
        for value, count in values:
            seen += count
            if k < seen:
                return value
        return values[-1][0]

    lo = at(low)
    return float(lo) if frac == 0 else round(lo + (at(low + 1) - lo) * frac, 2)


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
    _refuse_overwrite(reader.paths, output, report_path)
    index = {str(p): i for i, p in enumerate(reader.paths)}
    shards = [shard_name(p) for p in reader.paths]

    def ident(key: int) -> str:
        return f"{shards[key >> _LINE_BITS]}:{key & ((1 << _LINE_BITS) - 1)}"

    encoder = msgspec.json.Encoder()
    with LinesWriter(output) as out, LinesWriter(report_path) as rep:

        def bad(line: BadLine) -> None:
            where = line.shard if line.lineno is None else f"{line.shard}:{line.lineno}"
            rep.write(encoder.encode(DropRecord(where, "bad", None, None, line.reason)))
            if on_bad is not None:
                on_bad(line)

        reader.on_bad = bad
        for batch in reader.batches():
            keys = [index[p.line.path] << _LINE_BITS | p.line.lineno for p in batch]
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


def peak_rss_mb() -> float | None:
    """This process's peak resident memory so far, in MB (None where it cannot be known)."""
    if sys.platform == "win32":
        return None
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / (1 << 20) if sys.platform == "darwin" else rss / 1024, 1)


def _refuse_overwrite(inputs: Sequence[Path], *outputs: str | Path) -> None:
    resolved = {p.resolve() for p in inputs}
    for out in outputs:
        if Path(out).resolve() in resolved:
            raise ConfigError(f"output {out} is one of the inputs; write to another file")
    if len(outputs) > 1 and len({Path(o).resolve() for o in outputs}) < len(outputs):
        raise ConfigError("--report must differ from --output")


# --- command line -----------------------------------------------------------------------------


class _BadLog:
    """Names the first bad lines on stderr, then only counts them."""

    def __init__(self, command: str, limit: int = 20, stream: IO[str] | None = None) -> None:
        self.command = command
        self.limit = limit
        self.stream = stream if stream is not None else sys.stderr
        self.count = 0

    def __call__(self, bad: BadLine) -> None:
        self.count += 1
        if self.count <= self.limit:
            self.stream.write(f"asyncgen: {self.command}: skipped {bad}\n")

    def close(self) -> None:
        if self.count > self.limit:
            self.stream.write(
                f"asyncgen: {self.command}: ... {self.count - self.limit} more bad lines skipped "
                "(--strict stops at the first)\n"
            )


def _status(bad_lines: int) -> int:
    return EXIT_BAD_LINES if bad_lines else EXIT_OK


def _run_sample(args: argparse.Namespace) -> int:
    log = _BadLog("sample")
    reader = PersonaReader(args.input, field=args.field, strict=args.strict, on_bad=log)
    _refuse_overwrite(reader.paths, args.output)
    with LinesWriter(args.output) as out:
        for persona in reservoir_sample(reader, args.n, seed=args.seed):
            out.write(persona.line.raw)
    log.close()
    sys.stderr.write(
        f"asyncgen: sample: {out.lines:,} of {reader.records:,} records (seed {args.seed}), "
        f"{reader.bad:,} bad lines -> {args.output}\n"
    )
    return _status(reader.bad)


def _run_filter(args: argparse.Namespace) -> int:
    keep = PersonaFilter(
        keywords=args.keyword, regexes=args.regex, where=args.where, invert=args.invert
    )
    log = _BadLog("filter")
    reader = PersonaReader(args.input, field=args.field, strict=args.strict, on_bad=log)
    _refuse_overwrite(reader.paths, args.output)
    with LinesWriter(args.output) as out:
        for persona in reader:
            if keep(persona):
                out.write(persona.line.raw)
    log.close()
    share = f" ({out.lines / reader.records:.1%})" if reader.records else ""
    sys.stderr.write(
        f"asyncgen: filter: kept {out.lines:,} of {reader.records:,} records{share}, "
        f"{reader.bad:,} bad lines -> {args.output}\n"
    )
    return _status(reader.bad)


def _run_stats(args: argparse.Namespace) -> int:
    log = _BadLog("stats")
    reader = PersonaReader(args.input, field=args.field, strict=args.strict, on_bad=log)
    collector = StatsCollector(top=args.top)
    for persona in reader:
        collector.add(persona.text)
    log.close()
    stats = collector.result(reader.bad)
    if args.json:
        sys.stdout.write(msgspec.json.encode(stats).decode() + "\n")
    else:
        sys.stdout.write(format_stats(stats))
    return _status(reader.bad)


def format_stats(s: PersonaStats) -> str:
    """The human-readable table ``stats`` prints without ``--json``."""
    lines = [
        f"records            {s.records:,}",
        f"bad lines          {s.bad_lines:,}",
        f"exact duplicates   {s.exact_duplicates:,}",
    ]
    if s.chars is not None and s.words is not None:
        lines.append(
            f"{'length':10} {'min':>7} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>7}"
        )
        for name, d in (("chars", s.chars), ("words", s.words)):
            cells = f"{d.min:7} {d.mean:9.1f} {d.p50:9.1f} {d.p90:9.1f} {d.p99:9.1f} {d.max:7}"
            lines.append(f"{name:10} {cells}")
    if s.top_terms:
        exact = "" if s.top_terms_exact else " (approximate: counts are lower bounds)"
        lines.append(f"top terms{exact}:")
        lines.extend(f"  {term:24} {count:,}" for term, count in s.top_terms)
    return "\n".join(lines) + "\n"


def _run_dedup(args: argparse.Namespace) -> int:
    log = _BadLog("dedup")
    s = dedup_files(
        args.input,
        args.output,
        report=args.report,
        field=args.field,
        threshold=args.threshold,
        num_perm=args.num_perm,
        near=not args.no_near,
        strict=args.strict,
        on_bad=log,
    )
    log.close()
    rss = "" if s.peak_rss_mb is None else f", peak RSS {s.peak_rss_mb:,.0f} MB"
    sys.stderr.write(
        f"asyncgen: dedup: read {s.read:,} records, kept {s.kept:,}; dropped {s.exact:,} exact "
        f"and {s.near:,} near duplicates; {s.bad_lines:,} bad lines; {s.seconds:.1f} s{rss}\n"
        f"asyncgen: dedup: output {s.output}, report {s.report}\n"
    )
    return _status(s.bad_lines)


def _fraction(text: str) -> float:
    value = number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _field_value(text: str) -> tuple[str, str]:
    field, eq, value = text.partition("=")
    if not eq or not field:
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
    return field, value


_EPILOG = (
    "Bad lines (not JSON, no persona string) are named on stderr and left out; --strict stops "
    "at the first. Exit status: 0 done; 1 done, but bad lines were left out; 2 usage or input "
    "error (nothing written)."
)


def _common(p: argparse.ArgumentParser, *, output: bool = True) -> None:
    add_inputs(p, "persona shards: .jsonl or .jsonl.zst files or globs, read in the order given")
    if output:
        p.add_argument(
            "--output",
            "-o",
            required=True,
            metavar="FILE",
            help="where to write the selected lines, unchanged (.jsonl.zst: zstd; else plain); "
            "written to a temporary file and renamed into place at the end",
        )
    p.add_argument(
        "--field",
        default="persona",
        metavar="NAME",
        help="the field holding the persona text (default: %(default)s)",
    )
    p.add_argument("--strict", action="store_true", help="stop at the first bad line (exit 2)")


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register this module's ``asyncgen personas`` subcommands."""
    sample = sub.add_parser(
        "sample",
        help="a uniform random sample of N personas over all shards",
        description="Pick N personas uniformly at random from all input shards together "
        "(reservoir sampling: one pass, memory for N records). The same inputs, N and seed "
        "give the same sample; the sample keeps input order. Fewer than N records: all of them.",
        epilog=_EPILOG,
    )
    _common(sample)
    sample.add_argument("-n", type=positive_int, required=True, help="how many personas")
    sample.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    sample.set_defaults(handler=_run_sample)

    filt = sub.add_parser(
        "filter",
        help="keep the personas matching keywords, patterns or field values",
        description="Keep personas that match every kind of condition given: any --keyword, "
        "any --regex, and for each field named by --where one of its values. "
        "The kept/total count goes to stderr.",
        epilog=_EPILOG,
    )
    _common(filt)
    filt.add_argument(
        "--keyword",
        action="append",
        default=[],
        metavar="WORD",
        help="a word or phrase matched as a whole word, ignoring case ('nurse' does not match "
        "'nursery'); repeat for alternatives",
    )
    filt.add_argument(
        "--regex",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a Python regular expression searched in the persona text (case-sensitive unless "
        "it starts with (?i)); repeat for alternatives",
    )
    filt.add_argument(
        "--where",
        action="append",
        default=[],
        type=_field_value,
        metavar="FIELD=VALUE",
        help="another field must equal VALUE exactly (non-strings compare as JSON text: "
        "age=30); repeat a field for alternatives, name several fields to require all",
    )
    filt.add_argument("--invert", action="store_true", help="keep the personas that do not match")
    filt.set_defaults(handler=_run_filter)

    stats = sub.add_parser(
        "stats",
        help="counts, lengths, top terms and exact duplicates of persona shards",
        description="One streaming pass: record and bad-line counts, length in characters and "
        "words (min, mean, p50, p90, p99, max; exact), the most frequent words (lowercased, "
        "without stopwords and numbers) and how many personas are exact copies of an earlier "
        "one after normalisation (as dedup sees them).",
        epilog=_EPILOG,
    )
    _common(stats, output=False)
    stats.add_argument("--json", action="store_true", help="print one JSON object instead")
    stats.add_argument(
        "--top", type=positive_int, default=20, metavar="N", help="top terms (default: 20)"
    )
    stats.set_defaults(handler=_run_stats)

    dedup = sub.add_parser(
        "dedup",
        help="drop exact and near-duplicate personas (MinHash LSH), keeping the first",
        description="One pass in input order. A persona whose normalised text (NFKC, "
        "casefolded, whitespace collapsed, punctuation stripped at the ends) was seen before is "
        "an exact duplicate; otherwise one whose word set has an estimated Jaccard similarity "
        "of at least --threshold with a kept persona (MinHash with --num-perm permutations, LSH "
        "to find candidates) is a near duplicate. The first of each group is written, unchanged; "
        "every other line gets a report line: id (shard:line), reason (exact, near, bad), "
        "duplicate_of and similarity. Memory: about 1.4 KB per kept persona at the defaults "
        "(about 150 B with --no-near).",
        epilog=_EPILOG,
    )
    _common(dedup)
    dedup.add_argument(
        "--report",
        metavar="FILE",
        help="JSON-lines report of dropped lines (default: the output name with its extensions "
        "replaced by .dedup-report.jsonl)",
    )
    dedup.add_argument(
        "--threshold",
        type=_fraction,
        default=0.9,
        help="least estimated Jaccard similarity of word sets for a near duplicate "
        "(default: %(default)s, as Persona Hub)",
    )
    dedup.add_argument(
        "--num-perm",
        type=positive_int,
        default=128,
        metavar="N",
        help="MinHash permutations, 16 to 1024 (default: %(default)s)",
    )
    dedup.add_argument(
        "--no-near", action="store_true", help="exact duplicates only (fast, little memory)"
    )
    dedup.set_defaults(handler=_run_dedup)
