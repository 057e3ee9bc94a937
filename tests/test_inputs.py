"""Input formats and damaged inputs, end to end: gzip, xz, Parquet, directories, and files cut
or corrupted mid-stream (named with byte offset and decoder error, the lines before kept)."""

from __future__ import annotations

import asyncio
import gzip
import lzma
import re
import sys
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard
from aiohttp import web

from asyncgen import Engine
from asyncgen.core.errors import ConfigError, InputError
from asyncgen.mock.server import MockServer
from asyncgen.storage.sources import ShardReader, expand_inputs

from .conftest import assert_exactly_once, personas, write_shard
from .test_cli import _cli_async
from .test_engine import ids_for, job


def jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(msgspec.json.encode(r) + b"\n" for r in records)


def cut_zstd(path: Path, n: int) -> Path:
    """A zstd shard of ``n`` personas in one frame, cut in the middle of it."""
    data = zstandard.ZstdCompressor(level=3).compress(jsonl(personas(n)))
    path.write_bytes(data[: len(data) // 2])
    return path


def read_lines(path: Path) -> list[int]:
    reader = ShardReader(path)
    numbers: list[int] = []
    while batch := reader.read_batch(500):
        numbers.extend(line.lineno for line in batch)
    return numbers


async def test_a_truncated_zstd_shard_is_named_and_the_lines_before_are_kept(
    tmp_path: Path, mock_server: MockServer
) -> None:
    big = cut_zstd(tmp_path / "big.jsonl.zst", 8000)  # several blocks: some decode
    small = cut_zstd(tmp_path / "small.jsonl.zst", 50)  # one block: nothing decodes
    good = write_shard(tmp_path / "good.jsonl", personas(40))
    async with Engine(job(tmp_path, mock_server, [big, small, good])) as engine:
        stats = await engine.run()
    assert stats.finished
    assert len(stats.bad_files) == 2
    kept = int(re.search(r"lines 1-(\d+) were read", stats.bad_files[0]).group(1))  # type: ignore[union-attr]
    assert 1000 < kept < 8000
    expected = ids_for("big", kept) | ids_for("good", 40) | {"big:file", "small:file"}
    found = assert_exactly_once(tmp_path / "out", expected)
    errors = {r["custom_id"]: r for r in found["errors"]}
    size = small.stat().st_size
    message = errors["small:file"]["error"]["message"]
    assert errors["small:file"]["path"] == str(small)
    assert f"cut off at byte {size}" in message and "zstd error" in message
    assert "no line was read before it" in message
    assert errors["big:file"]["source"] == {"shard": "big", "line": kept}

    # the command line: stderr names each file, byte offset and error; the rest goes on
    out = tmp_path / "cli"
    args = ["run", "-i", str(small), str(good), "-p", "math", "-m", "mock-model"]
    args += ["--base-url", mock_server.base_url, "--quiet", "-o"]
    result = await _cli_async(*args, str(out))
    assert result.returncode == 1, result.stderr
    assert "nothing to do" not in result.stderr
    assert (
        "small.jsonl.zst: truncated zstd file: the frame starting at byte 0 is cut off at "
        f"byte {size}" in result.stderr
    )
    assert "40 succeeded" in result.stderr
    strict = await _cli_async(*args, str(tmp_path / "strict"), "--strict")
    assert strict.returncode == 2 and "small.jsonl.zst: truncated zstd" in strict.stderr


def test_corrupt_zstd_data_names_the_bytes_and_the_zstd_error(tmp_path: Path) -> None:
    c = zstandard.ZstdCompressor(level=3)
    first = c.compress(jsonl(personas(10)))
    second = bytearray(c.compress(jsonl(personas(10, "late"))))
    second[len(second) // 2 :] = b"\xff" * (len(second) - len(second) // 2)
    path = tmp_path / "c.jsonl.zst"
    path.write_bytes(first + bytes(second))
    reader = ShardReader(path)
    assert [line.lineno for line in reader.read_batch(100)] == list(range(1, 11))
    with pytest.raises(InputError, match=rf"frame starting at byte {len(first)}\): zstd error: "):
        reader.read_batch(100)


@pytest.mark.parametrize(
    ("name", "compress"),
    [("p.jsonl.gz", gzip.compress), ("p.jsonl.xz", lzma.compress), ("p.jsonl", gzip.compress)],
)
def test_gzip_and_xz_are_streamed_and_told_by_their_bytes(
    tmp_path: Path, name: str, compress: Any
) -> None:
    records = personas(3000)
    data = compress(jsonl(records[:1000])) + compress(jsonl(records[1000:]))  # two members
    path = tmp_path / name
    path.write_bytes(data)
    reader = ShardReader(path)
    assert reader.shard == "p"
    lines = []
    while batch := reader.read_batch(700):
        lines.extend(batch)
    assert [line.lineno for line in lines] == list(range(1, 3001))
    assert msgspec.json.decode(lines[2999].raw) == records[2999]
    assert reader.position == path.stat().st_size


@pytest.mark.parametrize(
    ("name", "compress"), [("t.jsonl.gz", gzip.compress), ("t.jsonl.xz", lzma.compress)]
)
def test_truncated_gzip_and_xz_are_named_with_what_was_read(
    tmp_path: Path, name: str, compress: Any
) -> None:
    data = compress(jsonl(personas(15000)))
    path = tmp_path / name
    path.write_bytes(data[: len(data) // 2])
    kind = name.rsplit(".", 1)[1].replace("gz", "gzip")
    reader = ShardReader(path)
    n = 0
    with pytest.raises(InputError) as caught:
        while batch := reader.read_batch(1000):
            n = batch[-1].lineno
    message = str(caught.value)
    assert message.startswith(f"{path}: truncated {kind} file: cut off at byte")
    assert f"{kind} error:" in message and f"lines 1-{n} were read" in message
    assert 1000 < n < 15000


async def test_a_directory_is_its_supported_files_sorted(
    tmp_path: Path, mock_server: MockServer
) -> None:
    data = tmp_path / "data"
    write_shard(data / "b.jsonl", personas(5, "b"))
    (data / "a.jsonl.gz").write_bytes(gzip.compress(jsonl(personas(4, "a"))))
    (data / "c.ndjson.xz").write_bytes(lzma.compress(jsonl(personas(3, "c"))))
    (data / "notes.txt").write_text("not an input")
    (data / "manifest.json").write_text("{}")
    (data / ".hidden.jsonl").write_text("{}")
    (data / "sub").mkdir()
    write_shard(data / "sub" / "d.jsonl", personas(2))
    assert [p.name for p in expand_inputs([str(data)])] == ["a.jsonl.gz", "b.jsonl", "c.ndjson.xz"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"directory .*empty holds no input file"):
        expand_inputs([str(tmp_path / "empty")])
    async with Engine(job(tmp_path, mock_server, [data])) as engine:
        stats = await engine.run()
    assert stats.succeeded == 12
    assert_exactly_once(tmp_path / "out", ids_for("a", 4) | ids_for("b", 5) | ids_for("c", 3))


async def test_parquet_rows_are_lines_with_nested_columns_as_json(
    tmp_path: Path, mock_server: MockServer
) -> None:
    pytest.importorskip("pyarrow")
    records = [
        {"persona": f"A reader number {i}", "idx": i, "tags": ["a", str(i)], "where": {"x": i}}
        for i in range(1200)
    ]
    records[7]["persona"] = None  # a row without a persona is a bad line with its row number
    path = write_shard(tmp_path / "p.parquet", records)  # row groups of 500
    reader = ShardReader(path)
    lines = []
    while batch := reader.read_batch(300):
        lines.extend(batch)
    assert [line.lineno for line in lines] == list(range(1, 1201))
    assert msgspec.json.decode(lines[1000].raw) == records[1000]
    assert reader.position == path.stat().st_size
    async with Engine(job(tmp_path, mock_server, [path])) as engine:
        stats = await engine.run()
    assert stats.succeeded == 1199 and stats.bad_lines == 1
    found = assert_exactly_once(tmp_path / "out", (ids_for("p", 1200) - {"p:8:math:0"}) | {"p:8"})
    by_id = {r["custom_id"]: r for r in found["results"]}
    assert by_id["p:1001:math:0"]["meta"] == {
        "idx": 1000,
        "tags": ["a", "1000"],
        "where": {"x": 1000},
    }
    assert found["errors"][0]["source"] == {"shard": "p", "line": 8}


def test_a_damaged_parquet_file_is_named(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    path = write_shard(tmp_path / "d.parquet", personas(2000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the footer, with the schema, is gone
    with pytest.raises(
        InputError,
        match=r"d\.parquet: not a readable Parquet file \(arrow error: .+\); no line was read",
    ):
        ShardReader(path).read_batch(10)
    bad = bytearray(data)
    bad[len(bad) // 2 : len(bad) // 2 + 2000] = b"\x00" * 2000  # inside the middle row groups
    path.write_bytes(bytes(bad))
    reader = ShardReader(path)
    with pytest.raises(InputError, match=r"corrupt Parquet data in row group \d \(arrow error"):
        while reader.read_batch(100):
            pass
    assert reader.lineno >= 500, "the row groups before the damage were read"


def top_dirs_with_files(root: Path) -> set[str]:
    return {p.relative_to(root).parts[0] for p in root.rglob("*") if p.is_file()}


def hostile_corpus(root: Path) -> tuple[list[str], set[str], dict[str, str]]:
    """Hostile inputs under ``root``: the inputs to give, the ids expected as results, and
    the bad lines expected (id: a piece of the reason)."""
    deep = b'{"persona": "deep", "x": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_000 + b"}"
    huge = b'{"persona": "' + b"y" * (50 << 20)  # 50 MB, the string never closed
    write_shard(
        root / "mixed.jsonl",
        [
            {"persona": "fine"},
            b'{"persona": "caf\xe9 au lait"}',  # Latin-1, not UTF-8
            b'{"persona": "a\x00b"}',  # a raw NUL inside a string
            b'{"persona": "escaped \\u0000 NUL is text"}',
            b"\x00" * 64,
            deep,
            huge,
            {"persona": "after the big one"},
        ],
    )
    (root / "really-gzip.jsonl").write_bytes(gzip.compress(jsonl(personas(3, "gz"))))
    write_shard(root / "dir-named.jsonl" / "inner.jsonl", personas(2, "inner"))
    loops = root / "loops"
    write_shard(loops / "looped.jsonl", personas(2, "loop"))
    (loops / "self").symlink_to(".")  # a directory loop: ** sees it again and again
    write_shard(
        root / "batch.jsonl",
        [
            {"custom_id": cid, "body": {"messages": [{"role": "user", "content": "hi"}]}}
            for cid in ("../../x", "/tmp/abs", "..\\..\\y", "a/../../../b")
        ],
    )
    inputs = [
        str(root / "mixed.jsonl"),
        str(root / "really-gzip.jsonl"),
        str(root / "dir-named.jsonl"),
        str(loops / "**" / "*.jsonl"),
        str(root / "batch.jsonl"),
    ]
    results = (
        {f"mixed:{n}:math:0" for n in (1, 4, 8)}
        | ids_for("really-gzip", 3)
        | ids_for("inner", 2)
        | ids_for("looped", 2)
        | {"../../x", "/tmp/abs", "..\\..\\y", "a/../../../b"}
    )
    bad = {
        "mixed:2": "not valid UTF-8 at byte 16",
        "mixed:3": "malformed JSON",
        "mixed:5": "malformed JSON",
        "mixed:6": "nested too deeply",
        "mixed:7": "malformed JSON",
    }
    return inputs, results, bad


async def test_hostile_inputs_are_recorded_with_file_and_line_and_nothing_else_is_lost(
    tmp_path: Path, mock_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "in"
    inputs, results, bad = hostile_corpus(root)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    beside = set(tmp_path.parent.iterdir())  # where "../../x" from out/ would land
    async with Engine(job(tmp_path, mock_server, [Path(i) for i in inputs])) as engine:
        stats = await engine.run()
    assert stats.finished and not stats.bad_files
    found = assert_exactly_once(tmp_path / "out", results | set(bad))
    for record in found["errors"]:
        assert bad[record["custom_id"]] in record["error"]["message"], record
        assert record["path"] == str(root / "mixed.jsonl")
        assert len(record["raw"]) <= 2000
    assert not found["failures"]
    # nothing written anywhere but the output directory
    assert not list(work.iterdir())
    assert set(tmp_path.parent.iterdir()) == beside
    assert not (tmp_path / "x").exists() and not (tmp_path / "b").exists()
    assert top_dirs_with_files(tmp_path) == {"in", "out"}


def test_hostile_paths_are_refused_by_name(tmp_path: Path) -> None:
    (tmp_path / "loop.jsonl").symlink_to("loop.jsonl")
    with pytest.raises(ConfigError, match=r"loop\.jsonl is a broken symlink or a symlink loop"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "empty.jsonl").mkdir()
    with pytest.raises(ConfigError, match=r"input directory .*empty\.jsonl holds no input file"):
        expand_inputs([str(tmp_path / "empty.jsonl")])


def test_parquet_without_pyarrow_is_refused_before_the_job_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "p.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # import fails
    with pytest.raises(ConfigError, match=r"Parquet inputs need pyarrow: pip install"):
        expand_inputs([str(path)])


async def test_remote_inputs_through_fsspec_over_http_and_file_urls(
    tmp_path: Path, mock_server: MockServer
) -> None:
    pytest.importorskip("fsspec")
    served = tmp_path / "served"
    served.mkdir()
    (served / "web.jsonl.gz").write_bytes(gzip.compress(jsonl(personas(300, "web"))))
    local = write_shard(tmp_path / "local.parquet", personas(200, "pq"))
    app = web.Application()
    app.router.add_static("/data", served)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    secret = "tok-very-secret-4242"
    try:
        url = f"http://127.0.0.1:{port}/data/web.jsonl.gz?token={secret}"
        inputs = [url, local.as_uri()]
        with pytest.raises(
            ConfigError, match=r"input not found: http://127\.0\.0\.1:\d+/data/gone\.jsonl\?\*\*\*"
        ):
            await asyncio.to_thread(expand_inputs, [url.replace("web.jsonl.gz", "gone.jsonl")])
        config = msgspec.structs.replace(job(tmp_path, mock_server, []), inputs=inputs)
        async with Engine(config) as engine:
            stats = await engine.run()
    finally:
        await runner.cleanup()
    assert stats.finished and stats.succeeded == 500
    found = assert_exactly_once(tmp_path / "out", ids_for("web", 300) | ids_for("local", 200))
    assert {r["source"]["shard"] for r in found["results"]} == {"web", "local"}
    manifest = (tmp_path / "out" / "manifest.json").read_text()
    assert secret not in manifest and "data/web.jsonl.gz?***" in manifest


def test_records_are_counted_in_each_format_and_unknown_when_not_cheap(tmp_path: Path) -> None:
    from asyncgen.storage.count import RecordCount, count_records

    files = [
        write_shard(tmp_path / "a.jsonl", personas(7)),
        write_shard(tmp_path / "b.jsonl.zst", personas(1200)),
        write_shard(tmp_path / "c.jsonl.gz", personas(30)),
        write_shard(tmp_path / "d.jsonl.xz", personas(40)),
        write_shard(tmp_path / "e.parquet", personas(1500)),
    ]
    (tmp_path / "f.jsonl").write_bytes(jsonl(personas(4)).rstrip(b"\n"))  # no final newline
    files.append(tmp_path / "f.jsonl")
    assert [count_records(p) for p in files] == [7, 1200, 30, 40, 1500, 4]
    assert count_records(cut_zstd(tmp_path / "cut.jsonl.zst", 500)) is None
    counter = RecordCount(files)
    assert counter.total is None
    counter.start()
    deadline = time.monotonic() + 10
    while counter.total is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert counter.total == 7 + 1200 + 30 + 40 + 1500 + 4
    stopped = RecordCount(files)
    stopped.close()  # a job that ended before the count: the total stays unknown
    stopped.start()
    time.sleep(0.2)
    assert stopped.total is None


async def test_the_job_knows_its_total_and_a_remote_jsonl_leaves_it_unknown(
    tmp_path: Path, mock_server: MockServer
) -> None:
    pytest.importorskip("fsspec")
    shard = write_shard(tmp_path / "p.jsonl.zst", personas(120))
    config = msgspec.structs.replace(
        job(tmp_path, mock_server, [shard]), samples=2, check_endpoint=False
    )
    async with Engine(config) as engine:
        first = engine.statistics()
        await engine.run()
        for _ in range(500):
            if engine.statistics().total_items is not None:
                break
            await asyncio.sleep(0.01)
        assert first.total_items is None and engine.statistics().total_items == 240
    remote = write_shard(tmp_path / "r" / "q.jsonl", personas(5))
    config = msgspec.structs.replace(config, inputs=[remote.as_uri()], output=str(tmp_path / "o2"))
    async with Engine(config) as engine:
        await engine.run()
        await asyncio.sleep(0.1)
        assert engine.statistics().total_items is None


@pytest.mark.slow  # moto's server and four CLI runs: ~15 s
async def test_s3_directories_and_globs_through_a_stand_in(
    tmp_path: Path, mock_server: MockServer
) -> None:
    from .s3_standin import put, s3_standin
    from .test_jobfile import _cli

    gz = write_shard(tmp_path / "src" / "a.jsonl.gz", personas(30, "gz"))
    pq = write_shard(tmp_path / "src" / "b.parquet", personas(20, "pq"))
    with s3_standin() as (endpoint, env):
        put(endpoint, "bkt")
        put(endpoint, "bkt/d/a.jsonl.gz", gz.read_bytes())
        put(endpoint, "bkt/d/b.parquet", pq.read_bytes())
        put(endpoint, "bkt/d/notes.txt", b"not an input")

        def run(inputs: str, out: str) -> Any:
            args = ["run", "-i", inputs, "-p", "math", "-m", "mock-model", "-q"]
            args += ["-o", str(tmp_path / out), "--base-url", mock_server.base_url]
            return _cli(*args, env=env)

        whole = await asyncio.to_thread(run, "s3://bkt/d/", "all")
        assert whole.returncode == 0, whole.stderr
        assert_exactly_once(tmp_path / "all", ids_for("a", 30) | ids_for("b", 20))
        some = await asyncio.to_thread(run, "s3://bkt/d/*.parquet", "some")
        assert some.returncode == 0, some.stderr
        assert_exactly_once(tmp_path / "some", ids_for("b", 20))
        none = await asyncio.to_thread(run, "s3://bkt/d/*.xz", "none")
        assert none.returncode == 2 and "no input file matches 's3://bkt/d/*.xz'" in none.stderr
        bare = await asyncio.to_thread(run, "s3://bkt/d", "bare")
        assert bare.returncode == 2 and "end it with / to read its files" in bare.stderr
