"""The Batch API backend against the mock's /v1/files and /v1/batches on loopback, the openai
SDK as the client: the whole lifecycle, kill -9 at each phase then rerun, failed and expired
batches, [output] checks, the ``batches`` command."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import msgspec
import pytest

from asyncgen.engine.batch import job_batches
from asyncgen.mock.server import MockConfig, MockServer
from asyncgen.storage.status import status

from .conftest import assert_exactly_once, clean_env, personas, read_output, write_shard


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asyncgen",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env or clean_env(),
    )
    out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode()


def batch_run(
    base_url: str, inp: Path, out: Path, *extra: str, max_requests: int = 400
) -> list[str]:
    return [
        "run",
        "-i",
        str(inp),
        "-o",
        str(out),
        "-p",
        "persona",
        "-m",
        "mock-model",
        "--base-url",
        base_url,
        "--backend",
        "batch",
        "--batch-poll",
        "0.05",
        "--batch-max-requests",
        str(max_requests),
        *extra,
    ]


def expected_ids(n: int, shard: str = "in") -> set[str]:
    return {f"{shard}:{i + 1}:persona:0" for i in range(n)}


async def other_jobs_batches(base_url: str, n: int) -> None:
    """``n`` batches of someone else's at the server, made with the openai SDK."""
    import openai

    async with openai.AsyncOpenAI(base_url=base_url, api_key="none") as client:
        line = b'{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{}}\n'
        file = await client.files.create(file=("x.jsonl", line), purpose="batch")
        for _ in range(n):
            await client.batches.create(
                input_file_id=file.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
                metadata={"owner": "someone else"},
            )


async def test_full_lifecycle_and_a_finished_rerun_sends_nothing(tmp_path: Path) -> None:
    inp = write_shard(tmp_path / "in.jsonl", personas(1000))
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=0.2)) as server:
        code, text = await run_cli(*batch_run(server.base_url, inp, out))
        assert code == 0, text
        api = server.batches
        assert len(api.created) == 3  # 1 000 items, 400 a file
        assert max(api.submitted.values()) == 1
        assert "completed, 400/400 done" in text
        found = assert_exactly_once(out, expected_ids(1000))
        assert len(found["results"]) == 1000
        first = found["results"][0]
        assert first["output"] and first["usage"]["completion_tokens"] > 0
        assert first["endpoint"] == server.base_url
        manifest = msgspec.json.decode((out / "manifest.json").read_bytes())
        assert manifest["job"]["backend"] == "batch"
        metadata = {m["asyncgen_part"] for _, m in api.created}
        assert metadata == {"p00001", "p00002", "p00003"}

        routes_before = dict(server.statistics().by_route)
        code, text = await run_cli(*batch_run(server.base_url, inp, out))
        assert code == 0, text
        assert server.statistics().by_route == routes_before  # not even a list
        assert "0 requests sent" in text
        assert_exactly_once(out, expected_ids(1000))

        listed = sorted(await job_batches(out, api_key=None), key=lambda b: b.part)
        assert [b.part for b in listed] == ["p00001", "p00002", "p00003"]
        assert [(b.status, b.completed) for b in listed] == [("completed", 400)] * 2 + [
            ("completed", 200)
        ]
        s = status(out, price_input=2.0, price_output=8.0)
        assert s.batch_prompt_tokens == s.prompt_tokens > 0
        online = (s.prompt_tokens * 2.0 + s.completion_tokens * 8.0) / 1e6
        assert s.cost == pytest.approx(online / 2)


@pytest.mark.slow
async def test_cancelled_batches_are_sent_again_by_the_rerun(tmp_path: Path) -> None:
    n = 300
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    env = clean_env(ASYNCGEN_BATCH_CRASH=f"polling:{tmp_path / 'flag'}")
    async with MockServer(MockConfig(batch_delay=0.5)) as server:
        args = batch_run(server.base_url, inp, out, max_requests=150)
        code, text = await run_cli(*args, env=env)
        assert code == -9, text
        cancelled = await job_batches(out, api_key=None, cancel=True)
        assert {b.status for b in cancelled} == {"cancelled"}
        assert len(cancelled) == 2
        code, text = await run_cli(*args)
        assert code == 0, text
        found = assert_exactly_once(out, expected_ids(n))
        assert {r["attempts"] for r in found["results"]} == {2}
        parts = [m["asyncgen_part"] for _, m in server.batches.created]
        assert sorted(parts) == ["p00001", "p00001-r1", "p00002", "p00002-r1"]


async def test_failed_and_expired_batches_are_resubmitted(tmp_path: Path) -> None:
    n = 300
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    config = MockConfig(batch_delay=0.05, batch_fail=1, batch_expire=1)
    async with MockServer(config) as server:
        code, text = await run_cli(*batch_run(server.base_url, inp, out, max_requests=300))
        assert code == 0, text
        found = assert_exactly_once(out, expected_ids(n))
        assert len(found["results"]) == n
        api = server.batches
        parts = [m["asyncgen_part"] for _, m in api.created]
        # p00001 failed (all 300 again), its retry expired half-way (150 again).
        assert parts == ["p00001", "p00001-r1", "p00001-r2"]
        assert sorted(api.submitted.values()).count(3) == 150
        rounds = sorted(r["attempts"] for r in found["results"])
        assert rounds.count(2) == 150 and rounds.count(3) == 150
        assert "expired" in text


