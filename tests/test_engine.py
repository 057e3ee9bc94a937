"""The engine end to end against the loopback mock server."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from asyncgen import Engine, JobConfig
from asyncgen.core.errors import ConfigError, ConnectError, InputError, OutputError
from asyncgen.core.records import BadLine, Line, Result
from asyncgen.engine.clock import VirtualClock
from asyncgen.engine.transport import HttpResponse
from asyncgen.mock.server import MockConfig, MockServer
from asyncgen.storage.sources import ShardReader

from .conftest import Canned, assert_exactly_once, personas, read_output, write_shard

FAST = {"backoff_base": 0.01, "backoff_cap": 0.05, "flush_interval": 0.05}


CANNED = Canned.base_url


class Silent(Canned):
    """Never answers: every attempt lasts until the engine gives up on it."""

    async def post(self, path: str, body: bytes) -> HttpResponse:
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable")


class SilentOnce(Canned):
    """Answers each request body only the second time it is sent."""

    def __init__(self, content: str) -> None:
        super().__init__(content)
        self.seen: set[bytes] = set()

    async def post(self, path: str, body: bytes) -> HttpResponse:
        if body not in self.seen:
            self.seen.add(body)
            await asyncio.get_running_loop().create_future()
        return await super().post(path, body)


def job(tmp_path: Path, server: MockServer | str, inputs: list[Path], **kw: Any) -> JobConfig:
    """A job on ``inputs`` against a mock server, or a base URL (a canned transport's)."""
    settings: dict[str, Any] = {
        "inputs": [str(p) for p in inputs],
        "output": str(tmp_path / "out"),
        "prompt": "math",
        "model": "mock-model",
        "base_url": server if isinstance(server, str) else server.base_url,
        "concurrency": 64,
        **FAST,
    }
    settings.update(kw)
    return JobConfig(**settings)


def ids_for(shard: str, n: int, template: str = "math", samples: int = 1) -> set[str]:
    return {f"{shard}:{i}:{template}:{s}" for i in range(1, n + 1) for s in range(samples)}


async def test_thousands_of_items_with_faults_exactly_once(tmp_path: Path) -> None:
    faults = MockConfig(
        fail_429=0.05,
        retry_after=0.01,
        fail_500=0.03,
        fail_503=0.03,
        drop=0.02,
        malformed=0.03,
        seed=11,
    )
    inputs = [write_shard(tmp_path / f"p{k}.jsonl.zst", personas(1500, f"s{k}")) for k in (1, 2)]
    async with MockServer(faults) as server:
        config = job(tmp_path, server, inputs, concurrency=128, max_attempts=10)
        async with Engine(config, rng=random.Random(5)) as engine:
            stats = await engine.run()
        requests = server.statistics().requests
    expected = ids_for("p1", 1500) | ids_for("p2", 1500)
    found = assert_exactly_once(tmp_path / "out", expected)
    assert len(found["results"]) == 3000 and not found["failures"] and not found["errors"]
    assert stats.finished and stats.succeeded == 3000 and stats.failed == 0
    assert stats.retries > 100, "the injected faults were retried"
    assert stats.requests == requests == 3000 + stats.retries
    retried = [r for r in found["results"] if r["attempts"] > 1]
    assert len(retried) > 100
    record = found["results"][0]
    assert record["persona"].startswith("A s") and record["template"] == "math"
    assert record["output"] and record["finish_reason"] in ("stop", "length")
    assert record["usage"]["completion_tokens"] > 0 and record["model"] == "mock-model"
    assert record["error"] is None and record["latency_s"] >= 0
    assert record["meta"] == {"idx": record["source"]["line"] - 1}


async def test_rerun_of_finished_job_sends_nothing(tmp_path: Path, mock_server: MockServer) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(200))]
    config = job(tmp_path, mock_server, inputs, samples=2)
    async with Engine(config) as engine:
        first = await engine.run()
    assert first.succeeded == 400
    before = mock_server.statistics().requests
    async with Engine(config) as engine:
        second = await engine.run()
    assert mock_server.statistics().requests == before, "a finished job sends zero requests"
    assert second.requests == 0 and second.skipped == 400 and second.finished
    assert second.succeeded_total == 400
    assert_exactly_once(tmp_path / "out", ids_for("p", 200, samples=2))


