"""A job's output directory as users see it afterwards: provenance in every record, the
manifest, ``asyncgen status``, ``asyncgen export`` and ``asyncgen retry-failed``."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zstandard

from asyncgen import Engine, JobConfig
from asyncgen.cli.jobtools import retry_config
from asyncgen.cli.main import main
from asyncgen.core.ledger import Redo
from asyncgen.job.prompts import load_template
from asyncgen.mock.server import MockConfig, MockServer
from asyncgen.storage import export as export_module
from asyncgen.storage.export import export
from asyncgen.storage.status import status
from asyncgen.storage.view import standing_failures

from .conftest import (
    assert_exactly_once,
    assert_logically_once,
    clean_env,
    personas,
    write_shard,
)
from .test_crash_resume import mock_process, server_requests

FAST = {"backoff_base": 0.01, "backoff_cap": 0.02, "flush_interval": 0.05}


def ids(n: int, shard: str = "p") -> set[str]:
    return {f"{shard}:{i}:math:0" for i in range(1, n + 1)}


async def run_job(tmp_path: Path, url: str, n: int, **kw: Any) -> JobConfig:
    shard = tmp_path / "p.jsonl"
    if not shard.exists():
        write_shard(shard, personas(n))
    settings: dict[str, Any] = {
        "inputs": [str(shard)],
        "output": str(tmp_path / "out"),
        "prompt": "math",
        "model": "mock-model",
        "base_url": url,
        "concurrency": 16,
        "max_attempts": 1,
        **FAST,
    }
    settings.update(kw)
    config = JobConfig(**settings)
    async with Engine(config, rng=random.Random(0)) as engine:
        await engine.run()
    return config


async def test_every_record_carries_its_provenance(tmp_path: Path) -> None:
    async with MockServer(MockConfig(fail_500=0.3, seed=2)) as server:
        await run_job(tmp_path, server.base_url, 60, extra_body={"temperature": 0.5})
    found = assert_exactly_once(tmp_path / "out", ids(60))
    assert found["results"] and found["failures"]
    digest = load_template("math").digest[:16]
    for r in found["results"] + found["failures"]:
        assert r["endpoint"] == server.base_url
        assert r["persona_sha256"] == hashlib.sha256(r["persona"].encode()).hexdigest()[:16]
        assert r["template_sha256"] == digest and r["template"] == "math"
        assert r["sampling"]["temperature"] == 0.5 and "messages" not in r["sampling"]
        assert r["started"] <= r["created"] and r["attempts"] == 1
        assert r["model"] == "mock-model" and r["replaces_failure"] is False
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["asyncgen"] and manifest["spec"]["template"]["sha256"].startswith(digest)
    job = manifest["job"]
    assert job["inputs"] == [str((tmp_path / "p.jsonl").resolve())]
    assert job["base_url"] == [server.base_url] and job["template_endpoint"] == "chat"


async def test_no_credentials_in_manifest_or_records(tmp_path: Path) -> None:
    async with MockServer() as server:  # takes (and ignores) the Basic credentials
        url = server.base_url.replace("http://", "http://user:sk-secret-123@")
        await run_job(tmp_path, url, 5)
    out = tmp_path / "out"
    assert_exactly_once(out, ids(5))
    for path in out.iterdir():
        data = path.read_bytes()
        if path.name.endswith(".zst"):
            data = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
        assert b"sk-secret-123" not in data, path
    with pytest.raises(Exception, match="credentials"):
        retry_config(out)


async def test_retry_failed_replaces_failures_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with MockServer(MockConfig(fail_500=0.5, seed=4)) as server:
        await run_job(tmp_path, server.base_url, 200)
    failed = set(standing_failures(out))
    assert 50 < len(failed) < 150
    async with MockServer(MockConfig(seed=5)) as healthy:
        config = retry_config(out, base_url=healthy.base_url)
        assert config.inputs == [str((tmp_path / "p.jsonl").resolve())]
        redo = Redo((i, "p", int(i.split(":")[1])) for i in failed)
        async with Engine(config, redo=redo) as engine:
            stats = await engine.run()
        sent = healthy.statistics().requests
    assert sent == len(failed), "only the failures are sent again"
    assert stats.succeeded == len(failed) and stats.skipped == 200 - len(failed)
    assert stats.succeeded_total == 200 and stats.failed_total == 0
    current = assert_logically_once(out, ids(200))
    assert all(r["error"] is None for r in current.values())
    assert all(current[i]["replaces_failure"] for i in failed)
    assert standing_failures(out) == {}
    s = status(out)
    assert (s.succeeded, s.failed) == (200, 0)
    # Reopened, the store counts the superseded failures again: the job is complete.
    async with MockServer() as again:
        config = retry_config(out, base_url=again.base_url)
        async with Engine(config) as engine:
            stats = await engine.run()
        assert again.statistics().requests == 0
    assert (stats.succeeded_total, stats.failed_total, stats.skipped) == (200, 0, 200)


def _old_manifest(out: Path, inputs: list[str], url: str) -> None:
    """Replace the manifest of ``out`` with the one asyncgen 0.1 (commit f5fa499) wrote for
    the same job: its layout and settings as they were, written as that version wrote them."""
    new = json.loads((out / "manifest.json").read_text())
    job = {
        "backoff_base": 0.01,
        "backoff_cap": 0.02,
        "base_url": [url],
        "check_endpoint": True,
        "concurrency": 16,
        "deadline": 3600.0,
        "drain_timeout": 30.0,
        "extra_body": {},
        "flush_interval": 0.05,
        "flush_records": 1024,
        "idle_timeout": 60.0,
        "inputs": [str(Path(p).resolve()) for p in inputs],
        "max_attempts": 1,
        "max_invalid": 3,
        "max_tokens": None,
        "min_concurrency": 1,
        "model": "mock-model",
        "output": str(out.resolve()),
        "persona_field": "persona",
        "prompt": "math",
        "rpm": None,
        "samples": 1,
        "stream": False,
        "strict": False,
        "template_endpoint": "chat",
        "timeout": 600.0,
        "tpm": None,
    }
    old = {"format": 1, "asyncgen": "0.1.0", "fingerprint": new["fingerprint"], "job": job}
    with open(out / "manifest.json", "w", encoding="utf-8") as f:
        json.dump({**old, "spec": new["spec"]}, f, indent=2, sort_keys=True)
        f.write("\n")


async def test_previous_versions_output_reports_retries_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with MockServer(MockConfig(fail_500=0.5, seed=4)) as server:
        config = await run_job(tmp_path, server.base_url, 40)
    failed = set(standing_failures(out))
    assert failed
    _old_manifest(out, config.inputs, server.base_url)
    s = status(out)
    assert (s.succeeded, s.failed, s.model, s.template) == (
        40 - len(failed),
        len(failed),
        "mock-model",
        "math",
    )
    async with MockServer(MockConfig(seed=5)) as healthy:
        config = retry_config(out, base_url=healthy.base_url)
        assert config.concurrency == 16 and config.max_attempts == 1
        redo = Redo((i, "p", int(i.split(":")[1])) for i in failed)
        async with Engine(config, redo=redo) as engine:
            stats = await engine.run()
        assert healthy.statistics().requests == len(failed)
    assert stats.succeeded_total == 40 and status(out).failed == 0
    assert_logically_once(out, ids(40))
    async with MockServer() as again:
        await run_job(tmp_path, again.base_url, 40)
        assert again.statistics().requests == 0


async def test_failing_again_keeps_one_standing_failure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with MockServer(MockConfig(fail_500=1.0)) as broken:
        await run_job(tmp_path, broken.base_url, 30)
        for _ in range(2):
            code = await _retry_cli(out, broken.base_url)
            assert code == 1
    current = assert_logically_once(out, ids(30))
    assert all(r["error"]["code"] == "http_500" for r in current.values())
    s = status(out)
    assert (s.succeeded, s.failed, s.failed_by_reason) == (0, 30, {"http_500": 30})
    # 30 originals and 2 x 30 replacements on disk, 30 standing.
    assert sum(1 for _ in _lines(out, "failures")) == 90


async def _retry_cli(out: Path, url: str, *extra: str) -> int:
    """``asyncgen retry-failed`` in a subprocess (the CLI owns signals and its loop) while
    this loop serves the in-process mock."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "asyncgen", "retry-failed", str(out), "--base-url", url, "-q", *extra),
        env=clean_env(),
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    assert proc.returncode in (0, 1), err.decode()
    return proc.returncode


