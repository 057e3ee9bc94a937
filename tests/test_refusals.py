"""Flow control under refusals, end to end: a hiccup is the item's, a spent budget the
endpoint's, a used-up quota or a broken server the job's, and a stop sends nothing new."""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from asyncgen import Engine, JobConfig
from asyncgen.core.errors import ConfigError
from asyncgen.engine.clock import VirtualClock
from asyncgen.engine.transport import HttpResponse
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import Canned, assert_exactly_once, clean_env, personas, until, write_shard
from .test_crash_resume import mock_process, server_requests

URL = "http://refusing.invalid/v1"


def job(tmp_path: Path, inputs: list[Path], base_url: str = URL, **kw: Any) -> JobConfig:
    settings: dict[str, Any] = {
        "inputs": [str(p) for p in inputs],
        "output": str(tmp_path / "out"),
        "prompt": "math",
        "model": "m",
        "base_url": base_url,
        "concurrency": 50,
        "flush_interval": 0.05,
        **kw,
    }
    return JobConfig(**settings)


def ids_for(shard: str, n: int) -> set[str]:
    return {f"{shard}:{i}:math:0" for i in range(1, n + 1)}


def _refusal(status: int, retry_after: float | None) -> HttpResponse:
    error = {"error": {"message": "try again later", "code": "rate_limit_exceeded"}}
    headers = {} if retry_after is None else {"retry-after-ms": str(int(retry_after * 1000))}
    return HttpResponse(status, headers, msgspec.json.encode(error))


class Refusing(Canned):
    """An endpoint on a virtual clock that answers after ``latency``, refusing a share of
    requests at random whatever the load (429 and 503, both with Retry-After), or those
    ``refuse(n)`` picks by their number."""

    base_url = URL

    def __init__(
        self,
        clock: VirtualClock,
        *,
        share: float = 0.0,
        retry_after: float = 1.0,
        latency: float = 0.03,
        seed: int = 1,
    ) -> None:
        super().__init__("an answer")
        self.clock = clock
        self.share = share
        self.retry_after = retry_after
        self.latency = latency
        self.rng = random.Random(seed)
        self.sent: list[float] = []
        self.refused = 0

    def refuse(self, n: int) -> HttpResponse | None:
        if self.rng.random() >= self.share:
            return None
        self.refused += 1
        return _refusal(429 if n % 2 else 503, self.retry_after)

    async def post(self, path: str, body: bytes) -> HttpResponse:
        n = len(self.sent)
        self.sent.append(self.clock.monotonic())
        await self.clock.sleep(self.latency)
        refusal = self.refuse(n)
        if refusal is not None:
            return refusal
        return await super().post(path, body)


@pytest.mark.parametrize("share", [0.05, 0.15, 0.30])
async def test_sporadic_refusals_are_waited_out_by_their_items_alone(
    tmp_path: Path, share: float
) -> None:
    """A gateway refusing a share of requests at random: every item succeeds, the endpoint
    is never paused nor its window shrunk, and each refused item waits at least the
    Retry-After it was given while the others go on."""
    inputs = [write_shard(tmp_path / "p.jsonl", personas(1_000))]
    clock = VirtualClock()
    refusing = Refusing(clock, share=share)
    async with Engine(job(tmp_path, inputs), transport=refusing, clock=clock) as engine:
        stats = await engine.run()
    assert stats.succeeded == 1_000 and stats.failed == 0
    endpoint = stats.endpoints[0]
    assert endpoint.window == 50 and endpoint.paused_for == 0
    assert refusing.refused > 0 and stats.retries == refusing.refused
    # Each refused item waited on its own, between Retry-After and twice it (full jitter),
    # but for the first replies, which are all the evidence there is (a first reply refused
    # pauses the endpoint, two of the first four too); nothing else waits that long but the
    # gate's bounded waits.
    # (A wait is the time left until a deadline: 1 s may come out a float's hair under.)
    own_waits = [s for s in clock.slept if 1.0 - 1e-9 <= s <= 2.0]
    assert refusing.refused - 10 <= len(own_waits) <= refusing.refused
    shorter = [s for s in clock.slept if 0.5 < s < 1.0 - 1e-9]
    assert not shorter, "never shorter than Retry-After"
    assert_exactly_once(tmp_path / "out", ids_for("p", 1_000))


class EveryFourth(Refusing):
    def refuse(self, n: int) -> HttpResponse | None:
        if n % 4 != 3:
            return None
        self.refused += 1
        return _refusal(429, self.retry_after)