async def test_errors_retried_up_to_the_bound_then_recorded_with_the_reason(
    tmp_path: Path,
) -> None:
    n = 200
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=0.0, batch_error=1.0)) as server:
        code, text = await run_cli(
            *batch_run(server.base_url, inp, out, "--max-attempts", "2"),
        )
        assert code == 1, text
        found = assert_exactly_once(out, expected_ids(n))
        assert len(found["failures"]) == n
        error = found["failures"][0]["error"]
        assert error["status"] == 500
        assert error["message"].startswith("gave up after 2 batch rounds:")
        assert len(server.batches.created) == 2


async def test_invalid_replies_go_again_up_to_max_invalid(tmp_path: Path) -> None:
    template = tmp_path / "qa.toml"
    template.write_text(
        'endpoint = "chat"\nuser = "Question for {persona}"\n'
        '[output]\nformat = "json"\nschema = { question = "str", answer = "str" }\n'
    )
    n = 200
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    async with MockServer(MockConfig(invalid_json=0.3, seed=3)) as server:
        args = batch_run(server.base_url, inp, out, "--max-invalid", "3")
        args[args.index("persona")] = str(template)
        code, text = await run_cli(*args)
        assert code in (0, 1), text
        found = assert_exactly_once(out, {f"in:{i + 1}:qa:0" for i in range(n)})
        assert all(r["parsed"] for r in found["results"])
        assert all(f["error"]["code"] == "invalid_output" for f in found["failures"])
        assert len(found["results"]) > n * 0.9
        assert len(server.batches.created) >= 2


@pytest.mark.slow
async def test_kill_9_after_upload_after_logging_it_and_after_a_retry_part(
    tmp_path: Path,
) -> None:
    """Killed after an upload (not logged: uploaded again), after logging it (not uploaded
    again), and after an expired batch's retry part is written but before the batch is
    logged as ingested (the rerun ingests it again and sends the same retry part once)."""
    n = 300
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=0.05, batch_expire=1)) as server:
        args = batch_run(server.base_url, inp, out, max_requests=300)
        for point in ("uploaded", "journaled", "retried"):
            env = clean_env(ASYNCGEN_BATCH_CRASH=f"{point}:{tmp_path / point}")
            code, text = await run_cli(*args, env=env)
            assert code == -9, f"{point}: {text}"
        assert server.batches.uploads == 2
        code, text = await run_cli(*args)
        assert code == 0, text
        found = assert_exactly_once(out, expected_ids(n))
        assert len(found["results"]) == n
        parts = [m["asyncgen_part"] for _, m in server.batches.created]
        assert parts == ["p00001", "p00001-r1"]


async def test_a_refused_key_is_a_clear_error(tmp_path: Path) -> None:
    inp = write_shard(tmp_path / "in.jsonl", personas(5))
    async with MockServer(MockConfig(api_key="sk-right")) as server:
        env = clean_env(OPENAI_API_KEY="sk-wrong-secret")
        code, text = await run_cli(*batch_run(server.base_url, inp, tmp_path / "out"), env=env)
        assert code == 2, text
        assert "refused the API key" in text
        assert "sk-wrong-secret" not in text


@pytest.mark.slow
async def test_20000_items_killed_at_every_phase_in_turn(tmp_path: Path) -> None:
    """Four files of 5 000; each run is killed at the next phase, resuming from where the
    last one died: right after ``batches.create`` returned (its id not logged: the rerun
    must find the batch in ``batches.list``, past another job's 150 batches), then
    half-way through an output file (1 024 lines are committed at a time; the cancel test
    kills one while polling).
    Then a run finishes, and one more sends nothing."""
    n = 20_000
    inp = write_shard(tmp_path / "in.jsonl.zst", personas(n))
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=0.5, batch_error=0.01, seed=4)) as server:
        args = batch_run(server.base_url, inp, out, max_requests=5000)
        for point in ("created", "ingest"):
            env = clean_env(ASYNCGEN_BATCH_CRASH=f"{point}:{tmp_path / point}")
            code, text = await run_cli(*args, env=env)
            assert code == -9, f"{point}: {text}"
            if point == "created":
                await other_jobs_batches(server.base_url, 150)
            if point == "ingest":
                assert 0 < len(read_output(out)["results"]) < n
        code, text = await run_cli(*args)
        assert code == 0, text
        ids = expected_ids(n)
        found = assert_exactly_once(out, ids)
        assert len(found["results"]) == n  # the 1 % of 500s went again and succeeded
        parts = [m["asyncgen_part"] for _, m in server.batches.created if "asyncgen_part" in m]
        assert sorted(p for p in parts if "-r" not in p) == [f"p0000{i}" for i in range(1, 5)]
        assert len(parts) == len(set(parts)), "a part was sent in two batches"
        first = {i: c for i, c in server.batches.submitted.items() if i in ids}
        retried = {r["custom_id"] for r in found["results"] if r["attempts"] > 1}
        assert {i for i, c in first.items() if c > 1} == retried, "only retries sent twice"
        code, text = await run_cli(*args)
        assert code == 0 and "0 requests sent" in text, text
