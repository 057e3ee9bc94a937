"""What servers no one here wrote showed (issue 18): failures filed by a normalised reason,
truncated and empty replies, missing usage, start-up checks that must not refuse what a
gateway serves, and batch exports of text completions. Each against a loopback server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import web

from asyncgen import Engine, JobConfig
from asyncgen.bench.runner import Bench, BenchConfig
from asyncgen.core.errors import ConfigError
from asyncgen.core.records import ErrorInfo, Result, failure_reason
from asyncgen.mock.server import MockConfig, MockServer
from asyncgen.storage.status import status

from .conftest import assert_exactly_once, assert_logically_once, personas, serve, write_shard
from .test_jobtools import FAST, _retry_cli

Reply = Callable[[dict[str, Any], int], tuple[int, Any]]
"""(request body, request number from 1) -> (status, JSON body)."""


def chat(content: str | None, finish: str = "stop", usage: bool = True) -> dict[str, Any]:
    reply: dict[str, Any] = {
        "object": "chat.completion",
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content},
             "finish_reason": finish}
        ],
    }  # fmt: skip
    if usage:
        reply["usage"] = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    return reply


class Replies:
    """A loopback OpenAI-shaped server: POSTs answered by ``reply``, ``GET /models`` listing
    ``models`` (None: 404); the request bodies are kept, by path."""

    def __init__(self, reply: Reply, models: list[str] | None) -> None:
        self.reply = reply
        self.models = models
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.url = ""

    async def _post(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.paths.append(request.path)
        status, body = self.reply(self.bodies[-1], len(self.bodies))
        return web.json_response(body, status=status)

    async def _models(self, request: web.Request) -> web.Response:
        if self.models is None:
            return web.json_response({"error": {"message": "no such route"}}, status=404)
        data = [{"id": m, "object": "model"} for m in self.models]
        return web.json_response({"object": "list", "data": data})


@contextlib.asynccontextmanager
async def serving(reply: Reply, models: list[str] | None = None) -> AsyncIterator[Replies]:
    server = Replies(reply, ["m"] if models is None else models)
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server._post)
    app.router.add_post("/v1/completions", server._post)
    app.router.add_get("/v1/models", server._models)
    async with serve(app) as server.url:
        yield server


def config(tmp_path: Path, url: str | list[str], n: int, **kw: Any) -> JobConfig:
    shard = tmp_path / "p.jsonl"
    if not shard.exists():
        write_shard(shard, personas(n))
    where = {"inputs": [str(shard)], "output": str(tmp_path / "out"), "base_url": url}
    small = {"prompt": "math", "model": "m", "concurrency": 4, "max_attempts": 1}
    return JobConfig(**{**where, **small, **FAST, **kw})


async def run(tmp_path: Path, url: str | list[str], n: int, **kw: Any) -> Any:
    async with Engine(config(tmp_path, url, n, **kw), rng=random.Random(0)) as engine:
        return await engine.run()


def ids(n: int, template: str = "math") -> set[str]:
    return {f"p:{i}:{template}:0" for i in range(1, n + 1)}


# --- 5. failure records ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        ("invalid_request_error", 400, "http_400"),
        ("http_503", 503, "http_503"),
        ("insufficient_quota", 429, "quota"),
        ("timeout", None, "timeout"),
        ("connection_error", None, "connection"),
        ("invalid_output", 200, "invalid_output"),
        ("malformed_response", 200, "malformed_response"),
        ("stream_cut", 200, "stream_cut"),
        ("rate_limit_exceeded", 429, "http_429"),
    ],
)
def test_every_failure_gets_a_normalised_reason(code: str, status: int, reason: str) -> None:
    assert failure_reason(code, status) == reason
    assert ErrorInfo(code, "m", status).reason == reason


def test_a_failure_written_before_reasons_decodes_with_one() -> None:
    old = {
        "custom_id": "p:1:math:0",
        "error": {"code": "invalid_request_error", "message": "bad", "status": 400},
        "output": None, "finish_reason": None, "model": "m", "template": "math",
        "persona": "x", "source": {"shard": "p", "line": 1}, "attempts": 1,
        "latency_s": 0.1, "created": 1.0,
    }  # fmt: skip
    record = msgspec.json.decode(json.dumps(old).encode(), type=Result)
    assert record.error is not None and record.error.reason == "http_400"
    assert record.rejected_output is None


async def test_retry_failed_by_reason_takes_a_400_with_the_servers_own_code(
    tmp_path: Path,
) -> None:
    """LiteLLM's 400s carry ``code: invalid_request_error``: filed as http_400 beside it."""
    body = {"error": {"message": "bad param", "type": "invalid_request_error",
                      "code": "invalid_request_error"}}  # fmt: skip
    out = tmp_path / "out"
    async with serving(lambda b, n: (400, body)) as bad:
        await run(tmp_path, bad.url, 6)
    failures = assert_exactly_once(out, ids(6))["failures"]
    assert {(f["error"]["code"], f["error"]["reason"]) for f in failures} == {
        ("invalid_request_error", "http_400")
    }
    s = status(out)
    assert s.failed_by_reason == {"http_400": 6}
    assert s.failed_by_code == {"http_400": {"invalid_request_error": 6}}
    async with serving(lambda b, n: (200, chat("42"))) as good:
        assert await _retry_cli(out, good.url, "--reason", "http_400") == 0
        assert len(good.bodies) == 6
    assert all(r["error"] is None for r in assert_logically_once(out, ids(6)).values())


