"""Shared fixtures: input shards, output readers, and the loopback mock server."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import gzip
import logging
import lzma
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard
from aiohttp import web

from asyncgen.engine.transport import HttpResponse
from asyncgen.mock.server import MockConfig, MockServer

KINDS = ("results", "failures", "errors")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without OPENAI_* settings, for CLI subprocesses."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env.update(extra)
    return env


def write_shard(path: Path, records: Iterable[Any], *, compress: bool | None = None) -> Path:
    """Write JSON lines (objects are encoded; bytes are written as they are), compressed as
    the name says (``.zst``, ``.gz``, ``.xz``); or a Parquet file of the objects, by name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(records)), path, row_group_size=500)
        return path
    lines = [r if isinstance(r, bytes) else msgspec.json.encode(r) for r in records]
    data = b"".join(line + b"\n" for line in lines)
    if compress is None:
        compress = path.name.endswith(".zst")
    if compress:
        data = zstandard.ZstdCompressor(level=3).compress(data)
    elif path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".xz"):
        data = lzma.compress(data)
    path.write_bytes(data)
    return path


def personas(n: int, prefix: str = "person") -> list[dict[str, Any]]:
    return [{"persona": f"A {prefix} number {i} who likes puzzles", "idx": i} for i in range(n)]


def read_output(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Every record of every shard in ``out``, decoded independently of asyncgen's own reader
    (plain zstandard, reading across frames), grouped by kind."""
    found: dict[str, list[dict[str, Any]]] = {k: [] for k in KINDS}
    for kind in KINDS:
        # A job run by workers keeps its records in its partitions' directories.
        names = glob.glob(os.path.join(out, f"{kind}-*.jsonl.zst"))
        names += glob.glob(os.path.join(out, "parts", "*", f"{kind}-*.jsonl.zst"))
        for name in sorted(names):
            with open(name, "rb") as f:
                data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
            found[kind].extend(msgspec.json.decode(line) for line in data.splitlines())
    return found


def assert_exactly_once(out: Path, expected: set[str]) -> dict[str, list[dict[str, Any]]]:
    found = read_output(out)
    ids = [r["custom_id"] for kind in KINDS for r in found[kind]]
    dupes = {i: n for i, n in Counter(ids).items() if n > 1}
    assert not dupes, f"duplicated ids: {list(dupes)[:10]}"
    missing = expected - set(ids)
    assert not missing, f"{len(missing)} ids missing, e.g. {sorted(missing)[:5]}"
    extra = set(ids) - expected
    assert not extra, f"unexpected ids: {sorted(extra)[:5]}"
    return found


def assert_logically_once(out: Path, expected: set[str]) -> dict[str, dict[str, Any]]:
    """Like :func:`assert_exactly_once`, for a directory ``asyncgen retry-failed`` has worked
    on: an id may have several records, but every one after the first replaces a failure,
    and at most one is a success. Returns each id's current record."""
    found = read_output(out)
    current: dict[str, dict[str, Any]] = {}
    firsts: Counter[str] = Counter()
    for kind in ("failures", "results"):  # shards hold commit order; a success is final
        for r in found[kind]:
            cid = r["custom_id"]
            firsts[cid] += not r.get("replaces_failure", False)
            if kind == "results":
                assert current.get(cid, {}).get("error", True) is not None, f"{cid} succeeded twice"
            current[cid] = r
    twice = [i for i, n in firsts.items() if n != 1]
    assert not twice, f"ids recorded more than once without replacing a failure: {twice[:5]}"
    missing, extra = sorted(expected - set(current)), sorted(set(current) - expected)
    assert not missing and not extra, f"missing {missing[:5]}, extra {extra[:5]}"
    return current


@pytest.fixture
async def mock_server() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(seed=3)) as server:
        yield server


class Canned:
    """A transport answering every request with the same completion, recording the bodies."""

    base_url = "http://canned.invalid/v1"

    def __init__(self, content: str, finish_reason: str = "stop") -> None:
        self.bodies: list[dict[str, Any]] = []
        reply = {
            "choices": [{"message": {"content": content}, "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
        }
        self._reply = msgspec.json.encode(reply)

    async def post(self, path: str, body: bytes) -> HttpResponse:
        self.bodies.append({"path": path, **msgspec.json.decode(body)})
        return HttpResponse(200, {}, self._reply)

    async def get(self, path: str) -> HttpResponse:
        return HttpResponse(200, {}, b"{}")

    async def aclose(self) -> None:
        pass


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Serve ``app`` on a free loopback port; yields its base URL (``http://.../v1``)."""
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


async def until(done: Callable[[], bool]) -> None:
    """Poll a statistics snapshot until ``done()``, for at most a minute (the engine has no
    event for "N items done" or "N in flight"); wrap it in a shorter timeout if need be."""
    async with asyncio.timeout(60):
        while not done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def _asyncgen_logger_restored() -> Iterator[None]:
    """A command run in process (``main([...])``) configures the ``asyncgen`` logger; the
    next test gets it as it was."""
    logger = logging.getLogger("asyncgen")
    saved = (logger.level, list(logger.handlers), logger.propagate)
    yield
    logger.setLevel(saved[0])
    logger.handlers[:] = saved[1]
    logger.propagate = saved[2]
