"""asyncgen personas sample | filter | stats | dedup: the streaming pieces and the commands."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import zstandard

from asyncgen.cli.main import main
from asyncgen.core.errors import InputError, OutputError
from asyncgen.core.records import Line
from asyncgen.personas.reader import BadLine, Persona, PersonaReader
from asyncgen.personas.select import PersonaFilter, reservoir_sample
from asyncgen.personas.stats import StatsCollector
from asyncgen.storage.shards import LinesWriter

BASE = (
    "A retired marine biologist from Maine who volunteers at the aquarium and writes picture "
    "books about tides for curious children"
)


def write(path: Path, lines: list[bytes]) -> Path:
    data = b"".join(line + b"\n" for line in lines)
    if path.name.endswith(".zst"):
        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)
    return path


def read(path: Path) -> list[bytes]:
    data = path.read_bytes()
    if path.name.endswith(".zst"):
        with open(path, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return data.splitlines()


def persona_line(text: str, **extra: object) -> bytes:
    return json.dumps({"persona": text, **extra}, ensure_ascii=False).encode()


def persona(text: str, raw: bytes | None = None) -> Persona:
    return Persona(Line("p.jsonl", "p", 1, raw or persona_line(text)), text)


# --- sample ---------------------------------------------------------------------------------


def test_reservoir_is_uniform_over_items_and_pairs() -> None:
    items, n, runs = range(6), 2, 3000
    singles: Counter[int] = Counter()
    pairs: Counter[tuple[int, ...]] = Counter()
    for seed in range(runs):
        sample = reservoir_sample(items, n, seed=seed)
        assert len(sample) == n and sample == sorted(sample)  # input order
        singles.update(sample)
        pairs[tuple(sample)] += 1
    expected = runs * n / len(items)
    chi2 = sum((singles[i] - expected) ** 2 / expected for i in items)
    assert chi2 < 20.5  # chi-square, 5 degrees of freedom, p = 0.001
    expected_pair = runs / 15
    chi2 = sum(
        (pairs[p] - expected_pair) ** 2 / expected_pair for p in itertools.combinations(items, 2)
    )
    assert len(pairs) == 15 and chi2 < 36.1  # 14 degrees of freedom, p = 0.001


def test_reservoir_is_deterministic_and_takes_all_when_short() -> None:
    data = list(range(1000))
    assert reservoir_sample(data, 10, seed=5) == reservoir_sample(iter(data), 10, seed=5)
    assert reservoir_sample(data, 10, seed=5) != reservoir_sample(data, 10, seed=6)
    assert reservoir_sample(data[:7], 10, seed=5) == data[:7]
    assert reservoir_sample([], 3, seed=0) == []


def test_sample_command_over_plain_and_zstd_shards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = write(tmp_path / "a.jsonl", [persona_line(f"person {i}", i=i) for i in range(30)])
    b = write(tmp_path / "b.jsonl.zst", [persona_line(f"person {i}", i=i) for i in range(30, 50)])
    out = tmp_path / "s.jsonl.zst"
    args = ["personas", "sample", "-i", str(a), str(b), "-o", str(out), "-n", "12", "--seed", "4"]
    assert main(args) == 0
    first = read(out)
    assert len(first) == 12 and set(first) <= set(read(a) + read(b))
    assert [json.loads(x)["i"] for x in first] == sorted(json.loads(x)["i"] for x in first)
    assert "12 of 50 records (seed 4)" in capsys.readouterr().err
    assert main(args) == 0 and read(out) == first  # same seed, same sample
    assert main([*args[:-1], "5"]) == 0 and read(out) != first
    assert main([*args[:7], "-n", "80"]) == 0 and read(out) == read(a) + read(b)


# --- reading and writing -----------------------------------------------------------------------


def test_reader_names_bad_lines_and_goes_on(tmp_path: Path) -> None:
    lines = [
        persona_line("good one"),
        b"not json",
        b"[1, 2]",
        b'{"name": "no persona"}',
        b'{"persona": 42}',
        b'{"persona": "   "}',
        b'{"persona": "bad \xff utf8"}',
        b"",
        persona_line("good two"),
    ]
    path = write(tmp_path / "p.jsonl", lines)
    bad: list[BadLine] = []
    reader = PersonaReader([str(path)], on_bad=bad.append)
    assert [p.text for p in reader] == ["good one", "good two"]
    assert [p.line.lineno for p in PersonaReader([str(path)])] == [1, 9]
    assert [(b.lineno, b.reason) for b in bad] == [
        (2, "JSON is malformed: invalid character (byte 4)"),
        (3, "not a JSON object"),
        (4, "no 'persona' field"),
        (5, "'persona' must be a string, not int"),
        (6, "'persona' is empty"),
        (7, "not valid UTF-8 at byte 17 (invalid start byte)"),
    ]
    assert str(bad[0]) == f"{path}:2: JSON is malformed: invalid character (byte 4)"
    assert (reader.records, reader.bad) == (2, 6)
    with pytest.raises(InputError, match=r"p\.jsonl:2: JSON is malformed"):
        list(PersonaReader([str(path)], strict=True))
    other = PersonaReader([str(path)], field="name")
    assert [p.text for p in other] == ["no persona"]


def test_reader_reports_a_truncated_zstd_shard_and_reads_the_next(tmp_path: Path) -> None:
    whole = zstandard.ZstdCompressor().compress(
        b"".join(persona_line(f"p{i}") + b"\n" for i in range(50))
    )
    (tmp_path / "a.jsonl.zst").write_bytes(whole[: len(whole) // 2])
    b = write(tmp_path / "b.jsonl", [persona_line("after")])
    bad: list[BadLine] = []
    texts = [
        p.text for p in PersonaReader([str(tmp_path / "a.jsonl.zst"), str(b)], on_bad=bad.append)
    ]
    assert texts[-1] == "after"
    assert len(bad) == 1 and bad[0].lineno is None and "truncated" in bad[0].reason


def test_writer_is_atomic(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "o.jsonl.zst"
    with LinesWriter(out) as w:
        w.write(b'{"a": 1}')
        w.write(b'{"b": 2}')
    assert read(out) == [b'{"a": 1}', b'{"b": 2}']
    with pytest.raises(RuntimeError), LinesWriter(out) as w:
        w.write(b'{"c": 3}')
        raise RuntimeError("boom")
    assert read(out) == [b'{"a": 1}', b'{"b": 2}']  # the old file is untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.jsonl.zst"]  # no temp left
    with pytest.raises(OutputError, match="cannot write"):
        LinesWriter(out / "under-a-file.jsonl")


# --- filter -----------------------------------------------------------------------------------


def test_filter_semantics() -> None:
    nurse = persona("A night-shift Nurse in Oslo", persona_line("x", country="NO", age=41))
    nursery = persona("A nursery teacher in Lima", persona_line("x", country="PE", age=30))
    chef = persona("A pastry chef who loves jazz", persona_line("x", country="FR", age=30))
    everyone = [nurse, nursery, chef]

    def kept(**kwargs: object) -> list[Persona]:
        f = PersonaFilter(**kwargs)  # type: ignore[arg-type]
        return [p for p in everyone if f(p)]

    assert kept() == everyone
    assert kept(keywords=["nurse"]) == [nurse]  # whole word, any case; not "nursery"
    assert kept(keywords=["nurse", "JAZZ"]) == [nurse, chef]  # any of
    assert kept(keywords=["night-shift nurse"]) == [nurse]  # phrases
    assert kept(regexes=[r"\bnurs"]) == [nursery]  # case-sensitive
    assert kept(regexes=[r"(?i)\bnurs", "jazz"]) == everyone
    assert kept(where=[("country", "PE"), ("country", "FR")]) == [nursery, chef]  # same field: or
    assert kept(where=[("country", "FR"), ("age", "30")]) == [chef]  # fields: and; JSON text
    assert kept(where=[("missing", "x")]) == []
    assert kept(keywords=["jazz", "nurse"], where=[("age", "30")]) == [chef]  # and across kinds
    assert kept(keywords=["jazz", "nurse"], where=[("age", "30")], invert=True) == [nurse, nursery]


def test_filter_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines = [
        persona_line("A nurse in Oslo", country="NO"),
        persona_line("A nursery teacher", country="NO"),
        b"garbage",
        persona_line("A chef", country="NO"),
    ]
    src = write(tmp_path / "p.jsonl.zst", lines)
    out = tmp_path / "f.jsonl"
    args = ["personas", "filter", "-i", str(src), "-o", str(out), "--where", "country=NO"]
    assert main([*args, "--keyword", "nurse", "--keyword", "chef"]) == 1  # a bad line
    assert read(out) == [lines[0], lines[3]]
    err = capsys.readouterr().err
    assert f"{src}:3: JSON is malformed" in err and "kept 2 of 3 records (66.7%)" in err
    assert main([*args, "--keyword", "nurse", "--invert"]) == 1
    assert read(out) == [lines[1], lines[3]]
    assert main([*args, "--regex", "(unclosed"]) == 2
    assert "--regex '(unclosed' is not a valid pattern" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*args[:-1], "country"])
    assert exc.value.code == 2


# --- stats ------------------------------------------------------------------------------------


def test_stats_numbers() -> None:
    texts = [
        "The quick brown fox",
        "the quick  brown fox.",  # exact duplicate after normalisation
        "A lazy dog sleeps in the sun",
        "Quick thinking saves the day, quick!",
        "One 2 three",
    ]
    c = StatsCollector(top=3)
    for t in texts:
        c.add(t)
    s = c.result(bad_lines=2)
    assert (s.records, s.bad_lines, s.exact_duplicates) == (5, 2, 1)
    chars = [len(t) for t in texts]
    word_counts = [len(t.split()) for t in texts]
    for summary, values in ((s.chars, chars), (s.words, word_counts)):
        assert summary is not None
        assert (summary.min, summary.max) == (min(values), max(values))
        assert summary.mean == pytest.approx(np.mean(values), abs=0.01)
        for q in (50, 90, 99):
            assert getattr(summary, f"p{q}") == pytest.approx(np.percentile(values, q), abs=0.01)
    assert s.top_terms == [("quick", 4), ("brown", 2), ("fox", 2)]  # no "the", no "2"
    assert s.top_terms_exact
    empty = StatsCollector().result()
    assert (empty.records, empty.chars, empty.top_terms) == (0, None, [])


def test_stats_terms_stay_bounded_and_say_so() -> None:
    c = StatsCollector(top=2, max_terms=50)
    for i in range(2000):
        c.add(f"alpha beta rare{i}" if i % 2 else f"alpha rare{i}")
    s = c.result()
    assert [t for t, _ in s.top_terms] == ["alpha", "beta"]
    assert not s.top_terms_exact
    assert s.top_terms[0][1] <= 2000 and s.top_terms[1][1] <= 1000  # lower bounds
    assert len(c._terms) <= 100


def test_stats_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(
        tmp_path / "p.jsonl",
        [persona_line("a nurse from oslo"), persona_line("A Nurse from Oslo."), b"{}"],
    )
    assert main(["personas", "stats", "-i", str(src), "--json"]) == 1
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["records"] == 2 and data["bad_lines"] == 1 and data["exact_duplicates"] == 1
    assert data["words"] == {"min": 4, "mean": 4.0, "p50": 4.0, "p90": 4.0, "p99": 4.0, "max": 4}
    assert data["top_terms"] == [["nurse", 2], ["oslo", 2]]
    assert f"{src}:3: no 'persona' field" in err
    assert main(["personas", "stats", "-i", str(src), "--strict"]) == 2
    assert main(["personas", "stats", "-i", str(src)]) == 1
    table = capsys.readouterr().out
    assert "exact duplicates   1" in table and "nurse" in table and "p99" in table


# --- dedup ------------------------------------------------------------------------------------


def test_dedup_command_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_changed = BASE.replace("retired", "former")
    a_lines = [
        b'{ "persona" : "' + BASE.encode() + b'", "id": 1, "tags": ["x"], "n": 1.50 }',
        persona_line("A software engineer in Berlin who writes compilers", id=2),
        persona_line("  a SOFTWARE engineer in berlin who writes compilers!", id=3),
        b"{broken",
        persona_line(one_changed, id=5, note="caf\u00e9 \u2603"),
    ]
    b_lines = [
        persona_line("A beekeeper in rural Kenya who sells honey at the weekly market", id=6),
        persona_line(BASE + " too", id=7),
        b'{"persona": "a software engineer in berlin who writes compilers", "id": "\\u0038"}',
        b'{"text": "no persona"}',
    ]
    a = write(tmp_path / "a.jsonl", a_lines)
    b = write(tmp_path / "b.jsonl.zst", b_lines)
    out = tmp_path / "out" / "kept.jsonl.zst"
    assert main(["personas", "dedup", "-i", str(a), str(b), "-o", str(out)]) == 1
    assert read(out) == [a_lines[0], a_lines[1], b_lines[0]]  # byte for byte, input order
    report_path = tmp_path / "out" / "kept.dedup-report.jsonl"
    report = [json.loads(x) for x in read(report_path)]
    drops = {r["id"]: r for r in report}
    assert set(drops) == {"a:3", "a:4", "a:5", "b:2", "b:3", "b:4"}
    assert drops["a:3"] == {
        "id": "a:3",
        "reason": "exact",
        "duplicate_of": "a:2",
        "similarity": 1.0,
        "error": None,
    }
    assert drops["a:5"] == {
        "id": "a:5",
        "reason": "near",
        "duplicate_of": "a:1",
        "similarity": 0.9375,
        "error": None,
    }
    assert drops["b:2"]["reason"] == "near" and drops["b:2"]["duplicate_of"] == "a:1"
    assert drops["b:3"]["reason"] == "exact" and drops["b:3"]["duplicate_of"] == "a:2"
    assert drops["a:4"]["reason"] == "bad" and "malformed" in drops["a:4"]["error"]
    assert drops["b:4"] == {
        "id": "b:4",
        "reason": "bad",
        "duplicate_of": None,
        "similarity": None,
        "error": "no 'persona' field",
    }
    err = capsys.readouterr().err
    assert f"{a}:4: JSON is malformed" in err and f"{b}:4: no 'persona' field" in err
    assert "read 7 records, kept 3; dropped 2 exact and 2 near duplicates; 2 bad lines" in err
    assert "peak RSS" in err and str(report_path) in err

    # exact only, plain output, own report name, another field
    plain, rep = tmp_path / "kept.jsonl", tmp_path / "r.jsonl"
    args = ["personas", "dedup", "-i", str(b), "-o", str(plain), "--report", str(rep)]
    assert main([*args, "--no-near"]) == 1
    assert read(plain) == b_lines[:3]  # one word added is not an exact copy
    assert [json.loads(x)["id"] for x in read(rep)] == ["b:4"]
    assert main([*args, "--field", "text"]) == 1
    assert read(plain) == [b_lines[3]]
    assert [json.loads(x)["reason"] for x in read(rep)] == ["bad", "bad", "bad"]


def test_dedup_strict_and_refusals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write(tmp_path / "p.jsonl", [persona_line("one"), b"oops", persona_line("two")])
    out = tmp_path / "o.jsonl"
    assert main(["personas", "dedup", "-i", str(src), "-o", str(out), "--strict"]) == 2
    assert f"asyncgen: error: {src}:2: JSON is malformed" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl"]  # nothing written
    assert main(["personas", "dedup", "-i", str(src), "-o", str(src)]) == 2
    assert "is one of the inputs" in capsys.readouterr().err
    assert main(["personas", "sample", "-i", str(src), "-o", f"{src}/x.jsonl", "-n", "1"]) == 2
    assert "asyncgen: error: cannot write" in capsys.readouterr().err
    assert main(["personas", "dedup", "-i", str(tmp_path / "nope.jsonl"), "-o", str(out)]) == 2
    assert "input file not found" in capsys.readouterr().err
    clean = write(tmp_path / "c.jsonl", [persona_line("one"), persona_line("ONE")])
    assert main(["personas", "dedup", "-i", str(clean), "-o", str(out), "--num-perm", "8"]) == 2
    assert "num_perm" in capsys.readouterr().err
    assert main(["personas", "dedup", "-i", str(clean), "-o", str(out)]) == 0
    assert read(out) == [persona_line("one")]
    with pytest.raises(SystemExit):
        main(["personas", "dedup", "-i", str(clean), "-o", str(out), "--threshold", "1.5"])


@pytest.mark.parametrize(
    ("command", "phrases"),
    [
        ("sample", ["-n N", "--seed", "reservoir", "Exit status"]),
        ("filter", ["--keyword", "--regex", "--where", "--invert", "whole word"]),
        ("stats", ["--json", "p99", "stopwords"]),
        ("dedup", ["--threshold", "--num-perm", "--no-near", "--report", "shard:line"]),
    ],
)
def test_help(command: str, phrases: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["personas", command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ["--input", "--field", "--strict", *phrases]:
        assert phrase in text, phrase
