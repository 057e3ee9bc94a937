"""A job run by several workers: partitions, leases, job-wide budgets, and exactly once when
worker processes (or the coordinator) are killed at random instants."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from asyncgen.core.errors import BusyError, OutputError
from asyncgen.core.flow import FlowControl
from asyncgen.scale.budget import divide
from asyncgen.storage.files import DirLock
from asyncgen.storage.partitions import Partition, open_partitioned, plan_partitions
from asyncgen.storage.sources import ShardReader, count_lines
from asyncgen.storage.store import Store

from .conftest import assert_exactly_once, clean_env, personas, read_output, write_shard
from .test_crash_resume import FAULTS, mock_process, server_requests

# --- sans-IO and storage pieces ---------------------------------------------------------------


def test_budgets_are_divided_so_that_their_sum_stays_within_the_job() -> None:
    share = divide(256, 6000.0, None, 3)
    assert (share.concurrency, share.rpm, share.tpm) == (85, 2000.0, None)
    assert divide(2, 100.0, 10.0, 4).concurrency == 1  # never 0
    assert divide(256, None, 1e6, 0).tpm == 1e6


def test_an_endpoints_own_limits_are_divided_too() -> None:
    from asyncgen.core.limits import EndpointLimits

    share = divide(100, None, None, 2, [EndpointLimits(rpm=600.0, concurrency=9), None])
    assert share.endpoints == (EndpointLimits(rpm=300.0, concurrency=4), None)
    flow = FlowControl(["a", "b"], concurrency=50, limits=list(share.endpoints), now=0.0)
    assert flow.endpoint_stats(0.0)[0].window <= 4

    def granted_to_a(flow: FlowControl, now: float) -> int:
        leases = [flow.try_acquire(now, 1, 1) for _ in range(40)]
        return sum(getattr(lease, "endpoint", None) == 0 for lease in leases)

    halves = divide(100, None, None, 2, [EndpointLimits(rpm=600.0), None])
    flow = FlowControl(["a", "b"], concurrency=50, limits=list(halves.endpoints), now=0.0)
    assert granted_to_a(flow, 0.0) == 2  # half a second of 300 a minute holds 2.5
    whole = divide(100, None, None, 1, [EndpointLimits(rpm=600.0), None])
    flow.set_share(concurrency=100, rpm=None, tpm=None, now=10.0, limits=list(whole.endpoints))
    assert granted_to_a(flow, 10.0) == 5  # the worker alone: 600 a minute


def test_a_new_share_changes_the_pace_and_the_window_cap_without_a_burst() -> None:
    flow = FlowControl(["a"], concurrency=64, rpm=600.0, now=0.0)
    granted = 0
    while not hasattr(flow.try_acquire(0.0, 10, 10), "seconds"):
        granted += 1
    assert granted == 5  # half a second of 10/s
    flow.set_share(concurrency=8, rpm=300.0, tpm=None, now=0.0)
    assert flow.cap == 8.0
    assert all(e.window <= 8 for e in flow.endpoint_stats(0.0))
    # What was charged stays charged: 1 s later, 5 per s has drained 5, room for 2.5 more.
    later = [hasattr(flow.try_acquire(1.0, 10, 10), "seconds") for _ in range(3)]
    assert later == [False, False, True]


def test_a_reader_hands_out_only_its_line_range(tmp_path: Path) -> None:
    lines = [json.dumps({"persona": f"p{i}"}).encode() for i in range(1, 11)]
    lines[4] = b""  # line 5 is blank: it keeps its number
    shard = write_shard(tmp_path / "s.jsonl", lines)
    assert count_lines(shard) == 10
    reader = ShardReader(shard, first=4, last=7)
    got = reader.read_batch(100)
    assert [line.lineno for line in got] == [4, 6, 7]
    assert reader.read_batch(100) == []
    tail = ShardReader(shard, first=8)
    assert [line.lineno for line in tail.read_batch(100)] == [8, 9, 10]


def test_a_plan_splits_few_inputs_and_never_moves_what_it_planned(tmp_path: Path) -> None:
    one = write_shard(tmp_path / "in" / "a.jsonl", personas(100))
    out = tmp_path / "out"
    out.mkdir()
    plan, work = plan_partitions(out, [one], workers=2)
    # Fewer inputs than workers: about four partitions a worker, covering every line once.
    assert len(plan.partitions) == 8 and plan.lines == 13
    covered = [n for p in plan.partitions for n in range(p.first, (p.last or 100) + 1)]
    assert covered == list(range(1, 101))
    assert plan.partitions[-1].last is None
    assert [p for p, _ in work] == plan.partitions
    # A later run with more workers and a new input: the old partitions stay, the new input
    # is split by the plan's size.
    two = write_shard(tmp_path / "in" / "b.jsonl", personas(20))
    again, work = plan_partitions(out, [one, two], workers=8)
    assert again.partitions[:8] == plan.partitions
    assert [(p.shard, p.first, p.last) for p in again.partitions[8:]] == [
        ("b", 1, 13),
        ("b", 14, None),
    ]
    # This run's work is the partitions of the inputs it was given.
    _, only_b = plan_partitions(out, [two], workers=2)
    assert {p.shard for p, _ in only_b} == {"b"}


def test_a_damaged_input_is_planned_up_to_the_damage(tmp_path: Path) -> None:
    import zstandard

    data = b"".join(json.dumps({"persona": f"p{i}"}).encode() + b"\n" for i in range(400))
    frames = [zstandard.ZstdCompressor().compress(data[i : i + 2000]) for i in range(0, 8000, 2000)]
    whole = b"".join(frames)
    cut = tmp_path / "cut.jsonl.zst"
    cut.write_bytes(whole[: len(whole) - 40])  # the last frame torn
    counted = count_lines(cut)
    assert 0 < counted < 400
    out = tmp_path / "out"
    out.mkdir()
    plan, _ = plan_partitions(out, [cut], workers=2)
    assert plan.partitions[-1].last is None  # the rest, up to the damage, is the last range's


def test_whole_inputs_are_partitions_when_there_are_enough(tmp_path: Path) -> None:
    shards = [write_shard(tmp_path / f"s{k}.jsonl", personas(5)) for k in range(3)]
    out = tmp_path / "out"
    out.mkdir()
    plan, _ = plan_partitions(out, shards, workers=2)
    assert plan.partitions == [Partition(f"p00000{k + 1}", f"s{k}") for k in range(3)]


def test_a_partitioned_directory_and_a_one_process_one_are_not_mixed(tmp_path: Path) -> None:
    spec = {"model": "m"}
    one = tmp_path / "one"
    store = Store.open(one, spec, version="t")
    store.ledger.claim("x:1:t:0")
    store.commit([], [])
    (one / "ledger.zst").write_bytes(b"not empty")
    store.close()
    with pytest.raises(OutputError, match="without --workers"):
        open_partitioned(one, spec, version="t", job=None)
    many = tmp_path / "many"
    open_partitioned(many, spec, version="t", job=None).release()
    plan_partitions(many, [write_shard(tmp_path / "s.jsonl", personas(3))], workers=1)
    with pytest.raises(OutputError, match="several workers"):
        Store.open(many, spec, version="t")
    # The lease of a partition is its store's lock.
    with DirLock(many / "parts" / "p000001"), pytest.raises(BusyError):
        Store.open(many / "parts" / "p000001", spec, version="t")


# --- the CLI with worker processes ------------------------------------------------------------

N = 6000


def _job(tmp_path: Path, url: str, *extra: str) -> list[str]:
    for k in range(2):
        write_shard(tmp_path / f"personas-{k}.jsonl.zst", personas(N // 2, f"s{k}"))
    return [
        "--input",
        str(tmp_path / "personas-*"),
        "--prompt",
        "math",
        "--model",
        "mock-model",
        "--output",
        str(tmp_path / "out"),
        "--base-url",
        url,
        "--concurrency",
        "32",
        "--max-attempts",
        "20",
        "--drain-timeout",
        "2",
        "--quiet",
        *extra,
    ]


def _expected() -> set[str]:
    return {f"personas-{k}:{i}:math:0" for k in range(2) for i in range(1, N // 2 + 1)}


def _workers_of(pid: int) -> list[int]:
    """The worker processes a coordinator started (not multiprocessing's helpers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == pid and b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(entry))
    return found


def _popen(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "asyncgen", "run", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )


@pytest.mark.slow
def test_killed_worker_processes_are_replaced_and_every_item_lands_once(tmp_path: Path) -> None:
    with mock_process(*FAULTS, "--seed", "7") as url:
        args = _job(tmp_path, url, "--workers", "2", "--partition-lines", "500")
        rng = random.Random(int(time.time()))
        proc = _popen(args)
        kills = 0
        deadline = time.monotonic() + 90
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.3, 1.0))
            workers = _workers_of(proc.pid)
            if workers and kills < 4:
                os.kill(rng.choice(workers), signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert kills >= 2, "the job ended before its workers could be killed"
        assert err.count("died") >= kills, err
        found = assert_exactly_once(tmp_path / "out", _expected())
        assert len(found["results"]) == N
        before = server_requests(url)
        # Without --workers: a job once run by workers keeps its partitions.
        rerun = subprocess.run(
            [sys.executable, "-m", "asyncgen", "run", *args[: args.index("--workers")]],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=60,
        )
        assert rerun.returncode == 0, rerun.stderr
        assert f"all {N:,} items were already committed" in rerun.stderr
        assert server_requests(url) == before
        # status and export see one job.
        status = subprocess.run(
            [sys.executable, "-m", "asyncgen", "status", str(tmp_path / "out")],
            capture_output=True,
            text=True,
            env=clean_env(),
        )
        assert f"succeeded      {N:,}" in status.stdout, status.stdout
        assert "partitions     12 (run by workers; 0 held now)" in status.stdout


@pytest.mark.slow
def test_a_killed_coordinator_is_resumed_exactly_once(tmp_path: Path) -> None:
    with mock_process(*FAULTS, "--seed", "8") as url:
        args = _job(tmp_path, url, "--workers", "2")
        rng = random.Random(int(time.time()))
        for attempt in range(30):
            proc = _popen(args)
            try:
                _, err = proc.communicate(timeout=rng.uniform(1.0, 2.5) if attempt < 3 else 90)
            except subprocess.TimeoutExpired:
                orphans = _workers_of(proc.pid)
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=30)
                # Its workers see the coordinator gone, drain (2 s) and exit.
                for pid in orphans:
                    for _ in range(100):
                        if not Path(f"/proc/{pid}").exists():
                            break
                        time.sleep(0.1)
                continue
            assert proc.returncode == 0, err
            break
        else:
            pytest.fail("the job never finished")
        assert_exactly_once(tmp_path / "out", _expected())


