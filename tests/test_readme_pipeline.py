"""README's whole pipeline, run as the README writes it: text → personas → MinHash dedup →
embeddings → semantic dedup → synthesis, against a loopback server, every record traced back
to its text line.

The server stands in for a chat model and an embedding model: a persona is the text it was
asked about, prefixed; a text's embedding is the mock's bag-of-words vector after mapping each
synonym ``vN`` to its word ``wN``. So a paraphrase (half its words swapped for synonyms) has
the same vector as its original while sharing too few words for MinHash: the case the
semantic stage is for."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import random
import re
import shlex
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from asyncgen.cli.main import main
from asyncgen.mock.embeddings import embed_text

from .conftest import assert_exactly_once, write_shard
from .test_pipeline import read_shard

ROOT = Path(__file__).resolve().parent.parent
_TEXT = re.compile(r"<text>\n(.*?)\n</text>", re.S)


def pipeline_commands() -> list[list[str]]:
    """The commands of README's "The whole pipeline" block, without the leading asyncgen."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("### The whole pipeline", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.+?)\n```", section, re.S)
    assert block is not None
    commands = [shlex.split(line) for line in block.group(1).splitlines() if line.strip()]
    assert all(c[0] == "asyncgen" for c in commands)
    return [c[1:] for c in commands]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def at(key: str) -> int:
    """The index in its shard of a report's ``shard:line`` key."""
    return int(key.rsplit(":", 1)[1]) - 1


def canonical(text: str) -> str:
    return re.sub(r"\bv(\d+)\b", r"w\1", text)


def make_app() -> tuple[web.Application, dict[str, int]]:
    seen = {"chat": 0, "embeddings": 0, "texts": 0}

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock-model"}]})

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        seen["chat"] += 1
        prompt = body["messages"][-1]["content"]
        found = _TEXT.search(prompt)
        if found is not None:  # text to persona
            answer = f"A reader who cares about {found.group(1)}"
        else:  # a math problem for the persona
            answer = f"How many ways are there to order {len(prompt)} clocks?"
        return web.json_response(
            {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
                "model": body["model"],
                "usage": {"prompt_tokens": 10, "completion_tokens": 8, "total_tokens": 18},
            }
        )

    async def embeddings(request: web.Request) -> web.Response:
        body = await request.json()
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        seen["embeddings"] += 1
        seen["texts"] += len(texts)
        data = []
        for i, text in enumerate(texts):
            vector = embed_text(canonical(text))
            packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": packed})
        usage = {"prompt_tokens": 5 * len(texts), "total_tokens": 5 * len(texts)}
        return web.json_response({"data": data, "model": body["model"], "usage": usage})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_post("/v1/embeddings", embeddings)
    return app, seen