async def test_invalid_output_failure_keeps_the_last_rejected_text(tmp_path: Path) -> None:
    async with serving(lambda b, n: (200, chat(f"no answer {n}", "length"))) as server:
        stats = await run(
            tmp_path, server.url, 1, prompt="persona", max_invalid=3, accept_length=False
        )
    [failure] = assert_exactly_once(tmp_path / "out", ids(1, "persona"))["failures"]
    assert failure["error"]["reason"] == failure["error"]["code"] == "invalid_output"
    assert failure["rejected_output"] == "no answer 3" and failure["attempts"] == 3
    assert "truncated at max_tokens" in failure["error"]["message"]
    assert failure["rejected_usage"]["completion_tokens"] == 15
    assert stats.rejected == 3 and stats.retries == 2


async def test_retries_are_counted_when_sent_not_when_scheduled(tmp_path: Path) -> None:
    """Items refused with a long Retry-After and stopped while they wait were scheduled for
    a retry that was never sent: no retry is counted."""
    n = 4
    async with serving(lambda b, k: (500, {"error": {"message": "boom"}})) as server:
        engine = Engine(config(tmp_path, server.url, n, max_attempts=5, backoff_base=30.0,
                               backoff_cap=30.0))  # fmt: skip
        async with engine:
            job = asyncio.create_task(engine.run())
            async with asyncio.timeout(30):
                while engine.statistics().retrying < n:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
            engine.stop()
            stats = await job
    assert len(server.bodies) == stats.requests == n
    assert stats.retries == 0 and stats.succeeded == stats.failed == 0


# --- 3. truncated and empty replies ---------------------------------------------------------


