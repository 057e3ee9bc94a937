"""``asyncgen personas dedup`` on synthetic personas with planted duplicates.

Generates N persona lines (varied sentences from word lists, 15-40 words) in which about 5% are
exact copies of an earlier line (case, spacing and end punctuation changed) and 12% near copies
(one word substituted, added or removed — or two substituted, which falls below 0.9 and must
be kept). Shards are cached in ``$TMPDIR/asyncgen-bench/``. Each run is the real command in a
fresh subprocess; its summary line gives the seconds and peak RSS. The parent regenerates the
texts and scores the report against the planted truth:

* recall: planted copies whose word-set Jaccard with their source is >= the threshold and that
  were dropped (as near or exact), by edit kind;
* precision: near drops whose pair really is >= the threshold (any pair, planted or not), and
  the share of near drops that were planted.

``--lsh-sweep`` scores three band shapes in-process (datasketch's default for 0.9, asyncgen's,
and one with 99% candidate recall at 0.9). ``--index-comparison`` measures datasketch's own
``MinHashLSH`` (query, insert if new) over the same signatures, each variant in a fresh
process, against the whole asyncgen check (normalising, signatures, index, verification):
time per record, memory per kept record.

Usage::

    python benchmarks/bench_dedup.py --lines 100000 1000000
    python benchmarks/bench_dedup.py --lines 100000 --index-comparison --lsh-sweep
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import zstandard

from asyncgen.personas.dedup import Deduplicator, MinHasher, lsh_params, normalise, words


def _list(words: str) -> list[str]:
    return words.split()


ADJECTIVES = _list(
    """retired ambitious curious meticulous soft-spoken energetic reclusive outspoken
cheerful pragmatic idealistic skeptical nostalgic restless patient stubborn thoughtful witty
introverted charismatic frugal generous anxious fearless methodical whimsical devout secular
self-taught award-winning semi-retired bilingual trilingual disabled young elderly middle-aged
veteran aspiring former newly-qualified part-time freelance"""
)
JOBS = _list(
    """nurse teacher carpenter software-engineer marine-biologist pastry-chef librarian
electrician paramedic architect accountant farmer beekeeper pharmacist historian journalist
translator welder plumber violinist data-scientist social-worker firefighter pilot
geologist zookeeper tailor barista photographer midwife lawyer judge economist chemist
astronomer linguist mechanic locksmith florist potter glassblower bookbinder archivist
cartographer sommelier brewer fisherman shepherd surgeon dentist optometrist physiotherapist
nutritionist coach referee choreographer playwright novelist poet cartoonist animator
game-designer cryptographer statistician actuary auditor diplomat curator conservator"""
)
PLACES = _list(
    """Oslo Lagos Lima Kyoto Nairobi Hanoi Quito Tbilisi Porto Cork Dakar Perth Leeds
Lyon Pune Cusco Bergen Tartu Riga Split Bilbao Graz Gdansk Cluj Izmir Tunis Accra Kigali
Medellin Valparaiso Hobart Dunedin Halifax Tucson Boise Duluth Savannah Asheville Missoula
rural-Kenya coastal-Maine the-Scottish-Highlands a-Greek-island the-Andes the-Outback
a-fishing-village a-mining-town the-suburbs a-border-town"""
)
VERBS = _list(
    """restores collects studies teaches writes repairs photographs documents translates
organizes volunteers-for mentors builds designs researches campaigns-for blogs-about
podcasts-about sketches catalogues grows brews bakes knits carves paints"""
)
OBJECTS = _list(
    """antique-clocks vintage-motorcycles medieval-manuscripts folk-songs tide-pools
heirloom-tomatoes stained-glass old-maps jazz-records board-games wooden-boats street-food
bird-calls fossils textiles mosaics sourdough-bread kites bonsai-trees rare-orchids comics
radio-dramas chess-openings local-legends protest-posters shipwrecks"""
)
CLAUSES = [
    "and spends weekends {v} {o} with {p} friends",
    "and dreams of opening a small shop selling {o}",
    "while raising {n} children and caring for an aging parent",
    "and is known in the neighbourhood for {v} {o}",
    "after a long career as a {j} in {pl}",
    "and runs a monthly meetup about {o} at the public library",
    "and worries about how climate change will affect {pl}",
    "and keeps a detailed journal about {o} and {o2}",
    "hoping to write a book about {o} one day",
    "and argues online about the best way to care for {o}",
]
EXTRA = _list(
    """quietly often rarely passionately secretly proudly always sometimes patiently