async def test_results_iterator_yields_each_committed_record(
    tmp_path: Path, mock_server: MockServer
) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", [*personas(50), b"{not json", {"other": 1}])]
    seen: list[str] = []
    async with Engine(job(tmp_path, mock_server, inputs)) as engine:
        async for record in engine.results():
            assert isinstance(record, Result | BadLine)
            seen.append(record.custom_id)
        stats = engine.statistics()
    assert sorted(seen) == sorted(ids_for("p", 50) | {"p:51", "p:52"})
    assert stats.bad_lines == 2 and stats.lines_read == 52
    assert "finished" in repr(engine)


async def test_stopping_early_from_the_consumer_then_resuming(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl.zst", personas(2000))]
    async with MockServer(MockConfig(latency=0.05)) as server:
        config = job(tmp_path, server, inputs, concurrency=32, flush_records=500)
        async with Engine(config) as engine:
            got = 0
            async for _ in engine.results():
                got += 1
                if got >= 5:
                    break
            assert not engine.statistics().finished
        # The generator was left suspended, not closed: leaving the block still stops the job.
        assert not [t for t in asyncio.all_tasks() if "Engine." in repr(t.get_coro())]
        assert engine.statistics().in_flight == 0
        sent = server.statistics().requests
        files = {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir()}
        await asyncio.sleep(0.3)
        assert server.statistics().requests == sent, "no request after the block was left"
        assert {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir()} == files
        found = read_output(tmp_path / "out")
        assert 5 <= len(found["results"]) < 2000
        async with Engine(config) as engine:
            stats = await engine.run()
    assert stats.finished and stats.skipped >= 5
    assert_exactly_once(tmp_path / "out", ids_for("p", 2000))


async def test_the_next_batch_is_read_while_this_one_is_sent(
    tmp_path: Path, mock_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-ahead: the second batch's read starts as the first batch arrives, not once it
    has been sent (without read-ahead, at least 1024 - 64 requests would be out by then)."""
    inputs = [write_shard(tmp_path / "p.jsonl.zst", personas(2500))]
    sent_when_read: list[int] = []
    engines: list[Engine] = []
    read_batch = ShardReader.read_batch

    def recording(self: ShardReader, n: int, done: bytes | None = None) -> list[Line]:
        sent_when_read.append(engines[0].statistics().requests)
        return read_batch(self, n, done)

    monkeypatch.setattr(ShardReader, "read_batch", recording)
    async with Engine(job(tmp_path, mock_server, inputs)) as engine:
        engines.append(engine)
        stats = await engine.run()
    assert stats.succeeded == 2500
    assert sent_when_read[0] == 0 and sent_when_read[1] < 512, sent_when_read
    assert len(sent_when_read) == 4  # 1024 + 1024 + 452 lines, then the end
    assert_exactly_once(tmp_path / "out", ids_for("p", 2500))


async def test_a_stop_during_a_read_ahead_waits_for_it_and_claims_none_of_it(
    tmp_path: Path, mock_server: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stop while the next batch is being read: the file is closed only after the read
    ends, the batch read ahead is dropped unclaimed, and a rerun sends it exactly once."""
    inputs = [write_shard(tmp_path / "p.jsonl.zst", personas(3000))]
    events: list[str] = []
    engines: list[Engine] = []
    read_batch, close = ShardReader.read_batch, ShardReader.close

    def slow_second(self: ShardReader, n: int, done: bytes | None = None) -> list[Line]:
        events.append("read")
        if events.count("read") == 2:
            loop.call_soon_threadsafe(engines[0].stop)
            time.sleep(0.3)
        batch = read_batch(self, n, done)
        events.append("read done")
        return batch

    def closing(self: ShardReader) -> None:
        events.append("close")
        close(self)

    monkeypatch.setattr(ShardReader, "read_batch", slow_second)
    monkeypatch.setattr(ShardReader, "close", closing)
    config = job(tmp_path, mock_server, inputs, concurrency=8)
    loop = asyncio.get_running_loop()
    async with Engine(config) as engine:
        engines.append(engine)
        stats = await engine.run()
    assert stats.stopped and not stats.finished
    assert events[:4] == ["read", "read done", "read", "read done"], events
    assert stats.succeeded <= 1024, "nothing of the batch read ahead was sent"
    monkeypatch.setattr(ShardReader, "read_batch", read_batch)
    async with Engine(config) as engine:
        again = await engine.run()
    assert again.finished and again.succeeded == 3000 - stats.succeeded
    assert_exactly_once(tmp_path / "out", ids_for("p", 3000))


async def test_graceful_stop_drains_in_flight(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(3000))]
    async with MockServer(MockConfig(latency=0.05)) as server:
        config = job(tmp_path, server, inputs, concurrency=32)
        async with Engine(config) as engine:

            async def stop_soon() -> None:
                await asyncio.sleep(0.3)
                engine.stop()

            async with asyncio.TaskGroup() as tg:
                tg.create_task(stop_soon())
                stats = await engine.run()
        sent = server.statistics().requests
    assert stats.stopped and not stats.finished
    assert stats.in_flight == 0
    # Everything that was sent came back and was committed: nothing in flight was dropped.
    assert stats.succeeded == sent and 0 < sent < 3000
    async with MockServer() as server:
        config = job(tmp_path, server, inputs, concurrency=32)
        async with Engine(config) as engine:
            await engine.run()
        assert server.statistics().requests == 3000 - sent
    assert_exactly_once(tmp_path / "out", ids_for("p", 3000))


async def test_drain_timeout_abandons_hung_requests(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(20))]
    clock = VirtualClock()
    config = job(tmp_path, CANNED, inputs, model="m", concurrency=8, drain_timeout=0.2)
    stopped_at: list[float] = []
    async with Engine(config, transport=Silent("never"), clock=clock) as engine:

        async def stop_when_full() -> None:
            # Real time: the input is read in a thread, which virtual time does not wait for.
            while engine.statistics().in_flight < 8:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            stopped_at.append(clock.monotonic())
            engine.stop()

        async with asyncio.timeout(10), asyncio.TaskGroup() as tg:
            tg.create_task(stop_when_full())
            stats = await engine.run()
    # The transport never answers: only the drain timer, a wait of drain_timeout on the
    # engine's clock, can have ended the eight attempts. (Virtual time also runs on while the
    # commit's thread works, so the time after the run says nothing.)
    assert stopped_at and 0.2 in clock.slept
    assert stats.stopped and stats.succeeded == 0 and stats.in_flight == 0
    assert stats.requests == 8
    assert read_output(tmp_path / "out")["results"] == []


async def test_permanent_errors_are_recorded_not_retried(
    tmp_path: Path, mock_server: MockServer
) -> None:
    lines = [batch_line(f"r{i}") for i in range(20)]
    for i in (3, 7):  # the server answers 400 to these two alone
        lines[i]["body"]["messages"] = []
    inputs = [write_shard(tmp_path / "b.jsonl", lines)]
    config = job(tmp_path, mock_server, inputs, prompt=None, model=None, max_attempts=5)
    async with Engine(config) as engine:
        stats = await engine.run()
    assert mock_server.statistics().requests == 20, "a 400 is not retried"
    found = assert_exactly_once(tmp_path / "out", {f"r{i}" for i in range(20)})
    assert stats.failed == 2 and {r["custom_id"] for r in found["failures"]} == {"r3", "r7"}
    error = found["failures"][0]["error"]
    assert error["status"] == 400 and "messages" in error["message"]
    assert found["failures"][0]["attempts"] == 1


async def test_wrong_model_or_url_stops_the_job_instead_of_failing_every_item(
    tmp_path: Path,
) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(300))]
    async with MockServer(MockConfig(models=["real-model"])) as server:
        config = job(tmp_path, server, inputs, model="typo-model")
        async with Engine(config) as engine:
            with pytest.raises(ConfigError, match=r"'typo-model' is not served.*real-model"):
                await engine.run()
        assert server.statistics().requests == 0
        unchecked = msgspec.structs.replace(config, check_endpoint=False, concurrency=8)
        async with Engine(unchecked) as engine:
            with pytest.raises(ConfigError, match=r"answered HTTP 404.*typo-model"):
                await engine.run()
        assert 1 <= server.statistics().requests <= 8
        no_v1 = msgspec.structs.replace(config, base_url=server.base_url.removesuffix("/v1"))
        async with Engine(no_v1) as engine:
            with pytest.raises(ConfigError, match=r"no /models.*base URL"):
                await engine.run()
        assert read_output(tmp_path / "out") == {"results": [], "failures": [], "errors": []}
        async with Engine(msgspec.structs.replace(config, model="real-model")) as engine:
            stats = await engine.run()
    assert stats.succeeded == 300
    assert_exactly_once(tmp_path / "out", ids_for("p", 300))


