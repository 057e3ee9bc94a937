"""``asyncgen personas sample|filter|stats|dedup`` over :mod:`asyncgen.personas`.

Output lines are the input lines byte for byte (every field kept), written to a temporary file
that is renamed over ``--output`` only when the command succeeds; a name ending in ``.zst`` is
zstd-compressed. A bad line is named with file and line on stderr (the first 20), counted, and
left out; ``--strict`` stops at the first one instead. Exit status: 0 done, 1 done but bad lines
were left out, 2 usage or input error (nothing written).
"""

from __future__ import annotations

import argparse
from typing import Any

import msgspec

from asyncgen.cli.args import add_inputs, number, positive_int
from asyncgen.cli.console import error, out, say, warn
from asyncgen.cli.exits import Exit
from asyncgen.personas.dedup_files import dedup_files
from asyncgen.personas.diversity import Diversity
from asyncgen.personas.reader import BadLine, PersonaReader, refuse_overwrite
from asyncgen.personas.select import PersonaFilter, reservoir_sample
from asyncgen.personas.stats import PersonaStats, StatsCollector
from asyncgen.storage.shards import LinesWriter

__all__ = ["add_commands", "format_stats"]


class _BadLog:
    """Names the first bad lines on stderr, then only counts them."""

    def __init__(self, command: str, limit: int = 20) -> None:
        self.command = command
        self.limit = limit
        self.count = 0

    def __call__(self, bad: BadLine) -> None:
        self.count += 1
        if self.count <= self.limit:
            say(f"{self.command}: skipped {bad}")

    def close(self) -> None:
        if self.count > self.limit:
            say(
                f"{self.command}: ... {self.count - self.limit} more bad lines skipped "
                "(--strict stops at the first)"
            )


def _status(bad_lines: int) -> Exit:
    return Exit.FAILURES if bad_lines else Exit.OK


def _run_sample(args: argparse.Namespace) -> Exit:
    log = _BadLog("sample")
    reader = PersonaReader(args.input, field=args.field, strict=args.strict, on_bad=log)
    refuse_overwrite(reader.paths, args.output)
    with LinesWriter(args.output) as writer:
        for persona in reservoir_sample(reader, args.n, seed=args.seed):
            writer.write(persona.line.raw)
    log.close()
    say(
        f"sample: {writer.lines:,} of {reader.records:,} records (seed {args.seed}), "
        f"{reader.bad:,} bad lines -> {args.output}"
    )
    return _status(reader.bad)


def _run_filter(args: argparse.Namespace) -> Exit:
    keep = PersonaFilter(
        keywords=args.keyword, regexes=args.regex, where=args.where, invert=args.invert
    )
    log = _BadLog("filter")
    reader = PersonaReader(args.input, field=args.field, strict=args.strict, on_bad=log)
    refuse_overwrite(reader.paths, args.output)
    with LinesWriter(args.output) as writer:
        for persona in reader:
            if keep(persona):
                writer.write(persona.line.raw)
    log.close()
    share = f" ({writer.lines / reader.records:.1%})" if reader.records else ""
    say(
        f"filter: kept {writer.lines:,} of {reader.records:,} records{share}, "
        f"{reader.bad:,} bad lines -> {args.output}"
    )
    return _status(reader.bad)


def _run_stats(args: argparse.Namespace) -> Exit:
    log = _BadLog("stats")
    reader = PersonaReader(args.input, field=args.field, strict=args.strict, on_bad=log)
    collector = StatsCollector(top=args.top)
    for persona in reader:
        collector.add(persona.text)
    log.close()
    stats = collector.result(reader.bad)
    if args.semantic:
        if args.embeddings is None:
            error("stats --semantic needs --embeddings DIR (the output of an embedding job)")
            return Exit.USAGE
        from asyncgen.personas.diversity import diversity
        from asyncgen.personas.semantic_files import load_vectors

        spread = diversity(load_vectors(args.embeddings).matrix, seed=args.seed)
        if args.json:
            both = {"text": stats, "semantic": spread}
            out(msgspec.json.encode(both).decode())
        else:
            out(format_stats(stats) + "\n" + format_diversity(spread))
        return _status(reader.bad)
    out(msgspec.json.encode(stats).decode() if args.json else format_stats(stats))
    return _status(reader.bad)