async def test_items_waiting_out_a_refusal_lend_their_slot(tmp_path: Path) -> None:
    """Four slots, one refusal in four, Retry-After 10 s: the refused items park, and the
    others are all done long before the first Retry-After has passed."""
    inputs = [write_shard(tmp_path / "p.jsonl", personas(40))]
    clock = VirtualClock()
    refusing = EveryFourth(clock, retry_after=10.0, latency=0.1)
    config = job(tmp_path, inputs, concurrency=4)
    async with Engine(config, transport=refusing, clock=clock) as engine:
        stats = await engine.run()
    assert stats.succeeded == 40
    records = assert_exactly_once(tmp_path / "out", ids_for("p", 40))["results"]
    first_try = sorted(r["latency_s"] for r in records if r["attempts"] == 1)
    assert len(first_try) >= 28 and first_try[-1] < 0.5
    retried = [r for r in records if r["attempts"] > 1]
    assert retried and all(r["latency_s"] >= 10.0 for r in retried)


class ThenFails(Canned):
    """The first request: 429 with Retry-After 5 s; the next nine, in flight with it: 500s
    (the endpoint is ejected); then every request succeeds."""

    base_url = URL

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__("fine")
        self.clock = clock
        self.sent: list[float] = []

    async def post(self, path: str, body: bytes) -> HttpResponse:
        n = len(self.sent)
        self.sent.append(self.clock.monotonic())
        await self.clock.sleep(0.1)
        if n == 0:
            return _refusal(429, 5.0)
        if n < 10:
            return HttpResponse(500, {}, b'{"error": {"message": "boom"}}')
        return await super().post(path, body)


async def test_a_retry_after_is_not_cut_short_by_a_successful_probe(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(10))]
    clock = VirtualClock()
    transport = ThenFails(clock)
    config = job(tmp_path, inputs, concurrency=10, backoff_base=0.01, backoff_cap=0.05)
    async with Engine(config, transport=transport, clock=clock) as engine:
        stats = await engine.run()
    assert stats.succeeded == 10
    # The probe (0.25 s after the ejection) re-admitted the endpoint; the pause held.
    assert all(t >= 5.0 for t in transport.sent[10:]), transport.sent[10:]
    assert stats.endpoints[0].ejections == 1


async def test_a_used_up_quota_stops_the_job_at_once(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(500))]
    async with MockServer(MockConfig(quota_exhausted=True)) as server:
        config = job(tmp_path, inputs, base_url=server.base_url, model="mock-model")
        async with Engine(config) as engine:
            with pytest.raises(ConfigError) as caught:
                await engine.run()
        sent = server.statistics().requests
    message = str(caught.value)
    assert "insufficient_quota" in message and "quota" in message and "HTTP 429" in message
    assert sent <= 50  # the first answers stop it; at most what was in flight was sent
    assert_exactly_once(tmp_path / "out", set())  # nothing recorded: a rerun sends them


async def test_a_server_that_answers_only_500_stops_the_job(tmp_path: Path) -> None:
    """500 to everything, GET /models included: after the probes' budget the job stops
    with the server's status and body, instead of waiting for ever."""
    inputs = [write_shard(tmp_path / "p.jsonl", personas(20))]
    clock = VirtualClock()
    async with MockServer(MockConfig(broken=True)) as server:
        config = job(tmp_path, inputs, base_url=server.base_url, concurrency=8)
        async with Engine(config, clock=clock) as engine:
            with pytest.raises(ConfigError) as caught:
                async with asyncio.timeout(30):
                    await engine.run()
    message = str(caught.value)
    assert "no endpoint can serve" in message and "HTTP 500" in message
    assert "server had an error" in message


class Slow(Canned):
    """Answers after ``latency`` real seconds; the first attempt of each item fails."""

    base_url = URL

    def __init__(self, latency: float, fail_first: bool) -> None:
        super().__init__("done")
        self.latency = latency
        self.fail_first = fail_first
        self.seen: set[bytes] = set()
        self.requests = 0

    async def post(self, path: str, body: bytes) -> HttpResponse:
        self.requests += 1
        await asyncio.sleep(self.latency)
        if self.fail_first and body not in self.seen:
            self.seen.add(body)
            return HttpResponse(500, {}, b'{"error": {"message": "once"}}')
        return await super().post(path, body)