async def test_exhausted_retries_become_failures(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(10))]
    async with MockServer(MockConfig(fail_503=1.0)) as server:
        config = job(tmp_path, server, inputs, max_attempts=3)
        async with Engine(config) as engine:
            stats = await engine.run()
        assert server.statistics().requests == 30
    found = read_output(tmp_path / "out")
    assert stats.failed == 10 and len(found["failures"]) == 10
    error = found["failures"][0]["error"]
    assert error["status"] == 503 and "gave up after 3 attempts" in error["message"]


async def test_a_429_storm_does_not_use_up_attempts(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(200))]
    async with MockServer(MockConfig(fail_429=0.7, retry_after=0.001, seed=8)) as server:
        config = job(tmp_path, server, inputs, max_attempts=2)
        async with Engine(config) as engine:
            stats = await engine.run()
        assert server.statistics().by_outcome["429"] > 200
    assert stats.succeeded == 200 and stats.failed == 0


async def test_timeouts_are_retried(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(10))]
    config = job(tmp_path, CANNED, inputs, model="m", timeout=0.2, max_attempts=20)
    async with Engine(config, transport=SilentOnce("ok"), clock=VirtualClock()) as engine:
        stats = await engine.run()
    assert stats.succeeded == 10 and stats.retries == 10


async def test_a_timeout_ends_the_attempt_on_time(tmp_path: Path) -> None:
    """Attempt limits are swept (no timer per attempt), at most timeout / 8 late."""
    inputs = [write_shard(tmp_path / "p.jsonl", personas(1))]
    config = job(tmp_path, CANNED, inputs, model="m", timeout=0.4, max_attempts=2)
    async with Engine(config, transport=Silent("never"), clock=VirtualClock()) as engine:
        stats = await engine.run()
        sweep = engine._parts.attempter
        assert not sweep.deadlines and not sweep.expired  # nothing left registered
    (failure,) = read_output(tmp_path / "out")["failures"]
    assert stats.failed == 1 and failure["attempts"] == 2
    assert failure["error"]["code"] == "timeout" and "0.4s" in failure["error"]["message"]
    # two attempts of 0.4 s, each at most 0.05 s late, and a backoff of at most 0.05 s
    assert 0.8 <= failure["latency_s"] <= 0.95, failure["latency_s"]


