"""Embedding jobs (/v1/embeddings as an endpoint kind), the mock's vectors, and semantic
dedup over them on loopback."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import struct
from pathlib import Path
from typing import Any

import msgspec
import pytest

from asyncgen import Engine, JobConfig
from asyncgen.core.embedding import EmbeddingError, vector_bytes, vector_floats
from asyncgen.core.errors import ConfigError, InputError
from asyncgen.core.retry import interpret
from asyncgen.job.prompts import parse_template
from asyncgen.mock.completions import BadRequest
from asyncgen.mock.embeddings import embed_text, embeddings_reply, read_embed
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import assert_exactly_once, read_output, serve, write_shard

FAST = {"backoff_base": 0.01, "backoff_cap": 0.05, "flush_interval": 0.05}


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / math.sqrt(
        sum(x * x for x in a) * sum(y * y for y in b)
    )


def test_mock_vectors_are_unit_deterministic_and_close_for_shared_words() -> None:
    a = embed_text("a retired nurse who grows tomatoes and reads crime novels on the porch")
    assert a == embed_text("A retired nurse who grows tomatoes and reads crime novels on the porch")
    assert len(a) == 256 and abs(sum(x * x for x in a) - 1) < 1e-9
    one_word = embed_text("a retired nurse who grows peppers and reads crime novels on the porch")
    other = embed_text("an astrophysicist studying pulsar timing with radio telescopes in Chile")
    assert cosine(a, one_word) > 0.85 > 0.3 > cosine(a, other)
    assert len(embed_text("x", 64)) == 64


def test_mock_reply_in_floats_and_base64_holds_the_same_vectors() -> None:
    raw = json.dumps({"model": "m", "input": ["one text", "two texts"], "dimensions": 8})
    floats = msgspec.json.decode(embeddings_reply(read_embed(raw.encode(), models=[]))[0])
    ask = read_embed(
        raw.replace('"dimensions"', '"encoding_format": "base64", "dimensions"').encode(), models=[]
    )
    packed = msgspec.json.decode(embeddings_reply(ask)[0])
    assert [d["index"] for d in floats["data"]] == [0, 1]
    for f, p in zip(floats["data"], packed["data"], strict=True):
        unpacked = struct.unpack("<8f", base64.b64decode(p["embedding"]))
        assert all(abs(x - y) < 1e-6 for x, y in zip(f["embedding"], unpacked, strict=True))
    assert floats["usage"]["prompt_tokens"] == floats["usage"]["total_tokens"] > 0
    for bad, message in (
        ({"model": "m", "input": ""}, "'input' must be"),
        ({"model": "m", "input": "t", "dimensions": 0}, "'dimensions' must be between"),
        ({"model": "m", "input": "t", "encoding_format": "int8"}, "'encoding_format'"),
    ):
        with pytest.raises(BadRequest, match=message):
            read_embed(json.dumps(bad).encode(), models=[])


def test_vector_bytes_reads_floats_and_base64_and_refuses_the_rest() -> None:
    as_floats = vector_bytes([0.5, -0.25, 1.0])
    assert vector_floats(as_floats) == [0.5, -0.25, 1.0]
    assert vector_bytes(base64.b64encode(as_floats).decode()) == as_floats
    for bad in ("not base64!", base64.b64encode(b"12345").decode(), [], None, ["x"]):
        with pytest.raises(EmbeddingError):
            vector_bytes(bad)
    reply = b'{"data": [{"embedding": [0.1, 0.2], "index": 0}], "model": "e"}'
    good = interpret(200, reply, embeddings=True)
    assert good.completion is not None and good.error is None
    # The same reply to a chat request is not a completion.
    wrong = interpret(200, reply)
    assert wrong.error is not None and wrong.error.message == "200 with no choices"
    broken = interpret(200, b'{"data": [{"embedding": "@@@", "index": 0}]}', embeddings=True)
    assert broken.error is not None and broken.error.code == "malformed_response"
    assert broken.retryable


def test_embeddings_template_renders_input_and_keeps_sampling() -> None:
    t = parse_template(
        'endpoint = "embeddings"\nuser = "{persona}"\n[sampling]\ndimensions = 64\n', name="e"
    )
    assert t.url == "/embeddings"
    body = t.render({"persona": "a baker"})
    assert body == {"input": "a baker", "dimensions": 64, "encoding_format": "base64"}
    floats = parse_template(
        'endpoint = "embeddings"\nuser = "{persona}"\n[sampling]\nencoding_format = "float"\n',
        name="f",
    )
    assert floats.render({"persona": "p"})["encoding_format"] == "float"
    for text, message in (
        ('endpoint = "embeddings"\nsystem = "s"\nuser = "{persona}"', "no system message"),
        ('endpoint = "embeddings"\nuser = "{persona}"\n[sampling]\ninput = "x"', "input"),
        (
            'endpoint = "embeddings"\nuser = "{persona}"\n[output]\nformat = "json_object"',
            "no \\[output",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_template(text, name="bad")


def persona_lines(n: int) -> list[dict[str, Any]]:
    return [{"persona": f"a chemist number {i} who collects maps of lost rivers"} for i in range(n)]


def embed_job(tmp_path: Path, urls: list[str], inputs: list[Path], **kw: Any) -> JobConfig:
    prompt = tmp_path / "emb.toml"
    prompt.write_text('endpoint = "embeddings"\nuser = "{persona}"\n[sampling]\ndimensions = 48\n')
    settings: dict[str, Any] = {
        "inputs": [str(p) for p in inputs],
        "output": str(tmp_path / "out"),
        "prompt": str(prompt),
        "model": "mock-model",
        "base_url": urls if len(urls) > 1 else urls[0],
        "concurrency": 32,
        "max_attempts": 12,
        **FAST,
        **kw,
    }
    return JobConfig(**settings)


async def test_embedding_job_with_faults_on_two_endpoints_exactly_once(tmp_path: Path) -> None:
    faults = {"fail_500": 0.05, "fail_429": 0.05, "retry_after": 0.01, "malformed": 0.05}
    inputs = [write_shard(tmp_path / "p.jsonl", persona_lines(600))]
    async with (
        MockServer(MockConfig(seed=1, **faults)) as one,  # type: ignore[arg-type]
        MockServer(MockConfig(seed=2, **faults)) as two,  # type: ignore[arg-type]
    ):
        config = embed_job(tmp_path, [one.base_url, two.base_url], inputs, rpm=60_000)
        async with Engine(config, rng=random.Random(3)) as engine:
            stats = await engine.run()
        served = [s.statistics().by_route.get("/v1/embeddings", 0) for s in (one, two)]
    assert stats.finished and stats.succeeded == 600 and stats.retries > 10
    assert min(served) > 50, served  # both endpoints took a share
    found = assert_exactly_once(tmp_path / "out", {f"p:{i}:emb:0" for i in range(1, 601)})
    for record in found["results"][:50]:
        vector = struct.unpack("<48f", base64.b64decode(record["embedding"]))
        expected = embed_text(record["persona"], 48)
        assert all(abs(x - y) < 1e-6 for x, y in zip(vector, expected, strict=True))
        assert record["output"] is None and record["sampling"]["dimensions"] == 48
        assert record["usage"]["prompt_tokens"] > 0
    # A finished job sends nothing again.
    async with MockServer(MockConfig()) as three:
        config = embed_job(tmp_path, [three.base_url], inputs)
        async with Engine(config) as engine:
            again = await engine.run()
        assert three.statistics().requests == 0 and again.succeeded == 0


async def test_embeddings_do_not_stream(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", persona_lines(2))]
    with pytest.raises(ConfigError, match="do not stream"):
        async with Engine(embed_job(tmp_path, ["http://127.0.0.1:9/v1"], inputs, stream=True)):
            pass


def planted(rng: random.Random, distinct: int, copies: int) -> tuple[list[str], set[int]]:
    """Distinct personas over a large vocabulary, with near copies (one word of about thirty
    changed) of earlier ones among them; returns the texts and the positions of the copies."""
    vocabulary = [f"w{k}" for k in range(20_000)]
    originals: list[str] = []
    texts: list[str] = []
    copy_at: set[int] = set()
    for _ in range(distinct):
        text = "a person who " + " ".join(rng.choice(vocabulary) for _ in range(30))
        originals.append(text)
        texts.append(text)
        if rng.random() < copies / distinct:
            words = rng.choice(originals).split()
            words[rng.randrange(3, len(words))] = rng.choice(vocabulary)
            copy_at.add(len(texts))
            texts.append(" ".join(words))
    return texts, copy_at


async def test_semantic_dedup_removes_planted_copies_and_keeps_distinct(tmp_path: Path) -> None:
    from asyncgen.cli.main import main

    rng = random.Random(7)
    texts, copies = planted(rng, 1500, 150)
    # The planted data is what the issue describes, under the mock's vectors.
    vectors = [embed_text(t, 48 * 4) for t in texts]
    originals = [i for i in range(len(texts)) if i not in copies]
    for i in sorted(copies)[:40]:
        assert max(cosine(vectors[i], vectors[j]) for j in originals if j < i) >= 0.95
    sample = rng.sample(originals, 200)
    assert max(cosine(vectors[a], vectors[b]) for a in sample for b in sample if a < b) <= 0.8

    shard = write_shard(tmp_path / "p.jsonl", [{"persona": t} for t in texts])
    prompt = tmp_path / "emb.toml"
    prompt.write_text('endpoint = "embeddings"\nuser = "{persona}"\n[sampling]\ndimensions = 192\n')
    async with MockServer(MockConfig(seed=1)) as server:
        config = JobConfig(
            inputs=[str(shard)], output=str(tmp_path / "emb"), prompt=str(prompt),
            model="mock-model", base_url=server.base_url, concurrency=32, **FAST,
        )  # fmt: skip
        async with Engine(config) as engine:
            assert (await engine.run()).succeeded == len(texts)
    out, report = tmp_path / "kept.jsonl", tmp_path / "report.jsonl"
    args = ["personas", "dedup", "--semantic", "--threshold", "0.9",
            "--embeddings", str(tmp_path / "emb"), "--input", str(shard),
            "-o", str(out), "--report", str(report)]  # fmt: skip
    assert main(args) == 0
    kept = [json.loads(line)["persona"] for line in out.read_text().splitlines()]
    dropped = [json.loads(line) for line in report.read_text().splitlines()]
    removed = {int(d["id"].split(":")[1]) - 1 for d in dropped}
    caught = len(removed & copies) / len(copies)
    wrong = len(removed - copies) / len(originals)
    assert caught >= 0.95 and wrong <= 0.01, (caught, wrong)
    assert len(kept) + len(dropped) == len(texts)
    for d in dropped:
        assert d["reason"] == "semantic" and d["similarity"] >= 0.9
        i, j = int(d["id"].split(":")[1]) - 1, int(d["duplicate_of"].split(":")[1]) - 1
        assert j < i and j not in removed  # first kept wins: the neighbour is earlier, kept
        assert abs(cosine(vectors[i], vectors[j]) - d["similarity"]) < 0.01
    assert read_output(tmp_path / "emb")["failures"] == []
    # The index in shards of 400 kept vectors, written out and searched memory-mapped: the
    # same verdicts (these shards are small enough to be searched exhaustively).
    sharded = tmp_path / "sharded.jsonl"
    args[args.index("-o") + 1] = str(sharded)
    args[args.index("--report") + 1] = str(tmp_path / "sharded-report.jsonl")
    assert main([*args, "--index-shard-size", "400"]) == 0
    assert sharded.read_text() == out.read_text()
    assert (tmp_path / "sharded-report.jsonl").read_text() == report.read_text()
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob(".semantic-index-*")))


def test_semantic_dedup_needs_embeddings(tmp_path: Path) -> None:
    from asyncgen.cli.main import main

    shard = write_shard(tmp_path / "p.jsonl", persona_lines(3))
    args = ["personas", "dedup", "--semantic", "--input", str(shard), "-o", str(tmp_path / "o")]
    assert main(args) == 2
    assert main([*args, "--embeddings", str(tmp_path / "nothing")]) == 2


def test_diversity_of_near_copies_is_lower_than_of_distinct_vectors() -> None:
    import numpy as np

    from asyncgen.personas.diversity import diversity

    rng = np.random.default_rng(0)
    distinct = rng.standard_normal((400, 32)).astype(np.float32)
    close = np.repeat(distinct[:100], 4, axis=0) + 0.05 * rng.standard_normal((400, 32))
    wide, narrow = diversity(distinct, sample=400, pairs=5000), diversity(close, sample=400)
    assert wide.exact and wide.vectors == 400 and wide.dimensions == 32
    assert wide.nearest is not None and narrow.nearest is not None and wide.pairs is not None
    assert wide.nearest.count == 400 and wide.pairs.count == 5000
    assert narrow.nearest.p50 > 0.99 > 0.8 > wide.nearest.p90  # copies have a twin
    assert abs(wide.pairs.mean) < 0.05 and wide.pairs.p10 < 0 < wide.pairs.p90
    # No vector is its own neighbour: exact copies are found as each other's, at 1.
    twins = diversity(np.concatenate([distinct, distinct]), sample=100)
    assert twins.nearest is not None and twins.nearest.p10 > 0.999


def test_diversity_past_the_exact_bound_matches_numpy_on_planted_copies() -> None:
    """Past ``EXACT_UP_TO`` vectors the report searches semantic dedup's inverted file:
    each planted near copy's nearest similarity is the exact one (fp16 rounding aside),
    and the distinct vectors' are short of it by little (an HNSW graph lost copies)."""
    import numpy as np

    from asyncgen.personas.diversity import EXACT_UP_TO, diversity, nearest_similarity
    from asyncgen.personas.semantic import unit_rows

    rng = np.random.default_rng(5)
    distinct, copied, dims = 45_000, 15_000, 48
    base = rng.standard_normal((distinct, dims)).astype(np.float32)
    noise = rng.uniform(0.1, 0.3, (copied, 1)) * rng.standard_normal((copied, dims))
    rows = unit_rows(np.concatenate([base, base[:copied] + noise.astype(np.float32)]))
    n = len(rows)
    assert n > EXACT_UP_TO
    queries = rng.choice(n, size=1500, replace=False)
    found = nearest_similarity(rows, queries)
    exact = np.empty(len(queries), dtype=np.float32)
    for s in range(0, len(queries), 500):
        block = queries[s : s + 500]
        sims = rows[block] @ rows.T
        sims[np.arange(len(block)), block] = -2.0  # not its own neighbour
        exact[s : s + 500] = sims.max(axis=1)
    planted = (queries < copied) | (queries >= distinct)
    assert planted.sum() > 600 and exact[planted].min() > 0.9
    assert np.abs(found[planted] - exact[planted]).max() < 0.005
    assert (found <= exact + 0.005).all()  # never closer than the truth
    short = exact[~planted] - found[~planted]
    assert short.mean() < 0.015 and (short > 0.01).mean() < 0.2
    report = diversity(rows, sample=1500, pairs=1000)
    assert not report.exact and report.nearest is not None
    assert abs(report.nearest.p90 - float(np.quantile(exact, 0.9))) < 0.02