async def test_a_stop_sends_no_retry_and_ends_with_the_last_reply(tmp_path: Path) -> None:
    """Every first attempt fails, and its retry would come after 30 s: a stop once they are
    in flight ends as soon as they come back, sends no retry, and leaves the items to the
    next run, which sends each exactly once."""
    inputs = [write_shard(tmp_path / "p.jsonl", personas(20))]
    transport = Slow(0.2, fail_first=True)
    config = job(
        tmp_path, inputs, concurrency=20, backoff_base=30.0, backoff_cap=30.0, drain_timeout=60
    )
    async with Engine(config, transport=transport) as engine:

        async def stop_when_all_in_flight() -> None:
            await until(lambda: engine.statistics().in_flight == 20)
            engine.stop()

        started = time.monotonic()
        async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
            tg.create_task(stop_when_all_in_flight())
            stats = await engine.run()
        took = time.monotonic() - started
    assert took < 5, "the drain waited for retries or for its timeout"
    assert transport.requests == 20 and stats.retries == 0
    assert stats.stopped and not stats.finished and stats.succeeded == 0
    again = Slow(0.0, fail_first=False)
    async with Engine(job(tmp_path, inputs), transport=again) as engine:
        rerun = await engine.run()
    assert again.requests == 20 and rerun.finished
    assert_exactly_once(tmp_path / "out", ids_for("p", 20))


async def test_a_stop_after_the_last_item_was_taken_can_still_finish(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(10))]
    transport = Slow(0.3, fail_first=False)
    async with Engine(job(tmp_path, inputs), transport=transport) as engine:

        async def stop_when_all_in_flight() -> None:
            await until(lambda: engine.statistics().in_flight == 10)
            engine.stop()

        async with asyncio.timeout(20), asyncio.TaskGroup() as tg:
            tg.create_task(stop_when_all_in_flight())
            stats = await engine.run()
    assert stats.stopped and stats.finished and stats.succeeded == 10


# --- the command line ---------------------------------------------------------------------------


def _run(
    args: list[str], *, signal_when: Callable[[], bool] | None = None, sig: int = 15
) -> tuple[int, str]:
    """``asyncgen run ARGS`` in a subprocess; its exit status and stderr. ``signal_when``:
    send ``sig`` once it is true (polled; a loaded machine may take seconds to start)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncgen", "run", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    if signal_when is not None:
        deadline = time.monotonic() + 30
        while not signal_when() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def _args(tmp_path: Path, url: str, inputs: list[Path], *extra: str) -> list[str]:
    return [
        *("-i", *map(str, inputs), "-p", "math", "-m", "mock-model", "--base-url", url),
        *("-o", str(tmp_path / "out"), "-q", *extra),
    ]


def test_cli_a_used_up_quota_exits_2_naming_it(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(2_000))]
    with mock_process("--quota-exhausted") as url:
        started = time.monotonic()
        code, err = _run(_args(tmp_path, url, inputs, "--concurrency", "256"))
        took = time.monotonic() - started
        sent = server_requests(url)
    assert code == 2 and took < 30 and sent < 50
    assert "insufficient_quota" in err and "quota" in err and "Traceback" not in err


def test_cli_a_drain_that_completes_every_item_exits_0(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(20))]
    # The signal comes once all 20 are in flight (each takes 5 s).
    with mock_process("--latency", "5") as url:
        code, err = _run(
            _args(tmp_path, url, inputs), signal_when=lambda: server_requests(url) == 20
        )
        sent = server_requests(url)
    assert code == 0, err
    assert sent == 20 and "no new requests" in err
    assert_exactly_once(tmp_path / "out", ids_for("p", 20))


@pytest.mark.slow
def test_kill_9_during_a_pause_resumes_exactly_once(tmp_path: Path) -> None:
    """Most requests refused with a Retry-After of 5 s: killed while the endpoint is paused
    and items wait, then rerun against a healthy server: every item exactly once."""
    inputs = [write_shard(tmp_path / "p.jsonl", personas(300))]
    with mock_process("--fail-429", "0.7", "--retry-after", "5", "--seed", "3") as url:
        code, _ = _run(
            _args(tmp_path, url, inputs), signal_when=lambda: server_requests(url) > 30, sig=9
        )
        assert code == -9
        refused_run = server_requests(url)
    assert refused_run > 0
    with mock_process() as url:
        code, err = _run(_args(tmp_path, url, inputs))
        resent = server_requests(url)
    assert code == 0, err
    assert 0 < resent <= 300
    assert_exactly_once(tmp_path / "out", ids_for("p", 300))
