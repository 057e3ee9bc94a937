"""The output store: commit protocol, torn-tail repair, manifest and lock."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard

from asyncgen.core.errors import OutputError
from asyncgen.core.ledger import bad_line_key
from asyncgen.core.records import BadLine, ErrorInfo, Result, Source
from asyncgen.storage import files, shards
from asyncgen.storage import store as store_module
from asyncgen.storage.manifest import fingerprint, read_manifest
from asyncgen.storage.shards import FrameWriter, scan_frames
from asyncgen.storage.status import status
from asyncgen.storage.store import Store

from .conftest import read_output

SPEC = {"model": "m", "template": {"name": "math", "sha256": "abc"}}


def result(i: int, *, failed: bool = False) -> Result:
    return Result(
        custom_id=f"s:{i}:math:0",
        error=ErrorInfo("http_400", "bad", 400) if failed else None,
        output=None if failed else f"text {i}",
        finish_reason=None if failed else "stop",
        model="m",
        template="math",
        persona=f"p{i}",
        source=Source("s", i),
        attempts=1,
        latency_s=0.1,
        created=time.time(),
    )


def open_store(root: Path, **kw: object) -> Store:
    return Store.open(root, SPEC, version="test", **kw)  # type: ignore[arg-type]


def test_commit_then_reopen_sees_everything(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    ids = store.commit(
        [result(1), result(2, failed=True)],
        [BadLine("s:3", "in.jsonl", Source("s", 3), ErrorInfo("bad_input", "x"), "{")],
    )
    assert sorted(ids) == [bad_line_key("s:3"), "s:1:math:0", "s:2:math:0"]
    store.ledger.commit(ids)
    store.close()
    store = open_store(tmp_path)
    assert store.counts == {"results": 1, "failures": 1, "errors": 1}
    assert store.ledger.committed == 3 and store.ledger.is_committed("s:2:math:0")
    assert store.ledger.is_committed(bad_line_key("s:3")) and not store.ledger.is_committed("s:3")
    store.close()
    found = read_output(tmp_path)
    assert [r["custom_id"] for r in found["results"]] == ["s:1:math:0"]
    assert found["failures"][0]["error"]["code"] == "http_400"
    assert found["errors"][0]["source"] == {"shard": "s", "line": 3}


def test_shards_are_plain_multiframe_zstd(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for i in range(5):
        store.commit([result(i)])
    store.close()
    shard = next(tmp_path.glob("results-*.jsonl.zst"))
    assert len(list(scan_frames(shard))) == 5
    if shutil.which("zstd"):  # the zstd CLI is optional on the machine
        out = subprocess.run(["zstd", "-dc", str(shard)], capture_output=True, check=True)
        assert out.stdout.count(b"\n") == 5
    with zstandard.open(shard, "rb") as f:
        assert len(f.read().splitlines()) == 5


def big_lines(lines: int, seed: int = 3) -> list[bytes]:
    rng = random.Random(seed)
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(2, 8))) for _ in range(500)]
    return [
        f'{{"n": {i}, "t": "{" ".join(rng.choices(words, k=40))}"}}\n'.encode()
        for i in range(lines)
    ]


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_frames_of_one_append_are_compressed_at_once_and_land_in_order(
    tmp_path: Path, threads: int
) -> None:
    """Payloads handed over as a generator become one frame each, in order, written at
    once: ordinary checksummed frames that every multi-frame reader reads back."""
    rows = big_lines(3_000)
    parts = [b"".join(rows[i : i + 1000]) for i in range(0, 3000, 1000)]
    produced: list[int] = []

    def payloads() -> Iterator[bytes]:
        for i, part in enumerate(parts):
            produced.append(i)
            yield part

    shard = tmp_path / "big.jsonl.zst"
    writer = FrameWriter(shard, threads=threads)
    end = writer.append_frames(payloads())
    small = writer.append(b'{"n": -1}\n')
    assert writer.append_frames(iter(())) == small  # nothing to write: nothing written
    writer.close()
    assert produced == [0, 1, 2]
    frames = list(scan_frames(shard))
    assert [p for _, p in frames] == [*parts, b'{"n": -1}\n']
    assert frames[2][0] == end and frames[3][0] == small == shard.stat().st_size
    assert zstandard.get_frame_parameters(shard.read_bytes()).has_checksum
    with zstandard.open(shard, "rb") as f:
        assert f.read() == b"".join(parts) + b'{"n": -1}\n'
    if shutil.which("zstd"):
        out = subprocess.run(["zstd", "-dc", str(shard)], capture_output=True, check=True)
        assert out.stdout == b"".join(parts) + b'{"n": -1}\n'


def test_a_failing_producer_writes_nothing_and_the_writer_goes_on(tmp_path: Path) -> None:
    """An error while the payloads are produced (a frame already with a helper) appends
    nothing; the next append, with the same compressors, is whole."""

    def payloads() -> Iterator[bytes]:
        yield b'{"n": 1}\n' * 50_000
        yield b'{"n": 2}\n' * 50_000
        raise RuntimeError("encoding failed")

    shard = tmp_path / "s.jsonl.zst"
    writer = FrameWriter(shard, threads=2)
    with pytest.raises(RuntimeError, match="encoding failed"):
        writer.append_frames(payloads())
    assert shard.stat().st_size == writer.size == 0
    writer.append_frames(iter([b'{"n": 3}\n', b'{"n": 4}\n']))
    writer.close()
    assert [p for _, p in scan_frames(shard)] == [b'{"n": 3}\n', b'{"n": 4}\n']


def test_a_large_batch_is_spread_over_frames_of_whole_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shards, "usable_cpus", lambda: 3)
    store = open_store(tmp_path)
    store.ledger.commit(store.commit([result(i) for i in range(1000)]))  # 3 frames
    store.ledger.commit(store.commit([result(i) for i in range(1000, 1400)]))  # too few
    store.close()
    shard = next(tmp_path.glob("results-*.jsonl.zst"))
    sizes = [p.count(b"\n") for _, p in scan_frames(shard)]
    assert sizes == [334, 334, 332, 400]
    lines = [r["source"]["line"] for r in read_output(tmp_path)["results"]]
    assert lines == list(range(1400))


def test_a_commit_torn_between_its_frames_keeps_the_whole_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crash inside a multi-frame commit: the complete frames before the tear hold whole
    records, so recovery adds those (exactly once, also on a second reopen) and cuts the
    rest; the ids of the cut records are not done and will be sent again."""
    monkeypatch.setattr(shards, "usable_cpus", lambda: 3)
    store = open_store(tmp_path)
    store.ledger.commit(store.commit([result(0)]))
    many = [result(i) for i in range(1, 3001)]
    store.commit(many)
    store.close()
    shard = next(tmp_path.glob("results-*.jsonl.zst"))
    frames = list(scan_frames(shard))
    assert len(frames) == 4
    first_end, first = frames[1]
    kept = first.count(b"\n")
    assert 0 < kept < 3000
    # The crash: the second frame of the commit torn, the third not written, no ledger line.
    with open(shard, "r+b") as f:
        f.truncate(frames[2][0] - 7)
    ledger = tmp_path / "ledger.zst"
    with open(ledger, "r+b") as f:
        f.truncate(list(scan_frames(ledger))[-2][0])
    for _ in range(2):
        store = open_store(tmp_path)
        assert store.counts["results"] == 1 + kept
        assert shard.stat().st_size == first_end
        done = [i for i in range(3001) if store.ledger.is_committed(f"s:{i}:math:0")]
        assert done == list(range(kept + 1))
        store.close()
    lines = [r["source"]["line"] for r in read_output(tmp_path)["results"]]
    assert lines == list(range(kept + 1))