def test_stats_semantic_prints_the_similarity_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncgen.cli.main import main
    from asyncgen.storage.shards import LinesWriter

    out = tmp_path / "emb"
    out.mkdir()
    shard = write_shard(tmp_path / "p.jsonl", persona_lines(30))
    with LinesWriter(out / "results-000001.jsonl.zst") as w:
        for i in range(1, 31):
            vector = vector_bytes(embed_text(f"persona {i % 10} who likes maps", 16))
            record = {"custom_id": f"p:{i}:e:0", "source": {"shard": "p", "line": i}}
            w.write(msgspec.json.encode({**record, "embedding": vector}))
    args = ["personas", "stats", "--input", str(shard), "--semantic", "--embeddings", str(out)]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "vectors            30 x 16" in text and "nearest (exact)" in text
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["semantic"]["nearest"]["p50"] > 0.99  # every text has nine equal ones
    assert report["text"]["records"] == 30


def test_interpret_matches_several_vectors_to_their_inputs() -> None:
    def reply(*entries: dict[str, Any]) -> bytes:
        return msgspec.json.encode({"data": list(entries), "model": "e"})

    def vec(index: int | None) -> dict[str, Any]:
        entry: dict[str, Any] = {"embedding": [0.1, float(index or 0)]}
        if index is not None:
            entry["index"] = index
        return entry

    shuffled = interpret(200, reply(vec(2), vec(0), vec(1)), embeddings=3)
    assert shuffled.completion is not None
    assert [e.index for e in shuffled.completion.data] == [2, 0, 1]
    # Without indexes, by position; a reply that leaves an input out is good for the rest.
    assert interpret(200, reply(vec(None), vec(None)), embeddings=2).error is None
    partial = interpret(200, reply(vec(0), vec(2)), embeddings=3)
    assert partial.completion is not None and len(partial.completion.data) == 2
    for entries, message in (
        ((vec(0), vec(0)), "do not match 3 inputs"),
        ((vec(0), vec(3)), "do not match 3 inputs"),
        ((vec(0), vec(1), vec(2), vec(None)), "4 vectors for 3 inputs"),
    ):
        bad = interpret(200, reply(*entries), embeddings=3)
        assert bad.error is not None and bad.error.code == "malformed_response"
        assert message in bad.error.message and bad.retryable
    one = interpret(200, reply(vec(1)), embeddings=1)
    assert one.error is not None and "input 1 of one" in one.error.message


