"""Prometheus metrics: scraped over HTTP during a loopback job, and checked against the job's
own totals at the end."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from asyncgen.engine.engine import Engine
from asyncgen.engine.metrics import Metrics
from asyncgen.job.config import JobConfig
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import clean_env, personas, until, write_shard


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sum(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


async def test_a_scrape_during_the_job_and_after_matches_its_totals(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", [*personas(120), b"{bad"])
    metrics = Metrics(price_in=2.0, price_out=8.0)
    port = metrics.serve(0)
    try:
        faults = MockConfig(seed=4, latency=0.05, fail_429=0.1, fail_500=0.05)
        async with MockServer(faults) as server:
            config = JobConfig(
                inputs=[str(shard)],
                output=str(tmp_path / "out"),
                prompt="math",
                model="mock-model",
                base_url=server.base_url,
                concurrency=8,
                stream=True,
                backoff_base=0.01,
                backoff_cap=0.05,
            )
            async with Engine(config, metrics=metrics) as engine:
                job = asyncio.create_task(engine.run())
                await until(lambda: engine.statistics().succeeded >= 10)
                during = await asyncio.to_thread(_scrape, port)
                stats = await job
        after = await asyncio.to_thread(_scrape, port)
    finally:
        metrics.close()

    assert stats.finished and stats.succeeded == 120 and stats.bad_lines == 1
    url = server.base_url
    # during the job: a consistent snapshot, behind the end
    assert 10 <= _sum(during, "asyncgen_items_total", outcome="succeeded") < 120
    assert _sum(during, "asyncgen_endpoint_up", endpoint=url) == 1
    assert _sum(during, "asyncgen_endpoint_window", endpoint=url) >= 1
    # after: the job's own totals
    assert _sum(after, "asyncgen_requests_total") == stats.requests
    assert _sum(after, "asyncgen_requests_total", endpoint=url, outcome="throttled") == (
        stats.throttled
    )
    assert stats.throttled > 0  # the mock refused some: the label is not trivially zero
    assert _sum(after, "asyncgen_retries_total") == stats.retries > 0
    # every attempt without a result is counted with its reason: here the mock's 429s and 500s
    errors_500 = _sum(after, "asyncgen_request_errors_total", status="500")
    assert errors_500 > 0
    assert _sum(after, "asyncgen_request_errors_total") == stats.throttled + errors_500
    assert _sum(
        after, "asyncgen_request_errors_total", reason="rate_limit_exceeded", status="429"
    ) == (stats.throttled)
    # requests by status: the successes' 200s, the 429s, the 500s
    assert _sum(after, "asyncgen_requests_total", outcome="success", status="200") == 120
    assert _sum(after, "asyncgen_requests_total", status="429") == stats.throttled
    assert _sum(after, "asyncgen_requests_total", outcome="error", status="500") == errors_500
    # the input was counted (120 personas and the bad line): nothing is left
    assert _sum(after, "asyncgen_input_items") == 121
    assert ("asyncgen_items_left", ()) in after and _sum(after, "asyncgen_items_left") == 0
    assert _sum(after, "asyncgen_pauses_total") == sum(stats.pauses.values())
    assert _sum(after, "asyncgen_items_total", outcome="succeeded") == 120
    assert _sum(after, "asyncgen_items_total", outcome="bad_line") == 1
    assert _sum(after, "asyncgen_job_items", outcome="succeeded") == stats.succeeded_total
    assert _sum(after, "asyncgen_tokens_total", kind="prompt") == stats.prompt_tokens > 0
    assert _sum(after, "asyncgen_tokens_total", kind="completion") == stats.completion_tokens
    cost = (2.0 * stats.prompt_tokens + 8.0 * stats.completion_tokens) / 1e6
    assert _sum(after, "asyncgen_estimated_cost_dollars_total") == pytest.approx(cost)
    assert _sum(after, "asyncgen_in_flight") == 0
    assert _sum(after, "asyncgen_finished") == 1
    assert _sum(after, "asyncgen_lines_read_total") == 121
    # histograms: one observation per success, cumulative buckets ending in +Inf
    for name in ("asyncgen_item_latency_seconds", "asyncgen_time_to_first_token_seconds"):
        assert _sum(after, f"{name}_count") == 120
        assert _sum(after, f"{name}_bucket", le="+Inf") == 120
        assert _sum(after, f"{name}_sum") > 0
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in after.items()
        if name == "asyncgen_item_latency_seconds_bucket"
    }
    assert buckets["0.05"] < 120  # the mock takes 50 ms, and some items waited out a 429
    assert buckets["600.0"] == 120
    assert list(buckets.values()) == sorted(buckets.values())  # cumulative


def test_the_server_binds_loopback_by_default() -> None:
    metrics = Metrics()
    port = metrics.serve(0)
    try:
        assert metrics._server is not None
        assert metrics._server.server_address[0] == "127.0.0.1"
        # no engine yet: an empty, valid exposition
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert b"asyncgen_" not in reply.read()
    finally:
        metrics.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_cli_serves_metrics_while_it_runs(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(40))
    port = _free_port()
    async with MockServer(MockConfig(latency=0.2)) as server:
        argv = ["-m", "asyncgen", "run", "-i", str(shard), "-o", str(tmp_path / "out")]
        argv += ["-p", "math", "-m", "mock-model", "--base-url", server.base_url, "-q"]
        argv += ["--concurrency", "4", "--metrics-port", str(port)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, env=clean_env(), stderr=asyncio.subprocess.PIPE
        )
        seen: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        async with asyncio.timeout(60):
            while not seen:
                try:
                    seen = await asyncio.to_thread(_scrape, port)
                except OSError:  # not listening yet
                    await asyncio.sleep(0.05)
            _, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert f"metrics on http://127.0.0.1:{port}/metrics" in err.decode()
    assert _sum(seen, "asyncgen_endpoint_up", endpoint=server.base_url) == 1
    # the port in use: one clear line, exit 2
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, *argv[:-1], str(taken)],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{taken}" in result.stderr


def test_histogram_buckets_count_values_up_to_their_bound() -> None:
    from asyncgen.engine.metrics import _Histogram

    h = _Histogram((0.1, 1.0))
    h.observe([1.0, 0.05, 5.0, 0.1, 0.5])
    h.observe([])
    h.observe([2.0])
    counts, total = h.copy()
    assert counts == [2, 2, 2]  # <= 0.1, <= 1.0, above
    assert total == pytest.approx(8.65)
