"""The command line: help, exit statuses, errors people will meet, the demo."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import asyncgen
from asyncgen.cli.exits import Exit
from asyncgen.cli.main import build_parser, main
from asyncgen.cli.run import exit_status, run_job
from asyncgen.job.config import JobConfig
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import assert_exactly_once, clean_env, personas, read_output, write_shard


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = clean_env(**(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "asyncgen", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def test_help_explains_commands_and_flags() -> None:
    top = build_parser().format_help()
    for command in ("run", "demo", "mock-server", "prompts"):
        assert command in top
    result = cli("run", "--help")
    assert result.returncode == 0
    for flag in (
        "--input",
        "--prompt",
        "--model",
        "--output",
        "--base-url",
        "--api-key-env",
        "--concurrency",
        "--min-concurrency",
        "--stream",
        "--idle-timeout",
        "--rpm",
        "--tpm",
        "--max-attempts",
        "--timeout",
        "--samples",
        "--max-tokens",
        "--strict",
        "Exit status",
    ):
        assert flag in result.stdout, flag
    assert "math" in result.stdout and "npc" in result.stdout


def test_prompts_lists_templates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prompts"]) == 0
    out = capsys.readouterr().out
    for name in ("math", "reasoning", "instruction", "knowledge", "npc", "tool"):
        assert name in out


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(2))
    result = cli(
        "run",
        "--input",
        str(tmp_path / "missing.jsonl"),
        "--prompt",
        "math",
        "--model",
        "m",
        "--output",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and "input file not found" in result.stderr
    result = cli(
        "run",
        "--input",
        str(shard),
        "--prompt",
        "no-such-template",
        "--model",
        "m",
        "--output",
        str(tmp_path / "o"),
    )
    assert result.returncode == 2 and "no-such-template" in result.stderr
    assert "math" in result.stderr, "the error lists the available templates"
    result = cli("run", "--input", str(shard), "--prompt", "math", "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "--model" in result.stderr
    result = cli("run", "--input", str(shard), "--concurrency", "0", "--output", "x")
    assert result.returncode == 2 and "must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_endpoint_is_one_clear_line(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(2))
    result = cli(
        "run",
        "--input",
        str(shard),
        "--prompt",
        "math",
        "--model",
        "m",
        "--output",
        str(tmp_path / "o"),
        "--base-url",
        "http://127.0.0.1:9/v1",
    )
    assert result.returncode == 2
    assert "cannot reach endpoint http://127.0.0.1:9/v1" in result.stderr
    assert "Traceback" not in result.stderr


def test_unwritable_output_is_one_clear_line(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(2))
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = cli(
        "run",
        "--input",
        str(shard),
        "--prompt",
        "math",
        "--model",
        "m",
        "--output",
        str(blocker / "out"),
        "--base-url",
        "http://127.0.0.1:9/v1",
    )
    assert result.returncode == 2 and "cannot use output directory" in result.stderr


async def test_exit_status_and_key_from_named_variable(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", [*personas(20), b"{bad"])
    secret = "sk-test-very-secret-0123456789"
    async with MockServer(MockConfig(api_key=secret)) as server:
        common = [
            "run",
            "--input",
            str(shard),
            "--prompt",
            "math",
            "--model",
            "mock-model",
            "--base-url",
            server.base_url,
        ]
        # a bad line: finished, but exit 1; the key comes from the variable --api-key-env names
        result = await _cli_async(
            *common,
            "--output",
            str(tmp_path / "a"),
            "--api-key-env",
            "MY_KEY",
            env={"MY_KEY": secret},
        )
        assert result.returncode == 1, result.stderr
        assert "20 succeeded" in result.stderr and "1 bad input lines" in result.stderr
        # the default variable
        ok_shard = write_shard(tmp_path / "q.jsonl", personas(5))
        result = await _cli_async(
            "run",
            "--input",
            str(ok_shard),
            "--prompt",
            "math",
            "--model",
            "mock-model",
            "--base-url",
            server.base_url,
            "--output",
            str(tmp_path / "b"),
            env={"OPENAI_API_KEY": secret},
        )
        assert result.returncode == 0, result.stderr
        # no key: a clear refusal
        result = await _cli_async(*common, "--output", str(tmp_path / "c"))
        assert result.returncode == 2 and "refused the API key" in result.stderr
    _assert_not_in_files(tmp_path, secret.encode())
    assert secret not in result.stderr + result.stdout


async def _cli_async(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import asyncio

    return await asyncio.to_thread(cli, *args, env=env)


def test_base_url_from_environment(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(1))
    result = cli(
        "run",
        "--input",
        str(shard),
        "--prompt",
        "math",
        "--model",
        "m",
        "--output",
        str(tmp_path / "o"),
        env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"},
    )
    assert "http://127.0.0.1:9/v1" in result.stderr


def test_demo_runs_end_to_end_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = cli("demo", "--output", str(out), "--personas", "120")
    assert result.returncode == 0, result.stderr
    assert "zstdcat" in result.stdout and str(out / "results") in result.stdout
    found = read_output(out / "results")
    assert len(found["results"]) == 120 and not found["failures"]
    again = cli("demo", "--output", str(out), "--personas", "120")
    assert again.returncode == 0 and "nothing to do" in again.stderr


def _assert_not_in_files(root: Path, secret: bytes) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert secret not in path.read_bytes(), path


async def test_several_base_urls_and_streaming(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(60))
    async with MockServer(MockConfig(seed=1)) as a, MockServer(MockConfig(seed=2)) as b:
        result = await _cli_async(
            "run",
            "--input",
            str(shard),
            "--prompt",
            "math",
            "--model",
            "mock-model",
            "--base-url",
            a.base_url,
            "--base-url",
            b.base_url,
            "--stream",
            "--idle-timeout",
            "5",
            "--output",
            str(tmp_path / "o"),
        )
        served = (a.statistics().requests, b.statistics().requests)
    assert result.returncode == 0, result.stderr
    assert "60 succeeded" in result.stderr
    assert sum(served) == 60 and min(served) > 0, served
    # the summary names each endpoint when there are several
    assert f"{a.base_url}: " in result.stderr and f"{b.base_url}: " in result.stderr
    found = assert_exactly_once(tmp_path / "o", {f"p:{i}:math:0" for i in range(1, 61)})
    assert all(r["ttft_s"] is not None for r in found["results"])


def test_tune_gc_freezes_start_up_objects_and_raises_the_young_threshold() -> None:
    """Process-wide, so in a child process: the library never does this on its own."""
    code = (
        "import gc, asyncgen\n"
        "before = gc.get_threshold()\n"
        "asyncgen.tune_gc(12345)\n"
        "after = gc.get_threshold()\n"
        "print(after[0], after[1:] == before[1:], gc.get_freeze_count() > 1000)\n"
    )
    assert _printed_by(code) == ["12345", "True", "True"]


def _printed_by(code: str) -> list[str]:
    """What ``code`` prints in a fresh interpreter, word by word."""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return done.stdout.split()


def test_tune_gc_adapts_the_young_threshold_to_what_collections_find() -> None:
    """A collection that finds nothing doubles the threshold (up to the ceiling); one that
    finds a tenth of a threshold's worth of cyclic garbage halves it (down to the start)."""
    code = (
        "import gc, asyncgen\n"
        "asyncgen.tune_gc(1000, ceiling=8000)\n"
        "asyncgen.tune_gc(1000, ceiling=8000)  # again: still one hook\n"
        "seen = []\n"
        "for _ in range(4):\n"
        "    gc.collect(0)\n"
        "    seen.append(gc.get_threshold()[0])\n"
        "for _ in range(3):\n"
        "    for _ in range(2000):\n"
        "        cycle = []\n"
        "        cycle.append(cycle)\n"
        "    del cycle\n"
        "    gc.collect(0)\n"
        "    seen.append(gc.get_threshold()[0])\n"
        "print(*seen)\n"
    )
    assert _printed_by(code) == ["2000", "4000", "8000", "8000", "4000", "2000", "1000"]
    # checked before anything changes, so safe in this process
    with pytest.raises(ValueError, match="threshold <= ceiling"):
        asyncgen.tune_gc(20_000, ceiling=10_000)