async def test_persona_stage_retries_personas_cut_at_max_tokens(tmp_path: Path) -> None:
    def reply(body: dict[str, Any], n: int) -> tuple[int, Any]:
        return 200, chat(
            "A nurse who" if n % 2 else "A nurse who gardens.", "length" if n % 2 else "stop"
        )

    async with serving(reply) as server:
        stats = await run(
            tmp_path, server.url, 1, prompt="persona", concurrency=1, accept_length=False
        )
    [result] = assert_exactly_once(tmp_path / "out", ids(1, "persona"))["results"]
    assert result["output"] == "A nurse who gardens." and result["finish_reason"] == "stop"
    assert result["attempts"] == 2 and stats.rejected == 1
    assert result["rejected_usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("stage", ["from_text", "expand"])
def test_persona_stages_refuse_replies_cut_at_max_tokens(tmp_path: Path, stage: str) -> None:
    """Whatever the stage's template (a user's without ``[output]`` too), unless it says
    ``accept_length = true``."""
    from asyncgen.personas import pipeline

    seen: list[JobConfig] = []

    def runner(cfg: JobConfig) -> Any:
        seen.append(cfg)
        raise KeyboardInterrupt  # enough: the stage's job is what is looked at

    cfg = JobConfig(inputs=[str(write_shard(tmp_path / "p.jsonl", personas(1)))], output="x")
    with pytest.raises(KeyboardInterrupt):
        if stage == "from_text":
            pipeline.from_text(cfg, tmp_path / "s", run=runner, notify=lambda m: None)
        else:
            pipeline.expand(cfg, tmp_path / "s", rounds=1, run=runner, notify=lambda m: None)
    assert [c.accept_length for c in seen] == [False]
    assert JobConfig(inputs=[], output="y").accept_length  # other jobs keep them


async def test_an_empty_reply_with_finish_reason_stop_is_retried(tmp_path: Path) -> None:
    """A template without ``[output]`` (math) still rejects an empty completion: LiteLLM
    passes a stream cut upstream on as one."""
    async with serving(lambda b, n: (200, chat("" if n == 1 else "42"))) as server:
        stats = await run(tmp_path, server.url, 1, concurrency=1)
    [result] = assert_exactly_once(tmp_path / "out", ids(1))["results"]
    assert result["output"] == "42" and result["attempts"] == 2 and stats.rejected == 1


async def test_a_template_may_accept_empty_and_truncated_replies(tmp_path: Path) -> None:
    template = tmp_path / "lenient.toml"
    template.write_text(
        'endpoint = "chat"\nuser = "Say {persona}"\n[sampling]\nmax_tokens = 5\n'
        "[output]\naccept_empty = true\naccept_length = true\n"
    )
    async with serving(lambda b, n: (200, chat("", "length"))) as server:
        stats = await run(tmp_path, server.url, 2, prompt=str(template))
    results = assert_exactly_once(tmp_path / "out", ids(2, "lenient"))["results"]
    assert [r["output"] for r in results] == ["", ""] and stats.rejected == 0


# --- 6. start-up checks and refusing endpoints ----------------------------------------------


@pytest.mark.parametrize("listed", [["openai/*"], []])
async def test_a_listing_that_cannot_be_conclusive_warns_and_the_job_runs(
    tmp_path: Path, listed: list[str]
) -> None:
    warned: list[str] = []
    async with serving(lambda b, n: (200, chat("42")), models=listed) as server:
        shard = write_shard(tmp_path / "p.jsonl", personas(2))
        cfg = config(tmp_path, server.url, 2, model="openai/gpt-4o-mini", inputs=[str(shard)])
        async with Engine(cfg, warn=warned.append) as engine:
            stats = await engine.run()
    assert stats.succeeded == 2 and len(server.bodies) == 2
    assert len(warned) == 1 and "'openai/gpt-4o-mini' is not listed" in warned[0]
    assert engine.notices == warned


async def test_a_conclusive_listing_still_refuses_a_model_it_lacks(tmp_path: Path) -> None:
    async with serving(lambda b, n: (200, chat("42")), models=["m", "n"]) as server:
        engine = Engine(config(tmp_path, server.url, 1, model="typo"))
        async with engine:
            with pytest.raises(ConfigError, match="'typo' is not served"):
                await engine.run()
    assert server.bodies == []


async def test_one_endpoint_refusing_the_key_is_ejected_the_others_go_on(tmp_path: Path) -> None:
    refusal = {"error": {"message": "key not allowed here", "type": "permission_denied"}}
    async with (
        serving(lambda b, n: (403, refusal)) as refusing,
        serving(lambda b, n: (200, chat("42"))) as good,
    ):
        stats = await run(tmp_path, [refusing.url, good.url], 40, concurrency=8, max_attempts=3)
    found = assert_exactly_once(tmp_path / "out", ids(40))
    assert len(found["results"]) == 40 and stats.failed == 0
    # The refusing endpoint got at most its first round of requests, and stayed out.
    assert 1 <= len(refusing.bodies) <= 8 and len(good.bodies) == 40
    assert [e.up for e in stats.endpoints] == [False, True]


async def test_every_endpoint_refusing_stops_the_job(tmp_path: Path) -> None:
    refusal = {"error": {"message": "no", "type": "permission_denied"}}
    async with (
        serving(lambda b, n: (403, refusal)) as one,
        serving(lambda b, n: (404, {"error": {"message": "not here"}})) as two,
    ):
        with pytest.raises(ConfigError, match="on every endpoint"):
            await run(tmp_path, [one.url, two.url], 10, concurrency=2)
    assert assert_exactly_once(tmp_path / "out", set())["results"] == []


async def test_bench_without_a_model_takes_the_first_listed_and_says_so() -> None:
    told: list[str] = []
    async with MockServer(MockConfig(models=["zeta-model", "alpha-model"])) as server:
        bench = BenchConfig(base_url=server.base_url, num_requests=2, stream=False)
        async with Bench(bench) as b:
            assert (await b.run()).model == "zeta-model"  # not the alphabetically first
        async with Bench(bench, notify=told.append) as b:
            await b.run()
    assert told == ["no --model given: using 'zeta-model', the first GET /models lists"]


# --- 4. missing usage -----------------------------------------------------------------------


async def test_missing_usage_is_unknown_and_status_counts_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway that sends no usage (or an empty one) for some replies: those records say
    null, the status counts them and leaves them out of tokens and cost."""

    def reply(body: dict[str, Any], n: int) -> tuple[int, Any]:
        kind = int(body["messages"][-1]["content"].split("number ")[1].split()[0]) % 3
        answer = chat("42", usage=kind == 0)
        if kind == 1:
            answer["usage"] = {}  # the fields left out
        return 200, answer

    async with serving(reply) as server:
        stats = await run(tmp_path, server.url, 9)
    out = tmp_path / "out"
    results = assert_exactly_once(out, ids(9))["results"]
    usages = sorted((r["usage"] is not None, json.dumps(r["usage"])) for r in results)
    assert [u for _, u in usages].count("null") == 3
    empty = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}
    assert sum(r["usage"] == empty for r in results) == 3
    assert stats.prompt_tokens == 30 and stats.completion_tokens == 15
    s = status(out, price_input=1e6, price_output=2e6)
    assert (s.succeeded, s.no_usage, s.prompt_tokens, s.completion_tokens) == (9, 6, 30, 15)
    assert s.cost == pytest.approx(30 + 2 * 15)
    from asyncgen.cli.main import main

    assert main(["status", str(out)]) == 0
    assert "no usage       6 successes the server reported no token counts" in (
        capsys.readouterr().out
    )


async def test_streams_ask_for_usage(tmp_path: Path) -> None:
    from .test_stream_quirks import REPLY, run_job

    async def reply(resp: web.StreamResponse, _: int) -> None:
        for part in REPLY:
            await resp.write(part)

    _, (server, _) = await run_job(tmp_path, reply, n=2)
    assert all(b["stream_options"] == {"include_usage": True} for b in server.bodies)


# --- 2. batch export of text completions ----------------------------------------------------


async def test_batch_export_of_completions_lines_writes_text_completions(tmp_path: Path) -> None:
    from asyncgen.storage.export import export

    def reply(body: dict[str, Any], n: int) -> tuple[int, Any]:
        if "prompt" in body:
            choice = {"index": 0, "text": " world", "finish_reason": "stop"}
            return 200, {"object": "text_completion", "model": "m", "choices": [choice]}
        return 200, chat("hi")

    lines = [
        {"custom_id": "t", "method": "POST", "url": "/v1/completions",
         "body": {"model": "m", "prompt": "hello", "max_tokens": 5}},
        {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}},
    ]  # fmt: skip
    shard = write_shard(tmp_path / "batch.jsonl", lines)
    async with serving(reply) as server:
        await run(tmp_path, server.url, 0, inputs=[str(shard)], prompt=None, model=None)
    assert server.paths == ["/v1/completions", "/v1/chat/completions"] or sorted(server.paths) == [
        "/v1/chat/completions",
        "/v1/completions",
    ]
    target = tmp_path / "batch-out.jsonl"
    assert export(tmp_path / "out", target, "batch") == 2
    bodies = {
        x["custom_id"]: x["response"]["body"]
        for x in map(json.loads, target.read_text().splitlines())
    }
    assert bodies["t"]["object"] == "text_completion"
    assert bodies["t"]["choices"] == [{"index": 0, "text": " world", "finish_reason": "stop"}]
    assert bodies["c"]["object"] == "chat.completion"
    assert bodies["c"]["choices"][0]["message"]["content"] == "hi"