async def test_batched_embedding_job_gives_each_text_its_own_vector(tmp_path: Path) -> None:
    # Faults, and replies that leave a vector out: each text still gets its own vector
    # (matched by index), exactly once, from about a sixteenth of the requests.
    faults = {"fail_500": 0.05, "fail_429": 0.05, "retry_after": 0.01, "malformed": 0.05}
    lines = [
        {"persona": f"person {i} " + " ".join(f"w{i * 7 + k}" for k in range(6))}
        for i in range(1000)
    ]
    inputs = [write_shard(tmp_path / "p.jsonl", lines)]
    async with MockServer(MockConfig(seed=4, embed_partial=0.2, **faults)) as mock:  # type: ignore[arg-type]
        config = embed_job(tmp_path, [mock.base_url], inputs, embed_batch=16)
        async with Engine(config, rng=random.Random(5)) as engine:
            stats = await engine.run()
        served = mock.statistics()
    assert stats.finished and stats.succeeded == 1000 and stats.failed == 0
    assert 1000 / 16 < stats.requests < 1000 / 4 and served.requests == stats.requests
    found = assert_exactly_once(tmp_path / "out", {f"p:{i}:emb:0" for i in range(1, 1001)})
    for record in found["results"]:
        vector = struct.unpack("<48f", base64.b64decode(record["embedding"]))
        expected = embed_text(lines[record["source"]["line"] - 1]["persona"], 48)
        assert all(abs(x - y) < 1e-6 for x, y in zip(vector, expected, strict=True))
    # Each record's share of its request's prompt tokens; together what the server counted.
    assert sum(r["usage"]["prompt_tokens"] for r in found["results"]) == served.prompt_tokens
    assert all(r["usage"]["prompt_tokens"] > 0 for r in found["results"])


