"""Progress lines and the closing summary."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asyncgen.cli.progress import ProgressReporter, summary
from asyncgen.core.leases import EndpointStats
from asyncgen.engine.stats import Statistics
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import clean_env, personas, write_shard


def stats(**kw: Any) -> Statistics:
    values: dict[str, Any] = dict(
        elapsed=10.0,
        lines_read=100,
        skipped=0,
        in_flight=3,
        retrying=1,
        succeeded=90,
        failed=2,
        bad_lines=1,
        requests=120,
        retries=20,
        throttled=4,
        prompt_tokens=5000,
        completion_tokens=9000,
        succeeded_total=90,
        failed_total=2,
        bad_lines_total=1,
        input_fraction=0.5,
        finished=False,
        stopped=False,
    )
    values.update(kw)
    return Statistics(**values)


class ClosedPipe(io.StringIO):
    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_plain_line_has_counts_rates_and_eta() -> None:
    out = io.StringIO()
    reporter = ProgressReporter(lambda: stats(), out, live=False)
    reporter.show()
    line = out.getvalue()
    assert line.endswith("\n") and "\r" not in line
    for part in (
        "done 90",
        "failed 2",
        "bad 1",
        "in flight 3",
        "retrying 1",
        "req/s",
        "tok/s",
        "input 50.0%",
        "ETA 0:00:10",
    ):
        assert part in line, part


def test_a_closed_stream_does_not_fail_the_job() -> None:
    reporter = ProgressReporter(lambda: stats(), ClosedPipe(), live=True)
    reporter.show()
    reporter.show()
    reporter.finish()


def test_summaries() -> None:
    done = summary(
        stats(finished=True, succeeded=0, failed=0, bad_lines=0, requests=0, skipped=100), "out"
    )
    assert "nothing to do: all 100 items were already committed in out; 0 requests" in done
    empty = summary(
        stats(finished=True, lines_read=0, succeeded=0, failed=0, bad_lines=0, requests=0), "out"
    )
    assert "the input holds no records" in empty
    stopped = summary(stats(), "out")
    assert "stopped early" in stopped and "rerun" in stopped


def test_endpoint_health_is_shown() -> None:
    def ep(url: str, up: bool) -> EndpointStats:
        return EndpointStats(url, up, 8, 0, 0.0, 10, 9, 1, 0, 0 if up else 1, None, None)

    reporter = ProgressReporter(lambda: stats(), io.StringIO(), interval=1)
    two_up = stats(endpoints=[ep("http://a/v1", True), ep("http://b/v1", True)])
    assert "endpoints" not in reporter.line(two_up)
    one_down = stats(endpoints=[ep("http://a/v1", True), ep("http://b/v1", False)])
    assert "endpoints 1/2 up (down: http://b/v1)" in reporter.line(one_down)
    none = stats(endpoints=[ep("http://a/v1", False)], waiting_for_endpoint=True)
    assert "WAITING: no endpoint is answering" in reporter.line(none)
    paused = EndpointStats("http://a/v1", True, 8, 0, 4.25, 10, 9, 1, 0, 0, None, None)
    assert "PAUSED 4.2s: the server's budget is spent" in reporter.line(stats(endpoints=[paused]))
    assert "PAUSED" not in reporter.line(stats(endpoints=[paused, ep("http://b/v1", True)]))
    assert "429s 4" in reporter.line(two_up)
    text = summary(stats(finished=True, endpoints=two_up.endpoints), "out")
    assert "http://b/v1: 9 ok, 1 429s, 0 errors, ejected 0 times" in text


def test_line_counts_retries_and_the_cost_when_prices_are_given() -> None:
    plain = ProgressReporter(lambda: stats(), io.StringIO(), live=False)
    assert "retries 20" in plain.line(stats()) and "$" not in plain.line(stats())
    priced = ProgressReporter(lambda: stats(), io.StringIO(), live=False, prices=(2.0, 10.0))
    # 5 000 prompt tokens at $2/M + 9 000 completion tokens at $10/M
    assert " $0.10 " in priced.line(stats(prompt_tokens=5000, completion_tokens=9000))
    assert " $1,200.00 " in priced.line(stats(prompt_tokens=0, completion_tokens=120_000_000))


def test_with_a_total_the_line_shows_items_done_of_total_and_an_eta(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [100.0]
    monkeypatch.setattr("asyncgen.cli.progress.time.monotonic", lambda: clock[0])
    reporter = ProgressReporter(lambda: stats(), io.StringIO(), live=False)
    # 20 skipped (earlier runs) + 10 done in the first 10 s, of 200
    first = reporter.line(stats(total_items=200, skipped=20, succeeded=8, failed=1))
    assert "30/200 items 15.0% ETA 0:02:50" in first  # 170 left at 1 item/s
    assert "input" not in first
    clock[0] += 10.0
    second = reporter.line(stats(total_items=200, skipped=20, succeeded=18, failed=1))
    assert "40/200 items 20.0% ETA 0:02:40" in second  # still 1/s: 160 left
    clock[0] += 10.0
    # twice as fast now: the ETA follows, smoothed (not at once to 0:01:10)
    third = reporter.line(stats(total_items=200, skipped=20, succeeded=38, failed=1))
    eta = third.split("ETA ")[1].split(" ")[0]
    assert "60/200 items 30.0%" in third and "0:01:10" < eta < "0:02:20", third
    done = reporter.line(stats(total_items=200, skipped=20, succeeded=178, failed=1))
    assert "200/200 items 100.0% ETA 0:00:00" in done


def test_color_on_a_terminal_unless_no_color_and_never_in_a_pipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setattr(
        "asyncgen.cli.progress.shutil.get_terminal_size", lambda: os.terminal_size((400, 24))
    )
    down = EndpointStats("http://a/v1", False, 8, 0, 0.0, 10, 9, 1, 0, 1, None, None)
    troubled = stats(failed=2, endpoints=[down], waiting_for_endpoint=True)

    def shown(live: bool) -> str:
        out = io.StringIO()
        ProgressReporter(lambda: troubled, out, live=live).show()
        return out.getvalue()

    colored = shown(True)
    assert colored.startswith("\r") and "\x1b[31mfailed 2\x1b[0m" in colored
    assert "\x1b[33m | WAITING: no endpoint is answering, probing\x1b[0m" in colored
    assert "\x1b[31m" not in shown(False) and "\x1b[K" not in shown(False)
    monkeypatch.setenv("NO_COLOR", "1")
    plain = shown(True)
    assert "\x1b[3" not in plain and "failed 2" in plain and plain.endswith("\x1b[K")


def test_a_live_line_is_cut_to_the_terminal_width(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        "asyncgen.cli.progress.shutil.get_terminal_size", lambda: os.terminal_size((80, 24))
    )
    out = io.StringIO()
    ProgressReporter(lambda: stats(total_items=1000), out, live=True, color=False).show()
    text = out.getvalue().removeprefix("\r").removesuffix("\x1b[K")
    assert len(text) == 79 and text.endswith("…") and text.startswith("[0:00:10] 93/1,000")


def test_a_run_in_a_pipe_prints_plain_lines_with_the_total(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl.zst", personas(300))

    async def serve_and_run() -> subprocess.CompletedProcess[str]:
        async with MockServer(MockConfig(seed=3, latency=0.05)) as server:
            argv = [sys.executable, "-m", "asyncgen", "run", "-i", str(shard), "-p", "math"]
            argv += ["-m", "mock-model", "-o", str(tmp_path / "out"), "--concurrency", "16"]
            argv += ["--base-url", server.base_url, "--progress-interval", "0.2"]
            return await asyncio.to_thread(
                subprocess.run, argv, capture_output=True, text=True, env=clean_env(), timeout=110
            )

    result = asyncio.run(serve_and_run())
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(lines) >= 3, result.stderr  # ~1 s of work, a line every 0.2 s
    assert "\r" not in result.stderr and "\x1b" not in result.stderr  # a pipe: no escapes
    with_total = [line for line in lines if "/300 items" in line]
    assert with_total and " ETA " in with_total[-1], lines
    done = [int(line.split("/300 items")[0].split()[-1].replace(",", "")) for line in with_total]
    assert done == sorted(done) and all(0 <= n <= 300 for n in done)
