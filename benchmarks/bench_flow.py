"""Flow control end to end: rate budgets, endpoint failover and streaming, against the mock.

The mock server(s) and the job each run in their own subprocess (pinned to different cores
with ``taskset`` when it is available); this script generates the persona shards, starts and
kills the processes, samples the mock's ``GET /mock/stats`` and checks the output directory
at the end of every scenario: every expected ``custom_id`` exactly once, no failures.

Scenarios (``--scenario``, default all):

* ``known``   — the mock enforces an RPM and a TPM budget that bind at about the same rate;
  the job is given the same ``--rpm`` / ``--tpm``. Achieved rates over the steady window as a
  share of each budget, the share of 429s, and the job's CPU time per 1 000 requests.
* ``unknown`` — the same mock, the job without ``--rpm`` / ``--tpm`` (it learns the budgets
  from ``x-ratelimit-*`` headers and 429s); then again with ``--no-ratelimit-headers``.
* ``kill``    — three mocks, three ``--base-url``; one is ``kill -9``-ed after a third of the
  items and restarted on the same port after two thirds; wall time against an undisturbed run.
* ``stream``  — ``--stream`` against a mock that cuts 5 % of its streams part-way: retries
  against cuts, items/s and the recorded time to first token.

Usage::

    python benchmarks/bench_flow.py --json /tmp/bench_flow.json
    python benchmarks/bench_flow.py --scenario known --duration 20   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import msgspec
import zstandard

SCENARIOS = ("known", "unknown", "kill", "stream")
DEFAULT_DURATION = 75.0
"""Seconds of input for the budget scenarios; the item counts of the others scale with it."""
SERVER_CPU, CLIENT_CPU = "0", "1"
MAX_TOKENS = 32
RPM = 6000
PERIOD = 16
"""Persona lengths repeat with this period, so a warm-up of a multiple of it has the mean cost."""

_PHRASE = (
    "who restores clocks and reads about the history of timekeeping in small coastal towns "
    "while keeping bees tending a vegetable garden and writing letters abroad"
)
_WORDS = _PHRASE.split()


# --- processes ----------------------------------------------------------------------------------


def _taskset_works() -> bool:
    if (os.cpu_count() or 1) < 2 or shutil.which("taskset") is None:
        return False
    probe = subprocess.run(["taskset", "-c", CLIENT_CPU, "true"], capture_output=True, check=False)
    return probe.returncode == 0


PIN = _taskset_works()


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if PIN else argv


def asyncgen(*args: str) -> list[str]:
    return [sys.executable, "-m", "asyncgen", *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_json(url: str, *, method: str = "GET", timeout: float = 5.0) -> Any:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


class Mock:
    """``asyncgen mock-server`` in its own process."""

    def __init__(self, flags: Sequence[str], port: int | None = None) -> None:
        self.flags = list(flags)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout: float = 15.0) -> Mock:
        argv = asyncgen("mock-server", "--port", str(self.port), *self.flags)
        deadline = time.monotonic() + timeout
        while True:
            self.proc = subprocess.Popen(
                pinned(SERVER_CPU, argv),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=clean_env(),
            )
            while time.monotonic() < deadline and self.proc.poll() is None:
                with contextlib.suppress(OSError):
                    self.stats()
                    return self
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                self.kill()
                raise RuntimeError(f"mock server on port {self.port} did not start")
            time.sleep(0.2)  # exited early (port not free yet?): try again

    def stats(self) -> dict[str, Any]:
        stats: dict[str, Any] = http_json(f"http://127.0.0.1:{self.port}/mock/stats")
        return stats

    def cpu_s(self) -> float | None:
        """User + system CPU seconds of the server process so far (Linux /proc), else None."""
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.kill()


@contextlib.contextmanager
def mocks(*servers: Mock) -> Iterator[list[Mock]]:
    try:
        for m in servers:
            m.start()
        yield list(servers)
    finally:
        for m in servers:
            m.stop()


@dataclass
class JobResult:
    exit_code: int
    wall_s: float
    cpu_s: float
    summary: str
    retries: int = 0
    requests: int = 0
    throttled: int = 0
    endpoints: list[dict[str, Any]] = field(default_factory=list)


class Job:
    """``asyncgen run`` in its own process; reaped with ``wait4`` for its CPU time."""

    def __init__(self, inputs: list[Path], out: Path, urls: list[str], extra: list[str]) -> None:
        argv = asyncgen(
            "run",
            "-i",
            *map(str, inputs),
            "-p",
            "math",
            "-m",
            "mock-model",
            "--max-tokens",
            str(MAX_TOKENS),
            "-o",
            str(out),
            "--quiet",
            *[a for url in urls for a in ("--base-url", url)],
            *extra,
        )
        self.argv = argv
        self._stderr: TextIO = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in reap()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            pinned(CLIENT_CPU, argv),
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=clean_env(),
        )
        self.result: JobResult | None = None

    def poll(self) -> JobResult | None:
        """The result once the job has exited (reaped here, so its rusage is ours)."""
        if self.result is None:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid == 0:
                return None
            self._finish(status, usage)
        return self.result

    def wait(self, timeout: float) -> JobResult:
        """Wait for the job; after ``timeout`` seconds, SIGTERM it (it drains, exits 130)."""
        deadline = time.monotonic() + timeout
        while (result := self.poll()) is None:
            if time.monotonic() > deadline:
                self.proc.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 60
            time.sleep(0.05)
        return result

    def _finish(self, status: int, usage: Any) -> None:
        wall = time.monotonic() - self.started
        code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code
        self._stderr.seek(0)
        text = self._stderr.read()
        self._stderr.close()
        result = JobResult(code, wall, usage.ru_utime + usage.ru_stime, text.strip())
        if m := re.search(r"([\d,]+) requests \(([\d,]+) retries, ([\d,]+) answered 429\)", text):
            result.requests, result.retries, result.throttled = (
                int(g.replace(",", "")) for g in m.groups()
            )
        for m in re.finditer(
            r"^\s+(http\S+): ([\d,]+) ok, ([\d,]+) 429s, ([\d,]+) errors, ejected (\d+) times",
            text,
            re.M,
        ):
            url, ok, t429, errors, ejections = m.groups()
            result.endpoints.append(
                {
                    "url": url,
                    "ok": int(ok.replace(",", "")),
                    "429s": int(t429.replace(",", "")),
                    "errors": int(errors.replace(",", "")),
                    "ejections": int(ejections),
                }
            )
        self.result = result


# --- input and output ---------------------------------------------------------------------------


def persona(i: int) -> str:
    extra = (i * 7) % PERIOD  # 0..15 more words, so prompts differ in length
    return f"A person number {i} " + " ".join(_WORDS[: 2 + extra])


def make_shards(directory: Path, n: int, shards: int = 4, stem: str = "personas") -> list[Path]:
    """``n`` persona lines spread over ``shards`` .jsonl.zst files (the last one plain)."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    per = -(-n // shards)
    cctx = zstandard.ZstdCompressor(level=3)
    for s in range(shards):
        lines = b"".join(
            msgspec.json.encode({"persona": persona(i)}) + b"\n"
            for i in range(s * per, min(n, (s + 1) * per))
        )
        if s == shards - 1:
            path = directory / f"{stem}-{s:02d}.jsonl"
            path.write_bytes(lines)
        else:
            path = directory / f"{stem}-{s:02d}.jsonl.zst"
            path.write_bytes(cctx.compress(lines))
        paths.append(path)
    return paths


