"""TOML job files: what they set, what the command line overrides, the errors, --print-config,
and a job run from one against loopback servers with a key each."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from asyncgen.cli.main import main
from asyncgen.core.errors import ConfigError
from asyncgen.job.jobfile import read_job_file, render_job_file
from asyncgen.mock.server import MockConfig, MockServer

from .conftest import assert_exactly_once, clean_env, personas, write_shard

FULL = """\
inputs = ["a.jsonl", "b/*.jsonl.zst"]
output = "out"
model = "m"
samples = 2
persona_field = "who"
strict = true
stream = true
check_endpoint = false
api_key_env = "MY_KEY"

[sampling]
max_tokens = 64
temperature = 0.5
top_p = 0.9
extra_body = { top_k = 20, stop = ["\\n\\n"], chat_template_kwargs = { enable_thinking = false } }

[limits]
concurrency = 32
min_concurrency = 2
rpm = 600
tpm = 100000
max_attempts = 4
max_invalid = 2
timeout = 30
idle_timeout = 5
deadline = 600
drain_timeout = 3

[log]
format = "json"
level = "warning"

[metrics]
port = 9400
price_in = 0.15
price_out = 0.6

[progress]
interval = 2
quiet = true

[[endpoints]]
base_url = "http://127.0.0.1:8001/v1"
api_key_env = "KEY_ONE"
rpm = 300
concurrency = 8

[[endpoints]]
base_url = "http://127.0.0.1:8002/v1"