async def test_an_expired_attempt_that_is_also_cancelled_stays_cancelled(tmp_path: Path) -> None:
    """The sweep's cancellation becomes a timeout only when nobody else cancelled the task:
    an attempt expiring as a hard stop cancels it is left for the next run, not recorded."""
    inputs = [write_shard(tmp_path / "p.jsonl", personas(1))]
    async with MockServer(MockConfig(hang=1.0, hang_seconds=30)) as server:
        config = job(tmp_path, server, inputs, timeout=60)
        async with Engine(config) as engine:
            run = asyncio.create_task(engine.run())
            sweep = engine._parts.attempter
            for _ in range(1000):  # until the attempt is on the wire
                if sweep.deadlines:
                    break
                await asyncio.sleep(0.01)
            (task,) = sweep.deadlines
            sweep.expired.add(task)  # what the sweep does...
            task.cancel()
            task.cancel()  # ...and a second cancel from elsewhere
            stats = await run
            assert not sweep.deadlines and not sweep.expired
    assert stats.succeeded == stats.failed == 0 and stats.retries == 0
    assert read_output(tmp_path / "out") == {"results": [], "failures": [], "errors": []}


async def test_a_transport_that_swallows_the_expiry_leaves_no_cancel_request(
    tmp_path: Path,
) -> None:
    """As asyncio.timeout does: a reply returned despite the sweep's cancellation is kept,
    and the task is not left with a pending cancel request."""
    tasks: list[asyncio.Task[Any]] = []

    class Stubborn(Canned):
        async def post(self, path: str, body: bytes) -> HttpResponse:
            task = asyncio.current_task()
            assert task is not None
            tasks.append(task)
            # A transport should not swallow cancellation; the engine copes if it does.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)
            return await super().post(path, body)

    inputs = [write_shard(tmp_path / "p.jsonl", personas(1))]
    config = job(tmp_path, CANNED, inputs, model="m", timeout=0.2, check_endpoint=False)
    async with Engine(config, transport=Stubborn("late")) as engine:
        stats = await engine.run()
    assert stats.succeeded == 1 and len(tasks) == 1
    assert tasks[0].cancelling() == 0
    (result,) = read_output(tmp_path / "out")["results"]
    assert result["output"] == "late"