carefully"""
)


def _words(text: str) -> set[str]:
    return words(normalise(text))


def _jaccard(a: str, b: str) -> float:
    x, y = _words(a), _words(b)
    return len(x & y) / len(x | y)


def _rss_mb() -> float:
    """Current resident memory (Linux), so structures built one after another compare fairly."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _base(rng: random.Random) -> str:
    def w(pool: list[str]) -> str:
        return rng.choice(pool).replace("-", " ")

    first = f"A {w(ADJECTIVES)} {w(JOBS)} from {w(PLACES)} who {w(VERBS)} {w(OBJECTS)}"
    parts = [first]
    parts.extend(
        clause.format(
            v=w(VERBS),
            o=w(OBJECTS),
            o2=w(OBJECTS),
            p=rng.choice(["old", "new", "online", "local", "school"]),
            n=rng.choice(["two", "three", "four", "five"]),
            j=w(JOBS),
            pl=w(PLACES),
        )
        for clause in rng.sample(CLAUSES, rng.randint(1, 3))
    )
    return " ".join(parts) + rng.choice([".", "", "!"])


def _exact_copy(rng: random.Random, text: str) -> str:
    text = rng.choice([text.upper(), text.lower(), text.title(), text])
    text = text.replace(" ", rng.choice(["  ", " ", "\t"]), rng.randint(1, 3))
    return "  " + text.rstrip(".!") + rng.choice(["...", ".", "!!", ""]) + " "


def _near_copy(rng: random.Random, text: str, kind: str) -> str:
    tokens = text.split()
    pool = [w.replace("-", " ") for w in ADJECTIVES + OBJECTS + JOBS]
    if kind == "add":
        tokens.insert(rng.randrange(1, len(tokens)), rng.choice(EXTRA))
    elif kind == "remove":
        del tokens[rng.randrange(1, len(tokens))]
    else:
        for i in rng.sample(range(1, len(tokens)), 1 if kind == "substitute" else 2):
            tokens[i] = rng.choice(pool).split()[0] + "ish"  # a word no persona has
    return " ".join(tokens)


def generate(n: int, seed: int = 1) -> Iterator[tuple[str, int, str]]:
    """(text, source line or 0, kind) for lines 1..n, deterministic for a seed."""
    rng = random.Random(seed)
    originals: list[int] = []
    texts: dict[int, str] = {}
    for line in range(1, n + 1):
        r = rng.random()
        if originals and r < 0.05:
            src = rng.choice(originals)
            yield _exact_copy(rng, texts[src]), src, "exact"
        elif originals and r < 0.17:
            src = rng.choice(originals)
            kind = rng.choice(["substitute", "add", "remove", "substitute2"])
            yield _near_copy(rng, texts[src], kind), src, kind
        else:
            text = _base(rng)
            originals.append(line)
            texts[line] = text
            yield text, 0, "original"


def make_shard(path: Path, n: int) -> None:
    if path.exists():
        return
    tmp = path.with_suffix(".tmp")
    cctx = zstandard.ZstdCompressor(level=3)
    with open(tmp, "wb") as raw, cctx.stream_writer(raw) as out:
        for i, (text, _, _) in enumerate(generate(n), 1):
            record = {"persona": text, "id": i, "source": "bench"}
            out.write(msgspec.json.encode(record) + b"\n")
    tmp.rename(path)


_SUMMARY = re.compile(
    r"read ([\d,]+) records, kept ([\d,]+); dropped ([\d,]+) exact and ([\d,]+) near "
    r"duplicates; ([\d,]+) bad lines; ([\d.]+) s, peak RSS ([\d,]+) MB"
)


