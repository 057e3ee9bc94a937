"""Streaming against servers that behave unlike the mock: connections held open after
[DONE], data after it, a long queue before the first event, rate limits reported inside the
stream, and request options of the user's that must reach the server."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from asyncgen import Engine, JobConfig
from asyncgen.core.errors import ConfigError

from .conftest import assert_exactly_once, personas, serve, write_shard

Handler = Callable[[web.StreamResponse, int], Awaitable[None]]


def event(payload: Any) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return event(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


REPLY = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "forty"}),
    chunk({"content": " two"}),
    chunk({}, "stop"),
    event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "m",
           "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2,
                                    "total_tokens": 9}}),
    event("[DONE]"),
]  # fmt: skip


class ScriptedServer:
    """A loopback server whose POST handler is a coroutine given the prepared response and
    the request's number (from 1); the request bodies are kept."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.bodies: list[dict[str, Any]] = []
        self.url = ""

    async def _post(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await self.handler(resp, len(self.bodies))
        return resp

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})

    @classmethod
    async def running(cls, handler: Handler) -> AsyncIterator[ScriptedServer]:
        server = cls(handler)
        app = web.Application()
        app.router.add_post("/v1/chat/completions", server._post)
        app.router.add_get("/v1/models", server._models)
        async with serve(app) as server.url:
            yield server


async def run_job(tmp_path: Path, handler: Handler, n: int = 3, **kw: Any) -> tuple[Any, Any]:
    shard = write_shard(tmp_path / "p.jsonl", personas(n))
    gen = ScriptedServer.running(handler)
    server = await anext(gen)
    try:
        settings: dict[str, Any] = {
            "inputs": [str(shard)],
            "output": str(tmp_path / "out"),
            "prompt": "math",
            "model": "m",
            "base_url": server.url,
            "stream": True,
            "concurrency": 4,
            "backoff_base": 0.01,
            "backoff_cap": 0.05,
            "flush_interval": 0.05,
            **kw,
        }
        async with Engine(JobConfig(**settings)) as engine:
            stats = await engine.run()
    finally:
        await gen.aclose()
    found = assert_exactly_once(tmp_path / "out", {f"p:{i}:math:0" for i in range(1, n + 1)})
    assert len(found["results"]) == n
    assert all(r["output"] == "forty two" for r in found["results"])
    return stats, (server, found)


async def test_connection_held_open_after_done_is_not_waited_for(tmp_path: Path) -> None:
    async def hold(resp: web.StreamResponse, _: int) -> None:
        for part in REPLY:
            await resp.write(part)
        await asyncio.sleep(30)  # a proxy that keeps the stream open

    started = time.monotonic()
    stats, _ = await run_job(tmp_path, hold, idle_timeout=20)
    assert time.monotonic() - started < 10, "the reply was complete at [DONE]"
    assert stats.retries == 0 and stats.failed == 0


async def test_data_after_done_does_not_spoil_a_complete_reply(tmp_path: Path) -> None:
    async def trailing(resp: web.StreamResponse, _: int) -> None:
        for part in [*REPLY, event("[DONE]"), chunk({"content": "junk"})]:
            await resp.write(part)

    stats, _ = await run_job(tmp_path, trailing)
    assert stats.retries == 0 and stats.requests == 3


async def test_a_long_queue_before_the_first_event_is_not_a_stall(tmp_path: Path) -> None:
    async def queued(resp: web.StreamResponse, _: int) -> None:
        await asyncio.sleep(0.8)  # headers sent, the request waits for a batch slot
        for part in REPLY:
            await resp.write(part)
            await asyncio.sleep(0.01)

    stats, (_, found) = await run_job(tmp_path, queued, idle_timeout=0.3)
    assert stats.retries == 0
    assert all(r["ttft_s"] >= 0.8 for r in found["results"])


async def test_a_server_that_sends_nothing_is_cut_at_the_timeout(tmp_path: Path) -> None:
    async def silent_once(resp: web.StreamResponse, number: int) -> None:
        if number == 1:
            await asyncio.sleep(30)
        for part in REPLY:
            await resp.write(part)

    started = time.monotonic()
    stats, _ = await run_job(tmp_path, silent_once, n=1, timeout=1.0, idle_timeout=0.3)
    assert stats.retries == 1 and time.monotonic() - started < 10


async def test_a_stall_after_the_first_event_is_retried(tmp_path: Path) -> None:
    async def stalls_once(resp: web.StreamResponse, number: int) -> None:
        for i, part in enumerate(REPLY):
            if number == 1 and i == 2:
                await asyncio.sleep(30)
            await resp.write(part)

    started = time.monotonic()
    stats, _ = await run_job(tmp_path, stalls_once, n=1, idle_timeout=0.3)
    assert stats.retries == 1 and time.monotonic() - started < 10


async def test_rate_limit_reported_in_the_stream_throttles(tmp_path: Path) -> None:
    error = {"error": {"message": "too many requests", "type": "rate_limit_error", "code": 429}}

    async def limited(resp: web.StreamResponse, number: int) -> None:
        if number <= 2:
            await resp.write(event(error))
            return
        for part in REPLY:
            await resp.write(part)

    stats, _ = await run_job(tmp_path, limited, max_attempts=2, concurrency=1)
    assert stats.throttled == 2 and stats.failed == 0


@pytest.mark.parametrize("options", ["absent", None, {}, {"continuous_usage_stats": True}])
async def test_stream_options_of_the_user_are_kept(tmp_path: Path, options: Any) -> None:
    async def plain(resp: web.StreamResponse, _: int) -> None:
        for part in REPLY:
            await resp.write(part)

    lines = [
        {
            "custom_id": f"req-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "m",
                "messages": [{"role": "user", "content": "hi"}],
                **({} if options == "absent" else {"stream_options": options}),
            },
        }
        for i in range(2)
    ]
    shard = write_shard(tmp_path / "batch.jsonl", lines)
    gen = ScriptedServer.running(plain)
    server = await anext(gen)
    try:
        config = JobConfig(
            inputs=[str(shard)], output=str(tmp_path / "out"), base_url=server.url, stream=True
        )
        async with Engine(config) as engine:
            stats = await engine.run()
    finally:
        await gen.aclose()
    assert stats.succeeded == 2
    for body in server.bodies:
        assert body["stream"] is True
        own = options if isinstance(options, dict) else {}
        assert body["stream_options"] == {"include_usage": True, **own}


async def test_a_used_up_quota_reported_in_the_stream_stops_the_job(tmp_path: Path) -> None:
    """A gateway that answers 200 and then an error event naming the quota: the job stops
    (exit 2 from the CLI), nothing is recorded, and it is not retried."""
    quota = {
        "error": {
            "message": "You exceeded your current quota",
            "type": "insufficient_quota",
            "code": "429",
        }
    }

    async def empty_account(resp: web.StreamResponse, number: int) -> None:
        await resp.write(event(quota))

    shard = write_shard(tmp_path / "p.jsonl", personas(20))
    gen = ScriptedServer.running(empty_account)
    server = await anext(gen)
    try:
        config = JobConfig(
            inputs=[str(shard)],
            output=str(tmp_path / "out"),
            prompt="math",
            model="m",
            base_url=server.url,
            stream=True,
            concurrency=2,
        )
        async with Engine(config) as engine:
            with pytest.raises(ConfigError) as caught:
                await engine.run()
    finally:
        await gen.aclose()
    message = str(caught.value)
    assert "insufficient_quota" in message and "in its event stream" in message
    assert "quota" in message and len(server.bodies) <= 2
    assert_exactly_once(tmp_path / "out", set())
