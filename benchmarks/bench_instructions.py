"""The engine's own cost per item, in instructions: a figure machine noise does not move.

Timings on a shared two-core VM wander by 20-30 % from one run to the next, which hides a
change worth 2 %. Instructions do not: this runs the whole engine (a persona ``.jsonl.zst``
shard, the ``math`` template, flow control, the ledger, msgspec, zstd output, both threads)
against an in-process transport that answers after one event-loop turn, under valgrind's
``callgrind`` tool, once with ``--small`` items and once with ``--items``. The difference,
divided by the difference in items, is the cost of one item with start-up taken out. It is
a proxy for CPU time (cache misses and branch mispredictions are not in it), good for
comparing two versions of the code on one machine: run it before and after a change.

Usage::

    python benchmarks/bench_instructions.py                    # 6 000 items vs 200
    python benchmarks/bench_instructions.py --items 12000 --repeat 3
    python benchmarks/bench_instructions.py --metrics          # with Prometheus metrics

Needs ``valgrind`` (``apt install valgrind``). Each run takes ~30 s per 6 000 items.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_memory import InstantTransport, make_shard  # noqa: E402


class OneTurnTransport(InstantTransport):
    """Answers every request after one turn of the event loop, as a socket read would."""

    async def post(self, path: str, body: bytes) -> Any:
        from asyncgen.engine.transport import HttpResponse

        await asyncio.sleep(0)
        return HttpResponse(200, {}, self._reply)


def child(items: int, workdir: Path) -> None:
    import uvloop

    from asyncgen import Engine, JobConfig, tune_gc

    shard = workdir / f"instr-{items}.jsonl.zst"
    make_shard(shard, items)
    out = workdir / f"instr-out-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    metrics = None
    if os.environ.get("BENCH_METRICS"):
        from asyncgen import Metrics

        # made before tune_gc's freeze, as the CLI freezes it with its start-up
        metrics = Metrics(price_in=1.0, price_out=2.0)
    tune_gc()

    async def main() -> int:
        config = JobConfig(
            inputs=[str(shard)],
            output=str(out),
            prompt="math",
            model="m",
            concurrency=256,
            check_endpoint=False,
        )
        async with Engine(config, transport=OneTurnTransport(), metrics=metrics) as engine:
            return (await engine.run()).succeeded

    done = uvloop.run(main())
    shutil.rmtree(out, ignore_errors=True)
    if done != items:
        raise SystemExit(f"{done} of {items} items succeeded")


def instructions(items: int, workdir: Path) -> int:
    """Instructions of one whole child process (all threads), from callgrind's summary."""
    make_shard(workdir / f"instr-{items}.jsonl.zst", items)  # not under valgrind
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "child",
        str(items),
        "--workdir",
        str(workdir),
    ]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    match = re.search(r"Collected\s*:\s*([\d,]+)", proc.stderr)
    if match is None:
        raise SystemExit(f"no instruction count in valgrind's output:\n{proc.stderr[-2000:]}")
    return int(match.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", nargs="?", default="measure", choices=("measure", "child"))
    parser.add_argument("items_arg", nargs="?", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--items", type=int, default=6000)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=1, help="pairs of runs; the median")
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="attach Prometheus metrics (asyncgen.engine.metrics.Metrics) to the engine",
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "asyncgen-bench"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.metrics:
        os.environ["BENCH_METRICS"] = "1"
    if args.command == "child":
        child(args.items_arg, args.workdir)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt install valgrind)")
    if args.items <= args.small:
        raise SystemExit("--items must be larger than --small")
    per_item = []
    for _ in range(args.repeat):
        big, small = instructions(args.items, args.workdir), instructions(args.small, args.workdir)
        per_item.append((big - small) / (args.items - args.small))
    print(
        json.dumps(
            {
                "items": args.items,
                "small": args.small,
                "instructions_per_item": round(statistics.median(per_item)),
                "each": [round(x) for x in per_item],
            }
        )
    )


if __name__ == "__main__":
    main()
