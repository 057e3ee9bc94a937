"""Flow control against servers that refuse: a hiccup, a spent budget, a used-up quota, a
server that sheds load. Each scenario runs the mock and the job in their own processes (as
``bench_flow.py`` does, whose helpers this uses) and checks the output directory: every id
exactly once, no failures.

Scenarios (``--scenario``, default all):

* ``sporadic`` — the mock refuses a share of requests at random, whatever the load (429 and
  503, half each, both with ``Retry-After: 1``), 30 ms latency. ``asyncgen run`` at
  ``--concurrency 200`` against the same server without refusals (the error-free rate) and
  with 5, 15 and 30 % refused; the openai SDK (``AsyncOpenAI``, its own retries honouring
  ``retry-after-ms``, 200 requests in flight) at the same shares. Targets: asyncgen's items/s
  at least the SDK's, and at least 70 % of (1 - share) x the error-free rate. Rates are given
  over the whole run and *steady* (until 95 % of the items were done): an item refused k
  times in a row waits k Retry-Afters whatever the client does, and in a run of seconds that
  tail weighs what it never would in a job of hours.
* ``quota`` — every request answered ``429 insufficient_quota``: exit status, seconds to exit,
  requests the server saw (targets: 2, under 30 s, under 50) and whether stderr names it.
* ``overload`` — a server with 64 running slots and 16 waiting that sheds the rest with bare
  503s at once, 0.2 s per reply: the adaptive window (``--concurrency 1024``) against fixed
  concurrencies (``--min-concurrency`` = ``--concurrency``). Target: within 10 % of the best.
* ``queueing`` — a server with 64 running slots that queues the rest without refusing (as
  vLLM does past its batch capacity), 1 s per reply: the adaptive window from
  ``--concurrency 1024`` against fixed 64 and 1024. Targets: items/s within 10 % of fixed 64,
  and a median latency over the second half of the items (by start) at most twice fixed
  64's (fixed 1024 queues ~16 s per item).
* ``upfront`` — the mock's TPM budget charges ``max_tokens`` in full as requests arrive (as
  OpenAI's does), the job told the budget: the share of requests refused (target < 1 %).

Usage::

    python benchmarks/bench_refusals.py --json /tmp/bench_refusals.json
    python benchmarks/bench_refusals.py --scenario sporadic --items 5000   # smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_flow import (  # the sibling script is the library here
    MAX_TOKENS,
    Job,
    Mock,
    check_cell,
    expected_ids,
    make_shards,
    mocks,
    public,
    verify,
)

SCENARIOS = ("sporadic", "quota", "overload", "queueing", "upfront")
SHARES = (0.05, 0.15, 0.30)
CONCURRENCY = 200


def _refusing(share: float) -> list[str]:
    flags = ["--latency", "0.03", "--seed", "5"]
    if share:
        flags += [
            *("--fail-429", str(share / 2), "--fail-503", str(share / 2)),
            *("--503-retry-after", "--retry-after", "1"),
        ]
    return flags


def _asyncgen_rate(work: Path, name: str, items: int, mock_flags: list[str]) -> dict[str, Any]:
    inputs = make_shards(work / f"{name}-in", items)
    out = work / f"{name}-out"
    with mocks(Mock(mock_flags)) as (mock,):
        result = Job(inputs, out, [mock.url], ["--concurrency", str(CONCURRENCY)]).wait(600)
        served = mock.stats()
    check = verify(out, expected_ids(inputs))
    return {
        "client": "asyncgen",
        "items": items,
        "exit_code": result.exit_code,
        "wall_s": round(result.wall_s, 2),
        "items_per_s": round(items / result.wall_s, 1),
        "steady_items_per_s": _steady_of(check["_results"]),
        "cpu_s": round(result.cpu_s, 2),
        "server_requests": served["requests"],
        "server_outcomes": served["by_outcome"],
        "check": public(check),
        "ok": check["exactly_once"] and check["failures"] == 0,
    }


def _steady(done: list[float]) -> float:
    """Items per second until 95 % of them were done: the rate of a long job, without the
    tail of the last items, refused several times in a row, each time waiting a Retry-After
    whatever the client does."""
    if not done:
        return 0.0
    k = max(1, int(0.95 * len(done)))
    return round(k / done[k - 1], 1) if done[k - 1] > 0 else 0.0


def _steady_of(records: list[dict[str, Any]]) -> float:
    """:func:`_steady` of a job's results, from their ``started`` and ``created`` stamps."""
    start = min((r["started"] for r in records), default=0.0)
    return _steady(sorted(r["created"] - start for r in records))


