"""Streaming input: plain and zstd JSON lines, globs, locations, corrupt files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import zstandard

from asyncgen.core.errors import ConfigError, InputError
from asyncgen.storage.sources import ShardReader, expand_inputs, shard_name

from .conftest import personas, write_shard


def read_all(path: Path, batch: int = 7) -> list[tuple[int, bytes]]:
    reader = ShardReader(path)
    out = []
    while lines := reader.read_batch(batch):
        out.extend((line.lineno, line.raw) for line in lines)
    assert reader.position == reader.size
    return out


@pytest.mark.parametrize("name", ["p.jsonl", "p.jsonl.zst"])
def test_reads_every_line_with_its_number(tmp_path: Path, name: str) -> None:
    path = write_shard(tmp_path / name, [*personas(50), b"", b"  ", *personas(3, "late")])
    lines = read_all(path)
    assert len(lines) == 53
    assert lines[0][0] == 1 and lines[49][0] == 50
    assert lines[50][0] == 53, "blank lines are skipped but keep their numbers"
    assert b"late number 2" in lines[-1][1]


def test_multi_frame_zstd_and_crlf_and_no_final_newline(tmp_path: Path) -> None:
    c = zstandard.ZstdCompressor()
    data = c.compress(b'{"persona": "a"}\r\n{"persona": "b"}\n') + c.compress(b'{"persona": "c"}')
    path = tmp_path / "m.jsonl.zst"
    path.write_bytes(data)
    assert [raw for _, raw in read_all(path)] == [
        b'{"persona": "a"}',
        b'{"persona": "b"}',
        b'{"persona": "c"}',
    ]


def test_truncated_zstd_names_file_and_line(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "t.jsonl.zst", personas(20000))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    reader = ShardReader(path)
    with pytest.raises(InputError, match=r"t\.jsonl\.zst: truncated zstd.*lines 1-\d+ were read"):
        while reader.read_batch(1000):
            pass


def test_garbage_zstd_is_an_input_error(tmp_path: Path) -> None:
    path = tmp_path / "g.jsonl.zst"
    path.write_bytes(b"\x28\xb5\x2f\xfd" + b"\xff" * 64)
    with pytest.raises(InputError, match=r"g\.jsonl\.zst: (corrupt|truncated) zstd"):
        read_all(path)


def test_shard_names() -> None:
    assert shard_name("/x/personas-00001.jsonl.zst") == "personas-00001"
    assert shard_name("a.jsonl") == "a"
    assert shard_name("b.ndjson.zst") == "b"
    assert shard_name("c.txt") == "c.txt"


def test_expand_inputs(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl.zst", "c.jsonl"):
        write_shard(tmp_path / name, personas(1))
    paths = expand_inputs([str(tmp_path / "*.jsonl*"), str(tmp_path / "a.jsonl.zst")])
    assert [p.name for p in paths] == ["a.jsonl.zst", "b.jsonl", "c.jsonl"]
    with pytest.raises(ConfigError, match="no input file matches"):
        expand_inputs([str(tmp_path / "*.none")])
    with pytest.raises(ConfigError, match="not found"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    (tmp_path / "sub").mkdir()
    write_shard(tmp_path / "sub" / "a.jsonl", personas(1))
    with pytest.raises(ConfigError, match="same shard name 'a'"):
        expand_inputs([str(tmp_path / "a.jsonl.zst"), str(tmp_path / "sub" / "a.jsonl")])


def test_pipes_are_refused_clearly(tmp_path: Path) -> None:
    fifo = tmp_path / "personas.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        expand_inputs([str(fifo)])


def test_long_lines_span_chunks_and_a_limit_applies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    long = b'{"persona": "' + b"x" * (3 << 20) + b'"}'
    path = tmp_path / "long.jsonl"
    path.write_bytes(b'{"persona": "a"}\n' + long + b"\n" + long)  # the last without newline
    lines = ShardReader(path).read_batch(10)
    assert [len(line.raw) for line in lines] == [16, len(long), len(long)]
    assert [line.lineno for line in lines] == [1, 2, 3]
    monkeypatch.setattr("asyncgen.storage.sources._MAX_LINE", 2 << 20)
    reader = ShardReader(path)
    assert [line.lineno for line in reader.read_batch(10)] == [1]
    with pytest.raises(InputError, match="line 2 is longer than 2 MiB"):
        reader.read_batch(10)


def test_read_batch_passes_over_done_lines(tmp_path: Path) -> None:
    lines = [f'{{"persona": "p{i}"}}'.encode() for i in range(1, 101)]
    lines[49] = b""  # a blank line keeps its number
    path = write_shard(tmp_path / "s.jsonl.zst", lines)
    done = bytearray(13)
    for n in range(1, 96):  # everything but 96..100 is done
        done[n >> 3] |= 1 << (n & 7)
    reader = ShardReader(path)
    first = reader.read_batch(2, bytes(done))
    assert [line.lineno for line in first] == []  # 32 lines passed: the batch comes back early
    assert reader.skipped == 32
    got = list(first)
    while True:  # as the engine does: an empty batch that passed lines is not the end
        before = reader.skipped
        batch = reader.read_batch(2, bytes(done))
        if not batch and reader.skipped == before:
            break
        got.extend(batch)
    assert [line.lineno for line in got] == [96, 97, 98, 99, 100]
    assert reader.skipped == 94  # 95 done numbers, one of them the blank line
    assert got[0].raw == b'{"persona": "p96"}'