async def test_texts_a_reply_leaves_out_are_sent_again_then_fail_alone(tmp_path: Path) -> None:
    from aiohttp import web

    sizes: list[int] = []

    async def first_only(request: web.Request) -> web.Response:
        # A server that embeds only the first text of each request.
        texts = (await request.json())["input"]
        sizes.append(len(texts))
        data = [{"index": 0, "embedding": [1.0, float(len(texts[0]))]}]
        return web.json_response({"data": data, "model": "e", "usage": {"prompt_tokens": 5}})

    app = web.Application()
    app.router.add_post("/v1/embeddings", first_only)
    inputs = [write_shard(tmp_path / "p.jsonl", [{"persona": f"text {i}"} for i in range(10)])]
    async with serve(app) as url:
        config = embed_job(
            tmp_path, [url], inputs, embed_batch=4, max_attempts=3, check_endpoint=False
        )
        async with Engine(config) as engine:
            stats = await engine.run()
    # Lines 1-4: 4 texts, then the 3 left out, then 2, then line 4 is given up (3 rounds);
    # 5-8 the same; 9-10: 2 texts, then line 10 alone.
    assert sorted(sizes) == [1, 2, 2, 2, 3, 3, 4, 4]
    assert stats.finished and stats.succeeded == 8 and stats.failed == 2
    found = assert_exactly_once(tmp_path / "out", {f"p:{i}:emb:0" for i in range(1, 11)})
    assert sorted(f["custom_id"] for f in found["failures"]) == ["p:4:emb:0", "p:8:emb:0"]
    for failure in found["failures"]:
        assert failure["error"]["code"] == "malformed_response"
        assert "gave up after 3 replies" in failure["error"]["message"]
    assert all(r["usage"]["prompt_tokens"] == 5 for r in found["results"])
    # A text alone that gets no vector is retried like any item.
    (tmp_path / "q").mkdir()
    inputs = [write_shard(tmp_path / "q.jsonl", [{"persona": "x"}])]

    async def nothing(request: web.Request) -> web.Response:
        return web.json_response({"data": [], "model": "e"})

    app = web.Application()
    app.router.add_post("/v1/embeddings", nothing)
    async with serve(app) as url:
        config = embed_job(
            tmp_path / "q", [url], inputs, embed_batch=4, max_attempts=2, check_endpoint=False
        )
        async with Engine(config) as engine:
            stats = await engine.run()
    assert stats.failed == 1
    (failure,) = read_output(tmp_path / "q" / "out")["failures"]
    assert "200 with no vectors" in failure["error"]["message"]