def expected_ids(paths: list[Path]) -> set[str]:
    ids: set[str] = set()
    for path in paths:
        data = path.read_bytes()
        if path.name.endswith(".zst"):
            data = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True).read()
        shard = path.name.split(".")[0]
        ids.update(f"{shard}:{line}:math:0" for line in range(1, len(data.splitlines()) + 1))
    return ids


def read_records(out: Path, kind: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    # A job run by workers (--workers) keeps its records in its partitions' directories.
    for name in [
        *sorted(out.glob(f"{kind}-*.jsonl.zst")),
        *out.glob(f"parts/*/{kind}-*.jsonl.zst"),
    ]:
        with open(name, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
        records.extend(msgspec.json.decode(line) for line in data.splitlines())
    return records


def verify(out: Path, expected: set[str]) -> dict[str, Any]:
    """Every expected id exactly once across results and failures; no failures."""
    results = read_records(out, "results")
    failures = read_records(out, "failures")
    counts = Counter(r["custom_id"] for r in results + failures)
    dupes = sum(1 for n in counts.values() if n > 1)
    missing = len(expected - counts.keys())
    unexpected = len(counts.keys() - expected)
    return {
        "expected": len(expected),
        "results": len(results),
        "failures": len(failures),
        "duplicates": dupes,
        "missing": missing,
        "unexpected": unexpected,
        "exactly_once": dupes == 0 and missing == 0 and unexpected == 0,
        "failure_reasons": dict(Counter(f["error"]["code"] for f in failures)),
        "_results": results,
    }


def public(check: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in check.items() if not k.startswith("_")}


def check_cell(check: dict[str, Any]) -> str:
    ok = check["exactly_once"] and check["failures"] == 0
    text = f"{check['results']:,}/{check['expected']:,}"
    if not ok:
        text += (
            f" FAIL (dup {check['duplicates']}, missing {check['missing']}, "
            f"failures {check['failures']} {check['failure_reasons']})"
        )
    return text


def pct(x: float) -> str:
    return f"{100 * x:.1f} %"


# --- scenarios 1 and 2: rate budgets ------------------------------------------------------------


@dataclass
class Sample:
    t: float
    requests: int
    ok: int
    rate_limited: int
    tokens: int


def sample(mock: Mock, t0: float) -> Sample:
    s = mock.stats()
    return Sample(
        round(time.monotonic() - t0, 3),
        s["requests"],
        s["by_outcome"].get("ok", 0),
        s["rate_limited"],
        s["prompt_tokens"] + s["completion_tokens"],
    )


def run_sampled(
    job: Job, mock: Mock, every: float, timeout: float
) -> tuple[JobResult, list[Sample]]:
    samples = [sample(mock, job.started)]
    deadline = job.started + timeout
    next_at = job.started + every
    while (result := job.poll()) is None:
        if time.monotonic() > deadline:
            job.proc.send_signal(signal.SIGTERM)
            deadline = float("inf")
        time.sleep(max(0.0, min(0.05, next_at - time.monotonic())))
        if time.monotonic() >= next_at:
            samples.append(sample(mock, job.started))
            next_at += every
    samples.append(sample(mock, job.started))
    return result, samples


def window(
    samples: list[Sample], start: float, n: int, per_second: float
) -> tuple[Sample, Sample] | None:
    """From the first sample at ``start`` seconds or later to the last one taken while at
    least one second of budget was still unanswered (the drain of in-flight is left out)."""
    first = next((s for s in samples if s.t >= start), None)
    lasts = [s for s in samples if s.ok <= n - per_second]
    if first is None or not lasts or lasts[-1].t - first.t < 1.0:
        return None
    return first, lasts[-1]


def rates(a: Sample, b: Sample, rpm: float, tpm: float) -> dict[str, float]:
    dt = b.t - a.t
    req_min = (b.ok - a.ok) / dt * 60
    tok_min = (b.tokens - a.tokens) / dt * 60
    sent = b.requests - a.requests
    return {
        "from_s": a.t,
        "to_s": b.t,
        "requests_per_min": round(req_min, 1),
        "tokens_per_min": round(tok_min, 1),
        "rpm_share": round(req_min / rpm, 4),
        "tpm_share": round(tok_min / tpm, 4),
        "window_429_share": round((b.rate_limited - a.rate_limited) / sent, 4) if sent else 0.0,
    }


def per_second_series(samples: list[Sample]) -> list[list[float]]:
    """[t, ok/s, 429/s, tokens/s] between consecutive samples, for the JSON file."""
    series = []
    for a, b in itertools.pairwise(samples):
        dt = b.t - a.t
        if dt > 0:
            series.append(
                [
                    b.t,
                    round((b.ok - a.ok) / dt, 1),
                    round((b.rate_limited - a.rate_limited) / dt, 1),
                    round((b.tokens - a.tokens) / dt),
                ]
            )
    return series


def request_cost(work: Path) -> dict[str, float]:
    """Mean prompt and completion tokens per request of this input, from an unlimited mock;
    and the CPU time of a job that sends next to nothing (start-up and shutdown)."""
    n = PERIOD * 40
    inputs = make_shards(work / "warmup-in", n, shards=1, stem="warmup")
    tiny = make_shards(work / "tiny-in", PERIOD, shards=1, stem="tiny")
    with mocks(Mock(["--latency", "0"])) as (mock,):
        startup = Job(tiny, work / "tiny-out", [mock.url], []).wait(120)
        http_json(f"http://127.0.0.1:{mock.port}/mock/reset", method="POST")
        result = Job(inputs, work / "warmup-out", [mock.url], []).wait(120)
        s = mock.stats()
    if result.exit_code != 0 or startup.exit_code != 0:
        raise RuntimeError(f"warm-up job failed:\n{result.summary}\n{startup.summary}")
    ok = s["by_outcome"].get("ok", 0)
    return {
        "requests": ok,
        "prompt_tokens": s["prompt_tokens"] / ok,
        "completion_tokens": s["completion_tokens"] / ok,
        "tokens": (s["prompt_tokens"] + s["completion_tokens"]) / ok,
        "startup_cpu_s": round(startup.cpu_s, 3),
    }


def budget_run(
    work: Path,
    name: str,
    *,
    rpm: int,
    tpm: int,
    duration: float,
    steady_from: float,
    mock_flags: list[str],
    job_flags: list[str],
    startup_cpu_s: float,
) -> dict[str, Any]:
    n = int(rpm / 60 * duration)
    inputs = make_shards(work / f"{name}-in", n)
    expected = expected_ids(inputs)
    out = work / f"{name}-out"
    flags = ["--rpm-limit", str(rpm), "--tpm-limit", str(tpm), *mock_flags]
    with mocks(Mock(flags)) as (mock,):
        job = Job(inputs, out, [mock.url], job_flags)
        result, samples = run_sampled(job, mock, 1.0, timeout=2 * duration + 60)
        server_cpu = mock.cpu_s()
    check = verify(out, expected)
    last = samples[-1]
    row: dict[str, Any] = {
        "name": name,
        "items": n,
        "mock_flags": flags,
        "job_flags": job_flags,
        "exit_code": result.exit_code,
        "wall_s": round(result.wall_s, 1),
        "cpu_s": round(result.cpu_s, 2),
        "requests": last.requests,
        "rate_limited": last.rate_limited,
        "share_429": round(last.rate_limited / last.requests, 4) if last.requests else 0.0,
        "cpu_ms_per_1000_requests": round(1e6 * result.cpu_s / last.requests, 1)
        if last.requests
        else None,
        "cpu_ms_per_1000_requests_net": round(
            1e6 * (result.cpu_s - startup_cpu_s) / last.requests, 1
        )
        if last.requests
        else None,
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
        "check": public(check),
        "job_summary": result.summary,
        "series": per_second_series(samples),
    }
    steady = window(samples, steady_from, n, rpm / 60)
    row["steady"] = rates(*steady, rpm, tpm) if steady else None
    early = window(samples, 0.0, n, rpm / 60)
    if early is not None and steady is not None:
        row["before_steady"] = rates(early[0], steady[0], rpm, tpm)
    print(json.dumps({k: v for k, v in row.items() if k != "series"}), flush=True)
    return row


def scenario_budgets(work: Path, duration: float, which: list[str]) -> dict[str, Any]:
    cost = request_cost(work)
    tpm = round(RPM * cost["tokens"])
    latency = ["--latency", "0.1", "--latency-jitter", "0.05"]
    report: dict[str, Any] = {"rpm": RPM, "tpm": tpm, "request_cost": cost, "runs": []}
    if "known" in which:
        report["runs"].append(
            budget_run(
                work,
                "known",
                rpm=RPM,
                tpm=tpm,
                duration=duration,
                steady_from=min(10.0, 0.15 * duration),
                mock_flags=latency,
                job_flags=["--rpm", str(RPM), "--tpm", str(tpm)],
                startup_cpu_s=cost["startup_cpu_s"],
            )
        )
    if "unknown" in which:
        for name, extra in (("unknown", []), ("unknown-no-headers", ["--no-ratelimit-headers"])):
            report["runs"].append(
                budget_run(
                    work,
                    name,
                    rpm=RPM,
                    tpm=tpm,
                    duration=duration,
                    steady_from=min(30.0, 0.4 * duration),
                    mock_flags=[*latency, *extra],
                    job_flags=[],
                    startup_cpu_s=cost["startup_cpu_s"],
                )
            )
    return report


def print_budgets(report: dict[str, Any]) -> None:
    cost = report["request_cost"]
    print(
        f"\nBudgets: {report['rpm']:,} RPM and {report['tpm']:,} TPM; a request costs "
        f"{cost['tokens']:.1f} tokens ({cost['prompt_tokens']:.1f} prompt + "
        f"{cost['completion_tokens']:.1f} completion), so both bind at "
        f"{report['rpm'] / 60:.0f} requests/s.\n"
    )
    print(
        "| run | items | steady window | requests/min (% RPM) | tokens/min (% TPM) | "
        "429s, whole run | 429s in window | failed | exit | every item once | wall s | job CPU s | "
        "CPU ms / 1k req (net of start-up) |"
    )
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in report["runs"]:
        s = r["steady"]
        window_429 = "n/a"
        if s is None:
            cells = "n/a | n/a | n/a"
        else:
            cells = (
                f"{s['from_s']:.0f}-{s['to_s']:.0f} s | {s['requests_per_min']:,.0f} "
                f"({pct(s['rpm_share'])}) | {s['tokens_per_min']:,.0f} ({pct(s['tpm_share'])})"
            )
            window_429 = pct(s["window_429_share"])
        print(
            f"| {r['name']} | {r['items']:,} | {cells} | {pct(r['share_429'])} "
            f"({r['rate_limited']:,}/{r['requests']:,}) | {window_429} | "
            f"{r['check']['failures']} | {r['exit_code']} | "
            f"{check_cell(r['check'])} | {r['wall_s']} | {r['cpu_s']} | "
            f"{r['cpu_ms_per_1000_requests']} ({r['cpu_ms_per_1000_requests_net']}) |"
        )
    print(
        f"\nStart-up CPU of a job (16 items): {cost['startup_cpu_s']} s; "
        "mock server CPU per run: "
        + ", ".join(f"{r['name']} {r['server_cpu_s']} s" for r in report["runs"])
    )
    for r in report["runs"]:
        if r.get("before_steady"):
            b = r["before_steady"]
            print(
                f"\n{r['name']}: before the window ({b['from_s']:.0f}-{b['to_s']:.0f} s) "
                f"{pct(b['rpm_share'])} of RPM, {pct(b['tpm_share'])} of TPM, "
                f"{pct(b['window_429_share'])} 429s",
                end="",
            )
    print()


# --- scenario 3: an endpoint killed and restarted -----------------------------------------------


def ok_count(mock: Mock) -> int | None:
    try:
        return int(mock.stats()["by_outcome"].get("ok", 0))
    except OSError:
        return None


def kill_run(
    work: Path, name: str, inputs: list[Path], expected: set[str], *, disturb: bool
) -> dict[str, Any]:
    n = len(expected)
    out = work / f"{name}-out"
    servers = [Mock(["--latency", "0.05"]) for _ in range(3)]
    victim = servers[1]
    events: dict[str, Any] = {}
    with mocks(*servers):
        job = Job(inputs, out, [m.url for m in servers], ["--concurrency", "256"])
        phase = 0 if disturb else 3
        killed_ok = 0
        while (result := job.poll()) is None:
            time.sleep(0.1)
            if phase == 3:
                continue
            if phase == 2:  # restarted: when does it serve its first request?
                if ok_count(victim):
                    events["victim_serving_at_s"] = round(time.monotonic() - job.started, 2)
                    phase = 3
                continue
            live = [ok_count(m) for m in servers if m is not victim or phase == 1]
            done = sum(c or 0 for c in live) + (killed_ok if phase == 1 else 0)
            if phase == 0 and done >= n / 3:
                killed_ok = ok_count(victim) or 0
                events["victim_cpu_s_before_kill"] = victim.cpu_s()
                victim.kill()
                events["killed_at_s"] = round(time.monotonic() - job.started, 2)
                events["done_at_kill"] = done
                events["victim_ok_before_kill"] = killed_ok
                phase = 1
            elif phase == 1 and done >= 2 * n / 3:
                victim.start()
                events["restarted_at_s"] = round(time.monotonic() - job.started, 2)
                events["done_at_restart"] = done
                phase = 2
        stats = []
        for m in servers:
            try:
                stats.append({**m.stats(), "cpu_s": m.cpu_s()})
            except OSError:
                stats.append({"by_outcome": {}, "by_route": {}, "down": True})
    check = verify(out, expected)
    row: dict[str, Any] = {
        "name": name,
        "items": n,
        "exit_code": result.exit_code,
        "wall_s": round(result.wall_s, 2),
        "cpu_s": round(result.cpu_s, 2),
        "requests": result.requests,
        "retries": result.retries,
        "endpoints": result.endpoints,
        "mock_stats": stats,
        "check": public(check),
        "job_summary": result.summary,
        **events,
    }
    if disturb:
        after = stats[1]
        row["victim_after_restart"] = {
            "ok": after["by_outcome"].get("ok", 0),
            "models_probes": after["by_route"].get("/v1/models", 0),
        }
        if "restarted_at_s" in events:
            row["after_restart_s"] = round(result.wall_s - events["restarted_at_s"], 2)
    print(json.dumps(row), flush=True)
    return row


def scenario_kill(work: Path, items: int) -> dict[str, Any]:
    inputs = make_shards(work / "kill-in", items)
    expected = expected_ids(inputs)
    base = kill_run(work, "undisturbed", inputs, expected, disturb=False)
    hit = kill_run(work, "kill-restart", inputs, expected, disturb=True)
    return {"items": items, "runs": [base, hit]}


def print_kill(report: dict[str, Any]) -> None:
    base, hit = report["runs"]
    print(
        "\n| run | items | exit | every item once | wall s | requests | retries | "
        "killed at | restarted at | victim serves again at | victim after restart: ok "
        "(GET /models) | job CPU s | servers CPU s |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---|---|---|---|---:|---:|")
    for r in (base, hit):
        killed = f"{r['killed_at_s']} s ({r['done_at_kill']:,} done)" if "killed_at_s" in r else "-"
        restarted = (
            f"{r['restarted_at_s']} s ({r['done_at_restart']:,} done)"
            if "restarted_at_s" in r
            else "-"
        )
        serving = f"{r['victim_serving_at_s']} s" if "victim_serving_at_s" in r else "-"
        if "restarted_at_s" in r and "victim_serving_at_s" not in r:
            serving = "never"
        victim = r.get("victim_after_restart")
        victim_cell = f"{victim['ok']:,} ({victim['models_probes']})" if victim else "-"
        server_cpu = sum(m.get("cpu_s") or 0.0 for m in r["mock_stats"])
        server_cpu += r.get("victim_cpu_s_before_kill") or 0.0
        print(
            f"| {r['name']} | {r['items']:,} | {r['exit_code']} | {check_cell(r['check'])} | "
            f"{r['wall_s']} | {r['requests']:,} | {r['retries']:,} | {killed} | {restarted} | "
            f"{serving} | {victim_cell} | {r['cpu_s']} | {server_cpu:.1f} |"
        )
    ratio = hit["wall_s"] / base["wall_s"] if base["wall_s"] else float("nan")
    print(f"\nWall time, kill and restart / undisturbed: {ratio:.2f}x")
    for e in hit["endpoints"]:
        print(f"- {e['url']}: {e['ok']:,} ok, {e['errors']:,} errors, ejected {e['ejections']}x")


# --- scenario 4: streaming with cuts ------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def scenario_stream(work: Path, items: int) -> dict[str, Any]:
    latency = 0.02
    flags = [
        "--latency",
        str(latency),
        "--stream-cut",
        "0.05",
        "--token-latency",
        "0.001",
        "--stream-comments",
    ]
    inputs = make_shards(work / "stream-in", items)
    expected = expected_ids(inputs)
    out = work / "stream-out"
    with mocks(Mock(flags)) as (mock,):
        result = Job(inputs, out, [mock.url], ["--stream", "--concurrency", "256"]).wait(600)
        stats = mock.stats()
        server_cpu = mock.cpu_s()
    check = verify(out, expected)
    ttfts = [r["ttft_s"] for r in check["_results"] if r.get("ttft_s") is not None]
    extra_attempts = sum(r["attempts"] - 1 for r in check["_results"])
    outcomes = stats["by_outcome"]
    row: dict[str, Any] = {
        "items": items,
        "mock_flags": flags,
        "exit_code": result.exit_code,
        "wall_s": round(result.wall_s, 2),
        "cpu_s": round(result.cpu_s, 2),
        "server_cpu_s": None if server_cpu is None else round(server_cpu, 2),
        "items_per_s": round(items / result.wall_s, 1),
        "requests": result.requests,
        "retries": result.retries,
        "extra_attempts_in_results": extra_attempts,
        "cuts": outcomes.get("stream_cut", 0),
        "mock_outcomes": outcomes,
        "mock_latency_s": latency,
        "stream_s_min": round(latency + (MAX_TOKENS - 1) * 0.001, 3),
        "ttft_count": len(ttfts),
        "ttft_s": {
            "min": min(ttfts),
            "p50": quantile(ttfts, 0.5),
            "p90": quantile(ttfts, 0.9),
            "p99": quantile(ttfts, 0.99),
            "max": max(ttfts),
            "mean": round(statistics.fmean(ttfts), 4),
        }
        if ttfts
        else None,
        "check": public(check),
        "job_summary": result.summary,
    }
    print(json.dumps(row), flush=True)
    return row


def print_stream(r: dict[str, Any]) -> None:
    t = r["ttft_s"] or {}
    print(
        "\n| items | exit | every item once | wall s | items/s | cuts | retries | "
        "TTFT min / p50 / p90 / p99 s | mock latency s | job CPU s | mock CPU s |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---:|")
    print(
        f"| {r['items']:,} | {r['exit_code']} | {check_cell(r['check'])} | {r['wall_s']} | "
        f"{r['items_per_s']:,} | {r['cuts']:,} | {r['retries']:,} | "
        f"{t.get('min')} / {t.get('p50')} / {t.get('p90')} / {t.get('p99')} | "
        f"{r['mock_latency_s']} | {r['cpu_s']} | {r['server_cpu_s']} |"
    )


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        help="seconds of input for the budget scenarios (default %(default)s); the item "
        "counts of the kill and stream scenarios scale with it (60 000 and 20 000 at 75)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(tempfile.gettempdir()) / "asyncgen-bench" / "bench_flow.json",
        help="where to write the results as JSON (default: %(default)s)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    scale = args.duration / DEFAULT_DURATION
    work = Path(tempfile.mkdtemp(prefix="asyncgen-bench-flow-"))
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "pinned": PIN,
        "duration": args.duration,
    }
    started = time.monotonic()
    try:
        budget_scenarios = [s for s in args.scenario if s in ("known", "unknown")]
        if budget_scenarios:
            report["budgets"] = scenario_budgets(work, args.duration, budget_scenarios)
        if "kill" in args.scenario:
            report["kill"] = scenario_kill(work, max(3000, round(60_000 * scale)))
        if "stream" in args.scenario:
            report["stream"] = scenario_stream(work, max(1000, round(20_000 * scale)))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report["total_s"] = round(time.monotonic() - started, 1)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    if "budgets" in report:
        print("\n### Rate budgets")
        print_budgets(report["budgets"])
    if "kill" in report:
        print("\n### Endpoint killed and restarted")
        print_kill(report["kill"])
    if "stream" in report:
        print("\n### Streaming with cuts")
        print_stream(report["stream"])
    print(f"\n{report['total_s']} s in all; JSON in {args.json}")


if __name__ == "__main__":
    main()