class Throttled(Canned):
    """Refuses every request with a 429 that asks for seven seconds."""

    async def post(self, path: str, body: bytes) -> HttpResponse:
        error = {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}
        return HttpResponse(429, {"retry-after": "7"}, msgspec.json.encode(error))


async def test_retry_after_is_honoured(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(1))]
    clock = VirtualClock()
    # 429s do not use up attempts; the per-item deadline ends the wait
    config = job(tmp_path, CANNED, inputs, model="m", max_attempts=2, deadline=20.0)
    async with Engine(config, transport=Throttled("unused"), clock=clock) as engine:
        stats = await engine.run()
    waits = [d for d in clock.slept if d > 0.5]  # the sweep and the prober wait 0.5 s at most
    assert len(waits) == 2 and all(7.0 <= d <= 7.7 for d in waits), waits
    assert stats.failed == 1
    (failure,) = read_output(tmp_path / "out")["failures"]
    assert failure["attempts"] == 3 and failure["error"]["status"] == 429
    assert 14.0 <= failure["latency_s"] <= 15.4


async def test_batch_lines_pass_through(tmp_path: Path, mock_server: MockServer) -> None:
    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "mock-model",
                "messages": [{"role": "user", "content": f"hi {i}"}],
                "max_tokens": 5,
            },
        }
        for i in range(20)
    ]
    lines.append(
        {
            "custom_id": "text-1",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "mock-model", "prompt": "Once upon", "max_tokens": 5},
        }
    )
    lines.append(
        {
            "custom_id": "req-3",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "mock-model", "messages": []},
        }
    )
    lines.append({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {}})
    inputs = [write_shard(tmp_path / "batch.jsonl", lines)]
    config = job(tmp_path, mock_server, inputs, prompt=None, model=None)
    async with Engine(config) as engine:
        stats = await engine.run()
    found = read_output(tmp_path / "out")
    ok = {r["custom_id"]: r for r in found["results"]}
    assert set(ok) == {f"req-{i}" for i in range(20)} | {"text-1"}
    assert ok["text-1"]["output"] and ok["req-0"]["usage"]["completion_tokens"] <= 5
    errors = {e["custom_id"]: e["error"]["code"] for e in found["errors"]}
    assert errors == {"batch:22": "duplicate_custom_id", "batch:23": "bad_input"}
    assert stats.bad_lines == 2


def batch_line(custom_id: str, text: str = "hi") -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "mock-model", "messages": [{"role": "user", "content": text}]},
    }


async def test_duplicate_custom_id_is_recorded_however_late_it_comes(
    tmp_path: Path, mock_server: MockServer
) -> None:
    # the first "dup" is long committed when its copy is read: still a duplicate, not "done"
    lines = [batch_line("dup", "first"), *(batch_line(f"r{i}") for i in range(300))]
    lines.append(batch_line("dup", "second"))
    inputs = [write_shard(tmp_path / "b.jsonl", lines)]
    config = job(
        tmp_path, mock_server, inputs, prompt=None, model=None, concurrency=4, flush_records=10
    )
    async with Engine(config) as engine:
        stats = await engine.run()
    found = assert_exactly_once(tmp_path / "out", {"dup", *(f"r{i}" for i in range(300)), "b:302"})
    (dup,) = found["errors"]
    assert dup["custom_id"] == "b:302" and dup["error"]["code"] == "duplicate_custom_id"
    assert stats.bad_lines == 1 and stats.skipped == 0
    async with Engine(config) as engine:  # the rerun skips all, records nothing new
        stats = await engine.run()
    assert stats.requests == 0 and stats.skipped == 302 and stats.bad_lines == 0


