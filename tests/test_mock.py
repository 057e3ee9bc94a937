"""The mock server: OpenAI-shaped replies the official SDK accepts, and each injected fault."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request

import aiohttp
import msgspec
import openai
import pytest

from asyncgen.mock import MockConfig, MockServer

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
    assert server.stats().requests == 3
    assert server.stats().by_route == {"/v1/chat/completions": 3, "/v1/models": 1}


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
        assert server.stats().by_outcome["429"] >= 3


async def post(
    server: MockServer, body: bytes, path: str = "/chat/completions"
) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.base_url + path, data=body) as resp,
    ):
        return resp.status, await resp.read()


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
        assert server.stats().by_outcome == {outcome: 1}
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
        assert server.stats().by_outcome == {"drop": 1}
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
        streaming = msgspec.json.encode({"model": "m", "prompt": "x", "stream": True})
        status, body = await post(server, streaming, "/completions")
        assert status == 400 and b"stream" in body
        bad_limit = msgspec.json.encode({"model": "m", "prompt": "x", "max_tokens": 0})
        assert (await post(server, bad_limit, "/completions"))[0] == 400
        assert server.stats().by_outcome == {"400": 5}


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