def run_dedup(shard: Path, workdir: Path, threshold: float, num_perm: int) -> dict[str, Any]:
    out = workdir / f"{shard.name}.dedup.jsonl.zst"
    cmd = [sys.executable, "-m", "asyncgen", "personas", "dedup", "-i", str(shard), "-o", str(out)]
    cmd += ["--threshold", str(threshold), "--num-perm", str(num_perm)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    match = _SUMMARY.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"dedup failed ({proc.returncode}): {proc.stderr[-2000:]}")
    read, kept, exact, near, _, seconds, rss = (float(g.replace(",", "")) for g in match.groups())
    report = Path(str(out).removesuffix(".jsonl.zst") + ".dedup-report.jsonl")
    return {
        "read": int(read),
        "kept": int(kept),
        "exact": int(exact),
        "near": int(near),
        "seconds": seconds,
        "records_per_s": round(read / seconds),
        "peak_rss_mb": rss,
        "report": report,
    }


def read_report(report: Path) -> dict[int, tuple[str, int | None]]:
    """line -> (reason, line of the kept persona) for every dropped line."""
    drops = {}
    for text in report.read_text().splitlines():
        r = json.loads(text)
        other = r["duplicate_of"]
        line = int(r["id"].rsplit(":", 1)[1])
        drops[line] = (r["reason"], None if other is None else int(other.rsplit(":", 1)[1]))
    return drops


def score(
    truth: list[tuple[str, int, str]], drops: dict[int, tuple[str, int | None]], threshold: float
) -> dict[str, Any]:
    positives: Counter[str] = Counter()
    found: Counter[str] = Counter()
    below: Counter[str] = Counter()
    below_dropped = 0
    for line, (text, src, kind) in enumerate(truth, 1):
        if kind in ("original", "exact"):
            continue
        if _jaccard(text, truth[src - 1][0]) >= threshold:
            positives[kind] += 1
            found[kind] += line in drops
        else:
            below[kind] += 1
            below_dropped += line in drops
    exact_planted = sum(kind == "exact" for _, _, kind in truth)
    exact_found = sum(
        1 for line, (_, _, kind) in enumerate(truth, 1) if kind == "exact" and line in drops
    )
    near = [(line, other) for line, (reason, other) in drops.items() if reason == "near"]
    correct = planted = 0
    for line, other in near:
        assert other is not None
        correct += _jaccard(truth[line - 1][0], truth[other - 1][0]) >= threshold
        planted += truth[line - 1][1] != 0
    return {
        "exact_recall": round(exact_found / max(exact_planted, 1), 4),
        "near_recall": round(sum(found.values()) / max(sum(positives.values()), 1), 4),
        "near_recall_by_kind": {
            k: f"{found[k]}/{positives[k]}" for k in ("substitute", "add", "remove", "substitute2")
        },
        "below_threshold_dropped": f"{below_dropped}/{sum(below.values())}",
        "near_precision": round(correct / max(len(near), 1), 4),
        "near_planted_share": round(planted / max(len(near), 1), 4),
    }


def index_worker(variant: str, n: int) -> dict[str, Any]:
    """One index over n personas' signatures, in a fresh process: time and memory it adds."""
    import time

    from datasketch import LeanMinHash, MinHashLSH  # type: ignore[import-untyped]

    texts = [text for text, _, _ in generate(n, seed=2)]
    if variant == "asyncgen":
        before = _rss_mb()
        dedup = Deduplicator()
        started = time.perf_counter()
        for i in range(0, n, 2048):
            dedup.check_batch(texts[i : i + 2048], list(range(i, min(i + 2048, n))))
        kept = dedup.statistics().kept
    else:
        sigs = MinHasher(128).signatures([_words(t) for t in texts])
        bands, rows = (int(x) for x in variant.split("x"))
        before = _rss_mb()
        lsh = MinHashLSH(num_perm=128, params=(bands, rows))
        started = time.perf_counter()
        kept = 0
        for i, row in enumerate(sigs):
            m = LeanMinHash(seed=1, hashvalues=row, scheme="affine32")
            if not lsh.query(m):  # unverified: any candidate counts as a duplicate
                lsh.insert(i, m, check_duplication=False)
                kept += 1
    seconds = time.perf_counter() - started
    return {
        "us_per_record": round(seconds / n * 1e6, 1),
        "kb_per_kept": round((_rss_mb() - before) * 1e3 / kept, 2),
    }


