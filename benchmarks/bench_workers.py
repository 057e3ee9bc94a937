"""Throughput of ``asyncgen run --workers N`` for N = 1, 2, 4, and the scaling efficiency
rate(N) / (N x rate(1)), in two regimes:

* ``latency`` — the server takes 1 s per reply and every worker keeps 4 000 requests in
  flight (``--concurrency`` 4 000 x N): the rate is bounded by what is in flight, so workers
  should add up while the machine has CPU to spare;
* ``cpu`` — replies at once, 256 in flight per worker: the client's CPU (and the mock's, on
  the same machine) bounds the rate.

The mock servers run in their own processes (``--mocks``, default 2, each one endpoint of the
job), unpinned, like the workers: on a 2-core machine everything shares the two cores, so the
figures are the machine's, recorded with its core count. The steady rate is taken from the
mocks' own counts between 10 % and 90 % of the items (start-up, the spawning of the workers
included, and the tail left out); CPU seconds are the whole job's (coordinator and workers,
from ``wait4``), so ``items per CPU-second`` at N = 1 is one worker's event-loop limit.
Every run's output is checked: every id exactly once.

Usage::

    python benchmarks/bench_workers.py --json /tmp/bench_workers.json
    python benchmarks/bench_workers.py --regime latency --workers 1 2 --items 40000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_flow
from bench_flow import Job, Mock, expected_ids, make_shards, mocks, verify

# The other benchmarks pin the mock to one core and the client to the other; here the
# workers are the point, so nothing is pinned.
bench_flow.pinned = lambda cpu, argv: argv

REGIMES: dict[str, dict[str, Any]] = {
    "latency": {"mock": ["--latency", "1.0"], "per_worker": 4000, "items": 60_000},
    "cpu": {"mock": [], "per_worker": 256, "items": 40_000},
}


def _counts(servers: list[Mock]) -> int | None:
    """Replies the mocks gave so far (None: a mock too busy to answer in time)."""
    try:
        return sum(int(m.stats()["by_outcome"].get("ok", 0)) for m in servers)
    except OSError:
        return None


def run_one(
    work: Path,
    regime: str,
    workers: int,
    items: int,
    n_mocks: int,
    per_worker: int | None,
    fixed: bool,
) -> dict[str, Any]:
    spec = REGIMES[regime]
    in_flight = per_worker or spec["per_worker"]
    inputs = make_shards(work / f"{regime}-{workers}-in", items, shards=8)
    out = work / f"{regime}-{workers}-out"
    extra = [
        "--max-tokens",  # (after Job's own, so this one holds)
        "64",
        "--concurrency",
        str(in_flight * workers),
        *(["--min-concurrency", str(in_flight * workers)] if fixed else []),
        "--workers",
        str(workers),
    ]
    with mocks(*(Mock(spec["mock"]) for _ in range(n_mocks))) as servers:
        job = Job(inputs, out, [m.url for m in servers], extra)
        marks: dict[float, tuple[float, int]] = {}
        while (result := job.poll()) is None:
            done = _counts(servers)
            for share in (0.1, 0.9):
                if done is not None and share not in marks and done >= share * items:
                    marks[share] = (time.monotonic(), done)
            time.sleep(0.1)
        server_cpu = sum(m.cpu_s() or 0.0 for m in servers)
    code, wall, cpu, text = result.exit_code, result.wall_s, result.cpu_s, result.summary
    check = verify(out, expected_ids(inputs))
    steady = None
    if 0.1 in marks and 0.9 in marks and marks[0.9][0] > marks[0.1][0]:
        steady = (marks[0.9][1] - marks[0.1][1]) / (marks[0.9][0] - marks[0.1][0])
    found = re.search(r"([\d.]+) items/s", text)
    return {
        "regime": regime,
        "workers": workers,
        "in_flight_per_worker": in_flight,
        "items": items,
        "exit": code,
        "wall_s": round(wall, 2),
        "items_per_s_whole": float(found.group(1)) if found else None,
        "items_per_s_steady": None if steady is None else round(steady, 1),
        "client_cpu_s": round(cpu, 2),
        "server_cpu_s": round(server_cpu, 2),
        "fixed_window": fixed,
        "load_avg_1m": os.getloadavg()[0],
        "items_per_cpu_s": round(items / cpu, 1) if cpu else None,
        "exactly_once": check["exactly_once"],
        "stderr_tail": text.splitlines()[-3:],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regime", choices=list(REGIMES), action="append")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--items", type=int, help="items per run (default: the regime's)")
    parser.add_argument("--mocks", type=int, default=2, help="mock server processes")
    parser.add_argument(
        "--per-worker", type=int, help="requests in flight per worker (default: the regime's)"
    )
    parser.add_argument(
        "--fixed",
        action="store_true",
        help="fixed windows (--min-concurrency = --concurrency): what is in flight stays "
        "put however the latency moves on a loaded machine",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for regime in args.regime or list(REGIMES):
            items = args.items or REGIMES[regime]["items"]
            base = None
            for n in args.workers:
                row = run_one(Path(tmp), regime, n, items, args.mocks, args.per_worker, args.fixed)
                rate = row["items_per_s_steady"]
                if n == 1:
                    base = rate
                row["efficiency"] = (
                    round(rate / (n * base), 3) if rate and base and n != 1 else None
                )
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}))
    report = {"cores": os.cpu_count(), "mocks": args.mocks, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\n{'regime':8} {'N':>2} {'steady/s':>9} {'whole/s':>8} {'eff':>6} "
        f"{'cpu s':>7} {'items/cpu-s':>11} {'mock cpu':>8} {'load':>5} once"
    )
    for r in rows:
        print(
            f"{r['regime']:8} {r['workers']:>2} {r['items_per_s_steady'] or '-':>9} "
            f"{r['items_per_s_whole'] or '-':>8} {r['efficiency'] or '-':>6} "
            f"{r['client_cpu_s']:>7} {r['items_per_cpu_s'] or '-':>11} "
            f"{r['server_cpu_s']:>8} {r['load_avg_1m']:>5.1f} {r['exactly_once']}"
        )


if __name__ == "__main__":
    main()
