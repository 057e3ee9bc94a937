"""Persona creation as resumable jobs: from-text, expand, crashes during either, and the whole
pipeline text → personas → expanded personas → dedup → math, killed in every stage."""

from __future__ import annotations

import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard

from asyncgen.cli.main import main
from asyncgen.personas.pipeline import StageReport, clean_persona, convert

from .conftest import assert_exactly_once, clean_env, read_output, write_shard
from .test_crash_resume import mock_process, server_requests

MODEL = ["--model", "mock-model"]
# from-text and expand print "<stage>: <N> in → <M> personas (<F> failed, ..." when they convert
# and "<stage>: done earlier → <M> personas (<F> failed, ..." when the shard was already there.
REPORT = re.compile(r"asyncgen: (from-text|round \d+/\d+): .*→ ([\d,]+) personas \(([\d,]+) failed")


@pytest.fixture(scope="module")
def faulty_url() -> Iterator[str]:
    """Fails 10 % of requests with a 500: with --max-attempts 1, those items fail."""
    with mock_process("--fail-500", "0.1", "--seed", "7") as url:
        yield url


@pytest.fixture(scope="module")
def slow_url() -> Iterator[str]:
    """No faults, ~30 ms per request: a job of a few hundred items at low concurrency runs
    long enough to be killed after its first commit (results are committed every second)."""
    with mock_process("--latency", "0.03", "--latency-jitter", "0.01", "--seed", "8") as url:
        yield url


def read_shard(path: Path) -> list[dict[str, Any]]:
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return [msgspec.json.decode(line) for line in data.splitlines()]


def texts(n: int, *, field: str = "text", repeat_every: int = 0) -> list[dict[str, Any]]:
    """Text records; with ``repeat_every`` k, every k-th text repeats the one before it."""
    out = []
    for i in range(n):
        j = i - 1 if repeat_every and i % repeat_every == repeat_every - 1 else i
        out.append({field: f"Notes on repairing escapement number {j} of a tower clock", "n": i})
    return out


def reports(err: str) -> dict[str, tuple[int, int]]:
    """Stage → (personas, failed) as the stage reports on stderr say."""
    return {
        m.group(1): (int(m.group(2).replace(",", "")), int(m.group(3).replace(",", "")))
        for m in REPORT.finditer(err)
    }


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  A retired clockmaker.\n", "A retired clockmaker."),
        ('"A retired clockmaker."', "A retired clockmaker."),
        ("\u201c 'A retired clockmaker.' \u201d", "A retired clockmaker."),
        ('"Tick" and "tock" fan', '"Tick" and "tock" fan'),
        ('""', ""),
        ("   ", ""),
        (None, ""),
    ],
)
def test_clean_persona(raw: str | None, clean: str) -> None:
    assert clean_persona(raw) == clean


def test_convert_skips_empty_answers_and_counts_standing_failures(tmp_path: Path) -> None:
    def result(line: int, output: str | None, **meta: Any) -> dict[str, Any]:
        return {
            "custom_id": f"p:{line}:persona:0",
            "error": None,
            "output": output,
            "model": "m",
            "template": "persona",
            "persona": f"parent {line}",
            "source": {"shard": "p", "line": line},
            "meta": meta,
        }

    job = tmp_path / "job"
    write_shard(
        job / "results-000001.jsonl.zst",
        [
            result(1, ' "A beekeeper." ', id="x:1", origin={"shard": "t", "line": 9}),
            result(2, "  "),
            result(3, '""', id="x:3"),
            result(4, None),
            result(5, "A glazier.", id="x:5", source={"shard": "t", "line": 5}),
        ],
    )
    failure = {**result(6, None), "error": {"code": "server_error", "message": "500"}}
    write_shard(
        job / "failures-000002.jsonl.zst", [failure, {**failure, "custom_id": "p:7:persona:0"}]
    )
    retried = {**result(7, "A tiler."), "replaces_failure": True}  # by retry-failed
    write_shard(job / "results-000003.jsonl.zst", [retried])
    shard = tmp_path / "round-1.jsonl.zst"
    report = convert(job, shard, round_=1)
    assert report == StageReport(personas=3, failed=1, bad_lines=0, inputs=7, empty=3)
    assert read_shard(shard) == [
        {
            "persona": "A beekeeper.",
            "id": "p:1:persona:0",
            "round": 1,
            "template": "persona",
            "model": "m",
            "parent": "x:1",
            "parent_persona": "parent 1",
            "origin": {"shard": "t", "line": 9},
        },
        {
            "persona": "A glazier.",
            "id": "p:5:persona:0",
            "round": 1,
            "template": "persona",
            "model": "m",
            "parent": "x:5",
            "parent_persona": "parent 5",
            "origin": {"shard": "t", "line": 5},
        },
        {
            "persona": "A tiler.",
            "id": "p:7:persona:0",
            "round": 1,
            "template": "persona",
            "model": "m",
            "parent": "p:7",  # an input without an id is named by shard and line
            "parent_persona": "parent 7",
        },
    ]
    # nothing usable at all: still a valid (empty) zstd shard
    empty = tmp_path / "empty.jsonl.zst"
    assert convert(tmp_path / "nothing", empty, round_=0).personas == 0
    assert read_shard(empty) == []