async def _sdk_items(url: str, items: int) -> tuple[float, int, list[float]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=50)
    slots = asyncio.Semaphore(CONCURRENCY)
    failed = 0
    done: list[float] = []

    async def one(i: int) -> None:
        nonlocal failed
        async with slots:
            try:
                await client.chat.completions.create(
                    model="mock-model",
                    messages=[{"role": "user", "content": f"As person {i}, write a problem."}],
                    max_tokens=MAX_TOKENS,
                )
            except openai.APIError:
                failed += 1
            done.append(time.monotonic() - started)

    started = time.monotonic()
    async with client:
        await asyncio.gather(*(one(i) for i in range(items)))
    return time.monotonic() - started, failed, sorted(done)


def _sdk_rate(items: int, mock_flags: list[str]) -> dict[str, Any]:
    with mocks(Mock(mock_flags)) as (mock,):
        wall, failed, done = asyncio.run(_sdk_items(mock.url, items))
        served = mock.stats()
    return {
        "client": "openai-sdk",
        "items": items,
        "failed": failed,
        "wall_s": round(wall, 2),
        "items_per_s": round(items / wall, 1),
        "steady_items_per_s": _steady(done),
        "server_requests": served["requests"],
    }


def scenario_sporadic(work: Path, items: int, sdk_items: int) -> dict[str, Any]:
    free = _asyncgen_rate(work, "free", items, _refusing(0.0))
    print(json.dumps({"share": 0.0, **free}), flush=True)
    rows = []
    for share in SHARES:
        ours = _asyncgen_rate(work, f"sporadic-{share}", items, _refusing(share))
        sdk = _sdk_rate(sdk_items, _refusing(share))
        floor = 0.7 * (1 - share) * free["steady_items_per_s"]
        row = {
            "share": share,
            "asyncgen": ours,
            "sdk": sdk,
            "vs_sdk": round(ours["items_per_s"] / sdk["items_per_s"], 2),
            "vs_sdk_steady": round(ours["steady_items_per_s"] / sdk["steady_items_per_s"], 2),
            "vs_error_free": round(ours["items_per_s"] / ((1 - share) * free["items_per_s"]), 3),
            "vs_error_free_steady": round(
                ours["steady_items_per_s"] / ((1 - share) * free["steady_items_per_s"]), 3
            ),
            "target_steady_items_per_s": round(floor, 1),
            "met": ours["ok"]
            and ours["items_per_s"] >= sdk["items_per_s"]
            and ours["steady_items_per_s"] >= floor,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"error_free": free, "runs": rows}


def scenario_quota(work: Path) -> dict[str, Any]:
    inputs = make_shards(work / "quota-in", 5_000)
    with mocks(Mock(["--quota-exhausted"])) as (mock,):
        result = Job(inputs, work / "quota-out", [mock.url], ["--concurrency", "256"]).wait(120)
        served = mock.stats()["requests"]
    row = {
        "exit_code": result.exit_code,
        "wall_s": round(result.wall_s, 2),
        "server_requests": served,
        "named_on_stderr": "insufficient_quota" in result.summary,
        "stderr": result.summary[-400:],
    }
    row["met"] = (
        row["exit_code"] == 2 and result.wall_s < 30 and served < 50 and row["named_on_stderr"]
    )
    print(json.dumps(row), flush=True)
    return row


