"""The Batch API backend against the mock's /v1/files and /v1/batches on loopback, the openai
SDK as the client: the whole lifecycle, kill -9 at each phase then rerun, failed and expired
batches, [output] checks, the ``batches`` command."""

from __future__ import annotations

import asyncio
import base64
import struct
import sys
from pathlib import Path

import msgspec
import pytest

from asyncgen.engine.batch import job_batches
from asyncgen.mock.embeddings import embed_text
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


async def start_until(args: list[str], *needles: str) -> tuple[asyncio.subprocess.Process, str]:
    """``asyncgen ARGS`` started, and what it printed until every one of ``needles`` was
    in it (each a line such as ``p00001: in_progress``: a batch being polled)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "asyncgen",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=clean_env(),
    )
    assert proc.stdout is not None
    seen = ""
    while not all(needle in seen for needle in needles):
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, seen
        seen += line.decode()
    return proc, seen


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
    """Killed (-9) once both batches are being polled (a crash point in the first poll
    could come before the second batch existed), then cancelled: the rerun sends both
    parts again."""
    n = 300
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=5.0)) as server:
        args = batch_run(server.base_url, inp, out, max_requests=150)
        proc, seen = await start_until(args, "p00001: in_progress", "p00002: in_progress")
        proc.kill()
        assert await proc.wait() == -9, seen
        cancelled = await job_batches(out, api_key=None, cancel=True)
        assert {b.status for b in cancelled} == {"cancelled"}
        assert len(cancelled) == 2
        server.config.batch_delay = 0.5  # the retry parts'
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
        # Killed half-way through an output file, the export is still the server's lines:
        # for a retried id, the line of the batch it succeeded in (the later one).
        mine = [b for b, m in server.batches.created if "asyncgen_part" in m]
        expected = await server_lines(server.base_url, mine)
        dest = tmp_path / "export.jsonl"
        code, text = await run_cli("export", str(out), "--to", str(dest), "--format", "batch")
        assert code == 0, text
        exported = dest.read_bytes().splitlines()
        assert len(exported) == n
        assert set(exported) == {expected[i] for i in ids}


async def server_lines(base_url: str, batch_ids: list[str]) -> dict[str, bytes]:
    """Every line of the batches' output and error files as the server wrote them, by
    custom_id (a later batch's line for an id replaces an earlier one's), read back with
    the openai SDK."""
    import openai

    lines: dict[str, bytes] = {}
    async with openai.AsyncOpenAI(base_url=base_url, api_key="none") as client:
        for batch_id in batch_ids:
            batch = await client.batches.retrieve(batch_id)
            for file_id in (batch.output_file_id, batch.error_file_id):
                if file_id:
                    content = await client.files.content(file_id)
                    for raw in content.content.splitlines():
                        lines[msgspec.json.decode(raw)["custom_id"]] = raw
    return lines


def keys_in_order(value: object) -> object:
    """The keys of every object in ``value``, nested, in their order."""
    if isinstance(value, dict):
        return [(k, keys_in_order(v)) for k, v in value.items()]
    if isinstance(value, list):
        return [keys_in_order(v) for v in value]
    return None


async def test_export_gives_back_the_servers_output_and_error_lines(tmp_path: Path) -> None:
    """``export --format batch --failures`` of a batch job: each success's and each
    answered failure's line is the server's own line, byte for byte (its ``id``,
    ``request_id``, status and body); a failure no line explains (an expired request's is
    in the error file, a failed batch's is not) gets OpenAI's error shape."""
    import json

    n = 300
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    config = MockConfig(batch_delay=0.0, batch_error=0.2, batch_fail=1, seed=5)
    async with MockServer(config) as server:
        args = batch_run(server.base_url, inp, out, "--max-attempts", "1", max_requests=100)
        code, text = await run_cli(*args)
        assert code == 1, text
        created = [b for b, _ in server.batches.created]
        assert len(created) == 3
        expected = await server_lines(server.base_url, created)
        dest = tmp_path / "export.jsonl"
        code, text = await run_cli(
            "export", str(out), "--to", str(dest), "--format", "batch", "--failures"
        )
        assert code == 0, text
    exported = dest.read_bytes().splitlines()
    assert len(exported) == n
    by_id = {msgspec.json.decode(raw)["custom_id"]: raw for raw in exported}
    assert len(by_id) == n
    # 100 items were in the batch that failed (no line at all); the others have one each,
    # a 200 in the output file or a 500 in the error file.
    assert len(expected) == 200
    statuses = {json.loads(raw)["response"]["status_code"] for raw in expected.values()}
    assert statuses == {200, 500}
    for custom_id, raw in expected.items():
        mine = by_id[custom_id]
        assert json.loads(mine) == json.loads(raw)
        assert keys_in_order(json.loads(mine)) == keys_in_order(json.loads(raw))
        assert mine == raw, custom_id
    unexplained = [json.loads(by_id[i]) for i in set(by_id) - set(expected)]
    assert len(unexplained) == 100
    for line in unexplained:
        assert list(line) == ["id", "custom_id", "response", "error"]
        assert line["response"] is None
        assert list(line["error"]) == ["code", "message"]
        assert line["error"]["code"] == "batch_failed"


def batch_lines(ids: list[str]) -> list[dict[str, object]]:
    return [
        {
            "custom_id": i,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": "mock-model", "messages": [{"role": "user", "content": i}]},
        }
        for i in ids
    ]


async def test_a_custom_id_given_twice_is_a_bad_line_sent_once(tmp_path: Path) -> None:
    inp = write_shard(tmp_path / "lines.jsonl", batch_lines(["a", "b", "a", "c", "b"]))
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=0.0)) as server:
        args = batch_run(server.base_url, inp, out)
        args[args.index("-p") : args.index("-p") + 2] = []  # batch lines: no template
        code, text = await run_cli(*args)
        assert code == 1, text  # bad lines
        assert dict(server.batches.submitted) == {"a": 1, "b": 1, "c": 1}
        found = assert_exactly_once(out, {"a", "b", "c", "lines:3", "lines:5"})
        assert sorted(r["custom_id"] for r in found["results"]) == ["a", "b", "c"]
        errors = {e["source"]["line"]: e["error"] for e in found["errors"]}
        assert errors == {
            3: {
                "code": "duplicate_custom_id",
                "message": "custom_id 'a' appears twice",
                "status": None,
                "reason": "duplicate_custom_id",
            },
            5: {
                "code": "duplicate_custom_id",
                "message": "custom_id 'b' appears twice",
                "status": None,
                "reason": "duplicate_custom_id",
            },
        }
        code, text = await run_cli(*args)  # the rerun records nothing more, sends nothing
        assert code == 1, text
        assert len(server.batches.created) == 1
        assert_exactly_once(out, {"a", "b", "c", "lines:3", "lines:5"})


@pytest.mark.parametrize("gone_every_time", [False, True])
async def test_an_output_file_gone_at_the_server(tmp_path: Path, gone_every_time: bool) -> None:
    """A 404 on ``files.content`` (OpenAI deletes outputs after 30 days): the batch's
    requests count as missing, so they go again in a retry part; a file gone in every
    round leaves failures that say why, after ``--max-attempts`` rounds."""
    n = 50
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=0.0)) as server:
        api = server.batches
        deleted: list[str] = []

        async def forget(point: str, ident: str) -> None:
            if point == "content" and (gone_every_time or not deleted):
                assert api.delete_file(ident)
                deleted.append(ident)

        api.hook = forget
        args = batch_run(server.base_url, inp, out, "--max-attempts", "2")
        code, text = await run_cli(*args)
        assert f"file {deleted[0]} of batch" in text and "is gone at the server (404)" in text
        parts = [m["asyncgen_part"] for _, m in api.created]
        assert parts == ["p00001", "p00001-r1"]
        found = assert_exactly_once(out, expected_ids(n))
        if gone_every_time:
            assert code == 1, text
            assert len(deleted) == 2
            assert not found["results"]
            error = found["failures"][0]["error"]
            assert error["code"] == "batch_file_gone"
            assert error["message"].startswith("gave up after 2 batch rounds: file ")
        else:
            assert code == 0, text
            assert {r["attempts"] for r in found["results"]} == {2}


async def test_odd_output_lines_are_named_and_commit_nothing(tmp_path: Path) -> None:
    """An output file with a line that is not JSON (in place of an item's line), a line for
    an id the part does not have, and an item's line twice: each is warned about by file
    and line, the stranger and the repeat commit nothing, and the item whose line was
    spoilt is missing, so it goes again."""
    n = 20
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=0.0)) as server:
        api = server.batches
        spoilt: list[str] = []

        async def spoil(point: str, ident: str) -> None:
            if point == "content" and not spoilt:
                lines = api.file_content(ident).splitlines()
                spoilt.append(msgspec.json.decode(lines[0])["custom_id"])
                stranger = lines[1].replace(b'"custom_id":"in:2:', b'"custom_id":"elsewhere:2:')
                odd = [b"{not json", *lines[1:], stranger, lines[2]]
                api.replace_content(ident, b"\n".join(odd) + b"\n")

        api.hook = spoil
        code, text = await run_cli(*batch_run(server.base_url, inp, out))
        assert code == 0, text
        assert "line 1 is not a batch output line" in text
        assert f"line {n + 1} is for custom_id 'elsewhere:2:persona:0', not in the part" in text
        assert f"line {n + 2} repeats custom_id 'in:3:persona:0'" in text
        assert "1 not a batch output line, 1 for an id not in the part, 1 repeating an id" in text
        found = assert_exactly_once(out, expected_ids(n))
        assert len(found["results"]) == n
        assert [m["asyncgen_part"] for _, m in api.created] == ["p00001", "p00001-r1"]
        again = [r["custom_id"] for r in found["results"] if r["attempts"] == 2]
        assert again == spoilt
        assert api.submitted[spoilt[0]] == 2


async def test_several_base_urls_are_refused(tmp_path: Path) -> None:
    inp = write_shard(tmp_path / "in.jsonl", personas(5))
    async with MockServer(MockConfig()) as a, MockServer(MockConfig()) as b:
        args = batch_run(a.base_url, inp, tmp_path / "out", "--base-url", b.base_url)
        code, text = await run_cli(*args)
        assert code == 2, text
        assert "give one --base-url, not 2" in text
        assert not a.batches.created and not b.batches.created
        assert not a.batches.uploads and not b.batches.uploads


async def test_ctrl_c_while_polling_exits_130_and_the_rerun_creates_nothing(
    tmp_path: Path,
) -> None:
    """SIGINT while both batches are being polled: the wait between looks (10 s here) is
    cut short, the run exits 130, and the rerun polls the same two batches to the end
    (the mock's log: two uploads, two creates in all)."""
    import signal
    import time

    n = 200
    inp = write_shard(tmp_path / "in.jsonl", personas(n))
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=2.0)) as server:
        api = server.batches
        args = batch_run(server.base_url, inp, out, max_requests=100)
        slow = list(args)
        slow[slow.index("--batch-poll") + 1] = "10"
        proc, seen = await start_until(slow, "p00001: in_progress", "p00002: in_progress")
        assert proc.stdout is not None
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = (await asyncio.wait_for(proc.stdout.read(), 30)).decode()
        code = await proc.wait()
        assert code == 130, seen + rest
        assert time.monotonic() - sent < 5, "the wait between looks was not cut short"
        assert "rerun the same command to pick up the batches" in rest
        assert len(api.created) == 2 and api.uploads == 2
        assert not read_output(out)["results"]

        code, text = await run_cli(*args)
        assert code == 0, text
        assert len(api.created) == 2 and api.uploads == 2
        assert max(api.submitted.values()) == 1
        found = assert_exactly_once(out, expected_ids(n))
        assert len(found["results"]) == n


async def test_a_truncated_input_is_recorded_and_the_next_one_is_sent(tmp_path: Path) -> None:
    """As online: the lines before the damage are sent, the file is an error record
    (``{shard}:file``, ``corrupt_input``) and the other inputs go on."""
    good = write_shard(tmp_path / "good.jsonl.zst", personas(30))
    broken = write_shard(tmp_path / "broken.jsonl.zst", personas(20000, "b"))
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=0.0)) as server:
        args = batch_run(server.base_url, broken, out, max_requests=20000)
        args[args.index(str(broken)) + 1 : args.index(str(broken)) + 1] = ["-i", str(good)]
        code, text = await run_cli(*args)
        assert code == 1, text
        assert "input not read to the end" in text and "broken" in text
        found = read_output(out)
        (err,) = found["errors"]
        assert err["custom_id"] == "broken:file" and err["error"]["code"] == "corrupt_input"
        read = err["source"]["line"]
        assert 0 < read < 20000
        assert_exactly_once(
            out, expected_ids(30, "good") | expected_ids(read, "broken") | {"broken:file"}
        )
        code, text = await run_cli(*args)  # the rerun records it once, sends nothing
        assert code == 1, text
        assert len(read_output(out)["errors"]) == 1
        assert len(server.batches.created) == 1


