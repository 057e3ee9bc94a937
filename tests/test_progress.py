"""Progress lines and the closing summary."""

from __future__ import annotations

import io
from typing import Any

from asyncgen.cli.progress import ProgressReporter, summary
from asyncgen.core.leases import EndpointStats
from asyncgen.engine.stats import Statistics


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
