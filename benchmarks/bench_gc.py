"""What CPython's garbage collector costs a client, with default and tuned settings.

Each client runs in a fresh process pinned to core 1 (the fast server of ``bench_peers.py``
on core 0), interleaved round by round; a ``gc.callbacks`` timer counts the collections of
each generation and the time they took. Settings: ``default``, ``tuned``
(:func:`asyncgen.tune_gc`, what the ``asyncgen`` command does at start) or ``tuned=N``
(the same with a young threshold of N).

Usage::

    python benchmarks/bench_gc.py --requests 10000 --rounds 3
    python benchmarks/bench_gc.py --clients asyncgen --concurrency 4000 --requests 40000
    python benchmarks/bench_gc.py --clients asyncgen --settings tuned=10000 tuned=100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_memory import make_shard  # noqa: E402
from bench_peers import (  # noqa: E402
    CLIENT_CPU,
    Server,
    client_asyncgen,
    client_floor,
    cpu_seconds,
    raise_nofile,
)


def child(kind: str, setting: str, url: str, n: int, concurrency: int, workdir: Path) -> None:
    import gc

    import uvloop

    import asyncgen.cli.main  # noqa: F401  (imports are start-up, before the clock)

    raise_nofile()
    shard = workdir / f"personas-{n}.jsonl.zst"
    out = workdir / f"gc-out-{os.getpid()}"
    shutil.rmtree(out, ignore_errors=True)
    if setting.startswith("tuned"):
        from asyncgen import tune_gc

        _, _, threshold = setting.partition("=")
        tune_gc(int(threshold)) if threshold else tune_gc()
    spent = {g: [0, 0.0] for g in range(3)}
    began = [0.0]

    def timer(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            row = spent[info["generation"]]
            row[0] += 1
            row[1] += time.perf_counter() - began[0]

    gc.callbacks.append(timer)
    coro = (
        client_floor(url, n, concurrency)
        if kind == "floor"
        else client_asyncgen(url, n, concurrency, shard, out)
    )
    cpu, wall = cpu_seconds(), time.perf_counter()
    uvloop.run(coro)
    cpu, wall = cpu_seconds() - cpu, time.perf_counter() - wall
    gc.callbacks.remove(timer)
    shutil.rmtree(out, ignore_errors=True)
    print(
        json.dumps(
            {
                "client": kind,
                "gc": setting,
                "req_per_s": round(n / wall),
                "cpu_ms_per_1k": round(cpu / n * 1e6, 1),
                "collections": {g: c for g, (c, _) in spent.items()},
                "gc_ms": {g: round(t * 1000, 1) for g, (_, t) in spent.items()},
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", nargs="+", default=["floor", "asyncgen"])
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["default", "tuned"],
        help="default, tuned (asyncgen.tune_gc()) or tuned=N (a young threshold of N)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/asyncgen-bench"))
    parser.add_argument(
        "--child", nargs=3, metavar=("KIND", "SETTING", "URL"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        kind, setting, url = args.child
        child(kind, setting, url, args.requests, args.concurrency, args.workdir)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    make_shard(args.workdir / f"personas-{args.requests}.jsonl.zst", args.requests)
    pin = (os.cpu_count() or 1) >= 2
    with Server("fast", 0.0, 0 if pin else None) as server:
        for r in range(args.rounds):
            for kind in args.clients:
                for setting in args.settings:
                    argv = [sys.executable, __file__, "--child", kind, setting, server.url]
                    argv += ["--requests", str(args.requests)]
                    argv += ["--concurrency", str(args.concurrency)]
                    argv += ["--workdir", str(args.workdir)]
                    pinned = (lambda: os.sched_setaffinity(0, {CLIENT_CPU})) if pin else None
                    done = subprocess.run(
                        argv, capture_output=True, text=True, check=True, preexec_fn=pinned
                    )
                    row: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
                    row["round"] = r + 1
                    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
