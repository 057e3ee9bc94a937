"""The mock server: OpenAI-shaped replies the official SDK accepts, and each injected fault."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from typing import Any

import aiohttp
import msgspec
import openai
import pytest

from asyncgen.cli.mock_server import add_arguments, config_from_args, main_from_args
from asyncgen.mock.budget import RateBudgets, RunningSlots, format_duration
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import clean_env


def sdk(server: MockServer, key: str = "sk-test", **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=key, **kw)  # type: ignore[arg-type]


async def test_official_sdk_chat_completions_and_models() -> None:
    async with MockServer(MockConfig(output_tokens=12)) as server, sdk(server) as client:
        reply = await client.chat.completions.create(
            model="mock-model",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "write a riddle"},
            ],
        )
        again = await client.chat.completions.create(
            model="mock-model",
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "write a riddle"},
            ],
        )
        other = await client.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "something else"}]
        )
        models = await client.models.list()
    assert reply.object == "chat.completion" and reply.model == "mock-model"
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content is not None
    assert len(choice.message.content.split()) == 12
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens == 5  # "be brief" + "write a riddle"
    assert reply.usage.total_tokens == 17
    assert again.choices[0].message.content == choice.message.content, "deterministic"
    assert other.choices[0].message.content != choice.message.content
    assert [m.id for m in models.data] == ["mock-model"]
    assert server.statistics().requests == 3
    assert server.statistics().by_route == {"/v1/chat/completions": 3, "/v1/models": 1}


async def test_official_sdk_completions_with_max_tokens_and_n() -> None:
    async with MockServer(MockConfig(output_tokens=50)) as server, sdk(server) as client:
        reply = await client.completions.create(
            model="base", prompt="Once upon a time", max_tokens=7, n=2
        )
    assert reply.object == "text_completion"
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in reply.choices)
    assert all(len(c.text.split()) == 7 for c in reply.choices)
    assert reply.choices[0].text != reply.choices[1].text
    assert reply.usage is not None and reply.usage.completion_tokens == 14


async def test_official_sdk_sees_openai_errors() -> None:
    config = MockConfig(models=["served"], api_key="sk-right")
    async with MockServer(config) as server:
        async with sdk(server, key="sk-wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as auth:
                await client.models.list()
        assert "sk-wrong" not in str(auth.value)
        async with sdk(server, key="sk-right", max_retries=0) as client:
            with pytest.raises(openai.NotFoundError, match="`missing` does not exist"):
                await client.chat.completions.create(
                    model="missing", messages=[{"role": "user", "content": "hi"}]
                )
            with pytest.raises(openai.BadRequestError, match="messages"):
                await client.chat.completions.create(model="served", messages=[])
            models = await client.models.list()
    assert [m.id for m in models.data] == ["served"]


async def test_official_sdk_retries_429_using_retry_after_ms() -> None:
    config = MockConfig(fail_429=0.5, retry_after=0.01, seed=2)
    async with MockServer(config) as server:
        async with sdk(server, max_retries=0) as client:
            with pytest.raises(openai.RateLimitError) as info:
                for _ in range(20):
                    await client.chat.completions.create(
                        model="m", messages=[{"role": "user", "content": "hi"}]
                    )
            response = info.value.response
            assert response.headers["retry-after-ms"] == "10"
            assert response.headers["retry-after"] == "1"
        async with sdk(server, max_retries=10) as client:
            for _ in range(10):
                reply = await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
                assert reply.choices[0].message.content
        assert server.statistics().by_outcome["429"] >= 3


async def call(
    server: MockServer, body: bytes, path: str = "/chat/completions"
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one raw request."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.base_url + path, data=body) as resp,
    ):
        headers = {name.lower(): value for name, value in resp.headers.items()}
        return resp.status, headers, await resp.read()


async def post(
    server: MockServer, body: bytes, path: str = "/chat/completions"
) -> tuple[int, bytes]:
    status, _, body = await call(server, body, path)
    return status, body


CHAT = msgspec.json.encode({"model": "m", "messages": [{"role": "user", "content": "x"}]})


@pytest.mark.parametrize(
    ("config", "status", "outcome"),
    [
        (MockConfig(fail_500=1.0), 500, "500"),
        (MockConfig(fail_503=1.0), 503, "503"),
        (MockConfig(fail_429=1.0, retry_after=2.5), 429, "429"),
    ],
)
async def test_injected_error_statuses(config: MockConfig, status: int, outcome: str) -> None:
    async with MockServer(config) as server:
        got, body = await post(server, CHAT)
        assert server.statistics().by_outcome == {outcome: 1}
    assert got == status
    decoded = json.loads(body)
    message = decoded["error"]["message"] if "error" in decoded else decoded["message"]
    assert message


async def test_malformed_bodies_are_not_completions() -> None:
    async with MockServer(MockConfig(malformed=1.0, seed=9)) as server:
        seen = set()
        for _ in range(40):
            status, body = await post(server, CHAT)
            assert status == 200
            try:
                decoded = json.loads(body)
            except ValueError:
                seen.add("invalid")
                continue
            assert "choices" not in decoded
            seen.add("object")
    assert seen == {"invalid", "object"}


async def test_dropped_connection_and_hang() -> None:
    async with MockServer(MockConfig(drop=1.0)) as server:
        with pytest.raises(aiohttp.ClientError):
            await post(server, CHAT)
        assert server.statistics().by_outcome == {"drop": 1}
    async with MockServer(MockConfig(hang=1.0, hang_seconds=60)) as server:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await post(server, CHAT)
    # leaving the context did not wait for the hung handler


async def test_request_validation() -> None:
    async with MockServer() as server:
        assert (await post(server, b"{not json"))[0] == 400
        assert (await post(server, b"[1, 2]"))[0] == 400
        no_model = msgspec.json.encode({"messages": [{"role": "user", "content": "x"}]})
        assert (await post(server, no_model))[0] == 400
        bad_limit = msgspec.json.encode({"model": "m", "prompt": "x", "max_tokens": 0})
        assert (await post(server, bad_limit, "/completions"))[0] == 400
        assert server.statistics().by_outcome == {"400": 4}


async def test_latency_is_applied() -> None:
    async with MockServer(MockConfig(latency=0.2, latency_jitter=0.05)) as server:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await asyncio.gather(*(post(server, CHAT) for _ in range(5)))
        elapsed = loop.time() - start
    assert elapsed >= 0.15  # concurrent requests wait in parallel, each at least 0.15 s


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="fail_429"):
        MockConfig(fail_429=1.5)
    with pytest.raises(ValueError, match="latency"):
        MockConfig(latency=-1)


def test_mock_server_command_serves_and_stops_on_sigterm() -> None:
    env = clean_env(MOCK_KEY="sk-command-line")
    command = [
        sys.executable,
        "-m",
        "asyncgen",
        "mock-server",
        "--port",
        "0",
        "--model",
        "a",
        "--model",
        "b",
        "--api-key-env",
        "MOCK_KEY",
    ]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("asyncgen mock server listening on http://127.0.0.1:"), line
        base = line.split()[-1]
        root = base.removesuffix("/v1")
        with urllib.request.urlopen(root + "/health", timeout=5) as resp:
            assert resp.status == 200
        request = urllib.request.Request(
            base + "/models", headers={"Authorization": "Bearer sk-command-line"}
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert [m["id"] for m in json.load(resp)["data"]] == ["a", "b"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert err == "asyncgen mock server: 0 requests, outcomes {}\n"
    assert "sk-command-line" not in err


def test_mock_server_command_reports_missing_key_variable() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NOT_SET_ANYWHERE"}
    result = subprocess.run(
        [sys.executable, "-m", "asyncgen", "mock-server", "--api-key-env", "NOT_SET_ANYWHERE"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 2 and "NOT_SET_ANYWHERE is not set" in result.stderr


# -- rate budgets --------------------------------------------------------------------------


def test_format_duration_writes_go_durations_like_openai() -> None:
    cases = {
        0: "0s",
        0.012: "12ms",
        0.0004: "1ms",  # rounded up: never announce less than the wait
        1: "1s",
        1.5: "1.5s",
        8.64: "8.64s",
        360: "6m0s",
        90.5: "1m30.5s",
        3600: "1h0m0s",
    }
    assert {seconds: format_duration(seconds) for seconds in cases} == cases


def test_rate_budgets_leak_continuously_and_charge_only_what_they_admit() -> None:
    budgets = RateBudgets(rpm=60, tpm=600, burst=2)  # 2 requests, 20 tokens; 1 and 10 a second
    assert budgets.admit(5, now=100.0).admitted
    assert budgets.admit(5, now=100.0).admitted
    refused = budgets.admit(5, now=100.0)
    assert not refused.admitted and refused.kind == "requests"
    assert refused.wait == pytest.approx(1.0)
    assert refused.message.startswith("Rate limit reached for requests per min (RPM)")
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "2s"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "10", "the refusal was not charged"
    admitted = budgets.admit(5, now=101.0)
    assert admitted.admitted and admitted.headers == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "2s",
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "15",
        "x-ratelimit-reset-tokens": "500ms",
    }
    assert budgets.admit(30, now=103.0).admitted, "larger than the bucket, admitted when empty"
    assert budgets.headers(now=103.0)["x-ratelimit-remaining-tokens"] == "0"
    assert budgets.headers(now=103.0)["x-ratelimit-reset-tokens"] == "3s"
    tokens = budgets.admit(1, now=104.0)
    assert not tokens.admitted and tokens.kind == "tokens"
    assert tokens.wait == pytest.approx(0.1)
    assert tokens.message.startswith("Rate limit reached for tokens per min (TPM)")
    assert not budgets.admit(30, now=105.9).admitted
    assert budgets.admit(30, now=106.0).admitted


def parse_reset(text: str) -> float:
    """Seconds in an ``x-ratelimit-reset-*`` value; fails the test on anything else."""
    if match := re.fullmatch(r"(\d+)ms", text):
        return int(match[1]) / 1000
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+(?:\.\d+)?)s", text)
    assert match, text
    return int(match[1] or 0) * 3600 + int(match[2] or 0) * 60 + float(match[3])


async def test_requests_budget_refuses_a_burst_and_announces_itself() -> None:
    # 3 requests in the bucket, one more every 5 s: nothing refills during the test.
    async with MockServer(MockConfig(rpm_limit=12, limit_burst=15)) as server:
        replies = [await call(server, CHAT) for _ in range(4)]
        assert [status for status, _, _ in replies] == [200, 200, 200, 429]
        for _, headers, _ in replies:
            assert headers["x-ratelimit-limit-requests"] == "12"
            assert "x-ratelimit-limit-tokens" not in headers
        remaining = [headers["x-ratelimit-remaining-requests"] for _, headers, _ in replies]
        assert remaining == ["2", "1", "0", "0"]
        resets = [parse_reset(headers["x-ratelimit-reset-requests"]) for _, headers, _ in replies]
        assert resets[0] == 5.0 and 14 < resets[3] <= 15
        _, headers, body = replies[3]
        error = json.loads(body)["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
        assert error["param"] is None
        assert error["message"].startswith("Rate limit reached for requests per min (RPM)")
        assert 4000 < int(headers["retry-after-ms"]) <= 5000
        assert headers["retry-after"] == "5"
        burst = await asyncio.gather(*(call(server, CHAT) for _ in range(10)))
        assert [status for status, _, _ in burst] == [429] * 10
        stats = server.statistics()
        assert stats.rate_limited == 11
        assert stats.by_outcome == {"ok": 3, "rate_limited": 11}
        async with aiohttp.ClientSession() as session:
            root = server.base_url.removesuffix("/v1")
            async with session.post(root + "/mock/reset") as resp:
                assert resp.status == 200
            async with session.get(root + "/mock/stats") as resp:
                after = await resp.json()
        assert after["rate_limited"] == after["requests"] == after["prompt_tokens"] == 0
        assert after.keys() >= {"completion_tokens", "max_running_seen", "by_outcome"}
        burst = await asyncio.gather(*(call(server, CHAT) for _ in range(10)))
        assert sorted(status for status, _, _ in burst) == [200] * 3 + [429] * 7, "reset refills"


async def test_retry_after_ms_is_long_enough() -> None:
    async with MockServer(MockConfig(rpm_limit=600, limit_burst=0.1)) as server:  # 1, 10 a second
        assert (await call(server, CHAT))[0] == 200
        status, headers, _ = await call(server, CHAT)
        assert status == 429 and 0 < int(headers["retry-after-ms"]) <= 100
        await asyncio.sleep(int(headers["retry-after-ms"]) / 1000)
        assert (await call(server, CHAT))[0] == 200
        async with sdk(server, max_retries=5) as client:
            for _ in range(3):  # the SDK honours retry-after-ms
                await client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}]
                )
        assert server.statistics().by_outcome["ok"] == 5


def chat_body(prompt: str, **extra: object) -> bytes:
    return msgspec.json.encode(
        {"model": "m", "messages": [{"role": "user", "content": prompt}], **extra}
    )


async def test_tokens_budget_charges_prompt_and_completion_of_admitted_requests() -> None:
    # 30 tokens in the bucket, one more a second; each request costs 5 + 10 tokens.
    config = MockConfig(tpm_limit=60, limit_burst=30, output_tokens=10)
    async with MockServer(config) as server:
        first, second, third = [await call(server, chat_body("a b c d e")) for _ in range(3)]
        assert first[0] == second[0] == 200
        assert first[1]["x-ratelimit-remaining-tokens"] == "15"
        assert second[1]["x-ratelimit-remaining-tokens"] == "0"
        assert "x-ratelimit-limit-requests" not in first[1]
        assert third[0] == 429 and json.loads(third[2])["error"]["type"] == "tokens"
        assert 14_000 < int(third[1]["retry-after-ms"]) <= 15_000
        # Had the refusal been charged, this 6-token request would wait 21 s, not 6 s.
        status, headers, _ = await call(server, chat_body("a b c d e", max_tokens=1))
        assert status == 429 and 5_000 < int(headers["retry-after-ms"]) <= 6_000
        stats = server.statistics()
    assert (stats.prompt_tokens, stats.completion_tokens, stats.rate_limited) == (10, 20, 2)


async def test_hidden_budget_sends_only_retry_after() -> None:
    config = MockConfig(rpm_limit=12, tpm_limit=1000, limit_burst=5, ratelimit_headers=False)
    async with MockServer(config) as server:
        (ok, ok_headers, _), (refused, headers, _) = [await call(server, CHAT) for _ in range(2)]
    assert (ok, refused) == (200, 429)
    assert not [name for name in {**ok_headers, **headers} if name.startswith("x-ratelimit")]
    assert int(headers["retry-after-ms"]) > 4000 and headers["retry-after"] == "5"


async def test_random_429_announces_the_budget_only_when_one_is_enforced() -> None:
    async with MockServer(MockConfig(fail_429=1.0)) as server:
        _, plain, _ = await call(server, CHAT)
    async with MockServer(MockConfig(fail_429=1.0, rpm_limit=600)) as server:
        status, headers, _ = await call(server, CHAT)
        assert (
            server.statistics().by_outcome == {"429": 1} and server.statistics().rate_limited == 0
        )
    assert not [name for name in plain if name.startswith("x-ratelimit")]
    assert status == 429 and headers["x-ratelimit-limit-requests"] == "600"


# -- load --------------------------------------------------------------------------------


async def test_running_slots_are_first_come_first_served() -> None:
    slots = RunningSlots(1)
    order: list[int] = []

    async def job(name: int) -> None:
        async with slots.hold():
            order.append(name)
            await asyncio.sleep(0)

    await slots.acquire()
    tasks = [asyncio.create_task(job(name)) for name in range(5)]
    await asyncio.sleep(0)
    assert slots.waiting == 5
    tasks[2].cancel()  # a waiter that gives up does not take a slot with it
    await asyncio.sleep(0)
    slots.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 1, 3, 4]
    assert (slots.running, slots.waiting, slots.peak) == (0, 0, 1)


async def test_max_running_queues_requests_and_their_wait_adds_to_latency() -> None:
    config = MockConfig(max_running=2, latency=0.05, token_latency=0.01, output_tokens=5)
    async with MockServer(config) as server:
        loop = asyncio.get_running_loop()

        async def timed() -> float:
            start = loop.time()
            assert (await post(server, CHAT))[0] == 200
            return loop.time() - start

        durations = await asyncio.gather(*(timed() for _ in range(6)))
        stats = server.statistics()
    assert stats.max_running_seen == 2
    assert min(durations) >= 0.09 and max(durations) >= 0.25  # three waves of 0.1 s


async def test_token_latency_paces_replies_and_slows_under_load() -> None:
    config = MockConfig(token_latency=0.005, output_tokens=20, load_slowdown=1.0)
    async with MockServer(config) as server:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await post(server, CHAT)
        alone = loop.time() - start
        start = loop.time()
        await asyncio.gather(*(post(server, CHAT) for _ in range(4)))
        together = loop.time() - start
        assert server.statistics().max_running_seen == 4
    assert alone >= 0.09  # 20 tokens at 5 ms
    assert together >= 0.25  # four at once: each token takes up to 20 ms


# -- streaming ---------------------------------------------------------------------------


async def test_official_sdk_streams_chat_exactly_like_the_plain_reply() -> None:
    messages: list[Any] = [{"role": "user", "content": "tell a story"}]
    async with MockServer(MockConfig(output_tokens=12)) as server, sdk(server) as client:
        plain = await client.chat.completions.create(model="m", messages=messages)
        stream = await client.chat.completions.create(
            model="m", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        short = await client.chat.completions.create(
            model="m", messages=messages, stream=True, max_tokens=3
        )
        short_chunks = [chunk async for chunk in short]
        stats = server.statistics()
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk.id for chunk in chunks}) == 1
    content = [chunk.choices[0].delta.content for chunk in chunks[1:13]]
    assert "".join(c or "" for c in content) == plain.choices[0].message.content
    assert [chunk.choices[0].finish_reason for chunk in chunks[:13]] == [None] * 13
    assert chunks[13].choices[0].finish_reason == "stop"
    assert chunks[14].choices == [] and chunks[14].usage == plain.usage
    assert len(chunks) == 15
    assert short_chunks[-1].choices[0].finish_reason == "length"
    assert all(chunk.usage is None for chunk in short_chunks), "usage only when asked"
    text = "".join(c.choices[0].delta.content or "" for c in short_chunks)
    assert text.split() == (plain.choices[0].message.content or "").split()[:3]
    assert stats.by_outcome == {"ok": 3}
    assert stats.completion_tokens == 12 + 12 + 3


async def test_official_sdk_streams_completions() -> None:
    async with MockServer(MockConfig(output_tokens=9)) as server, sdk(server) as client:
        plain = await client.completions.create(model="base", prompt="Once upon a time", n=2)
        stream = await client.completions.create(
            model="base",
            prompt="Once upon a time",
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert all(chunk.object == "text_completion" for chunk in chunks)
    texts = ["", ""]
    finishes = {}
    for chunk in chunks[:-1]:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert texts == [choice.text for choice in plain.choices]
    assert finishes == {0: "stop", 1: "stop"}
    assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage


async def raw_stream(
    server: MockServer, body: bytes, *, version: aiohttp.HttpVersion = aiohttp.HttpVersion11
) -> tuple[list[tuple[float, bytes]], BaseException | None]:
    """The pieces of a raw streamed chat reply with their arrival times, and how it ended."""
    loop = asyncio.get_running_loop()
    pieces: list[tuple[float, bytes]] = []
    start = loop.time()
    async with (
        aiohttp.ClientSession(version=version) as session,
        session.post(server.base_url + "/chat/completions", data=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        try:
            pieces.extend([(loop.time() - start, piece) async for piece in resp.content.iter_any()])
        except aiohttp.ClientPayloadError as exc:
            return pieces, exc
    return pieces, None


def events(raw: bytes) -> list[str]:
    return [line.removeprefix("data: ") for line in raw.decode().split("\n\n") if line]


async def test_stream_pacing_first_token_after_latency_then_per_token() -> None:
    config = MockConfig(latency=0.1, token_latency=0.03, output_tokens=6)
    async with MockServer(config) as server:
        pieces, error = await raw_stream(server, chat_body("x", stream=True))
    assert error is None
    assert pieces[0][0] >= 0.08
    assert pieces[-1][0] - pieces[0][0] >= 5 * 0.03 * 0.8
    assert events(b"".join(piece for _, piece in pieces))[-1] == "[DONE]"


async def test_stream_comments_and_split_events_still_parse() -> None:
    config = MockConfig(output_tokens=40, stream_comments=True, seed=3)
    async with MockServer(config) as server:
        pieces, error = await raw_stream(server, chat_body("x", stream=True))
        async with sdk(server) as client:
            plain = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
            stream = await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], stream=True
            )
            text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream])
    raw = b"".join(piece for _, piece in pieces)
    assert error is None and b": keep-alive\n\n" in raw and b"\n\n\n" in raw
    assert any(not piece.endswith(b"\n") for _, piece in pieces), "an event was split"
    assert text == plain.choices[0].message.content


async def test_stream_cut_closes_without_done() -> None:
    async with MockServer(MockConfig(stream_cut=1.0, output_tokens=20)) as server:
        _, error = await raw_stream(server, chat_body("x", stream=True))
        # HTTP/1.0 has no chunked encoding, so the reader keeps what came before the close
        # (aiohttp's raises the payload error instead of handing over what it buffered).
        pieces, eof = await raw_stream(
            server, chat_body("x", stream=True), version=aiohttp.HttpVersion10
        )
        stats = server.statistics()
    assert isinstance(error, aiohttp.ClientPayloadError) and eof is None
    assert stats.by_outcome == {"stream_cut": 2} and stats.completion_tokens == 0
    sent = events(b"".join(piece for _, piece in pieces))
    assert "[DONE]" not in sent
    chunks = [json.loads(event) for event in sent]
    assert len(chunks) >= 2, "the role chunk and at least one word"
    assert chunks[1]["choices"][0]["delta"]["content"]
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks)


async def test_stream_stall_pauses_then_finishes() -> None:
    config = MockConfig(stream_stall=1.0, hang_seconds=0.3, output_tokens=5)
    async with MockServer(config) as server:
        pieces, error = await raw_stream(server, chat_body("x", stream=True))
        assert server.statistics().by_outcome == {"stream_stalled": 1}
    assert error is None
    assert events(b"".join(piece for _, piece in pieces))[-1] == "[DONE]"
    gaps = [later[0] - earlier[0] for earlier, later in itertools.pairwise(pieces)]
    assert max(gaps) >= 0.25


async def test_faults_before_the_stream_answer_as_usual() -> None:
    async with MockServer(MockConfig(fail_500=1.0, rpm_limit=600)) as server:
        status, headers, body = await call(server, chat_body("x", stream=True))
    assert status == 500 and json.loads(body)["error"]["type"] == "server_error"
    assert headers["x-ratelimit-limit-requests"] == "600"


# -- configuration -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"stream_cut": 1.5}, "stream_cut"),
        ({"stream_stall": -0.1}, "stream_stall"),
        ({"rpm_limit": 0}, "rpm_limit"),
        ({"tpm_limit": -5}, "tpm_limit"),
        ({"limit_burst": 0}, "limit_burst"),
        ({"max_running": 0}, "max_running"),
        ({"token_latency": -0.1}, "token_latency"),
        ({"load_slowdown": float("nan")}, "load_slowdown"),
    ],
)
def test_bad_load_and_budget_config_is_rejected(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MockConfig(**fields)


def test_command_line_flags_build_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        [
            "--rpm-limit=500",
            "--tpm-limit=90000",
            "--limit-burst=2",
            "--no-ratelimit-headers",
            "--max-running=8",
            "--token-latency=0.02",
            "--load-slowdown=0.1",
            "--stream-comments",
            "--stream-cut=0.01",
            "--stream-stall=0.02",
            "--max-waiting=4",
            "--charge-max-tokens",
            "--503-retry-after",
            "--quota-exhausted",
            "--broken",
        ]
    )
    config = config_from_args(args)
    assert config.max_waiting == 4 and config.charge_max_tokens and config.retry_after_503
    assert config.quota_exhausted and config.broken
    assert (config.rpm_limit, config.tpm_limit, config.limit_burst) == (500, 90000, 2)
    assert not config.ratelimit_headers and config.max_running == 8
    assert (config.token_latency, config.load_slowdown) == (0.02, 0.1)
    assert config.stream_comments and (config.stream_cut, config.stream_stall) == (0.01, 0.02)
    defaults = config_from_args(parser.parse_args([]))
    assert defaults == MockConfig()
    assert main_from_args(parser.parse_args(["--max-running=0"])) == 2
    assert "max_running must be at least 1" in capsys.readouterr().err


async def test_injected_503s_with_retry_after_say_when_to_come_back() -> None:
    config = MockConfig(fail_503=1.0, retry_after=1.5, retry_after_503=True)
    async with MockServer(config) as server:
        status, headers, _ = await call(server, CHAT)
    assert status == 503 and headers["retry-after-ms"] == "1500"
    async with MockServer(MockConfig(fail_503=1.0)) as bare:
        status, headers, _ = await call(bare, CHAT)
    assert status == 503 and "retry-after" not in headers and "retry-after-ms" not in headers


async def test_quota_exhausted_refuses_every_request_like_openai() -> None:
    async with MockServer(MockConfig(quota_exhausted=True)) as server, sdk(server) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.with_options(max_retries=0).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}]
            )
        models = await client.models.list()  # the account still exists
        stats = server.statistics()
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "insufficient_quota" and body["code"] == "insufficient_quota"
    assert "quota" in body["message"] and [m.id for m in models.data] == ["mock-model"]
    assert stats.by_outcome == {"quota": 1}


async def test_a_broken_server_answers_500_everywhere() -> None:
    async with MockServer(MockConfig(broken=True)) as server:
        chat = await call(server, CHAT)
        async with aiohttp.ClientSession() as session:
            async with session.get(server.base_url + "/models") as models:
                models_status, models_body = models.status, await models.read()
            async with session.get(server.base_url.removesuffix("/v1") + "/health") as health:
                health_status = health.status
            async with session.get(server.base_url.removesuffix("/v1") + "/mock/stats") as st:
                stats_status = st.status
        stats = server.statistics()
    assert chat[0] == models_status == health_status == 500
    assert b"server had an error" in models_body and stats_status == 200
    assert stats.requests == 1 and stats.by_outcome == {"500": 1}


async def test_a_full_waiting_queue_sheds_load_with_a_bare_503() -> None:
    config = MockConfig(max_running=2, max_waiting=1, latency=0.2)
    async with MockServer(config) as server:
        results = await asyncio.gather(*(post(server, CHAT) for _ in range(6)))
        stats = server.statistics()
    assert sorted(status for status, _ in results) == [200, 200, 200, 503, 503, 503]
    assert stats.by_outcome == {"ok": 3, "shed": 3}


async def test_charging_max_tokens_up_front_like_openai() -> None:
    # 100 tokens of budget; a request of 5 prompt tokens, 10 output, max_tokens 40.
    config = MockConfig(tpm_limit=6_000, limit_burst=1, output_tokens=10, charge_max_tokens=True)
    async with MockServer(config) as server:
        first = await call(server, chat_body("a b c d e", max_tokens=40))
        second = await call(server, chat_body("a b c d e", max_tokens=40))
        third = await call(server, chat_body("a b c d e", max_tokens=40))
    assert first[0] == second[0] == 200 and third[0] == 429
    assert first[1]["x-ratelimit-remaining-tokens"] == "55"  # 100 - (5 + 40), not 100 - 15