[template]
user = "Write about {persona}.\\nBe \\"brief\\"."
system = "You are terse."
[template.sampling]
temperature = 0.1
"""


def test_every_key_is_read(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(FULL)
    job = read_job_file(str(path))
    o = job.options
    assert o["input"] == ["a.jsonl", "b/*.jsonl.zst"]
    assert (o["output"], o["model"], o["samples"], o["persona_field"]) == ("out", "m", 2, "who")
    assert o["strict"] and o["stream"] and o["no_check"]
    assert o["extra_body"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert (o["concurrency"], o["min_concurrency"], o["rpm"], o["drain_timeout"]) == (
        32,
        2,
        600.0,
        3.0,
    )
    assert (o["log_format"], o["log_level"], o["metrics_port"], o["price_out"]) == (
        "json",
        "warning",
        9400,
        0.6,
    )
    assert o["base_url"] == ["http://127.0.0.1:8001/v1", "http://127.0.0.1:8002/v1"]
    assert o["endpoint_key_envs"] == ["KEY_ONE", None]
    assert o["endpoint_limits"] == [{"rpm": 300.0, "concurrency": 8}, None]
    assert o["template"]["user"] == 'Write about {persona}.\nBe "brief".'
    assert o["template"]["sampling"] == {"temperature": 0.1}
    assert len(job.sha256) == 64
    # written back, it reads the same
    again = tmp_path / "again.toml"
    again.write_text(render_job_file(o))
    assert read_job_file(str(again)).options == o


@pytest.mark.parametrize(
    ("text", "where", "key"),
    [
        ('model = "m"\nconcurency = 3\n', ":2:", "'concurency'"),
        ('model = "m"\n\n[limits]\nconcurrency = 3\nrmp = 5\n', ":5:", "'limits.rmp'"),
        ('[[endpoints]]\nbase_url = "http://x/v1"\nkey = "K"\n', ":3:", "'endpoints.key'"),
        ("[sampling]\nmax_tokens = 3\n[lmits]\nrpm = 1\n", ":3:", "'lmits'"),
    ],
)
def test_an_unknown_key_is_named_with_its_line(
    tmp_path: Path, text: str, where: str, key: str
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        read_job_file(str(path))
    message = str(caught.value)
    assert f"{path}{where}" in message and f"unknown key {key}" in message


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('[limits]\nconcurrency = "many"\n', "limits.concurrency must be a whole number"),
        ("samples = 1.5\n", "samples must be a whole number"),
        ("strict = 1\n", "strict must be true or false"),
        ("inputs = [1, 2]\n", "inputs must be a list of strings"),
        ('[[endpoints]]\napi_key_env = "K"\n', "each [[endpoints]] needs a base_url"),
        ("model = \n", "not valid TOML"),
        ('[log]\nformat = "yaml"\n', "log.format must be one of text, json, got 'yaml'"),
        (
            '[[endpoints]]\nbase_url = "http://x/v1"\nconcurrency = 2.5\n',
            "endpoints.concurrency must be a whole number",
        ),
        ('[[endpoints]]\nbase_url = "http://x/v1"\nrpm = "x"\n', "endpoints.rpm must be a number"),
    ],
)
def test_a_wrong_value_is_named(tmp_path: Path, text: str, said: str) -> None:
    path = tmp_path / "job.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as caught:
        read_job_file(str(path))
    assert said in str(caught.value)


def test_print_config_merges_flags_over_the_file_and_round_trips(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.toml"
    path.write_text(FULL)
    assert main(["run", str(path), "--print-config", "--concurrency", "7", "-i", "c.jsonl"]) == 0
    printed = capsys.readouterr().out
    merged = tmp_path / "merged.toml"
    merged.write_text(printed)
    o = read_job_file(str(merged)).options
    assert o["concurrency"] == 7 and o["input"] == ["c.jsonl"]  # the flags win
    assert o["rpm"] == 600.0 and o["template"]["system"] == "You are terse."  # the file stays
    assert o["endpoint_key_envs"] == ["KEY_ONE", None]
    assert o["endpoint_limits"] == [{"rpm": 300.0, "concurrency": 8}, None]
    # the merged job, printed again, is the same text
    assert main(["run", str(merged), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    # --base-url on the command line replaces the file's endpoints (and their key variables)
    assert main(["run", str(path), "--print-config", "--base-url", "http://h:1/v1"]) == 0
    o2 = capsys.readouterr().out
    assert "http://h:1/v1" in o2 and "8001" not in o2 and "KEY_ONE" not in o2
    assert "rpm = 300" not in o2  # (the file's endpoints' own limits went with them)


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "job.toml"
    path.write_text('model = "m"\nprompt = "math"\n')
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(path)])
    assert exit_.value.code == 2
    assert "required: --input, --output" in capsys.readouterr().err
    path.write_text('model = "m"\nprompt = "math"\n[limits]\nconcurency = 3\n')
    assert main(["run", str(path), "-i", "x", "-o", str(tmp_path / "o")]) == 2
    assert f"{path}:4: unknown key 'limits.concurency'" in capsys.readouterr().err
    path.write_text('model = "m"\nprompt = "math"\n[template]\nuser = "{persona}"\n')
    assert main(["run", str(path), "-i", "x", "-o", str(tmp_path / "o")]) == 2
    assert "not both" in capsys.readouterr().err


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncgen", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=120,
    )


async def test_a_job_file_runs_with_a_key_per_endpoint_and_is_recorded(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(30))
    one, two = "sk-one-0123456789abcdef", "sk-two-0123456789abcdef"
    async with (
        MockServer(MockConfig(api_key=one, seed=1)) as a,
        MockServer(MockConfig(api_key=two, seed=2)) as b,
    ):
        job = tmp_path / "job.toml"
        text = f"""\
inputs = ["{shard}"]
output = "{tmp_path / "out"}"
model = "mock-model"

[limits]
concurrency = 8

[[endpoints]]
base_url = "{a.base_url}"
api_key_env = "KEY_A"

[[endpoints]]
base_url = "{b.base_url}"
api_key_env = "KEY_B"