def _lines(out: Path, kind: str) -> list[bytes]:
    lines: list[bytes] = []
    for path in sorted(out.glob(f"{kind}-*.jsonl.zst")):
        data = zstandard.ZstdDecompressor().stream_reader(
            path.read_bytes(), read_across_frames=True
        )
        lines += data.read().splitlines()
    return lines


async def test_retry_only_the_reasons_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with MockServer(MockConfig(fail_500=0.3, malformed=0.3, seed=7)) as server:
        await run_job(tmp_path, server.base_url, 100)
    by_reason = status(out).failed_by_reason
    assert set(by_reason) == {"http_500", "malformed_response"}, by_reason
    async with MockServer() as healthy:
        assert await _retry_cli(out, healthy.base_url, "--reason", "http_500") == 0
        assert healthy.statistics().requests == by_reason["http_500"]
    assert status(out).failed_by_reason == {"malformed_response": by_reason["malformed_response"]}
    assert_logically_once(out, ids(100))


def test_retry_failed_with_nothing_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert main(["status", str(out)]) == 2
    assert "not an asyncgen output directory" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_during_retry_failed_then_rerun(tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard = write_shard(tmp_path / "p.jsonl.zst", personas(1500))
    base = ["--input", str(shard), "-p", "math", "-m", "mock-model", "-o", str(out), "-q"]
    with mock_process("--fail-500", "0.6", "--seed", "3") as bad:
        code = subprocess.run(
            [
                sys.executable,
                "-m",
                "asyncgen",
                "run",
                *base,
                "--base-url",
                bad,
                "--max-attempts",
                "1",
            ],
            env=clean_env(),
            capture_output=True,
            timeout=120,
        ).returncode
        assert code == 1
    failed = set(standing_failures(out))
    assert len(failed) > 700
    retry = [sys.executable, "-m", "asyncgen", "retry-failed", str(out), "-q", "--concurrency", "8"]
    rng = random.Random(11)
    with mock_process("--latency", "0.02", "--fail-500", "0.2", "--seed", "9") as flaky:
        kills = 0
        for _ in range(20):
            proc = subprocess.Popen(
                [*retry, "--base-url", flaky, "--max-attempts", "1"],
                env=clean_env(),
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                _, err = proc.communicate(timeout=rng.uniform(0.8, 1.6) if kills < 3 else 120)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.communicate(timeout=30)
                kills += 1
                continue
            if proc.returncode == 0:
                break
            assert proc.returncode == 1, err  # some failed again: retry those once more
        else:
            pytest.fail("retry-failed never got every item through")
        assert kills == 3
        current = assert_logically_once(out, ids(1500))
        assert all(r["error"] is None for r in current.values())
        before = server_requests(flaky)
        done = subprocess.run(
            [*retry, "--base-url", flaky], env=clean_env(), capture_output=True, text=True
        )
        assert done.returncode == 0 and "nothing to retry" in done.stderr
        assert server_requests(flaky) == before


async def test_export_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    async with MockServer(MockConfig(fail_500=0.4, seed=8)) as server:
        await run_job(tmp_path, server.base_url, 50)
    found = assert_exactly_once(out, ids(50))
    n_ok, n_failed = len(found["results"]), len(found["failures"])
    # jsonl: the stored lines, unchanged.
    plain = tmp_path / "all.jsonl"
    assert export(out, plain, "jsonl", failures=True) == 50
    assert sorted(plain.read_bytes().splitlines()) == sorted(
        _lines(out, "results") + _lines(out, "failures")
    )
    zst = tmp_path / "ok.jsonl.zst"
    assert main(["export", str(out), "--to", str(zst)]) == 0
    data = zstandard.ZstdDecompressor().stream_reader(zst.read_bytes()).read()
    assert sorted(data.splitlines()) == sorted(_lines(out, "results"))
    # OpenAI Batch output lines.
    batch = tmp_path / "batch.jsonl"
    assert export(out, batch, "batch", failures=True) == 50
    lines = [json.loads(x) for x in batch.read_text().splitlines()]
    assert all(x["error"] is None for x in lines), "the server answered every one"
    ok = [x for x in lines if x["response"]["status_code"] == 200]
    assert len(ok) == n_ok and len(lines) - len(ok) == n_failed
    by_id = {r["custom_id"]: r for r in found["results"]}
    for x in ok:
        body = x["response"]["body"]
        assert x["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == by_id[x["custom_id"]]["output"]
        assert (
            body["usage"]["completion_tokens"]
            == by_id[x["custom_id"]]["usage"]["completion_tokens"]
        )
    # An error status is a response, as in OpenAI's output files.
    failed = [x["response"] for x in lines if x["response"]["status_code"] != 200]
    assert failed and all(
        r["status_code"] == 500 and r["body"]["error"]["code"] == "http_500" for r in failed
    )
    # Parquet, in batches smaller than the data: a column all null in the first batch
    # (error_code, before the first failure) must take values in later ones.
    pq = pytest.importorskip("pyarrow.parquet")
    monkeypatch.setattr(export_module, "_PARQUET_BATCH", 3)
    everything = tmp_path / "all.parquet"
    assert export(out, everything, "parquet", failures=True) == 50
    codes = pq.read_table(everything).column("error_code").to_pylist()
    assert codes[:n_ok] == [None] * n_ok and codes[n_ok:] == ["http_500"] * n_failed
    export_to = tmp_path / "r.parquet"
    assert export(out, export_to, "parquet") == n_ok
    table = pq.read_table(export_to)
    assert table.num_rows == n_ok
    rows = table.to_pylist()
    assert {r["custom_id"] for r in rows} == set(by_id)
    first = rows[0]
    assert first["output"] == by_id[first["custom_id"]]["output"]
    assert json.loads(first["sampling"]) == by_id[first["custom_id"]]["sampling"]


def test_status_json_and_cost(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    async def make() -> None:
        async with MockServer() as server:
            await run_job(tmp_path, server.base_url, 20)

    asyncio.run(make())
    out = tmp_path / "out"
    assert main(["status", str(out), "--json", "--price-input", "1", "--price-output", "2"]) == 0
    report = msgspec.json.decode(capsys.readouterr().out)
    assert report["succeeded"] == 20 and report["failed"] == 0 and not report["running"]
    expected = (report["prompt_tokens"] * 1 + report["completion_tokens"] * 2) / 1e6
    assert report["cost"] == pytest.approx(expected) and report["cost"] > 0
    assert main(["status", str(out)]) == 0
    text = capsys.readouterr().out
    assert "succeeded      20" in text and "cost estimate" not in text
    # A fraction of a cent is shown as such, not as $0.00 (and --price-in spells it too).
    assert main(["status", str(out), "--price-in", "1", "--price-out", "2"]) == 0
    text = capsys.readouterr().out
    assert f"cost estimate  ${expected:.4g}\n" in text and "$0.00\n" not in text


def test_status_throughput_leaves_out_pauses_between_runs(tmp_path: Path) -> None:
    """A retry run a day later must not spread the job's successes over the whole day."""
    from asyncgen.core.records import Result, Source
    from asyncgen.storage.store import Store

    def made(i: int, started: float) -> Result:
        return Result(
            custom_id=f"s:{i}:math:0",
            error=None,
            output="x",
            finish_reason="stop",
            model="m",
            template="math",
            persona="p",
            source=Source("s", i),
            attempts=1,
            latency_s=0.5,
            created=started + 0.5,
            started=started,
        )

    t0 = 1_764_000_000.0
    store = Store.open(tmp_path / "out", {"model": "m"}, version="test")
    try:
        # 100 successes over 10.4 s, then 50 over 5.4 s a day later (two commits each).
        for batch in (range(1, 51), range(51, 101)):
            store.ledger.commit(store.commit([made(i, t0 + (i - 1) * 0.1) for i in batch]))
        later = t0 + 86_400
        store.ledger.commit(
            store.commit([made(i, later + (i - 101) * 0.1) for i in range(101, 151)])
        )
    finally:
        store.close()
    report = status(tmp_path / "out")
    assert report.succeeded == 150
    assert report.active_seconds == pytest.approx(10.4 + 5.4)
    assert report.items_per_second == pytest.approx(150 / 15.8)
    assert report.last_finished - report.first_started > 86_400  # the span itself is kept


def test_a_retry_keeps_the_endpoints_own_limits_unless_it_names_other_endpoints(
    tmp_path: Path,
) -> None:
    from asyncgen.core.limits import EndpointLimits
    from asyncgen.job.config import JobConfig, job_record
    from asyncgen.storage.manifest import write_manifest

    urls = ["http://a:1/v1", "http://b:1/v1"]
    limits = [EndpointLimits(rpm=60.0, concurrency=4), None]
    cfg = JobConfig(inputs=["x.jsonl"], output=str(tmp_path), base_url=urls, endpoint_limits=limits)
    record = job_record(cfg, [tmp_path / "x.jsonl"], None)
    write_manifest(tmp_path, {"model": None}, version="t", job=record)
    kept = retry_config(tmp_path)
    assert kept.base_urls == urls and kept.endpoint_limits == limits
    kept.validate()
    other = retry_config(tmp_path, base_url="http://c:1/v1")
    assert other.base_urls == ["http://c:1/v1"] and other.endpoint_limits == []
    other.validate()
