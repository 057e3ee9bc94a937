"""``asyncgen bench``: the statistics without a server, then the figures against a loopback mock
whose latencies are known.

Timing tolerances are generous on purpose: CI machines are small and shared, and the mock and
the client share one event loop. Each test states its tolerance where it asserts.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import signal
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from asyncgen.bench.runner import Bench, BenchConfig, BenchResult
from asyncgen.bench.stats import (
    RequestRecord,
    distribution,
    format_report,
    percentile,
    summarize,
)
from asyncgen.bench.workload import Workload, arrival_offsets
from asyncgen.cli import bench as bench_command
from asyncgen.cli.main import main
from asyncgen.core.errors import ConfigError
from asyncgen.core.sse import SSEParser, StreamAssembler
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import clean_env, personas, write_shard

# --- statistics, no server ------------------------------------------------------------------


def test_percentile_interpolates_linearly_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile(values, 101)
    d = distribution([3.0, 1.0, 2.0])
    assert d is not None and (d.n, d.mean, d.p50, d.max) == (3, 2.0, 2.0, 3.0)
    assert (d.p90, d.p99) == pytest.approx((2.8, 2.98))
    assert distribution([]) is None


def _record(index: int, **fields: Any) -> RequestRecord:
    return RequestRecord(index=index, **fields)


def test_summary_definitions_errors_warmup_and_goodput() -> None:
    records = [
        # warmup: left out of everything, however slow
        _record(0, warmup=True, scheduled=0.0, sent=0.0, end=9.0, output_tokens=5),
        # scheduled at 1.0, sent 0.5 s late (queueing), first token at 2.0, then 3 gaps
        _record(
            1,
            scheduled=1.0,
            sent=1.5,
            token_times=[2.0, 2.1, 2.3, 2.6],
            end=2.6,
            output_tokens=4,
            prompt_tokens=10,
        ),
        _record(
            2,
            scheduled=2.0,
            sent=2.0,
            token_times=[2.2, 2.4],
            end=2.4,
            output_tokens=2,
            prompt_tokens=20,
        ),
        # one output token: no TPOT, and no TPOT to miss either
        _record(3, scheduled=3.0, sent=3.0, token_times=[3.1], end=3.1, output_tokens=1),
        # failures: counted by kind, never in a latency figure
        _record(4, scheduled=4.0, sent=4.0, end=5.0, error="http_429", status=429),
        _record(5, scheduled=4.5, sent=4.5, end=4.6, token_times=[4.55], error="stream_cut"),
        _record(6, scheduled=4.6, sent=4.6, end=5.0, error="http_429", status=429),
    ]
    report = summarize(records, slo={"ttft": 0.5, "tpot": 0.15})
    assert (report.requests, report.completed, report.failed, report.warmup) == (6, 3, 3, 1)
    assert report.errors == {"http_429": 2, "stream_cut": 1}
    assert report.duration_s == pytest.approx(5.0 - 1.0)  # first measured scheduled -> last end
    assert report.request_throughput == pytest.approx(3 / 4.0)
    assert (report.input_tokens, report.output_tokens) == (30, 7)
    assert report.output_token_throughput == pytest.approx(7 / 4.0)
    assert report.total_token_throughput == pytest.approx(37 / 4.0)
    assert report.e2e is not None and report.e2e.n == 3
    assert report.e2e.max == pytest.approx(1.6)  # from the scheduled time, queueing included
    assert report.ttft is not None and sorted([1.0, 0.2, 0.1]) == pytest.approx(
        [report.ttft.p50 - 0.1, report.ttft.p50, report.ttft.max]
    )
    # tpot = (e2e - ttft) / (output_tokens - 1): (1.6 - 1.0) / 3 and (0.4 - 0.2) / 1
    assert report.tpot is not None and report.tpot.n == 2
    assert report.tpot.mean == pytest.approx((0.2 + 0.2) / 2)
    # itl: every gap of every successful request, pooled (the cut stream's are not)
    assert report.itl is not None and report.itl.n == 4
    assert report.itl.max == pytest.approx(0.3) and report.itl.mean == pytest.approx(0.8 / 4)
    assert report.queueing is not None and report.queueing.max == pytest.approx(0.5)
    # goodput: ttft <= 0.5 and tpot <= 0.15: request 1 misses ttft (1.0), request 2 misses
    # tpot (0.2), request 3 has one token and meets both
    assert report.good == 1 and report.goodput == pytest.approx(1 / 4.0)
    assert summarize(records, slo={"e2e": 1.0}).good == 2
    assert summarize(records).goodput is None
    text = format_report(report)
    for label in ("Requests", "http_429: 2", "Goodput", "ttft", "tpot", "itl", "queueing"):
        assert label in text
    assert "n/a" in format_report(summarize([_record(0, scheduled=0, sent=0, end=1)]))


def test_fixed_arrivals_are_evenly_spaced_and_bounded() -> None:
    offsets = arrival_offsets(4.0, poisson=False, total=9)
    assert offsets == pytest.approx([i / 4 for i in range(9)])
    # duration counts from the first request after the warmup ones
    offsets = arrival_offsets(10.0, poisson=False, total=None, warmup=3, duration=1.0)
    assert len(offsets) == 3 + 10 and offsets[-1] == pytest.approx(1.2)
    # both: whichever ends first
    assert len(arrival_offsets(10.0, poisson=False, total=5, duration=60.0)) == 5


def test_poisson_gaps_have_the_right_mean_and_spread() -> None:
    offsets = arrival_offsets(20.0, poisson=True, total=4001, rng=random.Random(7))
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    # the exponential distribution: mean 1/rate, standard deviation 1/rate (±5% at n=4000)
    assert statistics.fmean(gaps) == pytest.approx(0.05, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.05, rel=0.05)
    again = arrival_offsets(20.0, poisson=True, total=4001, rng=random.Random(7))
    assert again == offsets


def test_token_chunks_count_chunks_that_carry_output() -> None:
    def event(delta: dict[str, Any] | None, finish: str | None = None, **extra: Any) -> bytes:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
        return b"data: " + msgspec.json.encode({"choices": choices, **extra}) + b"\n\n"

    stream = b"".join(
        [
            event({"role": "assistant", "content": ""}),
            event({"content": "Hello"}),
            event({"reasoning_content": "hm"}),
            event({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}),
            event({}, finish="stop"),
            event(None, usage={"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}),
            b"data: [DONE]\n\n",
        ]
    )
    assembler = StreamAssembler()
    for payload in SSEParser().feed(stream):
        assembler.add(payload)
    assert (assembler.chunks, assembler.token_chunks) == (6, 3)
    assert assembler.got_token


def test_config_refuses_what_cannot_work() -> None:
    base = {"base_url": "http://127.0.0.1:1/v1", "model": "m"}
    for bad, message in (
        ({"poisson": True}, "--poisson needs --rate"),
        ({"prompt": "math"}, "--prompt needs --input"),
        ({"inputs": ["x.jsonl"]}, "--input needs --prompt"),
        ({"output_len": 5, "max_tokens": 6}, "not both"),
        ({"extra_body": {"stream": False}}, "may not set stream"),
        ({"slo": {"ttft": 0.5}, "stream": False}, "needs streaming"),
        ({"slo": {"latency": 1.0}}, "unknown metric"),
    ):
        with pytest.raises(ConfigError, match=message):
            BenchConfig(**base, **bad)  # type: ignore[arg-type]
    assert BenchConfig(**base).total == 200  # type: ignore[arg-type]
    assert BenchConfig(**base, duration=5.0).total is None  # type: ignore[arg-type]
    assert BenchConfig(**base, rate=5.0).max_in_flight is None  # type: ignore[arg-type]
    assert BenchConfig(**base).max_in_flight == 64  # type: ignore[arg-type]


def test_workload_renders_templates_cycling_inputs_and_synthetic_prompts(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", [*personas(3), b"{bad"])
    config = BenchConfig(
        base_url="http://x/v1", model="m", prompt="math", inputs=[str(shard)], max_tokens=64
    )
    workload = Workload(config, "m", 7)
    bodies = [msgspec.json.decode(workload.body(i)) for i in range(7)]
    assert workload.path == "/chat/completions" and workload.skipped == 1
    users = [b["messages"][-1]["content"] for b in bodies]
    assert "person number 0 " in users[0] and users[3] == users[0] and users[4] == users[1]
    assert bodies[0]["max_tokens"] == 64 and bodies[0]["temperature"] == 0.9  # template's
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}
    mismatched = BenchConfig(
        base_url="http://x/v1",
        model="m",
        prompt="completion_math",
        inputs=[str(shard)],
        endpoint="chat",
    )
    with pytest.raises(ConfigError, match="completions endpoint, not chat"):
        Workload(mismatched, "m", 1)

    synthetic = BenchConfig(
        base_url="http://x/v1",
        model="m",
        endpoint="completions",
        input_len=50,
        output_len=7,
        ignore_eos=True,
        stream=False,
        extra_body={"temperature": 0},
        seed=3,
    )
    workload = Workload(synthetic, "m", None)
    body = msgspec.json.decode(workload.body(5))
    assert workload.path == "/completions" and len(body["prompt"].split()) == 50
    assert body["max_tokens"] == 7 and body["ignore_eos"] is True and body["temperature"] == 0
    assert "stream" not in body
    assert workload.body(5) == Workload(synthetic, "m", None).body(5)  # seeded
    assert workload.body(5) != workload.body(6)  # and distinct, so no prefix-cache hits


# --- against the mock -----------------------------------------------------------------------


async def bench(server: MockServer, **settings: Any) -> BenchResult:
    config = BenchConfig(base_url=server.base_url, **settings)
    async with Bench(config) as b:
        return await b.run()


def ok(result: BenchResult) -> list[RequestRecord]:
    return [r for r in result.records if r.ok and not r.warmup]


async def test_reported_latencies_match_the_mock_configuration() -> None:
    latency, token_latency, tokens = 0.1, 0.02, 10
    mock = MockConfig(latency=latency, token_latency=token_latency, output_tokens=tokens)
    async with MockServer(mock) as server:
        result = await bench(server, rate=10.0, num_requests=20, warmup=2)
    report = result.report
    assert result.model == "mock-model"  # picked from GET /models
    assert (report.completed, report.failed, report.warmup) == (20, 0, 2)
    assert report.output_tokens == 20 * tokens and report.input_tokens == 20 * 256
    e2e, ttft, tpot, itl = report.e2e, report.ttft, report.tpot, report.itl
    assert e2e and ttft and tpot and itl
    # Configured: the first token after `latency`, each later one `token_latency` after the
    # one before, so itl = tpot = token_latency and e2e = latency + (tokens - 1) *
    # token_latency. Tolerance: ttft median within 30 ms; tpot and itl medians within 25%;
    # e2e within 30 ms plus 25% of its decode part. The mock's sleeps overshoot (about 1 ms
    # each, several on a loaded machine), and the bench reports what the server really did.
    decode = (tokens - 1) * token_latency
    assert ttft.p50 == pytest.approx(latency, abs=0.03)
    assert tpot.p50 == pytest.approx(token_latency, rel=0.25)
    assert itl.p50 == pytest.approx(token_latency, rel=0.25)
    assert e2e.p50 == pytest.approx(latency + decode, abs=0.03 + 0.25 * decode)
    assert itl.n == 20 * (tokens - 1)  # one gap per token: the mock sends a token per chunk
    # fixed-rate arrivals: scheduled exactly 1/rate apart, sent within a few ms of it
    records = ok(result)
    assert [r.scheduled for r in records] == pytest.approx([0.1 * i for i in range(2, 22)])
    assert report.queueing is not None and report.queueing.p50 < 0.01
    # 20 arrivals 0.1 s apart plus one service time: throughput close to the rate (±20%)
    assert report.request_throughput == pytest.approx(10.0, rel=0.2)


async def test_queueing_behind_a_concurrency_cap_counts_in_latency() -> None:
    # 50 arrivals/s, but at most 2 in flight of 0.1 s each: capacity 20/s, so the client
    # queue grows. Latency from the scheduled time shows it; the service time does not.
    async with MockServer(MockConfig(latency=0.1, output_tokens=5)) as server:
        result = await bench(server, rate=50.0, concurrency=2, num_requests=30, stream=False)
        assert server.statistics().max_running_seen <= 2
    records = ok(result)
    report = result.report
    assert report.completed == 30
    service = [r.end - r.sent for r in records]
    assert statistics.median(service) == pytest.approx(0.1, abs=0.03)
    queueing = [r.queueing for r in records]
    assert queueing[-1] > queueing[0] + 0.6  # the queue grew: ~0.9 s by the 30th arrival
    for r in records:
        assert r.e2e == pytest.approx(r.queueing + (r.end - r.sent))
    assert report.e2e is not None and report.e2e.p90 > 5 * statistics.median(service)
    assert report.queueing is not None and report.queueing.p90 > 0.5
    # no stream: no first token, so no TTFT, TPOT or ITL; tokens from usage
    assert report.ttft is None and report.tpot is None and report.itl is None
    assert report.output_tokens == 30 * 5


async def test_closed_loop_schedules_when_a_slot_frees() -> None:
    async with MockServer(MockConfig(latency=0.05, output_tokens=4)) as server:
        result = await bench(server, concurrency=4, num_requests=20)
        assert server.statistics().max_running_seen == 4
        timed = await bench(server, concurrency=2, duration=0.4)
    report = result.report
    assert report.completed == 20
    assert report.queueing is not None and report.queueing.max < 0.01
    # 4 in flight, 0.05 s each: a closed loop never goes past 80 req/s (a loaded machine
    # makes it slower, so only the bound is checked; speed is benchmarks/' business)
    assert 0 < report.request_throughput <= 4 / 0.05 * 1.1
    # the duration bounds the arrivals: 2 slots x 0.4 s / 0.05 s, 16 at most (and the first
    # two, sent at once)
    assert 2 <= timed.report.completed <= 18


async def test_failures_are_counted_by_kind_and_kept_out_of_latencies() -> None:
    mock = MockConfig(
        latency=0.01,
        seed=5,
        output_tokens=8,
        fail_429=0.15,
        fail_500=0.15,
        drop=0.1,
        stream_cut=0.15,
        malformed=0.1,
        hang=0.05,
        hang_seconds=5.0,
    )
    async with MockServer(mock) as server:
        result = await bench(server, rate=200.0, num_requests=80, timeout=0.5)
        stats = server.statistics()
    seen = stats.by_outcome
    hanging = stats.requests - sum(seen.values())  # a hang has no outcome until it ends
    report = result.report
    assert report.completed + report.failed == 80
    assert report.errors["http_429"] == seen["429"]
    assert report.errors["http_500"] == seen["500"]
    assert report.errors["connection_error"] == seen["drop"]
    assert report.errors["stream_cut"] == seen["stream_cut"]
    assert report.errors["malformed_response"] == seen["malformed"]
    assert report.errors["timeout"] == hanging
    assert sum(report.errors.values()) == report.failed > 0
    assert report.e2e is not None and report.e2e.n == report.completed == seen["ok"]
    assert report.e2e.max < 0.4  # the 0.5 s timeouts are not in it
    failed = [r for r in result.records if not r.ok]
    assert all(r.output_tokens is None and r.message for r in failed)
    assert {r.status for r in failed if r.error == "http_429"} == {429}


async def test_goodput_counts_requests_within_every_slo() -> None:
    # first tokens spread uniformly over 0.02-0.18 s: about half meet ttft <= 0.1
    mock = MockConfig(latency=0.1, latency_jitter=0.08, seed=11, output_tokens=3)
    async with MockServer(mock) as server:
        result = await bench(
            server, rate=100.0, num_requests=40, slo={"ttft": 0.1, "e2e": 5.0}, seed=2
        )
    report = result.report
    expected = sum(1 for r in ok(result) if r.ttft is not None and r.ttft <= 0.1)
    assert report.good == expected and 5 < expected < 35
    assert report.goodput == pytest.approx(expected / report.duration_s)


async def test_refused_key_stops_the_run() -> None:
    async with MockServer(MockConfig(api_key="sk-right")) as server:
        config = BenchConfig(base_url=server.base_url, model="m", check_endpoint=False)
        async with Bench(config, api_key="sk-wrong") as b:
            with pytest.raises(ConfigError, match="refused the API key"):
                await b.run()
        async with Bench(BenchConfig(base_url=server.base_url), api_key="sk-wrong") as b:
            with pytest.raises(ConfigError, match=r"refused the API key \(HTTP 401\)"):
                await b.run()


async def test_stop_reports_what_finished() -> None:
    async with MockServer(MockConfig(latency=0.05)) as server:
        config = BenchConfig(base_url=server.base_url, rate=50.0, num_requests=500)
        async with Bench(config) as b:
            asyncio.get_running_loop().call_later(0.3, b.stop)
            result = await b.run()
    assert result.interrupted and 5 <= len(result.records) < 50
    assert result.report.completed == len(result.records)


# --- the command ----------------------------------------------------------------------------


def test_help_explains_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--base-url",
        "--model",
        "--prompt",
        "--input",
        "--input-len",
        "--output-len",
        "--ignore-eos",
        "--max-tokens",
        "--extra-body",
        "--endpoint",
        "--api-key-env",
        "--rate",
        "--poisson",
        "--concurrency",
        "--num-requests",
        "--duration",
        "--warmup",
        "--no-stream",
        "--slo",
        "--json",
        "--save-requests",
        "--no-check",
        "--seed",
        "coordinated omission",
        "Exit status",
    ):
        assert flag in text, flag


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncgen", "bench", *args],
        capture_output=True,
        text=True,
        env=clean_env(**(env or {})),
        timeout=60,
    )


async def test_cli_report_json_and_requests(tmp_path: Path) -> None:
    secret = "sk-bench-secret-0123456789"
    shard = write_shard(tmp_path / "p.jsonl", personas(3))
    mock = MockConfig(latency=0.02, token_latency=0.001, output_tokens=6, api_key=secret)
    async with MockServer(mock) as server:
        args = [
            "--base-url",
            server.base_url,
            "--model",
            "mock-model",
            "--prompt",
            "math",
            "--input",
            str(shard),
            "--rate",
            "100",
            "--poisson",
            "-n",
            "10",
            "--warmup",
            "2",
            "--slo",
            "ttft=1",
            "--api-key-env",
            "BENCH_KEY",
            "--json",
            str(tmp_path / "bench.json"),
            "--save-requests",
            str(tmp_path / "requests.jsonl"),
        ]
        result = await asyncio.to_thread(run_cli, *args, env={"BENCH_KEY": secret})
        assert result.returncode == 0, result.stderr
        refused = await asyncio.to_thread(run_cli, "--base-url", server.base_url)
        assert server.statistics().requests == 12
    assert refused.returncode == 2 and "refused the API key" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    out = result.stdout
    assert "10 completed, 0 failed (+2 warmup" in out and "Goodput" in out and "ttft" in out
    document = json.loads((tmp_path / "bench.json").read_text())
    assert document["asyncgen_version"]
    assert document["command"][:2] == ["asyncgen", "bench"] and "--poisson" in document["command"]
    assert document["command_line"].startswith("asyncgen bench --base-url ")
    config = document["config"]
    assert config["prompt"] == "math" and config["rate"] == 100.0 and config["poisson"]
    assert config["endpoint"] == "chat" and config["concurrency"] is None
    assert config["num_requests"] == 10 and config["slo"] == {"ttft": 1.0}
    results = document["results"]
    assert results["completed"] == 10 and results["good"] == 10 and results["errors"] == {}
    for metric in ("e2e", "ttft", "tpot", "itl", "queueing"):
        assert set(results[metric]) == {"n", "mean", "p50", "p90", "p99", "max"}
    for key in ("request_throughput", "output_token_throughput", "goodput", "duration_s"):
        assert results[key] > 0
    lines = (tmp_path / "requests.jsonl").read_text().splitlines()
    records = [msgspec.json.decode(line, type=RequestRecord) for line in lines]
    assert [r.index for r in records] == list(range(12))
    assert [r.warmup for r in records] == [True, True] + [False] * 10
    assert all(len(r.token_times) == 6 and r.output_tokens == 6 for r in records)
    assert_not_in_files(tmp_path, secret)
    assert secret not in result.stdout + result.stderr + refused.stderr


def assert_not_in_files(directory: Path, secret: str) -> None:
    for path in directory.iterdir():
        assert secret.encode() not in path.read_bytes(), path


def test_cli_unreachable_endpoint_is_one_clear_line() -> None:
    result = run_cli("--base-url", "http://127.0.0.1:9/v1", "--model", "m")
    assert result.returncode == 2
    assert result.stderr.startswith("asyncgen: error: cannot reach endpoint")
    assert len(result.stderr.strip().splitlines()) == 1


def test_cli_second_signal_cancels_a_hung_start_and_still_reports() -> None:
    # An endpoint that takes the connection and never answers: the run hangs in GET /models,
    # so the first signal's stop cannot end it; the second cancels it, and the report (of
    # nothing) and exit 130 still follow, with no traceback.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        command = [sys.executable, "-m", "asyncgen", "bench", "--base-url", url, "-m", "m"]
        with subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env()
        ) as proc:
            assert proc.stderr is not None
            connection, _ = listener.accept()  # the signal handlers are in place by now
            with connection:
                proc.send_signal(signal.SIGINT)
                first = proc.stderr.readline()
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=30)
    assert first == "asyncgen bench: interrupted; reporting what has finished\n"
    assert proc.returncode == 130, err
    assert "asyncgen bench: m at http://127.0.0.1:" in out and "0 completed, 0 failed" in out
    assert err == ""


async def test_cli_run_cancelled_from_elsewhere_is_not_swallowed() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # never answers
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        config = BenchConfig(base_url=url, model="m")
        task = asyncio.create_task(bench_command.run_cli(config, api_key=None, quiet=True))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert task.cancelled()