async def test_bad_line_ids_never_collide_with_custom_ids(
    tmp_path: Path, mock_server: MockServer
) -> None:
    # line 1 is bad, so its record is "b:1"; line 2 is a valid request whose own id is "b:1"
    lines: list[Any] = [{"custom_id": "x"}, batch_line("b:1")]
    inputs = [write_shard(tmp_path / "b.jsonl", lines)]
    config = job(tmp_path, mock_server, inputs, prompt=None, model=None)
    for _ in range(2):
        async with Engine(config) as engine:
            await engine.run()
    found = read_output(tmp_path / "out")
    assert [r["custom_id"] for r in found["results"]] == ["b:1"]
    assert [(e["custom_id"], e["error"]["code"]) for e in found["errors"]] == [("b:1", "bad_input")]


async def test_bad_lines_are_recorded_once_with_location(
    tmp_path: Path, mock_server: MockServer
) -> None:
    lines: list[Any] = [
        {"persona": "fine"},
        b"{broken json",
        {"name": "no persona field"},
        {"persona": "   "},
        b'{"persona": "caf\xe9"}',
        b"[1, 2]",
        {"persona": None},
        {"persona": "also fine"},
    ]
    inputs = [write_shard(tmp_path / "bad.jsonl", lines)]
    config = job(tmp_path, mock_server, inputs)
    for _ in range(2):  # the rerun must not record them again
        async with Engine(config) as engine:
            await engine.run()
    found = read_output(tmp_path / "out")
    assert {r["custom_id"] for r in found["results"]} == {"bad:1:math:0", "bad:8:math:0"}
    errors = {e["source"]["line"]: e for e in found["errors"]}
    assert sorted(errors) == [2, 3, 4, 5, 6, 7]
    assert "malformed JSON" in errors[2]["error"]["message"]
    assert "persona" in errors[3]["error"]["message"]
    assert "empty" in errors[4]["error"]["message"]
    assert "UTF-8" in errors[5]["error"]["message"]
    assert "JSON object" in errors[6]["error"]["message"]
    assert all(e["path"].endswith("bad.jsonl") for e in errors.values())
    assert errors[2]["raw"] == "{broken json"


async def test_strict_mode_fails_fast_naming_the_line(
    tmp_path: Path, mock_server: MockServer
) -> None:
    inputs = [write_shard(tmp_path / "bad.jsonl", [{"persona": "ok"}, b"nope"])]
    async with Engine(job(tmp_path, mock_server, inputs, strict=True)) as engine:
        with pytest.raises(InputError, match=r"bad\.jsonl:2: malformed JSON"):
            await engine.run()


async def test_corrupt_shard_is_recorded_and_other_shards_go_on(
    tmp_path: Path, mock_server: MockServer
) -> None:
    good = write_shard(tmp_path / "good.jsonl.zst", personas(30))
    broken = write_shard(tmp_path / "broken.jsonl.zst", personas(20000, "b"))
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    config = job(tmp_path, mock_server, [broken, good], concurrency=256)
    async with Engine(config) as engine:
        stats = await engine.run()
    found = read_output(tmp_path / "out")
    assert stats.finished
    assert {r["custom_id"] for r in found["results"]} >= ids_for("good", 30)
    (err,) = found["errors"]
    assert err["custom_id"] == "broken:file" and err["error"]["code"] == "corrupt_input"
    assert "truncated" in err["error"]["message"]
    assert len(found["results"]) == 30 + err["source"]["line"]


async def test_other_job_in_same_output_is_refused(tmp_path: Path, mock_server: MockServer) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(3))]
    async with Engine(job(tmp_path, mock_server, inputs)) as engine:
        await engine.run()
    with pytest.raises(OutputError, match="different job"):
        async with Engine(job(tmp_path, mock_server, inputs, prompt="npc")):
            pass