def test_from_text_then_expand_keeps_provenance(
    tmp_path: Path,
    faulty_url: str,
    slow_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    corpus = texts(40, field="body")
    records: list[Any] = [*corpus[:10], b"", *corpus[10:], {"title": "no body"}]
    shard = write_shard(tmp_path / "texts.jsonl.zst", records)
    line_of = {(i + 1 if i < 10 else i + 2): c for i, c in enumerate(corpus)}  # 11 is blank
    job = ["--base-url", faulty_url, "--max-attempts", "1", "--quiet", *MODEL]
    p0 = tmp_path / "p0"
    from_text = ["personas", "from-text", "-i", str(shard), "--text-field", "body", "-o", str(p0)]
    code, err = run(capsys, *from_text, *job)
    assert code == 1, err  # the line without a body is bad; some requests failed
    made = read_shard(p0 / "personas.jsonl.zst")
    out = read_output(p0 / "job")
    assert len(out["errors"]) == 1 and out["errors"][0]["source"]["line"] == 42
    assert reports(err)["from-text"] == (len(made), len(out["failures"]))
    assert len(made) == 40 - len(out["failures"])
    by_id = {r["custom_id"]: r for r in out["results"]}
    for p in made:
        line = p["source"]["line"]
        assert p["id"] == f"texts:{line}:text_to_persona:0"
        assert p["source"] == {"shard": "texts", "line": line}
        assert p["round"] == 0 and p["template"] == "text_to_persona"
        assert p["model"] == "mock-model"
        assert p["persona"] == by_id[p["id"]]["output"].strip() != ""
        # the result was made from the text on that line
        assert by_id[p["id"]]["persona"] == line_of[line]["body"]

    e = tmp_path / "e"
    expand = ["personas", "expand", "-i", str(p0 / "personas.jsonl.zst"), "-o", str(e)]
    code, err = run(capsys, *expand, "--rounds", "2", *job)
    said = reports(err)
    prev, prev_name = made, "personas"
    failed = 0
    for r in (1, 2):
        got = read_shard(e / f"round-{r}" / f"round-{r}.jsonl.zst")
        out = assert_exactly_once(
            e / f"round-{r}" / "job",
            {f"{prev_name}:{i}:persona:0" for i in range(1, len(prev) + 1)},
        )
        failed += len(out["failures"])
        # --samples 1: as many personas as the round's input, minus failures
        assert len(got) == len(prev) - len(out["failures"])
        assert said[f"round {r}/2"] == (len(got), len(out["failures"]))
        parents = {p["id"]: (line, p) for line, p in enumerate(prev, 1)}
        for p in got:
            line, parent = parents[p["parent"]]  # every parent is in the round before
            assert p["id"] == f"{prev_name}:{line}:persona:0"
            assert p["round"] == r and p["template"] == "persona"
            assert p["parent_persona"] == parent["persona"]
            assert p["origin"] == parent.get("origin", parent.get("source"))
            assert p["origin"]["shard"] == "texts" and p["origin"]["line"] in line_of
        prev, prev_name = got, f"round-{r}"
    assert code == (1 if failed else 0), err

    # A finished pipeline: a rerun sends nothing, rewrites nothing, says the same.
    before = server_requests(faulty_url)
    shards = {p: p.read_bytes() for p in tmp_path.rglob("*.jsonl.zst") if "job" not in p.parts}
    assert run(capsys, *from_text, *job)[0] == 1
    code2, err2 = run(capsys, *expand, "--rounds", "2", *job)
    assert code2 == code and reports(err2) == said and "done earlier" in err2
    assert server_requests(faulty_url) == before
    assert {p: p.read_bytes() for p in shards} == shards
    # ... unless it is another job: a finished stage does not pass for one with another model.
    other = [*job[:-2], "-m", "other-model"]
    code, err = run(capsys, *expand, "--rounds", "2", *other)
    assert code == 2 and "belongs to a different job (changed: model)" in err, err
    assert server_requests(faulty_url) == before

    # The last round's shard is a persona shard as asyncgen run takes it.
    math = tmp_path / "math"
    last = e / "round-2" / "round-2.jsonl.zst"
    args = ["run", "-i", str(last), "-p", "math", "-o", str(math), "--base-url", slow_url]
    code, err = run(capsys, *args, "--concurrency", "64", "-q", *MODEL)
    assert code == 0, err
    out = assert_exactly_once(math, {f"round-2:{i}:math:0" for i in range(1, len(prev) + 1)})
    assert all(r["meta"]["origin"]["shard"] == "texts" for r in out["results"])

    # Failures retried with retry-failed; the rounds' shards rebuilt: old lines keep their
    # places, the retried successes come after them, later rounds send only the new ones.
    one, two = (e / f"round-{r}" / f"round-{r}.jsonl.zst" for r in (1, 2))
    old = read_shard(one), read_shard(two)
    code, err = run(capsys, "retry-failed", str(e / "round-1" / "job"), "--base-url", slow_url)
    assert code == 0, err
    one.unlink()
    two.unlink()
    before = server_requests(faulty_url)
    code, err = run(capsys, *expand, "--rounds", "2", *job)
    new = read_shard(one)
    assert new[: len(old[0])] == old[0] and len(new) == len(made)
    assert read_shard(two)[: len(old[1])] == old[1]
    assert server_requests(faulty_url) == before + len(new) - len(old[0])
    assert reports(err)["round 2/2"][0] == len(read_shard(two)) >= len(old[1])


def test_expand_refuses_an_input_named_like_a_round(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Round 2's ids start with "round-1", the name of round 1's shard: an input of that name
    # would give round 1 the same ids.
    shard = write_shard(tmp_path / "round-1.jsonl", [{"persona": "a potter"}])
    args = ["personas", "expand", "-i", str(shard), "-o", str(tmp_path / "e"), *MODEL]
    code, err = run(capsys, *args, "--rounds", "2")
    assert code == 2 and "ids would collide" in err, err
    assert not (tmp_path / "e").exists()


def test_an_interrupted_conversion_is_redone(
    tmp_path: Path, slow_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A kill while a shard is written leaves a temporary file and no shard: the rerun finds
    the job finished (no requests), converts again and gets the same file."""
    shard = write_shard(tmp_path / "texts.jsonl", texts(30))
    job = ["--base-url", slow_url, "--concurrency", "64", "--quiet", *MODEL]
    p0, e = tmp_path / "p0", tmp_path / "e"
    from_text = ["personas", "from-text", "-i", str(shard), "-o", str(p0), *job]
    expand = ["personas", "expand", "-i", str(p0 / "personas.jsonl.zst"), "-o", str(e), *job]
    assert run(capsys, *from_text)[0] == 0
    assert run(capsys, *expand, "--rounds", "2")[0] == 0
    made = [p0 / "personas.jsonl.zst", e / "round-1" / "round-1.jsonl.zst"]
    made.append(e / "round-2" / "round-2.jsonl.zst")
    first = [p.read_bytes() for p in made]
    assert [len(read_shard(p)) for p in made] == [30, 30, 30]
    for path in made[0], made[2]:  # round 1 stays: only the missing one is redone
        path.unlink()
        path.with_name(f".{path.name}.x1y2z3.tmp").write_bytes(first[0][:100])  # torn, stale
    before = server_requests(slow_url)
    code, err = run(capsys, *from_text)
    assert code == 0 and "0 requests" in err, err
    code, err = run(capsys, *expand, "--rounds", "2")
    assert code == 0 and "round 1/2: done earlier" in err and "0 requests" in err, err
    assert server_requests(slow_url) == before
    assert [p.read_bytes() for p in made] == first
    assert not list(tmp_path.rglob("*.tmp"))


def committed(job: Path) -> bool:
    """Has the job in ``job`` committed some results (its ledger holds a frame)?"""
    ledger = job / "ledger.zst"
    return ledger.exists() and ledger.stat().st_size > 0


def run_cli(
    args: list[str], *, kill_when: Path | None = None, rng: random.Random | None = None
) -> tuple[int, str]:
    """``python -m asyncgen ARGS``; with ``kill_when``, SIGKILL it once the job in that
    directory has committed something (a little later, if ``rng`` is given)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncgen", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    deadline = time.monotonic() + 60
    while kill_when is not None and proc.poll() is None and time.monotonic() < deadline:
        if committed(kill_when):
            time.sleep(rng.uniform(0, 0.3) if rng else 0)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def shard_matches_job(shard: Path, job: Path) -> list[dict[str, Any]]:
    """The persona shard holds exactly the job's non-empty results, once each."""
    got = read_shard(shard)
    results = read_output(job)["results"]
    assert [p["id"] for p in got] == [r["custom_id"] for r in results if r["output"].strip()]
    return got


@pytest.mark.slow
def test_sigkill_during_rounds_then_resume(tmp_path: Path, slow_url: str) -> None:
    n = 200
    seeds = [{"persona": f"A clock restorer number {i} in a small town"} for i in range(n)]
    shard = write_shard(tmp_path / "seed.jsonl", seeds)
    e = tmp_path / "e"
    args = ["personas", "expand", "-i", str(shard), "-o", str(e), "--rounds", "2", "-q"]
    args += ["--base-url", slow_url, "--concurrency", "3", *MODEL]
    rng = random.Random(int(time.time()))
    for r in (1, 2):
        code, err = run_cli(args, kill_when=e / f"round-{r}" / "job", rng=rng)
        assert code == -signal.SIGKILL, f"round {r} finished before it was killed: {err}"
        assert not (e / f"round-{r}" / f"round-{r}.jsonl.zst").exists()
    code, err = run_cli(args)
    assert code == 0, err
    assert "round 1/2: done earlier" in err and "round 2/2: " in err
    one = e / "round-1"
    assert_exactly_once(one / "job", {f"seed:{i}:persona:0" for i in range(1, n + 1)})
    got = shard_matches_job(one / "round-1.jsonl.zst", one / "job")
    assert len(got) == n
    two = e / "round-2"
    assert_exactly_once(two / "job", {f"round-1:{i}:persona:0" for i in range(1, n + 1)})
    assert len(shard_matches_job(two / "round-2.jsonl.zst", two / "job")) == n
    before = server_requests(slow_url)
    code, err = run_cli(args)
    assert code == 0 and err.count("done earlier") == 2, err
    assert server_requests(slow_url) == before


@pytest.mark.slow
def test_text_to_math_killed_in_every_stage(tmp_path: Path, slow_url: str) -> None:
    """texts → from-text → expand 2 rounds → dedup → run -p math, each stage killed with
    SIGKILL and resumed; every math record traces back to the text line it descends from."""
    n = 120
    corpus = texts(n, repeat_every=6)  # 20 texts repeat the one before: duplicate personas
    shard = write_shard(tmp_path / "texts.jsonl.zst", corpus)
    rng = random.Random(int(time.time()))
    p0, e, d, m = (tmp_path / name for name in ("p0", "e", "d", "math"))
    job = ["--base-url", slow_url, "-q", *MODEL]
    from_text = ["personas", "from-text", "-i", str(shard), "-o", str(p0), *job]
    from_text += ["--concurrency", "2"]
    made = [p0 / "personas.jsonl.zst", e / "round-1" / "round-1.jsonl.zst"]
    made.append(e / "round-2" / "round-2.jsonl.zst")
    expand = ["personas", "expand", "-i", str(made[0]), "-o", str(e), "--rounds", "2", *job]
    expand += ["--concurrency", "2"]
    deduped = d / "personas.jsonl.zst"
    dedup = ["personas", "dedup", "-i", *map(str, made), "-o", str(deduped)]
    math = ["run", "-i", str(deduped), "-p", "math", "-o", str(m), *job, "--concurrency", "6"]

    # Each job stage is killed once it has committed results (expand: in each round), then
    # resumed; dedup is killed at a random instant (it may be done by then).
    said: dict[str, tuple[int, int]] = {}
    dedup_said = ""
    for args, jobs in (
        (from_text, [p0 / "job"]),
        (expand, [e / "round-1" / "job", e / "round-2" / "job"]),
        (math, [m]),
    ):
        for directory in jobs:
            code, err = run_cli(args, kill_when=directory, rng=rng)
            assert code == -signal.SIGKILL, f"{args[:2]} finished before the kill: {err}"
        code, err = run_cli(args)
        assert code == 0, err
        said.update(reports(err))
        if args is expand:
            proc = subprocess.Popen(
                [sys.executable, "-m", "asyncgen", *dedup],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=clean_env(),
            )
            time.sleep(rng.uniform(0.3, 1.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            code, err = run_cli(dedup)
            assert code == 0, err
            dedup_said = err

    # Every job holds each of its items once; every shard holds the job's answers.
    out0 = assert_exactly_once(
        p0 / "job", {f"texts:{i}:text_to_persona:0" for i in range(1, n + 1)}
    )
    rounds = [shard_matches_job(made[0], p0 / "job")]
    for r in (1, 2):
        prev = ("personas", "round-1")[r - 1]
        expected = {f"{prev}:{i}:persona:0" for i in range(1, len(rounds[-1]) + 1)}
        assert_exactly_once(e / f"round-{r}" / "job", expected)
        rounds.append(shard_matches_job(made[r], e / f"round-{r}" / "job"))
    assert [len(x) for x in rounds] == [n, n, n]  # no faults, no empty answers
    assert said == {"from-text": (n, 0), "round 1/2": (n, 0), "round 2/2": (n, 0)}

    # Dedup keeps one of each group of copies (the 20 repeated texts make 20 copies in each
    # round), with its provenance, and says so.
    kept = read_shard(deduped)
    by_id = {p["id"]: p for made_round in rounds for p in made_round}
    assert len(by_id) == 3 * n
    assert all(by_id[p["id"]] == p for p in kept)
    assert len({p["persona"] for p in kept}) == len(kept)
    found = re.search(
        r"read (\d+) records, kept (\d+); dropped (\d+) exact and (\d+) near", dedup_said
    )
    assert found, dedup_said
    read, kept_n, exact, near = map(int, found.groups())
    assert (read, kept_n, exact) == (3 * n, len(kept), 3 * (n // 6))
    assert kept_n + exact + near == read
    dropped = (d / "personas.dedup-report.jsonl").read_text().splitlines()
    assert len(dropped) == exact + near

    # Every math record names its persona; parent links lead back to the text line.
    out = assert_exactly_once(m, {f"personas:{i}:math:0" for i in range(1, len(kept) + 1)})
    assert len(out["results"]) == len(kept)
    text_of = {r["custom_id"]: r["persona"] for r in out0["results"]}
    for record in out["results"]:
        persona = by_id[record["meta"]["id"]]
        assert record["persona"] == persona["persona"]
        root = persona
        for _ in range(persona["round"]):
            parent = by_id[root["parent"]]
            assert parent["round"] == root["round"] - 1
            root = parent
        line = root["source"]["line"]
        assert root["source"] == {"shard": "texts", "line": line}
        assert persona.get("origin", root["source"]) == root["source"]
        assert text_of[root["id"]] == corpus[line - 1]["text"]

    # Done: rerunning every stage sends nothing.
    before = server_requests(slow_url)
    for args in from_text, expand, math:
        code, err = run_cli(args)
        assert code == 0, err
    assert "0 requests sent" in err
    assert server_requests(slow_url) == before