def test_a_reader_that_goes_away_ends_the_command_quietly() -> None:
    """``asyncgen prompts | head -1``: stdout's pipe is closed before the output is written."""
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "asyncgen", "prompts"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
            timeout=60,
        )
    finally:
        os.close(write)
    assert result.returncode == 0 and result.stderr == ""


def _slow_job(tmp_path: Path, base_url: str) -> JobConfig:
    shard = write_shard(tmp_path / "p.jsonl", personas(20))
    return JobConfig(
        inputs=[str(shard)],
        output=str(tmp_path / "o"),
        prompt="math",
        model="mock-model",
        base_url=base_url,
        drain_timeout=60,
    )


async def _until_requests(server: MockServer) -> None:
    async with asyncio.timeout(30):
        while not server.statistics().requests:  # noqa: ASYNC110  (the mock has no event for it)
            await asyncio.sleep(0.01)


async def test_a_cancel_from_the_caller_propagates_out_of_run_job(tmp_path: Path) -> None:
    """Only run_job's own second signal ends in a report; a cancellation from whoever awaits
    it (a timeout, a failing sibling in a task group) goes on."""
    async with MockServer(MockConfig(latency=60)) as server:
        task = asyncio.create_task(
            run_job(_slow_job(tmp_path, server.base_url), api_key=None, quiet=True)
        )
        await _until_requests(server)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert task.cancelled()


async def test_second_signal_stops_at_once_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first SIGINT drains (up to a minute here), the second stops now: run_job returns
    what finished, the command would exit 130."""
    async with MockServer(MockConfig(latency=60)) as server:
        loop = asyncio.get_running_loop()
        job = asyncio.ensure_future(
            run_job(_slow_job(tmp_path, server.base_url), api_key=None, quiet=True)
        )
        await _until_requests(server)
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.2)
        assert not job.done()
        loop.call_soon(os.kill, os.getpid(), signal.SIGINT)
        stats = await job
    assert not stats.finished and exit_status(stats) == Exit.INTERRUPTED
    err = capsys.readouterr().err
    assert "asyncgen: SIGINT: no new requests; waiting up to 60s" in err
    assert "asyncgen: stopping now; flushing what has come back" in err
    assert "stopped early (rerun the same command to resume)" in err