async def test_unreachable_endpoint_fails_fast(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(3))]
    async with MockServer() as server:
        url = server.base_url  # the port is free once the server is gone
    config = job(tmp_path, url, inputs, model="m")
    async with Engine(config) as engine:
        with pytest.raises(ConnectError, match="cannot reach endpoint"):
            await engine.run()
    assert read_output(tmp_path / "out") == {"results": [], "failures": [], "errors": []}


async def test_bad_api_key_fails_fast(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(3))]
    async with MockServer(MockConfig(api_key="sk-right-key")) as server:
        config = job(tmp_path, server, inputs)
        async with Engine(config, api_key="sk-wrong-secret") as engine:
            with pytest.raises(ConfigError, match="refused the API key") as info:
                await engine.run()
        assert "sk-wrong-secret" not in str(info.value)
        async with Engine(config, api_key="sk-right-key") as engine:
            stats = await engine.run()
            assert "sk-right-key" not in repr(engine) + repr(engine._transports)
    assert stats.succeeded == 3
    for path in (tmp_path / "out").iterdir():
        assert b"sk-right-key" not in path.read_bytes()


async def test_overrides_and_samples_reach_the_request(tmp_path: Path) -> None:
    recorder = Canned("ok")
    inputs = [write_shard(tmp_path / "p.jsonl", personas(2))]
    config = job(
        tmp_path,
        CANNED,
        inputs,
        prompt="npc",
        model="m",
        samples=3,
        max_tokens=77,
        extra_body={"top_k": 20, "temperature": 0.1},
    )
    async with Engine(config, transport=recorder) as engine:
        stats = await engine.run()
    assert stats.succeeded == 6 and len(recorder.bodies) == 6
    body = recorder.bodies[0]
    assert body["path"] == "/chat/completions" and body["model"] == "m"
    assert body["max_tokens"] == 77 and body["top_k"] == 20 and body["temperature"] == 0.1
    assert any("person number 0" in m["content"] for m in body["messages"])


async def test_rate_limit_paces_requests(tmp_path: Path, mock_server: MockServer) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(12))]
    config = job(tmp_path, mock_server, inputs, rpm=600.0)  # 10 per second
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with Engine(config) as engine:
        stats = await engine.run()
    elapsed = loop.time() - start
    assert stats.succeeded == 12
    # one second of budget may go at once, the rest is paced: >= 0.2 s for the last two
    assert elapsed >= 0.15


def test_job_config_types_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"Expected `array`, got `str` - at `\$.inputs`"):
        JobConfig(inputs="personas.jsonl", output="out", prompt="math", model="m").validate()  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"\$.samples"):
        JobConfig(inputs=["p"], output="out", prompt="math", model="m", samples="2").validate()  # type: ignore[arg-type]


async def test_strict_mode_stops_on_a_duplicate_custom_id(
    tmp_path: Path, mock_server: MockServer
) -> None:
    inputs = [write_shard(tmp_path / "b.jsonl", [batch_line("a"), batch_line("a")])]
    config = job(tmp_path, mock_server, inputs, prompt=None, model=None, strict=True)
    async with Engine(config) as engine:
        with pytest.raises(InputError, match=r"b\.jsonl:2: custom_id 'a' appears twice"):
            await engine.run()


class _FullReply(Canned):
    """Every optional part of a reply set, each to a value of its own."""

    def __init__(self) -> None:
        super().__init__("unused")
        self._reply = msgspec.json.encode(
            {
                "model": "served-model",
                "choices": [
                    {
                        "message": {
                            "content": "the answer",
                            "reasoning_content": "the why",
                            "tool_calls": [
                                {
                                    "id": "c1",
                                    "type": "function",
                                    "function": {"name": "f", "arguments": "{}"},
                                }
                            ],
                        },
                        "finish_reason": "length",
                    }
                ],
                "usage": {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33},
            }
        )