def test_torn_data_tail_is_cut_and_unlogged_frames_recovered(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.ledger.commit(store.commit([result(1)]))
    store.close()
    shard = next(tmp_path.glob("results-*.jsonl.zst"))
    # A crash after a frame was written but before its ledger line: recovered from the shard.
    FrameWriter(shard).append(b'{"custom_id": "s:2:math:0"}\n')
    good = shard.stat().st_size
    # And a crash in the middle of the next frame: a torn tail.
    frame = zstandard.ZstdCompressor(write_checksum=True).compress(b'{"custom_id": "s:3:math:0"}\n')
    with open(shard, "ab") as f:
        f.write(frame[: len(frame) - 5])
    store = open_store(tmp_path)
    assert store.ledger.is_committed("s:2:math:0")
    assert not store.ledger.is_committed("s:3:math:0")
    assert store.recovered_bytes == len(frame) - 5
    assert shard.stat().st_size == good
    assert store.counts["results"] == 2
    store.close()
    # Reopening again changes nothing: recovery is idempotent.
    store = open_store(tmp_path)
    assert store.counts["results"] == 2 and store.recovered_bytes == 0
    store.close()


def test_torn_ledger_tail_is_cut(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.commit([result(1)])
    store.commit([result(2)])
    store.close()
    ledger = tmp_path / "ledger.zst"
    size = ledger.stat().st_size
    with open(ledger, "r+b") as f:
        f.truncate(size - 3)  # the second ledger frame is torn; its data frame is intact
    store = open_store(tmp_path)
    assert store.ledger.committed == 2, "the data frame is re-logged from the shard"
    store.close()


def test_new_run_writes_new_shards_and_rotates(tmp_path: Path) -> None:
    store = open_store(tmp_path, max_shard_bytes=1)
    store.commit([result(1)])
    store.commit([result(2)])
    store.close()
    store = open_store(tmp_path)
    store.commit([result(3)])
    store.close()
    names = sorted(p.name for p in tmp_path.glob("results-*"))
    assert names == [
        "results-000001.jsonl.zst",
        "results-000002.jsonl.zst",
        "results-000003.jsonl.zst",
    ]


def test_different_spec_is_refused_once_records_exist(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    # nothing committed yet (a job stopped by a typo): the corrected spec takes the directory
    Store.open(tmp_path, {**SPEC, "model": "fixed"}, version="test").close()
    assert json.loads((tmp_path / "manifest.json").read_text())["spec"]["model"] == "fixed"
    store = Store.open(tmp_path, {**SPEC, "model": "fixed"}, version="test")
    store.commit([result(1)])
    store.close()
    with pytest.raises(OutputError, match=r"different job.*model"):
        Store.open(tmp_path, {**SPEC, "model": "other"}, version="test")


def test_shards_without_manifest_are_refused(tmp_path: Path) -> None:
    (tmp_path / "results-000001.jsonl.zst").write_bytes(b"")
    with pytest.raises(OutputError, match=r"no manifest\.json"):
        open_store(tmp_path)


def write_old_manifest(root: Path, spec: dict[str, object], job: object) -> None:
    """``manifest.json`` exactly as asyncgen 0.1 (commit f5fa499) wrote it."""
    manifest = {
        "format": 1,
        "asyncgen": "0.1.0",
        "fingerprint": fingerprint(spec),
        "spec": spec,
        "job": job,
    }
    with open(root / "manifest.json", "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")


@pytest.mark.parametrize("job", [None, {"inputs": ["/in/s.jsonl"], "output": "/out"}])
def test_a_directory_written_by_the_previous_version_resumes(tmp_path: Path, job: object) -> None:
    store = open_store(tmp_path)
    store.ledger.commit(store.commit([result(1), result(2, failed=True)]))
    store.close()
    write_old_manifest(tmp_path, SPEC, job)
    assert read_manifest(tmp_path).fingerprint == fingerprint(SPEC)
    assert (status(tmp_path).succeeded, status(tmp_path).failed) == (1, 1)
    store = open_store(tmp_path)
    try:
        assert store.ledger.is_committed("s:1:math:0") and store.ledger.is_committed("s:2:math:0")
        assert store.counts == {"results": 1, "failures": 1, "errors": 0}
    finally:
        store.close()
    # Reopening rewrote it in this version's layout, with the same content.
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["spec"] == SPEC and manifest["asyncgen"] == "test" and manifest["format"] == 1
    with pytest.raises(OutputError, match=r"different job.*model"):
        Store.open(tmp_path, {**SPEC, "model": "other"}, version="test")


@pytest.mark.parametrize(
    "content", [b"{not json", b"[1, 2]", b'{"spec": {}}', b'{"fingerprint": 1, "spec": {}}']
)
def test_a_corrupt_or_foreign_manifest_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "manifest.json"
    path.write_bytes(content)
    for read in (open_store, status, read_manifest):
        with pytest.raises(OutputError, match=re.escape(f"{path} is not an asyncgen manifest")):
            read(tmp_path)
    assert path.read_bytes() == content  # left as it was


def test_second_writer_is_locked_out(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    try:
        with pytest.raises(OutputError, match="in use by another"):
            open_store(tmp_path)
    finally:
        store.close()


def test_shard_shorter_than_ledger_is_an_error(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.commit([result(1)])
    store.close()
    shard = next(tmp_path.glob("results-*.jsonl.zst"))
    os.truncate(shard, 4)
    with pytest.raises(OutputError, match="shorter"):
        open_store(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot use output directory"):
            open_store(tmp_path / "out")
    finally:
        tmp_path.chmod(0o700)


def test_output_path_is_a_file(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(OutputError, match="cannot use output directory"):
        open_store(target)


def test_a_missing_shard_is_refused_not_silently_skipped(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.commit([result(1), result(2, failed=True)])
    store.close()
    next(tmp_path.glob("failures-*.jsonl.zst")).unlink()
    with pytest.raises(OutputError, match=r"failures-\d+\.jsonl\.zst is missing"):
        open_store(tmp_path)


def test_foreign_lines_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.commit([result(1)])
    store.close()
    with open(tmp_path / "ledger.zst", "ab") as f:
        f.write(zstandard.ZstdCompressor().compress(b"garbage\n"))
    with pytest.raises(OutputError, match=r"ledger\.zst holds a line that asyncgen did not write"):
        open_store(tmp_path)


def test_a_rewritten_shard_is_refused_not_cut(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    for i in range(20):
        store.commit([result(i)])
    store.close()
    shard = next(tmp_path.glob("results-*.jsonl.zst"))
    data = zstandard.ZstdDecompressor().stream_reader(shard.read_bytes(), read_across_frames=True)
    # the same records, compressed anew, plus a large incompressible line: longer than before
    filler = b'{"custom_id": "%s"}\n' % os.urandom(6000).hex().encode()
    recompressed = zstandard.ZstdCompressor().compress(data.read() + filler)
    shard.write_bytes(recompressed)
    with pytest.raises(OutputError, match="does not continue with a zstd frame"):
        open_store(tmp_path)
    assert shard.read_bytes() == recompressed, "nothing was cut"


def test_a_tail_torn_inside_the_frame_magic_is_cut(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.commit([result(1)])
    store.close()
    shard = next(tmp_path.glob("results-*.jsonl.zst"))
    size = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(b"\x28\xb5")  # a crash two bytes into the next frame
    store = open_store(tmp_path)
    assert store.ledger.committed == 1
    store.close()
    assert shard.stat().st_size == size


def test_ledger_packs_persona_ids_and_reads_the_plain_form_too(tmp_path: Path) -> None:
    import msgspec

    out = tmp_path / "out"
    store = open_store(out)
    records = [result(n) for n in range(1, 3001)]
    records.append(msgspec.structs.replace(result(0), custom_id="custom-7"))
    store.commit(records)
    store.close()
    with open(out / "ledger.zst", "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    entry = msgspec.json.decode(data.splitlines()[0])
    assert entry[2] == ["custom-7"] and len(entry[3]) == 1, "3000 ids in one bitmap run"
    assert len(data) < 1000
    # A ledger line in the plain form (ids only) still reads.
    with open(out / "ledger.zst", "ab") as f:
        plain = msgspec.json.encode([entry[0], entry[1], ["s:9999:math:0"]]) + b"\n"
        f.write(zstandard.ZstdCompressor().compress(plain))
    store = open_store(out)
    try:
        for n in [*range(1, 3001), 9999]:
            assert store.ledger.is_committed(f"s:{n}:math:0"), n
        assert store.ledger.is_committed("custom-7")
        assert not store.ledger.is_committed("s:3001:math:0")
        assert store.counts["results"] == 3002
    finally:
        store.close()


def test_data_frames_are_synced_and_the_ledger_is_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each commit syncs each data shard it wrote once, before its ledger line is written;
    the ledger (an index of the shards) is never synced."""
    events: list[str] = []
    real_write = os.write

    def write(fd: int, data: bytes | memoryview) -> int:
        events.append("write " + os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1].split("-")[0])
        return real_write(fd, data)

    monkeypatch.setattr(shards.os, "write", write)
    monkeypatch.setattr(shards, "_datasync", lambda fd: events.append("sync"))
    store = open_store(tmp_path)
    events.clear()
    store.commit([result(1), result(2, failed=True)])
    store.close()
    assert events == ["write results", "sync", "write failures", "sync", "write ledger.zst"]


@pytest.mark.parametrize("loss", ["all", "tail", "hole"])
def test_ledger_lines_lost_to_a_power_cut_are_rebuilt_from_the_shards(
    tmp_path: Path, loss: str
) -> None:
    """The ledger is not synced, so a power cut may take its last lines, all of it, or
    leave a hole of zeros where a page never reached the disk. Recovery rebuilds what is
    missing from the shards: every record counted and done exactly once."""
    store = open_store(tmp_path)
    for batch in range(4):
        rs = [result(10 * batch + i, failed=i == 0) for i in range(10)]
        store.ledger.commit(store.commit(rs))
    store.close()
    ledger = tmp_path / "ledger.zst"
    ends = [end for end, _ in scan_frames(ledger)]
    with open(ledger, "r+b") as f:
        if loss == "all":
            f.truncate(0)
        elif loss == "tail":
            f.truncate(ends[1])
        else:
            f.seek(ends[0])
            f.write(b"\0" * (ends[1] - ends[0]))
    for _ in range(2):
        store = open_store(tmp_path)
        assert store.counts == {"results": 36, "failures": 4, "errors": 0}
        assert store.ledger.committed == 40
        assert all(store.ledger.is_committed(f"s:{i}:math:0") for i in range(40))
        store.close()
    out = read_output(tmp_path)
    assert sorted(r["source"]["line"] for r in out["results"] + out["failures"]) == list(range(40))


def test_commits_and_close_take_turns_across_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit's thread outlives a cancelled caller: a second commit, or close, from
    another thread must wait for it rather than share its writers and compressors."""
    import threading

    real_sync = shards._datasync
    inside = threading.Event()

    def slow_sync(fd: int) -> None:
        inside.set()
        time.sleep(0.2)
        real_sync(fd)

    monkeypatch.setattr(shards, "_datasync", slow_sync)
    monkeypatch.setattr(shards, "usable_cpus", lambda: 2)
    store = open_store(tmp_path)
    errors: list[BaseException] = []

    def commit(first: int) -> None:
        try:
            store.ledger.commit(store.commit([result(i) for i in range(first, first + 800)]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(k * 800,)) for k in range(3)]
    for t in threads:
        t.start()
    assert inside.wait(5)
    store.close()  # waits for whatever commit is running; later ones find it closed
    for t in threads:
        t.join()
    assert all(isinstance(e, OutputError) and "closed" in str(e) for e in errors)
    done = 3 - len(errors)
    assert done >= 1
    store = open_store(tmp_path)
    assert store.counts["results"] == 800 * done and store.recovered_bytes == 0
    store.close()
    lines = sorted(r["source"]["line"] for r in read_output(tmp_path)["results"])
    assert len(lines) == len(set(lines)) == 800 * done


def test_recovered_frames_are_synced_before_the_ledger_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames past the ledger's end may never have been synced (the writer died between
    its write and its sync): recovery syncs the shard before it logs them."""
    store = open_store(tmp_path)
    store.ledger.commit(store.commit([result(1)]))
    store.close()
    shard = next(tmp_path.glob("results-*.jsonl.zst"))
    with open(shard, "ab") as f:  # written, never synced, no ledger line
        f.write(zstandard.ZstdCompressor().compress(b'{"custom_id": "s:2:math:0"}\n'))
    events: list[str] = []
    real_fsync_path = files.fsync_path
    monkeypatch.setattr(
        store_module, "fsync_path", lambda p: (events.append(f"sync {p.name}"), real_fsync_path(p))
    )
    real_log = Store._log
    monkeypatch.setattr(
        Store,
        "_log",
        lambda self, file, *a: (events.append(f"log {file}"), real_log(self, file, *a)),
    )
    store = open_store(tmp_path)
    assert store.ledger.is_committed("s:2:math:0")
    store.close()
    assert events == [f"sync {shard.name}", f"log {shard.name}"]
