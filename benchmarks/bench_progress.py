"""What the progress line and the background count of the input cost a running job.

Each run is a fresh process: a job over a ``.jsonl.zst`` shard of N personas through an
in-process transport that answers at once (``bench_memory.py``'s), so the engine runs as
fast as it can and any cost shows in its items/s. A live progress reporter (color on,
writing to memory) shows a line every ``--interval`` seconds; each ``show()`` is timed
(the statistics snapshot included). Modes, interleaved round by round:

* ``count``: as the CLI runs a job (the input's records counted in the background);
* ``nocount``: the same with the count turned off.

Reported per run: items/s, the reporter's share of the run's wall time, the mean cost of a
line, and when the total became known; then the items/s ratio of the two modes round by
round, and the CPU time the count takes alone (its whole cost to the process).

Usage::

    python benchmarks/bench_progress.py --lines 200000 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_memory import InstantTransport, make_shard  # noqa: E402

from asyncgen.storage.count import count_records  # noqa: E402


def child(mode: str, shard: Path, out: Path, interval: float) -> dict[str, Any]:
    import asyncgen.engine.engine as engine_module
    from asyncgen import Engine, JobConfig
    from asyncgen.cli.progress import ProgressReporter

    if mode == "nocount":

        class NoCount(engine_module.RecordCount):
            def start(self) -> None:
                return None

        engine_module.RecordCount = NoCount  # type: ignore[misc]

    async def main() -> dict[str, Any]:
        config = JobConfig(
            inputs=[str(shard)], output=str(out), prompt="math", model="m", concurrency=256
        )
        spent: list[float] = []
        known_at: list[float] = []
        async with Engine(config, transport=InstantTransport()) as engine:
            reporter = ProgressReporter(
                engine.statistics, io.StringIO(), interval=interval, live=True, color=True
            )
            show = reporter.show

            def timed() -> None:
                t = time.perf_counter()
                show()
                spent.append(time.perf_counter() - t)
                if not known_at and engine.statistics().total_items is not None:
                    known_at.append(time.perf_counter() - began)

            reporter.show = timed  # type: ignore[method-assign]
            began = time.perf_counter()
            task = asyncio.create_task(reporter.run())
            stats = await engine.run()
            wall = time.perf_counter() - began
            task.cancel()
            await asyncio.wait([task])
        return {
            "mode": mode,
            "items": stats.succeeded,
            "seconds": round(wall, 2),
            "items_per_s": round(stats.succeeded / wall),
            "lines": len(spent),
            "line_us": round(1e6 * sum(spent) / max(len(spent), 1), 1),
            "reporter_share_pct": round(100 * sum(spent) / wall, 4),
            "total_known_after_s": round(known_at[0], 2) if known_at else None,
        }

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SHARD", "OUT"))
    args = parser.parse_args()
    if args.child:
        mode, shard, out = args.child
        print(json.dumps(child(mode, Path(shard), Path(out), args.interval)))
        return
    work = Path(tempfile.gettempdir()) / "asyncgen-bench"
    work.mkdir(exist_ok=True)
    shard = work / f"personas-{args.lines}.jsonl.zst"
    make_shard(shard, args.lines)
    rows: dict[str, list[dict[str, Any]]] = {"count": [], "nocount": []}
    for _ in range(args.rounds):
        for mode in rows:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [sys.executable, __file__, "--interval", str(args.interval)]
                cmd += ["--child", mode, str(shard), str(Path(tmp) / "out")]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout)
                rows[mode].append(row)
                print(json.dumps(row), flush=True)
    ratios = [
        round(c["items_per_s"] / n["items_per_s"], 3)
        for c, n in zip(rows["count"], rows["nocount"], strict=True)
    ]
    print(json.dumps({"count_vs_nocount_by_round": ratios, "median": statistics.median(ratios)}))
    # The count's own price, alone: CPU seconds to count the shard once.
    cpu = time.process_time()
    n = count_records(shard)
    cpu = time.process_time() - cpu
    print(json.dumps({"counted": n, "count_cpu_s": round(cpu, 3), "us_per_line": 1e6 * cpu / n}))


if __name__ == "__main__":
    main()