[template]
user = "Tell a story about {{persona}}."
"""
        job.write_text(text)
        env = {"KEY_A": one, "KEY_B": two}
        result = await asyncio.to_thread(_cli, "run", str(job), "-q", env=env)
        assert result.returncode == 0, result.stderr
        # both endpoints answered, each with its own key (the mock refuses any other)
        assert a.statistics().requests > 0 and b.statistics().requests > 0
        ids = {f"p:{i + 1}:inline:0" for i in range(30)}
        assert_exactly_once(tmp_path / "out", ids)
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert manifest["job"]["job_file"] == str(job.resolve())
        import hashlib

        assert manifest["job"]["job_file_sha256"] == hashlib.sha256(job.read_bytes()).hexdigest()
        assert manifest["spec"]["template"]["name"] == "inline"
        # a setting that does not change what results mean: the job resumes (nothing to send)
        job.write_text(text.replace("concurrency = 8", "concurrency = 4"))
        sent = a.statistics().requests + b.statistics().requests
        result = await asyncio.to_thread(_cli, "run", str(job), "-q", env=env)
        assert result.returncode == 0, result.stderr
        assert a.statistics().requests + b.statistics().requests == sent
        manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
        assert manifest["job"]["job_file_sha256"] == hashlib.sha256(job.read_bytes()).hexdigest()
        # a changed template changes the spec: refused as any other job in that directory
        job.write_text(text.replace("Tell a story", "Write a poem"))
        result = await asyncio.to_thread(_cli, "run", str(job), "-q", env=env)
        assert result.returncode == 2
        assert "template" in result.stderr
    assert one not in result.stderr and two not in result.stderr


async def test_each_endpoint_of_a_job_file_gets_its_own_limits(tmp_path: Path) -> None:
    shard = write_shard(tmp_path / "p.jsonl", personas(100))
    # b refuses beyond 10 requests a second and does not say so in headers: only the job's
    # own limit for it (8 a second) keeps it from refusing. a is fast but takes two at once.
    async with (
        MockServer(MockConfig(latency=0.05, seed=1)) as a,
        MockServer(MockConfig(seed=2, rpm_limit=600, ratelimit_headers=False)) as b,
    ):
        job = tmp_path / "job.toml"
        job.write_text(f"""\
inputs = ["{shard}"]
output = "{tmp_path / "out"}"
model = "mock-model"
prompt = "persona"

[limits]
concurrency = 64

[[endpoints]]
base_url = "{a.base_url}"
concurrency = 2

[[endpoints]]
base_url = "{b.base_url}"
rpm = 480
""")
        result = await asyncio.to_thread(_cli, "run", str(job), "-q", env={})
        assert result.returncode == 0, result.stderr
        sa, sb = a.statistics(), b.statistics()
    assert_exactly_once(tmp_path / "out", {f"p:{i + 1}:persona:0" for i in range(100)})
    assert sa.max_running_seen == 2, sa  # never more than its own two at once
    assert sb.rate_limited == 0 and sb.requests >= 8, sb  # paced under its budget
    assert sa.requests + sb.requests == 100


def test_endpoint_limits_are_checked_with_the_job(tmp_path: Path) -> None:
    from asyncgen.core.limits import EndpointLimits
    from asyncgen.job.config import JobConfig

    two = ["http://u:secret-pw@a:1/v1", "http://b:1/v1"]
    cases = [
        ([EndpointLimits(concurrency=300), None], "endpoint 1 (http://***@a:1/v1): concurrency"),
        ([None, EndpointLimits(rpm=0.0)], "endpoint 2 (http://b:1/v1): rpm must be positive"),
        ([None], "1 endpoint limits for 2 base URLs"),
    ]
    for limits, said in cases:
        cfg = JobConfig(inputs=["x"], output="o", base_url=two, endpoint_limits=limits)
        with pytest.raises(ConfigError) as caught:
            cfg.validate()
        assert said in str(caught.value) and "secret-pw" not in str(caught.value)
    cfg = JobConfig(
        inputs=["x"],
        output="o",
        base_url=two,
        min_concurrency=4,
        endpoint_limits=[EndpointLimits(concurrency=2), None],
    )
    with pytest.raises(ConfigError, match="at least min concurrency"):
        cfg.validate()


def test_print_config_shows_no_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "job.toml"
    path.write_text('[[endpoints]]\nbase_url = "http://user:hunter2-secret@h:1/v1"\n')
    assert main(["run", str(path), "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "hunter2-secret" not in printed and "h:1/v1" in printed


def test_every_run_option_has_a_key() -> None:
    from asyncgen.cli.main import build_parser
    from asyncgen.job.jobfile import _SCHEMA

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    run = sub.choices["run"]  # type: ignore[index]
    dests = {a.dest for a in run._actions} - {"help", "job", "print_config"}
    keys = {k.dest for section in _SCHEMA.values() for k in section.values()} | {"base_url"}
    assert dests == keys