def _window_run(
    work: Path, name: str, items: int, mock_flags: list[str], job_flags: list[str]
) -> dict[str, Any]:
    """One job against a server of limited capacity: rates, what it shed, and the latency
    of the second half of the items by start (an opening burst at the cap says nothing of
    where the window settles)."""
    inputs = make_shards(work / f"{name}-in", items)
    out = work / f"{name}-out"
    with mocks(Mock(mock_flags)) as (mock,):
        result = Job(inputs, out, [mock.url], job_flags).wait(600)
        served = mock.stats()
    check = verify(out, expected_ids(inputs))
    by_start = sorted(check["_results"], key=lambda r: r["started"])
    late = sorted(r["latency_s"] for r in by_start[len(by_start) // 2 :])
    row = {
        "name": name,
        "job_flags": job_flags,
        "exit_code": result.exit_code,
        "items_per_s": round(items / result.wall_s, 1),
        "steady_items_per_s": _steady_of(check["_results"]),
        "shed": served["by_outcome"].get("shed", 0),
        "server_requests": served["requests"],
        "late_latency_p50_s": round(late[len(late) // 2], 3) if late else None,
        "late_latency_p90_s": round(late[int(len(late) * 0.9)], 3) if late else None,
        "check": check_cell(check),
    }
    print(json.dumps(row), flush=True)
    return row


def _overload_run(work: Path, name: str, items: int, job_flags: list[str]) -> dict[str, Any]:
    flags = ["--latency", "0.2", "--max-running", "64", "--max-waiting", "16"]
    return _window_run(work, name, items, flags, job_flags)


def scenario_overload(work: Path, items: int) -> dict[str, Any]:
    fixed = [
        _overload_run(
            work, f"fixed-{c}", items, ["--concurrency", str(c), "--min-concurrency", str(c)]
        )
        for c in (32, 64, 80, 128)
    ]
    adaptive = _overload_run(work, "adaptive", items, ["--concurrency", "1024"])
    best = max(r["items_per_s"] for r in fixed)
    best_steady = max(r["steady_items_per_s"] for r in fixed)
    return {
        "fixed": fixed,
        "adaptive": adaptive,
        "vs_best_fixed": round(adaptive["items_per_s"] / best, 3),
        "vs_best_fixed_steady": round(adaptive["steady_items_per_s"] / best_steady, 3),
        "met": adaptive["items_per_s"] >= 0.9 * best,
    }


def _queueing_run(work: Path, name: str, items: int, job_flags: list[str]) -> dict[str, Any]:
    flags = ["--latency", "1.0", "--max-running", "64"]
    return _window_run(work, name, items, flags, job_flags)


def scenario_queueing(work: Path, items: int) -> dict[str, Any]:
    fixed = {
        c: _queueing_run(
            work, f"queue-fixed-{c}", items, ["--concurrency", str(c), "--min-concurrency", str(c)]
        )
        for c in (64, 1024)
    }
    adaptive = _queueing_run(work, "queue-adaptive", items, ["--concurrency", "1024"])
    ref = fixed[64]
    rate = adaptive["items_per_s"] / ref["items_per_s"]
    slower = adaptive["late_latency_p50_s"] / ref["late_latency_p50_s"]
    return {
        "fixed": list(fixed.values()),
        "adaptive": adaptive,
        "vs_fixed_64": round(rate, 3),
        "latency_vs_fixed_64": round(slower, 2),
        "met": rate >= 0.9 and slower <= 2.0,
    }


def scenario_upfront(work: Path, items: int) -> dict[str, Any]:
    tpm = 60 * 50 * (MAX_TOKENS + 40)  # about 50 requests a second when charged in full
    inputs = make_shards(work / "upfront-in", items)
    out = work / "upfront-out"
    flags = ["--latency", "0.05", "--tpm-limit", str(tpm), "--charge-max-tokens"]
    with mocks(Mock(flags)) as (mock,):
        result = Job(inputs, out, [mock.url], ["--tpm", str(tpm)]).wait(600)
        served = mock.stats()
    refused = served.get("rate_limited", 0)
    row = {
        "tpm": tpm,
        "exit_code": result.exit_code,
        "wall_s": round(result.wall_s, 1),
        "server_requests": served["requests"],
        "refused": refused,
        "share_refused": round(refused / served["requests"], 4) if served["requests"] else 0,
        "check": check_cell(verify(out, expected_ids(inputs))),
    }
    row["met"] = row["share_refused"] < 0.01
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--items", type=int, default=20_000, help="items per asyncgen run")
    parser.add_argument("--sdk-items", type=int, default=3_000, help="items per SDK run")
    parser.add_argument("--json", metavar="PATH", help="write the report here too")
    args = parser.parse_args()
    report: dict[str, Any] = {"created": time.time(), "argv": sys.argv}
    with tempfile.TemporaryDirectory(prefix="bench-refusals-") as tmp:
        work = Path(tmp)
        if "sporadic" in args.scenario:
            report["sporadic"] = scenario_sporadic(work, args.items, args.sdk_items)
        if "quota" in args.scenario:
            report["quota"] = scenario_quota(work)
        if "overload" in args.scenario:
            report["overload"] = scenario_overload(work, max(2_000, args.items // 4))
        if "queueing" in args.scenario:
            report["queueing"] = scenario_queueing(work, max(4_000, args.items // 4))
        if "upfront" in args.scenario:
            report["upfront"] = scenario_upfront(work, max(1_000, args.items // 10))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