@pytest.mark.slow
def test_an_rpm_budget_holds_for_the_whole_job_across_workers(tmp_path: Path) -> None:
    rpm = 3000  # 50 a second, enforced by the mock with OpenAI's 429s
    with mock_process("--rpm-limit", str(rpm), "--latency", "0.05") as url:
        n = 700
        write_shard(tmp_path / "a.jsonl", personas(n // 2, "a"))
        write_shard(tmp_path / "b.jsonl", personas(n // 2, "b"))
        args = [
            "--input",
            str(tmp_path / "a.jsonl"),
            str(tmp_path / "b.jsonl"),
            "--prompt",
            "math",
            "--model",
            "mock-model",
            "--output",
            str(tmp_path / "out"),
            "--base-url",
            url,
            "--rpm",
            str(rpm),
            "--workers",
            "2",
            "--quiet",
        ]
        started = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "asyncgen", "run", *args],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=120,
        )
        elapsed = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        import urllib.request

        with urllib.request.urlopen(url.removesuffix("/v1") + "/mock/stats") as resp:
            stats = json.load(resp)
        refused = stats["by_outcome"].get("rate_limited", 0)
        assert refused < 0.01 * stats["requests"], stats
        # Both workers were paced at half the budget each: the job took about n / 50 s.
        assert elapsed > 0.8 * n / (rpm / 60), elapsed
        assert_exactly_once(
            tmp_path / "out",
            {f"{s}:{i}:math:0" for s in "ab" for i in range(1, n // 2 + 1)},
        )


# --- Ray ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[Any]:
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def _ray_job(tmp_path: Path, url: str) -> Any:
    """The job of :func:`_job` as a JobConfig for two Ray workers."""
    from asyncgen.job.config import JobConfig

    args = _job(tmp_path, url)
    return JobConfig(
        inputs=[args[1]],
        output=str(tmp_path / "out"),
        prompt="math",
        model="mock-model",
        base_url=url,
        concurrency=32,
        max_attempts=20,
        drain_timeout=2,
        workers=2,
        ray="auto",
    )


@pytest.mark.slow
async def test_ray_actors_killed_at_random_instants_are_restarted_exactly(
    tmp_path: Path, ray_cluster: Any
) -> None:
    from asyncgen.scale.coordinator import Coordinator
    from asyncgen.scale.ray import RayWorker, ray_spawner

    with mock_process(*FAULTS, "--seed", "9") as url:
        config = _ray_job(tmp_path, url)
        rng = random.Random(int(time.time()))
        spawn = ray_spawner(config, api_key=None, redo=None)
        async with Coordinator(config, workers=2, spawn=spawn, partition_lines=500) as job:
            run = asyncio.create_task(job.run())
            kills = 0
            while not run.done() and kills < 3:
                await asyncio.sleep(rng.uniform(1.0, 2.5))
                running = [h for h in job.handles if isinstance(h, RayWorker) and h.actor]
                if running and not run.done():
                    # Ray restarts the actor and retries its call; the lease and the
                    # partition's ledger make the retry resume where the commits stopped.
                    ray_cluster.kill(rng.choice(running).actor, no_restart=False)
                    kills += 1
            stats = await run
        assert stats.finished, stats
        assert kills >= 1
        found = assert_exactly_once(tmp_path / "out", _expected())
        assert len(found["results"]) == N
        before = server_requests(url)
        async with Coordinator(config, workers=2, spawn=spawn) as again:
            stats = await again.run()
        assert stats.finished and stats.requests == 0 and stats.skipped == N
        assert server_requests(url) == before


@pytest.mark.slow
def test_retry_failed_and_export_see_a_job_run_by_workers_as_one(tmp_path: Path) -> None:
    from .conftest import assert_logically_once

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "asyncgen", *args],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=120,
        )

    with mock_process("--fail-500", "0.3", "--seed", "4") as bad:
        args = _job(tmp_path, bad, "--workers", "2", "--max-attempts", "1")
        first = cli("run", *args)
    assert first.returncode == 1, first.stderr  # some items failed
    failed = len(assert_exactly_once(tmp_path / "out", _expected())["failures"])
    assert 0.2 * N < failed < 0.4 * N
    with mock_process("--seed", "4") as good:
        again = cli("retry-failed", str(tmp_path / "out"), "--base-url", good, "--quiet")
        assert again.returncode == 0, again.stderr
        assert f"retrying {failed:,} failed items" in again.stderr
        assert server_requests(good) == failed  # only the failures were sent again
    current = assert_logically_once(tmp_path / "out", _expected())
    assert all(r["error"] is None for r in current.values())
    exported = cli("export", str(tmp_path / "out"), "--to", str(tmp_path / "all.jsonl"))
    assert exported.returncode == 0, exported.stderr
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    ids = [json.loads(line)["custom_id"] for line in lines]
    assert sorted(ids) == sorted(_expected())


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_and_the_rerun_finishes_exactly_once(tmp_path: Path) -> None:
    with mock_process("--latency", "0.05", "--seed", "3") as url:
        args = _job(tmp_path, url, "--workers", "2")
        proc = _popen(args)
        deadline = time.monotonic() + 30
        while server_requests(url) < 500 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _workers_of(proc.pid)
        assert len(workers) == 2
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "SIGINT: no new requests" in err
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)  # none left behind
        partial = read_output(tmp_path / "out")
        ids = [r["custom_id"] for r in partial["results"]]
        assert len(ids) == len(set(ids)) and set(ids) <= _expected()
        assert 0 < len(ids) < N
    with mock_process("--seed", "3") as url:
        again = subprocess.run(
            [sys.executable, "-m", "asyncgen", "run", *_job(tmp_path, url, "--workers", "2")],
            capture_output=True,
            text=True,
            env=clean_env(),
            timeout=120,
        )
        assert again.returncode == 0, again.stderr
        assert server_requests(url) == N - len(partial["results"])
    assert len(assert_exactly_once(tmp_path / "out", _expected())["results"]) == N


@pytest.mark.slow
def test_the_api_key_reaches_the_workers_but_no_output_log_or_command_line(
    tmp_path: Path,
) -> None:
    import zstandard

    secret = "sk-test-WORKERS-0123456789"
    env = clean_env(ASYNCGEN_TEST_KEY=secret)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncgen",
            "mock-server",
            "--port",
            "0",
            "--latency",
            "0.05",
            "--api-key-env",
            "ASYNCGEN_TEST_KEY",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert server.stdout is not None
        url = server.stdout.readline().split()[-1]
        args = _job(tmp_path, url, "--workers", "2", "--api-key-env", "ASYNCGEN_TEST_KEY")
        args.remove("--quiet")
        proc = subprocess.Popen(
            [sys.executable, "-m", "asyncgen", "run", *args, "--progress-interval", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        cmdlines = b""
        deadline = time.monotonic() + 20
        while not cmdlines and time.monotonic() < deadline:
            time.sleep(0.2)
            cmdlines = b"".join(
                Path(f"/proc/{pid}/cmdline").read_bytes() for pid in _workers_of(proc.pid)
            )
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err  # the mock refuses requests without the key
    finally:
        server.send_signal(signal.SIGTERM)
        server.communicate(timeout=10)
    assert cmdlines and secret.encode() not in cmdlines
    assert secret not in out + err
    assert f"/{N:,} items" in err  # the progress line's total, counted once for the job
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".zst" and data:
                data = (
                    zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
                )
            assert secret.encode() not in data, path


def test_a_job_file_sets_the_workers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from asyncgen.cli.main import main
    from asyncgen.job.jobfile import read_job_file

    path = tmp_path / "job.toml"
    path.write_text(
        'inputs = ["a.jsonl"]\noutput = "out"\nprompt = "math"\nmodel = "m"\n'
        '[workers]\ncount = 4\npartition_lines = 100000\nray = "auto"\n'
    )
    options = read_job_file(str(path)).options
    assert (options["workers"], options["partition_lines"], options["ray"]) == (4, 100000, "auto")
    assert main(["run", str(path), "--print-config", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "[workers]\ncount = 2\n" in printed and "partition_lines = 100000" in printed


# --- the coordinator's scheduling, with workers faked -------------------------------------------


class _FakeWorker:
    """A worker that 'runs' a partition at once, or dies or finds it busy when told to."""

    def __init__(self, index: int, share: Any, script: dict[str, list[str]], log: list[Any]):
        self.index, self.share, self.script, self.log = index, share, script, log

    async def start(self) -> None:
        self.log.append(("start", self.index))

    async def run_partition(self, part: Partition, source: str) -> Any:
        from asyncgen.engine.stats import Statistics
        from asyncgen.scale import PartResult, WorkerLost

        await asyncio.sleep(0.01)
        fate = self.script.get(part.name, [])
        what = fate.pop(0) if fate else "ok"
        self.log.append((what, self.index, part.name, self.share.concurrency))
        if what == "die":
            raise WorkerLost("killed")
        if what == "busy":
            return PartResult(part.name, busy=True)
        stats = Statistics(
            succeeded=3,
            elapsed=0.01,
            succeeded_total=3,
            failed_total=0,
            bad_lines_total=0,
            input_fraction=1.0,
            finished=True,
            stopped=False,
        )
        return PartResult(part.name, stats=stats)

    def set_share(self, share: Any) -> None:
        self.share = share

    def statistics(self) -> Any:
        return None

    def stop(self, now: bool) -> None:
        pass

    async def close(self) -> None:
        self.log.append(("close", self.index))


async def _coordinate(tmp_path: Path, script: dict[str, list[str]], workers: int) -> Any:
    from asyncgen.job.config import JobConfig
    from asyncgen.scale import Coordinator

    for k in range(4):
        write_shard(tmp_path / f"s{k}.jsonl", personas(3))
    config = JobConfig(
        inputs=[str(tmp_path / "s*.jsonl")], output=str(tmp_path / "out"), concurrency=100
    )
    log: list[Any] = []
    job = Coordinator(
        config,
        workers=workers,
        spawn=lambda i, share: _FakeWorker(i, share, script, log),
    )
    job.BUSY_WAIT = 0.01
    async with job:
        stats = await job.run()
    return stats, log


async def test_a_lost_partition_goes_to_a_new_worker_and_busy_ones_are_tried_again(
    tmp_path: Path,
) -> None:
    stats, log = await _coordinate(tmp_path, {"p000002": ["die", "busy"]}, workers=2)
    assert stats.finished and stats.succeeded == 12 and stats.succeeded_total == 12
    ran = [e for e in log if e[0] in ("ok", "die", "busy")]
    assert sorted(e[2] for e in ran if e[0] == "ok") == ["p000001", "p000002", "p000003", "p000004"]
    assert [e[0] for e in ran if e[2] == "p000002"] == ["die", "busy", "ok"]
    assert sum(e[0] == "start" for e in log) == 3  # two workers and one replacement
    # While both run, each has half the job's concurrency.
    assert all(e[3] == 50 for e in ran[:2])


async def test_a_crash_loop_stops_the_job(tmp_path: Path) -> None:
    from asyncgen.core.errors import AsyncgenError

    with pytest.raises(AsyncgenError, match="died 11 times"):
        await _coordinate(tmp_path, {"p000001": ["die"] * 20}, workers=1)


@pytest.mark.slow
async def test_ray_workers_stopped_at_once_leave_a_job_that_resumes_exactly(
    tmp_path: Path, ray_cluster: Any
) -> None:
    from asyncgen.scale import workers_job

    with mock_process("--latency", "0.05", "--seed", "2") as url:
        config = _ray_job(tmp_path, url)
        async with workers_job(config) as job:
            run = asyncio.create_task(job.run())
            for _ in range(600):  # until some of the job is done (60 s at most)
                if run.done() or await asyncio.to_thread(server_requests, url) >= 300:
                    break
                await asyncio.sleep(0.1)
            job.stop(now=True)  # as a second Ctrl-C: the running calls are cancelled
            stats = await run
        assert not stats.finished and stats.stopped
        done = read_output(tmp_path / "out")["results"]
        assert 0 < len(done) < N and len({r["custom_id"] for r in done}) == len(done)
        async with workers_job(config) as again:
            stats = await again.run()
        assert stats.finished
        assert len(assert_exactly_once(tmp_path / "out", _expected())["results"]) == N
