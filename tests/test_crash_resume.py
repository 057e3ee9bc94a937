"""Kill the CLI with SIGKILL at random instants, rerun it until it finishes, and check that
every item is there exactly once, every file decodes, and a finished rerun sends nothing."""

from __future__ import annotations

import base64
import contextlib
import json
import random
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from asyncgen.mock.embeddings import embed_text

from .conftest import assert_exactly_once, clean_env, personas, read_output, write_shard
from .s3_standin import put, s3_standin

pytestmark = pytest.mark.slow


FAULTS = [
    "--latency",
    "0.02",
    "--latency-jitter",
    "0.02",
    "--fail-500",
    "0.02",
    "--fail-429",
    "0.02",
    "--retry-after",
    "0.05",
    "--malformed",
    "0.01",
]


@contextlib.contextmanager
def mock_process(*args: str) -> Iterator[str]:
    """The mock server in its own process, so it outlives the clients we kill."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncgen", "mock-server", "--port", "0", *args],
        stdout=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "listening on" in line, line
        yield line.split()[-1]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def server_url() -> Iterator[str]:
    with mock_process(*FAULTS, "--seed", "5") as url:
        yield url


def server_requests(base_url: str) -> int:
    url = base_url.removesuffix("/v1") + "/mock/stats"
    with urllib.request.urlopen(url, timeout=5) as resp:
        return int(json.load(resp)["requests"])


def run_cli(
    args: list[str], *, kill_after: float | None = None, env: dict[str, str] | None = None
) -> tuple[int, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncgen", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env or clean_env(),
    )
    try:
        _, err = proc.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    return proc.returncode, err


@pytest.mark.parametrize(
    "mode",
    [
        "plain",
        "stream-two-endpoints",
        "gzip-and-parquet",
        "remote-gzip-and-parquet",
        "s3-zst-and-parquet",
        "embeddings",
        "embeddings-batched",
    ],
)
def test_sigkill_at_random_points_then_resume(tmp_path: Path, server_url: str, mode: str) -> None:
    with contextlib.ExitStack() as stack:
        urls = [server_url]
        extra: list[str] = []
        if mode.startswith("s3"):
            # Moto's S3 server mode stands in for S3; the shards are read through s3fs,
            # named by a glob pattern over the bucket.
            s3 = stack.enter_context(s3_standin())
            kill_and_resume(tmp_path, urls, extra, kinds=("jsonl.zst", "parquet"), s3=s3)
            return
        if mode.endswith("gzip-and-parquet"):
            remote = mode.startswith("remote")  # file:// URLs, read through fsspec
            kill_and_resume(tmp_path, urls, extra, kinds=("jsonl.gz", "parquet"), remote=remote)
            return
        if mode.startswith("embeddings"):
            if mode == "embeddings-batched":
                # 16 texts a request, from a server whose replies leave one out now and then;
                # 0.3 s a reply keeps the ~250 requests at about 5 s of work, like the others
                # (at the faults' 0.02 s the job could end before the kills landed).
                partial = ["--embed-partial", "0.1", "--seed", "7", "--latency", "0.3"]
                urls = [stack.enter_context(mock_process(*FAULTS, *partial))]
                extra = ["--embed-batch", "16"]
            kill_and_resume(tmp_path, urls, extra, prompt="embed")
            found = read_output(tmp_path / "out")
            assert all(len(base64.b64decode(r["embedding"])) == 256 * 4 for r in found["results"])
            for r in random.Random(1).sample(found["results"], 200):  # each text its vector
                vector = struct.unpack("<256f", base64.b64decode(r["embedding"]))
                expected = embed_text(r["persona"])
                assert all(abs(x - y) < 1e-6 for x, y in zip(vector, expected, strict=True))
            return
        if mode != "plain":
            # A second replica that cuts 5 % of streams; the job streams from both.
            cuts = ["--stream-cut", "0.05", "--stream-comments", "--token-latency", "0.0005"]
            urls.append(stack.enter_context(mock_process(*FAULTS, *cuts, "--seed", "6")))
            extra = ["--stream", "--base-url", urls[1]]
        kill_and_resume(tmp_path, urls, extra)


def kill_and_resume(
    tmp_path: Path,
    urls: list[str],
    extra: list[str],
    kinds: tuple[str, str] = ("jsonl.zst", "jsonl.zst"),
    *,
    remote: bool = False,
    s3: tuple[str, dict[str, str]] | None = None,
    prompt: str = "math",
) -> None:
    server_url = urls[0]
    n = 4000
    shards = [
        write_shard(tmp_path / f"personas-{k}.{kind}", personas(n // 2, f"s{k}"))
        for k, kind in enumerate(kinds)
    ]
    inputs = [s.as_uri() for s in shards] if remote else [str(tmp_path / "personas-*")]
    env = None
    if s3 is not None:
        endpoint, env = s3
        put(endpoint, "inputs")
        for shard in shards:
            put(endpoint, f"inputs/shards/{shard.name}", shard.read_bytes())
        inputs = ["s3://inputs/shards/personas-*"]
    out = tmp_path / "out"
    args = [
        "--input",
        *inputs,
        "--prompt",
        prompt,
        "--model",
        "mock-model",
        "--output",
        str(out),
        "--base-url",
        server_url,
        "--concurrency",
        "16",
        "--max-attempts",
        "20",
        "--quiet",
        *extra,
    ]
    seed = int(time.time())
    rng = random.Random(seed)
    kills = 0
    # ~5 s of work at this concurrency; six kills land within the first second of each run
    # (start-up, intake, sending or committing), then the job is allowed to finish.
    for _ in range(40):
        kill_after = rng.uniform(0.4, 1.5) if kills < 6 else None
        code, err = run_cli(args, kill_after=kill_after, env=env)
        if code == -signal.SIGKILL:
            kills += 1
            continue
        assert code == 0, err
        break
    else:
        pytest.fail("the job never finished")
    assert kills >= 3, f"the job finished before it could be killed often enough (seed {seed})"
    expected = {
        f"personas-{k}:{i}:{prompt}:0" for k in range(len(shards)) for i in range(1, n // 2 + 1)
    }
    found = assert_exactly_once(out, expected)
    assert len(found["results"]) == n
    # A finished job: the rerun sends zero requests and says so.
    before = [server_requests(url) for url in urls]
    code, err = run_cli(args, env=env)
    assert code == 0, err
    assert "nothing to do" in err and "0 requests" in err
    assert [server_requests(url) for url in urls] == before


def test_sigterm_stops_gracefully_and_resumes(tmp_path: Path, server_url: str) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(3000))
    out = tmp_path / "out"
    args = [
        "--input",
        str(shard),
        "--prompt",
        "reasoning",
        "--model",
        "mock-model",
        "--output",
        str(out),
        "--base-url",
        server_url,
        "--concurrency",
        "16",
        "--progress-interval",
        "0.2",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncgen", "run", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    deadline = time.monotonic() + 30  # a loaded machine may take seconds to start it
    while server_requests(server_url) < 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "SIGTERM" in err and "stopped early" in err
    assert "done " in err, "plain periodic progress lines when stderr is not a terminal"
    code, err = run_cli(args)
    assert code == 0, err
    assert_exactly_once(out, {f"p:{i}:reasoning:0" for i in range(1, 3001)})