async def test_embed_batch_needs_an_embeddings_template_and_the_online_backend(
    tmp_path: Path,
) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", persona_lines(2))]
    chat = embed_job(tmp_path, ["http://127.0.0.1:9/v1"], inputs, embed_batch=4)
    chat = msgspec.structs.replace(chat, prompt="math")
    with pytest.raises(ConfigError, match='endpoint = "embeddings"'):
        async with Engine(chat):
            pass
    with pytest.raises(ConfigError, match="needs the online backend"):
        embed_job(
            tmp_path, ["http://127.0.0.1:9/v1"], inputs, embed_batch=4, backend="batch"
        ).validate()
    with pytest.raises(ConfigError, match="embed batch must be"):
        embed_job(tmp_path, ["http://127.0.0.1:9/v1"], inputs, embed_batch=4096).validate()


def test_semantic_dedup_finds_copies_before_and_after_its_index_is_inverted(
    tmp_path: Path,
) -> None:
    import numpy as np

    from asyncgen.personas.semantic import SemanticDeduplicator, inverted_lists

    assert [inverted_lists(n) for n in (None, 1000, 1_000_000, 10**12)] == [1024, 256, 2048, 65536]
    rng = np.random.default_rng(3)
    n, dims = 16_000, 64
    vectors = rng.standard_normal((n, dims)).astype(np.float32)
    original: dict[int, int] = {}
    for i in range(200, n):
        if rng.random() < 0.1:  # a near copy (cosine about 0.99) of an earlier non-copy
            j = int(rng.integers(0, i))
            while j in original:
                j = int(rng.integers(0, i))
            original[i] = j
            vectors[i] = vectors[j] + 0.15 * rng.standard_normal(dims)
    dedup = SemanticDeduplicator(threshold=0.9, expected=n)
    verdicts: list[Any] = []
    exact_until = None
    for s in range(0, n, 2048):
        verdicts += dedup.check_block(vectors[s : s + 2048], range(s, min(n, s + 2048)))
        if exact_until is None and "ivf256" in repr(dedup):
            exact_until = s + 2048  # 40 kept vectors per list (10 240) make it train
    assert exact_until is not None and 10_240 < exact_until < n
    found = {i: v.neighbour for i, v in enumerate(verdicts) if not v.kept}
    assert set(found) <= set(original)  # no distinct vector dropped
    assert all(found[i] == original[i] for i in found)
    before = [i for i in original if i < exact_until - 2048]
    after = [i for i in original if i >= exact_until]
    assert all(i in found for i in before)  # exact
    assert sum(i in found for i in after) >= 0.98 * len(after)
    s = dedup.statistics()
    assert (s.seen, s.dropped, s.dimensions) == (n, len(found), dims)
    # In shards of 4 000 kept vectors, each full one written out and memory-mapped: every
    # search looks in each, so the copies are found as well.
    from asyncgen.personas.semantic_files import _spiller

    sharded = SemanticDeduplicator(
        threshold=0.9, expected=n, shard_size=4000, spill=_spiller(tmp_path)
    )
    verdicts = []
    for s0 in range(0, n, 2048):
        verdicts += sharded.check_block(vectors[s0 : s0 + 2048], range(s0, min(n, s0 + 2048)))
    # Shards fill a block at a time: 4 000 to 6 047 kept vectors each.
    assert sharded.shards == 1 + len(list(tmp_path.glob("shard-*.faiss"))) >= 3
    again = {i: v.neighbour for i, v in enumerate(verdicts) if not v.kept}
    assert set(again) <= set(original) and all(again[i] == original[i] for i in again)
    assert len(again) >= 0.98 * len(original)


