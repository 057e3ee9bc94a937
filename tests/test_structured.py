"""Structured outputs end to end: the template asks for JSON, the mock answers (sometimes
badly), the engine checks every reply, retries invalid ones a bounded number of times and
records the rest exactly once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest

from asyncgen import Engine, JobConfig
from asyncgen.cli.mock_server import add_arguments, config_from_args
from asyncgen.core.errors import ConfigError
from asyncgen.job.prompts import load_template
from asyncgen.mock.server import MockConfig, MockServer
from asyncgen.storage.status import status

from .conftest import (
    Canned,
    assert_exactly_once,
    clean_env,
    personas,
    read_output,
    write_shard,
)

FAST = {"backoff_base": 0.01, "backoff_cap": 0.05, "flush_interval": 0.05}


def job(tmp_path: Path, base_url: str, inputs: list[Path], **kw: Any) -> JobConfig:
    settings: dict[str, Any] = {
        "inputs": [str(p) for p in inputs],
        "output": str(tmp_path / "out"),
        "prompt": "math_json",
        "model": "mock-model",
        "base_url": base_url,
        "concurrency": 32,
        **FAST,
    }
    settings.update(kw)
    return JobConfig(**settings)


def ids_for(shard: str, n: int) -> set[str]:
    return {f"{shard}:{i}:math_json:0" for i in range(1, n + 1)}


@pytest.mark.parametrize("stream", [False, True])
async def test_invalid_replies_are_retried_and_every_item_ends_once(
    tmp_path: Path, stream: bool
) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(200))]
    async with MockServer(MockConfig(invalid_json=0.3, seed=5)) as server:
        # Invalid replies do not use up --max-attempts: one attempt is enough for transport.
        config = job(
            tmp_path, server.base_url, inputs, max_attempts=1, max_invalid=20, stream=stream
        )
        async with Engine(config) as engine:
            stats = await engine.run()
        mock = server.statistics()
    found = assert_exactly_once(tmp_path / "out", ids_for("p", 200))
    assert not found["failures"] and stats.succeeded == 200
    assert mock.invalid_json > 20 and mock.requests == 200 + mock.invalid_json
    assert stats.requests == mock.requests and stats.retries == mock.invalid_json
    assert sum(r["attempts"] - 1 for r in found["results"]) == mock.invalid_json
    spec = load_template("math_json").output
    assert spec is not None
    for record in found["results"]:
        parsed = record["parsed"]
        assert parsed == msgspec.json.decode(record["output"])
        assert set(parsed) == {"problem", "solution", "answer", "topic", "difficulty"}
        assert spec.check(record["output"]).reason is None
    assert stats.completion_tokens == mock.completion_tokens, "invalid replies' tokens count"
    # ... in the records too, so that status (and its cost estimate) sees them.
    report = status(tmp_path / "out")
    assert (report.prompt_tokens, report.completion_tokens) == (
        mock.prompt_tokens,
        mock.completion_tokens,
    )
    retried = [r for r in found["results"] if r["attempts"] > 1]
    assert retried and all(r["rejected_usage"]["completion_tokens"] > 0 for r in retried)


async def test_always_invalid_fails_after_max_invalid_attempts(tmp_path: Path) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(30))]
    async with MockServer(MockConfig(invalid_json=1.0, seed=2)) as server:
        config = job(tmp_path, server.base_url, inputs, max_invalid=3, max_attempts=2)
        async with Engine(config) as engine:
            stats = await engine.run()
        mock = server.statistics()
    found = assert_exactly_once(tmp_path / "out", ids_for("p", 30))
    assert not found["results"] and stats.failed == 30
    assert mock.requests == mock.invalid_json == 90
    for failure in found["failures"]:
        error = failure["error"]
        assert error["code"] == "invalid_output" and error["status"] == 200
        assert failure["attempts"] == 3 and failure["parsed"] is None
        assert error["message"].startswith("3 invalid replies, the last: ")
        assert "missing required field" in error["message"] or "truncated" in error["message"]
    # The endpoint did its job: its window did not shrink, and the tokens were counted.
    (endpoint,) = stats.endpoints
    assert endpoint.window == 32
    assert stats.completion_tokens == mock.completion_tokens > 0
    assert status(tmp_path / "out").completion_tokens == mock.completion_tokens
    async with MockServer() as server:  # a rerun: failures are final for the directory
        async with Engine(job(tmp_path, server.base_url, inputs)) as engine:
            again = await engine.run()
        assert server.statistics().requests == 0 and again.skipped == 30


async def test_truncated_reply_says_so_and_the_request_asks_for_the_schema(
    tmp_path: Path,
) -> None:
    inputs = [write_shard(tmp_path / "p.jsonl", personas(2))]
    canned = Canned('{"problem": "A train leaves', finish_reason="length")
    config = job(tmp_path, canned.base_url, inputs, max_invalid=2)
    async with Engine(config, transport=canned) as engine:
        stats = await engine.run()
    assert len(canned.bodies) == 4 and stats.failed == 2
    assert stats.prompt_tokens == 40 and stats.completion_tokens == 28
    body = canned.bodies[0]
    assert body["path"] == "/chat/completions"
    rf = body["response_format"]
    assert rf["type"] == "json_schema" and rf["json_schema"]["name"] == "math_json"
    assert rf["json_schema"]["strict"] is True
    assert rf["json_schema"]["schema"]["required"] == [
        "problem",
        "solution",
        "answer",
        "topic",
        "difficulty",
    ]
    failure = read_output(tmp_path / "out")["failures"][0]
    message = failure["error"]["message"]
    assert "truncated at max_tokens (finish_reason 'length')" in message
    assert "not JSON" in message and failure["attempts"] == 2


async def test_fenced_json_passes_and_batch_lines_are_not_checked(tmp_path: Path) -> None:
    good = {
        "problem": "p",
        "solution": "s",
        "answer": "4",
        "topic": "algebra",
        "difficulty": 2,
    }
    canned = Canned("```json\n" + msgspec.json.encode(good).decode() + "\n```")
    batch = {
        "custom_id": "b-1",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    inputs = [write_shard(tmp_path / "p.jsonl", [*personas(3), batch])]
    async with Engine(job(tmp_path, canned.base_url, inputs), transport=canned) as engine:
        stats = await engine.run()
    assert stats.succeeded == 4 and stats.requests == 4
    results = {r["custom_id"]: r for r in read_output(tmp_path / "out")["results"]}
    assert results["p:1:math_json:0"]["parsed"] == good
    assert results["p:1:math_json:0"]["output"].startswith("```json")
    assert results["b-1"]["parsed"] is None  # not the template's request: no checks
    assert "response_format" not in canned.bodies[-1]


async def test_text_checks_with_a_template_file(tmp_path: Path) -> None:
    template = tmp_path / "answer.toml"
    template.write_text(
        'description = "d"\nuser = "As {persona}, answer."\n'
        '[output]\nmust_start_with = "Answer:"\nregex = "\\\\d+"\n',
        encoding="utf-8",
    )
    inputs = [write_shard(tmp_path / "p.jsonl", personas(2))]
    canned = Canned("I think the answer is seven.")
    config = job(tmp_path, canned.base_url, inputs, prompt=str(template), max_invalid=1)
    async with Engine(config, transport=canned) as engine:
        stats = await engine.run()
    assert stats.failed == 2 and len(canned.bodies) == 2
    assert "response_format" not in canned.bodies[0]
    failure = read_output(tmp_path / "out")["failures"][0]
    assert failure["error"]["message"] == (
        "1 invalid replies, the last: does not start with 'Answer:': 'I think the answer is seven.'"
    )


def test_max_invalid_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max invalid"):
        JobConfig(inputs=["p"], output="o", prompt="math", model="m", max_invalid=0).validate()


async def test_cli_run_with_max_invalid(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(8))
    async with MockServer(MockConfig(invalid_json=1.0)) as server:
        result = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "asyncgen",
                "run",
                "--input",
                str(shard),
                "--prompt",
                "math_json",
                "--model",
                "mock-model",
                "--base-url",
                server.base_url,
                "--output",
                str(tmp_path / "o"),
                "--max-invalid",
                "2",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=120,
        )
        assert server.statistics().requests == 16
    assert result.returncode == 1, result.stderr
    found = assert_exactly_once(tmp_path / "o", ids_for("p", 8))
    assert {f["error"]["code"] for f in found["failures"]} == {"invalid_output"}
    assert {f["attempts"] for f in found["failures"]} == {2}


# --- the mock's structured replies ------------------------------------------------------------


async def test_official_sdk_gets_schema_conforming_json() -> None:
    template = load_template("math_json")
    body = template.render({"persona": "a beekeeper"})
    async with (
        MockServer(MockConfig(seed=4)) as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key="sk-x") as client,
    ):
        first = await client.chat.completions.create(model="mock-model", **body)
        again = await client.chat.completions.create(model="mock-model", **body)
        text = await client.completions.create(
            model="mock-model", prompt="Q:", extra_body={"response_format": {"type": "json_object"}}
        )
        with pytest.raises(openai.BadRequestError, match="response_format"):
            await client.chat.completions.create(
                model="mock-model",
                messages=[{"role": "user", "content": "x"}],
                extra_body={"response_format": {"type": "yaml"}},
            )
    content = first.choices[0].message.content
    assert content is not None and content == again.choices[0].message.content
    spec = template.output
    assert spec is not None and spec.check(content).reason is None
    assert first.usage is not None and first.usage.completion_tokens == len(content.split(" "))
    assert set(msgspec.json.decode(text.choices[0].text)) == {"text"}


async def test_structured_replies_respect_max_tokens() -> None:
    template = load_template("math_json")
    body = {"model": "m", **template.render({"persona": "a pilot"}), "max_tokens": 3}
    async with (
        MockServer() as server,
        openai.AsyncOpenAI(base_url=server.base_url, api_key="x") as client,
    ):
        reply = await client.chat.completions.create(**body)
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content is not None
    assert len(choice.message.content.split(" ")) == 3


def test_mock_cli_flag() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert config_from_args(parser.parse_args(["--invalid-json", "0.25"])).invalid_json == 0.25
    with pytest.raises(ValueError, match="invalid_json"):
        MockConfig(invalid_json=1.5)