async def test_every_field_of_a_record_holds_its_own_value(tmp_path: Path) -> None:
    """The engine builds records positionally (for speed): each field must land where it
    belongs, which values of distinct kinds and sizes pin down."""
    import hashlib

    assert Result.__struct_fields__[:12] == (
        "custom_id", "error", "output", "finish_reason", "model", "template", "persona",
        "source", "attempts", "latency_s", "created", "usage",
    )  # fmt: skip
    shard = write_shard(tmp_path / "p.jsonl", [{"persona": "A clockmaker", "idx": 7}])
    config = job(tmp_path, CANNED, [shard], model="asked-model", check_endpoint=False)
    before = time.time()
    async with Engine(config, transport=_FullReply()) as engine:
        await engine.run()
    (record,) = read_output(tmp_path / "out")["results"]
    assert set(record) == set(Result.__struct_fields__)
    persona_digest = hashlib.sha256(b"A clockmaker").hexdigest()[:16]
    expected = {
        "custom_id": "p:1:math:0",
        "error": None,
        "output": "the answer",
        "finish_reason": "length",
        "model": "served-model",
        "template": "math",
        "persona": "A clockmaker",
        "source": {"shard": "p", "line": 1},
        "attempts": 1,
        "usage": {"prompt_tokens": 11, "completion_tokens": 22, "total_tokens": 33},
        "meta": {"idx": 7},
        "reasoning": "the why",
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
        "ttft_s": None,
        "endpoint": "http://canned.invalid/v1",
        "persona_sha256": persona_digest,
        "replaces_failure": False,
        "parsed": None,
        "rejected_usage": None,
        "rejected_output": None,
        "url": "/chat/completions",
    }
    assert {k: record[k] for k in expected} == expected
    assert len(record["template_sha256"]) == 16 and record["template_sha256"] != persona_digest
    assert record["sampling"] and "model" not in record["sampling"]
    assert before <= record["started"] <= record["created"] <= time.time()
    assert 0 <= record["latency_s"] < 5 and record["latency_s"] <= record["created"] - before + 1


async def test_leaving_during_a_slow_commit_waits_for_it_then_resumes_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer leaves while a commit is being synced: the commit's thread cannot be
    stopped, so the hard stop's own commit and closing the store wait for it instead of
    writing through the same files at once (which corrupted frames, or hit a closed fd)."""
    from asyncgen.storage import shards

    real_sync = shards._datasync
    slow = {"on": True}
    running: list[int] = []
    trouble: list[str] = []

    def sync(fd: int) -> None:
        if running:
            trouble.append("two commits at once")
        running.append(fd)
        try:
            if slow["on"]:
                time.sleep(0.4)
            real_sync(fd)
        except OSError as exc:
            trouble.append(repr(exc))  # the store closed under the commit
        finally:
            running.remove(fd)

    monkeypatch.setattr(shards, "_datasync", sync)
    inputs = [write_shard(tmp_path / "p.jsonl.zst", personas(3000))]
    async with MockServer(MockConfig(latency=0.01)) as server:
        config = job(tmp_path, server, inputs, flush_interval=0.05)
        async with Engine(config) as engine:
            async for _ in engine.results():
                await asyncio.sleep(0.1)  # the next commit is now inside its slow sync
                break
        slow["on"] = False
        assert trouble == []
        async with Engine(config) as engine:
            stats = await engine.run()
    assert stats.finished
    assert_exactly_once(tmp_path / "out", ids_for("p", 3000))


async def test_a_caller_cancelled_during_the_hard_stop_commit_stays_cancelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Leaving the block waits for the pipeline's last commit; a cancellation of the caller
    meanwhile is the caller's own and must reach it, not end with the pipeline's."""
    from asyncgen.storage import shards

    real_sync = shards._datasync

    def slow_sync(fd: int) -> None:
        time.sleep(0.2)
        real_sync(fd)

    monkeypatch.setattr(shards, "_datasync", slow_sync)
    inputs = [write_shard(tmp_path / "p.jsonl.zst", personas(3000))]
    left = asyncio.Event()
    async with MockServer(MockConfig(latency=0.01)) as server:
        config = job(tmp_path, server, inputs)

        async def consume() -> None:
            async with Engine(config) as engine:
                async for _ in engine.results():
                    break
                left.set()  # the block is left at once: the hard stop and its commit follow

        task = asyncio.create_task(consume())
        await left.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.setattr(shards, "_datasync", real_sync)
        async with Engine(config) as engine:
            stats = await engine.run()
    assert stats.finished
    assert_exactly_once(tmp_path / "out", ids_for("p", 3000))