async def test_an_embedding_job_through_batches_gives_the_online_vectors(tmp_path: Path) -> None:
    """An embeddings template with ``--backend batch``: the part goes as a
    ``/v1/embeddings`` batch; killed half-way through ingesting its output, the rerun
    commits every id once, creates no batch again, and each record holds the vector the
    online path gives for the same text (the same float32 bytes)."""
    import openai

    from asyncgen import Engine, JobConfig

    n = 2500  # one part; the ingest commits 1 024 lines at a time, so the kill is half-way
    texts = [f"a cartographer number {i} who collects maps of lost rivers" for i in range(n)]
    inp = write_shard(tmp_path / "in.jsonl", [{"persona": t} for t in texts])
    prompt = tmp_path / "emb.toml"
    prompt.write_text('endpoint = "embeddings"\nuser = "{persona}"\n[sampling]\ndimensions = 48\n')
    out, online = tmp_path / "out", tmp_path / "online"
    ids = {f"in:{i + 1}:emb:0" for i in range(n)}
    async with MockServer(MockConfig(batch_delay=0.05)) as server:
        args = batch_run(server.base_url, inp, out, "-p", str(prompt), max_requests=n)
        env = clean_env(ASYNCGEN_BATCH_CRASH=f"ingest:{tmp_path / 'ingest'}")
        code, text = await run_cli(*args, env=env)
        assert code == -9, text
        assert 0 < len(read_output(out)["results"]) < n
        code, text = await run_cli(*args)
        assert code == 0, text
        created = [b for b, _ in server.batches.created]
        assert len(created) == 1 and max(server.batches.submitted.values()) == 1
        assert server.statistics().by_route.get("/v1/embeddings", 0) == 0  # all by batch
        async with openai.AsyncOpenAI(base_url=server.base_url, api_key="none") as client:
            assert (await client.batches.retrieve(created[0])).endpoint == "/v1/embeddings"

        config = JobConfig(
            inputs=[str(inp)],
            output=str(online),
            prompt=str(prompt),
            model="mock-model",
            base_url=server.base_url,
            flush_interval=0.05,
        )
        async with Engine(config) as engine:
            stats = await engine.run()
        assert stats.succeeded == n
    by_batch = {r["custom_id"]: r for r in assert_exactly_once(out, ids)["results"]}
    by_online = {r["custom_id"]: r for r in assert_exactly_once(online, ids)["results"]}
    assert len(by_batch) == n
    for custom_id, record in by_batch.items():
        twin = by_online[custom_id]
        assert record["embedding"] == twin["embedding"], custom_id
        assert record["batch_id"] == created[0] and twin["batch_id"] is None
        assert record["output"] is None and record["error"] is None
        assert record["sampling"] == twin["sampling"]
        assert record["usage"]["prompt_tokens"] == twin["usage"]["prompt_tokens"] > 0
    vector = struct.unpack("<48f", base64.b64decode(by_batch["in:7:emb:0"]["embedding"]))
    assert all(abs(x - y) < 1e-6 for x, y in zip(vector, embed_text(texts[6], 48), strict=True))


