"""Structured logs: the library's events on the ``asyncgen`` logger, and ``--log-format json``
(one JSON object a line on stderr, never a key)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from asyncgen.cli.logs import JsonFormatter
from asyncgen.core.leases import EndpointStats
from asyncgen.engine.engine import Engine
from asyncgen.engine.events import EndpointWatcher
from asyncgen.job.config import JobConfig
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import clean_env, personas, read_output, until, write_shard


def _ep(**changes: object) -> EndpointStats:
    base: dict[str, object] = {
        "url": "http://127.0.0.1:9/v1",
        "up": True,
        "window": 16,
        "outstanding": 3,
        "paused_for": 0.0,
        "requests": 10,
        "succeeded": 8,
        "throttled": 2,
        "failed": 0,
        "ejections": 0,
        "rpm_limit": None,
        "tpm_limit": None,
        "refused_share": 0.1,
    }
    base.update(changes)
    return EndpointStats(**base)  # type: ignore[arg-type]


def _events(caplog: pytest.LogCaptureFixture) -> list[tuple[str, dict[str, object]]]:
    return [(getattr(r, "event", "?"), getattr(r, "fields", {})) for r in caplog.records]


def test_endpoint_changes_are_events_with_their_cause(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncgen")
    watcher = EndpointWatcher()
    endpoint_changes = watcher.compare
    before = [_ep(), _ep(url="http://b/v1")]
    after = [
        _ep(paused_for=4.0, refused_share=0.75, window=8),
        _ep(url="http://b/v1", up=False, ejections=1),
    ]
    endpoint_changes(before, after)
    events = dict(_events(caplog))
    assert events["endpoint_paused"]["cause"] == "refusals (75% of recent replies were 429/503)"
    assert events["endpoint_paused"]["seconds"] == 4.0
    assert events["endpoint_ejected"]["endpoint"] == "http://b/v1"
    caplog.clear()
    endpoint_changes(after, [_ep(paused_for=3.0), _ep(url="http://b/v1", ejections=1)], elapsed=1.0)
    # a pause already told is not told again; a return is
    assert [name for name, _ in _events(caplog)] == ["endpoint_back"]
    caplog.clear()
    # a pause renewed before it ran out is a new one
    endpoint_changes([_ep(paused_for=0.5)], [_ep(paused_for=1.4, refused_share=0.5)], 0.5)
    assert [name for name, _ in _events(caplog)] == ["endpoint_paused"]
    caplog.clear()
    endpoint_changes([_ep()], [_ep(paused_for=2.0, rpm_limit=60.0, refused_share=0.0)])
    assert _events(caplog)[0][1]["cause"] == "the announced rate-limit budget is spent"
    assert watcher.pauses == {"refusals": 2, "budget": 1}


def test_the_json_formatter_writes_one_object_with_the_fields() -> None:
    record = logging.LogRecord("asyncgen", logging.WARNING, __file__, 1, "see %s", ("x",), None)
    record.event = "endpoint_paused"
    record.fields = {"endpoint": "http://u:pw@h/v1", "seconds": 1.5}
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "warning" and line["event"] == "endpoint_paused"
    assert line["message"] == "see x" and line["seconds"] == 1.5
    assert line["time"].endswith("Z")


async def test_a_stop_is_an_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="asyncgen")
    shard = write_shard(tmp_path / "p.jsonl", personas(50))
    async with MockServer(MockConfig(latency=0.2)) as server:
        config = JobConfig(
            inputs=[str(shard)],
            output=str(tmp_path / "out"),
            prompt="math",
            model="mock-model",
            base_url=server.base_url,
            concurrency=4,
            drain_timeout=5,
        )
        async with Engine(config) as engine:
            job = asyncio.create_task(engine.run())
            await until(lambda: engine.statistics().in_flight > 0)
            engine.stop()
            engine.stop()  # told once
            stats = await job
    assert not stats.finished
    stops = [f for name, f in _events(caplog) if name == "job_stopping"]
    assert stops == [{"cause": "stop requested", "drain_timeout": 5}]


def test_json_logs_of_a_run_name_bad_lines_pauses_and_the_end_and_never_the_key(
    tmp_path: Path,
) -> None:
    shard = write_shard(tmp_path / "p.jsonl", [*personas(12), b"{bad"])
    secret = "sk-json-logs-secret-0123456789"

    async def serve_and_run() -> subprocess.CompletedProcess[str]:
        mock = MockConfig(api_key=secret, fail_429=0.5, retry_after=1.0, seed=5)
        async with MockServer(mock) as server:
            argv = [sys.executable, "-m", "asyncgen", "run", "-i", str(shard)]
            argv += ["-o", str(tmp_path / "out"), "-p", "math", "-m", "mock-model"]
            argv += ["--base-url", server.base_url, "--concurrency", "8", "--max-attempts", "40"]
            argv += ["--log-format", "json", "--log-level", "info"]
            env = clean_env(OPENAI_API_KEY=secret)
            return await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, env=env, timeout=110
            )

    result = asyncio.run(serve_and_run())
    assert result.returncode == 1, result.stderr  # the bad line
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    assert all({"time", "level", "event", "message"} <= line.keys() for line in lines)
    by_event: dict[str, list[dict[str, object]]] = {}
    for line in lines:
        by_event.setdefault(str(line["event"]), []).append(line)
    bad = by_event["bad_input_line"]
    assert len(bad) == 1 and bad[0]["path"] == str(shard) and bad[0]["line"] == 13
    assert bad[0]["level"] == "warning" and "JSON" in str(bad[0]["cause"])
    paused = by_event["endpoint_paused"]
    assert paused and all("refusals" in str(p["cause"]) for p in paused)
    (end,) = by_event["job_end"]
    assert end["finished"] is True and end["succeeded"] == 12 and end["bad_lines"] == 1
    assert secret not in result.stderr and secret not in result.stdout


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_a_file_of_bad_lines_names_the_first_few_then_one_notice(tmp_path: Path, fmt: str) -> None:
    shard = write_shard(tmp_path / "p.jsonl", [*personas(3), *[b"{bad"] * 40])

    async def serve_and_run() -> subprocess.CompletedProcess[str]:
        async with MockServer(MockConfig(seed=5)) as server:
            argv = [sys.executable, "-m", "asyncgen", "run", "-i", str(shard), "-q"]
            argv += ["-o", str(tmp_path / "out"), "-p", "math", "-m", "mock-model"]
            argv += ["--base-url", server.base_url, "--log-format", fmt]
            return await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, env=clean_env(), timeout=110
            )

    result = asyncio.run(serve_and_run())
    assert result.returncode == 1, result.stderr
    err = result.stderr
    named = [f"{shard}:{n}:" for n in range(4, 44)]
    assert [n for n in named if n in err] == named[:10]  # the first ten, by file and line
    assert err.count("only the first 10 are shown") == 1
    if fmt == "json":
        events = [json.loads(line)["event"] for line in err.splitlines()]
        assert events.count("bad_input_line") == 10
        assert events.count("bad_input_lines_not_shown") == 1
    else:
        assert "40 bad input lines" in err  # the closing report counts them all
    found = read_output(tmp_path / "out")
    assert len(found["errors"]) == 40  # the errors shard keeps every one