def lsh_sweep(n: int, threshold: float) -> dict[str, Any]:
    """Recall, precision, candidates and time for several LSH shapes, in this process."""
    import time

    truth = list(generate(n))
    texts = [text for text, _, _ in truth]
    result = {}
    for lsh in ((5, 25), lsh_params(threshold, 128), (12, 10)):
        dedup = Deduplicator(threshold=threshold, lsh=lsh)
        started = time.perf_counter()
        drops: dict[int, tuple[str, int | None]] = {}
        for i in range(0, n, 2048):
            keys = list(range(i + 1, min(i + 2048, n) + 1))  # keys are line numbers
            for key, v in zip(keys, dedup.check_batch(texts[i : i + 2048], keys), strict=True):
                if v.reason != "keep":
                    drops[key] = (v.reason, v.duplicate_of)
        seconds = time.perf_counter() - started
        s = score(truth, drops, threshold)
        result[f"{lsh[0]} x {lsh[1]}"] = {
            "near_recall": s["near_recall"],
            "near_precision": s["near_precision"],
            "candidates_per_record": round(dedup.statistics().candidates / n, 2),
            "us_per_record": round(seconds / n * 1e6, 1),
        }
    return result


def index_comparison(n: int) -> dict[str, Any]:
    bands, rows = lsh_params(0.9, 128)
    variants = {
        "datasketch MinHashLSH (5, 25): query + insert": "5x25",
        f"datasketch MinHashLSH ({bands}, {rows}): query + insert": f"{bands}x{rows}",
        f"asyncgen Deduplicator ({bands}, {rows}): everything": "asyncgen",
    }
    result = {}
    for name, variant in variants.items():
        cmd = [sys.executable, __file__, "--index-worker", variant, "--lines", str(n)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        result[name] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, nargs="+", default=[100_000])
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--num-perm", type=int, default=128)
    parser.add_argument("--index-comparison", action="store_true")
    parser.add_argument("--json", type=Path, help="write all results here too")
    parser.add_argument("--lsh-sweep", action="store_true")
    parser.add_argument("--index-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.index_worker:
        print(json.dumps(index_worker(args.index_worker, args.lines[0])))
        return
    cache = Path(tempfile.gettempdir()) / "asyncgen-bench"
    cache.mkdir(exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        for n in args.lines:
            shard = cache / f"dedup-personas-{n}.jsonl.zst"
            make_shard(shard, n)
            result = run_dedup(shard, Path(tmp), args.threshold, args.num_perm)
            truth = list(generate(n))
            result.update(score(truth, read_report(result.pop("report")), args.threshold))
            del truth
            result["lines"] = n
            result["shard_mb"] = round(os.path.getsize(shard) / 1e6, 1)
            rows.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
    print(
        "\n| lines | kept | exact | near | s | records/s | peak RSS MB | exact recall "
        "| near recall | near precision |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['lines']:,} | {r['kept']:,} | {r['exact']:,} | {r['near']:,} | "
            f"{r['seconds']:.1f} | {r['records_per_s']:,} | {r['peak_rss_mb']:,.0f} | "
            f"{r['exact_recall']:.2%} | {r['near_recall']:.2%} | {r['near_precision']:.2%} |"
        )
    comparison = None
    if args.index_comparison:
        comparison = index_comparison(args.lines[0])
        print("\n| index | µs per record | KB per kept record |\n|---|---:|---:|")
        for name, c in comparison.items():
            print(f"| {name} | {c['us_per_record']} | {c['kb_per_kept']:.2f} |")
    sweep = None
    if args.lsh_sweep:
        sweep = lsh_sweep(args.lines[0], args.threshold)
        print(
            "\n| bands x rows | near recall | near precision | candidates per record | µs per "
            "record |\n|---|---:|---:|---:|---:|"
        )
        for name, r in sweep.items():
            print(
                f"| {name} | {r['near_recall']:.2%} | {r['near_precision']:.2%} | "
                f"{r['candidates_per_record']} | {r['us_per_record']} |"
            )
    if args.json:
        data = {"runs": rows, "index": comparison, "lsh": sweep}
        args.json.write_text(json.dumps(data, indent=2))


if __name__ == "__main__":
    main()