async def test_a_batch_embedding_line_without_a_good_vector_is_a_failure(tmp_path: Path) -> None:
    """The ingest reads an embeddings line as the online path reads a reply: a body with
    no vectors, or a vector that is not float32s, is a ``malformed_response`` failure (a
    200 the server will not answer otherwise: not sent again); the other lines succeed."""
    n = 6
    inp = write_shard(
        tmp_path / "in.jsonl", [{"persona": f"a potter number {i}"} for i in range(n)]
    )
    prompt = tmp_path / "emb.toml"
    prompt.write_text('endpoint = "embeddings"\nuser = "{persona}"\n')
    out = tmp_path / "out"
    async with MockServer(MockConfig(batch_delay=0.0)) as server:
        api = server.batches

        async def spoil(point: str, ident: str) -> None:
            if point != "content" or api.file_content(ident).count(b"\n") != n:
                return
            lines = [msgspec.json.decode(raw) for raw in api.file_content(ident).splitlines()]
            lines[0]["response"]["body"]["data"] = []
            lines[1]["response"]["body"]["data"][0]["embedding"] = "bm90IGZsb2F0cw=="
            api.replace_content(ident, b"".join(msgspec.json.encode(x) + b"\n" for x in lines))

        api.hook = spoil
        code, text = await run_cli(*batch_run(server.base_url, inp, out, "-p", str(prompt)))
        assert code == 1, text  # the job finished with failures
        assert "4 succeeded, 2 failed" in text and len(api.created) == 1
    found = assert_exactly_once(out, {f"in:{i + 1}:emb:0" for i in range(n)})
    failed = {r["custom_id"]: r["error"] for r in found["failures"]}
    assert set(failed) == {"in:1:emb:0", "in:2:emb:0"}
    assert failed["in:1:emb:0"]["message"] == "200 with no vectors"
    assert "not float32s" in failed["in:2:emb:0"]["message"]
    assert {e["code"] for e in failed.values()} == {"malformed_response"}
    assert len(found["results"]) == n - 2
    assert all(len(base64.b64decode(r["embedding"])) == 256 * 4 for r in found["results"])