def format_diversity(d: Diversity) -> str:
    """The similarity table ``stats --semantic`` prints without ``--json``."""
    how = "exact" if d.exact else "IVF"
    lines = [
        f"vectors            {d.vectors:,} x {d.dimensions}",
        f"{'cosine':18} {'n':>9} "
        + " ".join(f"{h:>7}" for h in ("mean", "p10", "p50", "p90", "p99", "max")),
    ]
    for name, s in ((f"nearest ({how})", d.nearest), ("random pairs", d.pairs)):
        if s is not None:
            cells = (
                f"{s.mean:7.4f} {s.p10:7.4f} {s.p50:7.4f} {s.p90:7.4f} {s.p99:7.4f} {s.max:7.4f}"
            )
            lines.append(f"{name:18} {s.count:9,} {cells}")
    return "\n".join(lines)


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
    return "\n".join(lines)


def _run_semantic_dedup(args: argparse.Namespace) -> Exit:
    if args.embeddings is None:
        error("dedup --semantic needs --embeddings DIR (the output of an embedding job)")
        return Exit.USAGE
    from asyncgen.personas.semantic_files import semantic_dedup_files

    log = _BadLog("dedup")
    s = semantic_dedup_files(
        args.input,
        args.output,
        embeddings=args.embeddings,
        report=args.report,
        field=args.field,
        threshold=args.threshold,
        nprobe=args.nprobe,
        index_shard_size=args.index_shard_size,
        strict=args.strict,
        on_bad=log,
    )
    log.close()
    rss = "" if s.peak_rss_mb is None else f", peak RSS {s.peak_rss_mb:,.0f} MB"
    say(
        f"dedup: read {s.read:,} records, kept {s.kept:,}; dropped {s.dropped:,} semantic "
        f"duplicates (cosine >= {args.threshold:g}); {s.bad_lines:,} bad lines; "
        f"{s.seconds:.1f} s{rss}"
    )
    if s.without_vector:
        warn(
            f"dedup: {s.without_vector:,} personas have no vector in {args.embeddings} "
            "(kept unchecked; is the embedding job finished, over these shards?)"
        )
    say(f"dedup: output {s.output}, report {s.report}")
    return _status(s.bad_lines)


def _run_dedup(args: argparse.Namespace) -> Exit:
    if args.semantic:
        return _run_semantic_dedup(args)
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
    say(
        f"dedup: read {s.read:,} records, kept {s.kept:,}; dropped {s.exact:,} exact "
        f"and {s.near:,} near duplicates; {s.bad_lines:,} bad lines; {s.seconds:.1f} s{rss}"
    )
    say(f"dedup: output {s.output}, report {s.report}")
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
    add_inputs(p, "persona shards, read in the order given")
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
    """Register ``asyncgen personas sample``, ``filter``, ``stats`` and ``dedup``."""
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
    stats.add_argument(
        "--semantic",
        action="store_true",
        help="also the diversity of the personas' embeddings (--embeddings): each sampled "
        "vector's cosine to its nearest neighbour (10 000 sampled; exact up to 50 000 "
        "vectors, else in semantic dedup's inverted file) and of 100 000 random pairs, mean "
        "and quantiles; needs the 'semantic' extra",
    )
    stats.add_argument(
        "--embeddings",
        metavar="DIR",
        help="with --semantic: the output directory of an embedding job (asyncgen run "
        "--prompt embed ...); all its vectors are measured",
    )
    stats.add_argument(
        "--seed", type=int, default=0, help="with --semantic: the sample's seed (default: 0)"
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
        help="least estimated Jaccard similarity of word sets for a near duplicate, or with "
        "--semantic the least cosine similarity (default: %(default)s, as Persona Hub)",
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
    dedup.add_argument(
        "--semantic",
        action="store_true",
        help="instead of MinHash: drop a persona whose embedding has cosine similarity of at "
        "least --threshold with one kept before it (an approximate nearest-neighbour index "
        "over the kept vectors; needs --embeddings and the 'semantic' extra); the report "
        "names the nearest kept persona and the cosine",
    )
    dedup.add_argument(
        "--nprobe",
        type=positive_int,
        metavar="N",
        help="with --semantic: inverted lists each search scans, once the kept set is large "
        "enough to be indexed approximately (default 16); higher finds more copies, slower "
        "(benchmarks/README.md, semantic dedup)",
    )
    dedup.add_argument(
        "--index-shard-size",
        type=positive_int,
        metavar="N",
        help="with --semantic: keep the index of kept vectors in shards of N, each full one "
        "written to a temporary directory beside the output and searched memory-mapped, for "
        "kept sets larger than memory (every search looks in every shard)",
    )
    dedup.add_argument(
        "--embeddings",
        metavar="DIR",
        help="with --semantic: the output directory of an embedding job over the same shards "
        "(asyncgen run --prompt embed ...); vectors are matched by shard and line",
    )
    dedup.set_defaults(handler=_run_dedup)