@contextlib.contextmanager
def served_in_thread(app: web.Application) -> Iterator[str]:
    """Serve ``app`` from a loop of its own in a thread (the CLI runs its own loops here)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app, shutdown_timeout=0.1)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


def corpus(rng: random.Random) -> tuple[list[dict[str, Any]], dict[int, int], dict[int, int]]:
    """Texts in input order, and by line: exact repeats and paraphrases, each of its line."""
    texts: list[dict[str, Any]] = []
    repeats: dict[int, int] = {}
    paraphrases: dict[int, int] = {}
    copied: set[int] = set()
    """Lines copied or copies: each copy is of a text of its own, copied once."""
    for i in range(60):
        line = len(texts) + 1
        if i >= 10 and i % 6 == 0:
            of = rng.choice([k for k in range(1, line) if k not in copied])
            copied.add(of)
            repeats[line] = of
            texts.append(dict(texts[of - 1]))
        elif i >= 10 and i % 6 == 3:
            of = rng.choice([k for k in range(1, line) if k not in copied])
            copied.add(of)
            paraphrases[line] = of
            words = texts[of - 1]["text"].split()
            swapped = [("v" + w[1:]) if k % 2 else w for k, w in enumerate(words)]
            texts.append({"text": " ".join(swapped)})
        else:
            texts.append({"text": " ".join(f"w{rng.randrange(100_000)}" for _ in range(20))})
            continue
        copied.add(line)
    return texts, repeats, paraphrases


@pytest.mark.timeout(240)
def test_readme_pipeline_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    texts, repeats, paraphrases = corpus(random.Random(11))
    write_shard(tmp_path / "web" / "texts.jsonl.zst", texts)
    monkeypatch.chdir(tmp_path)
    app, seen = make_app()
    with served_in_thread(app) as url:
        for command in pipeline_commands():
            args = ["mock-model" if a in ("MODEL", "EMBEDDING_MODEL") else a for a in command]
            if args[0] == "run" or args[:2] == ["personas", "from-text"]:
                args += ["--base-url", url, "-q"]
            capsys.readouterr()
            code = main(args)
            err = capsys.readouterr().err
            assert code == 0, (args, err)
    n = len(texts)
    unique = [line for line in range(1, n + 1) if line not in repeats]
    final = [line for line in unique if line not in paraphrases]
    # The embedding job sent several texts per request (README's --embed-batch).
    assert seen["texts"] == len(unique) and seen["embeddings"] < len(unique) / 4

    # MinHash dropped the exact repeats, naming their originals, and kept the paraphrases
    # (too few words in common); the semantic stage dropped each paraphrase, naming the
    # persona of its original. Report ids are the stage's input shard and line. Which of a
    # pair is kept is the one first in the stage's input, and the persona shard is in the
    # order its job committed (replies' order, under load not the texts'): so one of each.
    personas = {p["id"]: p for p in read_shard(tmp_path / "p0" / "personas.jsonl.zst")}
    by_line = [p["source"]["line"] for p in read_shard(tmp_path / "p0" / "personas.jsonl.zst")]
    assert sorted(by_line) == list(range(1, n + 1))
    kept_unique = [p["source"]["line"] for p in read_shard(tmp_path / "unique.jsonl.zst")]
    assert_one_of_each_pair(kept_unique, range(1, n + 1), repeats)
    kept_final = [p["source"]["line"] for p in read_shard(tmp_path / "final.jsonl.zst")]
    assert_one_of_each_pair(kept_final, kept_unique, paraphrases)
    assert len(kept_unique) == len(unique) and len(kept_final) == len(final)
    for report, lines, copies, reason in (
        ("unique", by_line, repeats, "exact"),
        ("final", kept_unique, paraphrases, "semantic"),
    ):
        rows = read_jsonl(tmp_path / f"{report}.dedup-report.jsonl")
        said = {frozenset((lines[at(r["id"])], lines[at(r["duplicate_of"])])) for r in rows}
        assert said == {frozenset(pair) for pair in copies.items()}
        assert {r["reason"] for r in rows} == {reason}

    # Every math record traces back to its text line, through the persona it was made for.
    out = assert_exactly_once(
        tmp_path / "math", {f"final:{i}:math:0" for i in range(1, len(final) + 1)}
    )
    for record in out["results"]:
        persona = personas[record["meta"]["id"]]
        assert record["persona"] == persona["persona"]
        line = persona["source"]["line"]
        assert persona["source"] == {"shard": "texts", "line": line}
        assert persona["persona"] == f"A reader who cares about {texts[line - 1]['text']}"
    assert sorted(personas[r["meta"]["id"]]["source"]["line"] for r in out["results"]) == sorted(
        kept_final
    )


def assert_one_of_each_pair(kept: list[int], lines: Iterable[int], pairs: dict[int, int]) -> None:
    """``kept`` holds each of ``lines`` that is in no pair, and one line of each pair."""
    found = set(kept)
    assert len(found) == len(kept), "a line kept twice"
    paired = {line for pair in pairs.items() for line in pair}
    assert found == {line for line in lines if line not in paired} | (found & paired)
    for copy, original in pairs.items():
        assert len(found & {copy, original}) == 1, (copy, original, sorted(found))
