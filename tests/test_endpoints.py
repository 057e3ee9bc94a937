"""Flow control end to end: many endpoints, outages, announced budgets, streaming."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import pytest

from asyncgen import Engine, JobConfig
from asyncgen.core.errors import ConfigError, ConnectError
from asyncgen.engine.clock import VirtualClock
from asyncgen.engine.transport import HttpResponse
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import Canned, assert_exactly_once, personas, until, write_shard

FAST = {"backoff_base": 0.01, "backoff_cap": 0.05, "flush_interval": 0.05}


def job(tmp_path: Path, urls: str | list[str], inputs: list[Path], **kw: Any) -> JobConfig:
    settings: dict[str, Any] = {
        "inputs": [str(p) for p in inputs],
        "output": str(tmp_path / "out"),
        "prompt": "math",
        "model": "mock-model",
        "base_url": urls,
        "concurrency": 32,
        **FAST,
    }
    settings.update(kw)
    return JobConfig(**settings)


def ids_for(shard: str, n: int) -> set[str]:
    return {f"{shard}:{i}:math:0" for i in range(1, n + 1)}


async def test_three_endpoints_share_the_load(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(600))
    servers = [MockServer(MockConfig(latency=0.005, seed=i)) for i in range(3)]
    for s in servers:
        await s.start()
    try:
        config = job(tmp_path, [s.base_url for s in servers], [shard])
        async with Engine(config) as engine:
            stats = await engine.run()
        counts = [s.statistics().requests for s in servers]
    finally:
        for s in servers:
            await s.aclose()
    assert_exactly_once(tmp_path / "out", ids_for("p", 600))
    assert sum(counts) == 600 and min(counts) >= 100, counts
    assert [e.succeeded for e in stats.endpoints] == counts


async def test_endpoint_killed_and_restarted_gets_traffic_again(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(1500))
    cfg = MockConfig(latency=0.02, seed=1)
    servers = [MockServer(cfg) for _ in range(3)]
    for s in servers:
        await s.start()
    victim = servers[1]
    port = victim.port
    restarted = MockServer(cfg, port=port)
    try:
        config = job(tmp_path, [s.base_url for s in servers], [shard], max_attempts=3)
        async with Engine(config, rng=random.Random(1)) as engine:
            run = asyncio.create_task(engine.run())
            await until(lambda: engine.statistics().succeeded >= 200)
            await victim.aclose()  # in-flight requests to it are cut
            await until(lambda: engine.statistics().succeeded >= 600)
            down = [e.up for e in engine.statistics().endpoints]
            await restarted.start()
            stats = await run
    finally:
        for s in (*servers, restarted):
            await s.aclose()
    assert down == [True, False, True]
    found = assert_exactly_once(tmp_path / "out", ids_for("p", 1500))
    assert len(found["results"]) == 1500, "no item may fail because an endpoint died"
    assert restarted.statistics().requests > 0, "the restarted endpoint must get traffic again"
    assert stats.endpoints[1].ejections >= 1 and stats.endpoints[1].up


class Replica(Canned):
    """An endpoint in process, on a virtual clock: it refuses connections while ``down`` (and
    goes down by itself after ``up_for`` replies); it answers after ``latency`` seconds."""

    def __init__(
        self, url: str, clock: VirtualClock, *, latency: float = 0.0, up_for: int | None = None
    ) -> None:
        super().__init__("A problem.")
        self.base_url = url
        self.clock = clock
        self.latency = latency
        self.up_for = up_for
        self.down = False
        self.answered = self.refused = 0

    def _connect(self) -> None:
        if self.down:
            self.refused += 1
            raise ConnectError(f"cannot connect to {self.base_url}", sent=False)

    async def post(self, path: str, body: bytes) -> HttpResponse:
        self._connect()
        if self.latency:
            await self.clock.sleep(self.latency)
        self.answered += 1
        self.down = self.answered == self.up_for
        return await super().post(path, body)

    async def get(self, path: str) -> HttpResponse:
        self._connect()
        return await super().get(path)


async def test_waits_while_no_endpoint_is_up(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(300))
    clock = VirtualClock()
    replica = Replica("http://replica.invalid/v1", clock, up_for=50)
    # Three attempts only: with backoff of at most 0.05 s, counted failures would use them up
    # within the first 0.2 s of the minute-long outage.
    config = job(tmp_path, replica.base_url, [shard], max_attempts=3)
    async with Engine(config, transport=replica, clock=clock) as engine:
        run = asyncio.create_task(engine.run())
        async with asyncio.timeout(30):
            while not engine.statistics().waiting_for_endpoint:
                await clock.sleep(0.01)
        waiting, down_at = engine.statistics(), clock.now
        await clock.sleep(60.0)
        replica.down = False
        stats = await run
    assert waiting.waiting_for_endpoint and not waiting.endpoints[0].up
    assert waiting.endpoints[0].succeeded == 50 and replica.refused > 3
    assert stats.finished and stats.failed == 0
    assert stats.endpoints[0].up and stats.elapsed >= down_at + 60.0
    assert_exactly_once(tmp_path / "out", ids_for("p", 300))


async def test_unreachable_endpoint_at_start_joins_later(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(400))
    clock = VirtualClock()
    # 400 items at 32 x 0.2 s take 2.5 s on the one live endpoint: time for probes to find
    # the late one (0.25 s, then 0.5 s, 1 s ... apart).
    up = Replica("http://up.invalid/v1", clock, latency=0.2)
    late = Replica("http://late.invalid/v1", clock, latency=0.2)
    late.down = True
    config = job(tmp_path, [up.base_url, late.base_url], [shard])
    async with Engine(config, transport=[up, late], clock=clock) as engine:
        run = asyncio.create_task(engine.run())
        await clock.sleep(0.3)
        assert not engine.statistics().endpoints[1].up
        late.down = False
        stats = await run
    assert late.answered > 0 and stats.endpoints[1].up
    assert up.answered + late.answered == 400
    assert_exactly_once(tmp_path / "out", ids_for("p", 400))


async def test_no_endpoint_reachable_at_start_fails_fast(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(3))
    config = job(tmp_path, ["http://127.0.0.1:9/v1", "http://127.0.0.1:7/v1"], [shard])
    async with Engine(config) as engine:
        with pytest.raises(ConnectError, match="cannot reach endpoint"):
            await engine.run()


async def test_a_misconfigured_replica_is_left_out_and_the_others_go_on(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(3))
    warned: list[str] = []
    async with (
        MockServer() as good,
        MockServer(MockConfig(models=["other-model"])) as wrong,
    ):
        config = job(tmp_path, [good.base_url, wrong.base_url], [shard])
        async with Engine(config, warn=warned.append) as engine:
            stats = await engine.run()
        assert wrong.statistics().requests == 0 and good.statistics().requests == 3
    assert stats.succeeded == 3 and stats.failed == 0
    assert len(warned) == 1 and "not served by" in warned[0] and wrong.base_url in warned[0]
    # When every endpoint says so, the job stops.
    async with MockServer(MockConfig(models=["other-model"])) as wrong:
        config = job(tmp_path / "again", [wrong.base_url, good.base_url], [shard])
        async with Engine(config) as engine:
            with pytest.raises(ConfigError, match="not served by"):
                await engine.run()


def test_same_url_twice_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="twice"):
        job(tmp_path, ["http://a/v1", "http://a/v1"], [tmp_path / "x"]).validate()


async def test_announced_budget_is_followed_without_being_configured(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(120))
    async with MockServer(MockConfig(rpm_limit=3000, seed=2)) as server:  # 50/s
        config = job(tmp_path, server.base_url, [shard], concurrency=64, max_attempts=2)
        async with Engine(config) as engine:
            stats = await engine.run()
        mock = server.statistics()
    assert stats.failed == 0 and stats.succeeded == 120
    assert stats.endpoints[0].rpm_limit == 3000
    # The first burst finds the budget; after that, pacing keeps 429s rare.
    assert mock.rate_limited <= 64, mock


async def test_configured_budget_avoids_429s(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(150))
    async with MockServer(MockConfig(rpm_limit=3000, seed=2)) as server:
        config = job(tmp_path, server.base_url, [shard], concurrency=64, rpm=3000)
        async with Engine(config) as engine:
            stats = await engine.run()
        mock = server.statistics()
    assert stats.succeeded == 150
    assert mock.rate_limited <= 2, mock


async def test_streaming_with_cuts_completes_exactly_once(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(400))
    cfg = MockConfig(stream_cut=0.05, stream_comments=True, token_latency=0.0005, seed=4)
    async with MockServer(cfg) as server:
        config = job(tmp_path, server.base_url, [shard], stream=True, max_attempts=8)
        async with Engine(config) as engine:
            stats = await engine.run()
        mock = server.statistics()
    found = assert_exactly_once(tmp_path / "out", ids_for("p", 400))
    assert len(found["results"]) == 400
    assert mock.by_outcome.get("stream_cut", 0) > 0
    assert stats.retries >= mock.by_outcome["stream_cut"]
    for r in found["results"]:
        assert r["output"] and r["finish_reason"] in ("stop", "length")
        assert r["usage"]["completion_tokens"] > 0
        assert 0 <= r["ttft_s"] <= r["latency_s"] + 0.01


async def test_stream_output_equals_non_streamed(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(20))
    async with MockServer(MockConfig(seed=9)) as server:
        for name, stream in (("a", False), ("b", True)):
            out = str(tmp_path / name)
            config = job(tmp_path, server.base_url, [shard], output=out, stream=stream)
            async with Engine(config) as engine:
                await engine.run()
    a = assert_exactly_once(tmp_path / "a", ids_for("p", 20))["results"]
    b = assert_exactly_once(tmp_path / "b", ids_for("p", 20))["results"]
    by_id = {r["custom_id"]: r for r in a}
    for r in b:
        assert r["output"] == by_id[r["custom_id"]]["output"]
        assert r["usage"] == by_id[r["custom_id"]]["usage"]
        assert r["ttft_s"] is not None and by_id[r["custom_id"]]["ttft_s"] is None


async def test_stalled_stream_is_retried_after_idle_timeout(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(30))
    cfg = MockConfig(stream_stall=0.2, hang_seconds=30, seed=5)
    async with MockServer(cfg) as server:
        config = job(tmp_path, server.base_url, [shard], stream=True, idle_timeout=0.3)
        async with Engine(config) as engine:
            stats = await engine.run()
        mock = server.statistics()
    assert stats.succeeded == 30 and stats.failed == 0
    stalled = mock.requests - 30  # the mock never finishes a stall the client gave up on
    assert stalled >= 1
    assert stats.retries == stalled
    assert stats.elapsed < 20, "a stall costs the idle timeout, not hang_seconds"


async def test_a_429_sends_the_item_to_another_endpoint_at_once(tmp_path: Path) -> None:
    """The server's Retry-After pauses its endpoint; the items it refused go elsewhere now,
    not after the pause."""
    shard = write_shard(tmp_path / "p.jsonl", personas(100))
    async with (
        MockServer(MockConfig(fail_429=1.0, retry_after=30.0)) as limited,
        MockServer(MockConfig(latency=0.01)) as free,
    ):
        config = job(tmp_path, [limited.base_url, free.base_url], [shard], max_attempts=2)
        async with Engine(config) as engine:
            async with asyncio.timeout(15):
                stats = await engine.run()
        refused = limited.statistics().by_outcome.get("429", 0)
    assert_exactly_once(tmp_path / "out", ids_for("p", 100))
    assert stats.succeeded == 100 and stats.throttled == refused >= 1
    assert stats.endpoints[1].succeeded == 100