async def test_export_vectors_writes_a_float32_matrix_and_its_ids(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from asyncgen.cli.main import main

    inputs = [write_shard(tmp_path / "p.jsonl", persona_lines(300))]
    async with MockServer(MockConfig(seed=2, fail_500=0.05)) as mock:
        config = embed_job(tmp_path, [mock.base_url], inputs, embed_batch=32)
        async with Engine(config) as engine:
            await engine.run()
    out = tmp_path / "out"
    assert (
        await asyncio.to_thread(
            main, ["export", str(out), "--format", "vectors", "--to", str(tmp_path / "v.npy")]
        )
        == 0
    )
    assert "wrote 300 vectors" in capsys.readouterr().err
    matrix = np.load(tmp_path / "v.npy")
    assert matrix.dtype == np.float32 and matrix.shape == (300, 48)
    ids = [json.loads(line) for line in (tmp_path / "v.ids.jsonl").read_text().splitlines()]
    records = {r["custom_id"]: r for r in read_output(out)["results"]}
    assert sorted(i["custom_id"] for i in ids) == sorted(records)
    for row, entry in zip(matrix, ids, strict=True):
        record = records[entry["custom_id"]]
        assert (entry["shard"], entry["line"]) == ("p", record["source"]["line"])
        assert row.tobytes() == base64.b64decode(record["embedding"])
    with pytest.raises(ConfigError, match=r"writes a \.npy file"):
        await asyncio.to_thread(export_vectors_to, out, tmp_path / "v.jsonl")
    # A chat job's output has no vectors to export.
    chat = tmp_path / "chat"
    async with MockServer(MockConfig()) as mock:
        cfg = JobConfig(
            inputs=[str(inputs[0])],
            output=str(chat),
            prompt="math",
            model="mock-model",
            base_url=mock.base_url,
        )
        async with Engine(cfg) as engine:
            await engine.run()
    with pytest.raises(InputError, match="has no embedding"):
        await asyncio.to_thread(export_vectors_to, chat, tmp_path / "c.npy")
    assert not (tmp_path / "c.npy").exists() and not (tmp_path / "c.ids.jsonl").exists()


def export_vectors_to(root: Path, to: Path) -> int:
    from asyncgen.storage.export import export

    return export(root, to, "vectors")


async def test_a_stopped_batched_job_resumes_exactly_once(tmp_path: Path) -> None:
    # Stopped while groups wait between attempts (500s), are in flight, or are gathered:
    # each text's claim is released or its record committed, and the rerun sends the rest.
    inputs = [write_shard(tmp_path / "p.jsonl", persona_lines(2000))]
    faults = MockConfig(seed=3, latency=0.05, fail_500=0.3)
    async with MockServer(faults) as mock:
        config = embed_job(tmp_path, [mock.base_url], inputs, embed_batch=8, concurrency=8)
        async with Engine(config, rng=random.Random(1)) as engine:

            async def stop_soon() -> None:
                while engine.statistics().succeeded < 100:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                engine.stop()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(stop_soon())
                stats = await engine.run()
    assert stats.stopped and not stats.finished and stats.in_flight == 0
    assert 100 <= stats.succeeded < 2000
    async with MockServer(MockConfig(seed=4)) as mock:
        config = embed_job(tmp_path, [mock.base_url], inputs, embed_batch=8)
        async with Engine(config) as engine:
            again = await engine.run()
    assert again.finished and again.succeeded == 2000 - stats.succeeded
    assert_exactly_once(tmp_path / "out", {f"p:{i}:emb:0" for i in range(1, 2001)})
