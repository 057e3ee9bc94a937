"""The engine's own floors, without a network: the writer, and resuming a large job.

* ``writer`` — records per second through :meth:`asyncgen.storage.store.Store.commit`: msgspec
  encoding, zstd frames (a batch of 512 records or more as one frame per usable core, up to
  four, compressed at once), the data synced (``fdatasync``) and the ledger line, at the
  engine's batch size (1024) and a larger one. Target: ≥ 300 000 records/s. CPU seconds are
  reported beside the rate (all threads).
* ``resume`` — an output directory already holds N committed results (made once, through the
  engine with an instant transport, cached under ``--workdir``); a fresh process runs the
  same job with one more shard of new personas after the done one and reports the time from
  process start to its first new request. Target: ≤ 3 s at 1 M.

Usage::

    python benchmarks/bench_core.py writer --records 1000000
    python benchmarks/bench_core.py resume --lines 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_memory import InstantTransport, make_shard


def bench_writer(records: int, batch: int, workdir: Path) -> dict[str, Any]:
    from asyncgen.core.records import Result, Source, Usage
    from asyncgen.storage.store import Store

    out = workdir / f"writer-{os.getpid()}-{batch}"
    shutil.rmtree(out, ignore_errors=True)
    # Replies of ~100 words drawn from a small vocabulary: about as compressible as model
    # output (a repeated string would flatter zstd).
    rng = random.Random(7)
    vocab = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
        for _ in range(3000)
    ]
    made = [
        Result(
            custom_id=f"personas-00001:{i}:math:0",
            error=None,
            output=" ".join(rng.choices(vocab, k=100)),
            finish_reason="stop",
            model="mock-model",
            template="math",
            persona=f"A retired engineer number {i} who restores clocks",
            source=Source("personas-00001", i),
            attempts=1,
            latency_s=0.8123,
            created=1764043200.123,
            usage=Usage(91, 312, 403),
        )
        for i in range(1, batch + 1)
    ]
    store = Store.open(out, {"job": "writer-bench"}, version="bench")
    try:
        start = time.perf_counter()
        cpu = time.process_time()
        done = 0
        while done < records:
            store.commit(made)
            done += len(made)
        seconds = time.perf_counter() - start
        cpu_s = time.process_time() - cpu
    finally:
        store.close()
    size = sum(p.stat().st_size for p in out.iterdir())
    shutil.rmtree(out, ignore_errors=True)
    return {
        "records": done,
        "batch": batch,
        "seconds": round(seconds, 3),
        "records_per_s": round(done / seconds),
        "cpu_s": round(cpu_s, 3),
        "bytes_per_record": round(size / done, 1),
    }


class FirstRequest(InstantTransport):
    """Reports the moment of the first request and ends the process."""

    async def post(self, path: str, body: bytes) -> Any:
        print(json.dumps({"first_request_at": time.time()}), flush=True)
        os._exit(0)


def resume_child(done_shard: Path, new_shard: Path, out: Path) -> None:
    from asyncgen import Engine, JobConfig

    async def main() -> None:
        config = JobConfig(
            inputs=[str(done_shard), str(new_shard)],
            output=str(out),
            prompt="math",
            model="m",
            concurrency=256,
        )
        async with Engine(config, transport=FirstRequest()) as engine:
            await engine.run()
        print(json.dumps({"first_request_at": None}))

    asyncio.run(main())


def prepare_done(done_shard: Path, out: Path, lines: int) -> None:
    """An output directory holding every item of ``done_shard``, made once and kept."""
    marker = out / ".complete"
    if marker.exists():
        return
    shutil.rmtree(out, ignore_errors=True)
    from asyncgen import Engine, JobConfig

    async def main() -> None:
        config = JobConfig(
            inputs=[str(done_shard)], output=str(out), prompt="math", model="m", concurrency=256
        )
        async with Engine(config, transport=InstantTransport()) as engine:
            stats = await engine.run()
        assert stats.succeeded_total == lines, stats

    print(f"preparing {lines:,} committed results in {out} (once) ...", file=sys.stderr)
    asyncio.run(main())
    marker.touch()


def bench_resume(lines: int, workdir: Path, runs: int) -> dict[str, Any]:
    done_shard = workdir / f"personas-{lines}.jsonl.zst"
    make_shard(done_shard, lines)
    new_shard = workdir / "new-personas.jsonl"
    new_shard.write_text(
        "".join(json.dumps({"persona": f"A new person {i}"}) + "\n" for i in range(1000))
    )
    pristine = workdir / f"resume-done-{lines}"
    prepare_done(done_shard, pristine, lines)
    times = []
    for _ in range(runs):
        out = workdir / f"resume-run-{os.getpid()}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(pristine, out)
        (out / ".complete").unlink()
        start = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "resume-child", str(done_shard), str(new_shard), str(out)],
            capture_output=True,
            text=True,
            check=True,
        )
        at = json.loads(proc.stdout.splitlines()[-1])["first_request_at"]
        assert at is not None, "the job sent no new request"
        times.append(at - start)
        shutil.rmtree(out, ignore_errors=True)
    times.sort()
    ledger_mb = (pristine / "ledger.zst").stat().st_size / 1e6
    return {
        "committed": lines,
        "ledger_mb": round(ledger_mb, 2),
        "runs": runs,
        "first_request_s_median": round(times[len(times) // 2], 3),
        "first_request_s_all": [round(t, 3) for t in times],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("writer")
    w.add_argument("--records", type=int, default=1_000_000)
    w.add_argument("--batches", type=int, nargs="+", default=[1024, 8192])
    r = sub.add_parser("resume")
    r.add_argument("--lines", type=int, default=1_000_000)
    r.add_argument("--runs", type=int, default=3)
    for p in (w, r):
        p.add_argument(
            "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "asyncgen-bench"
        )
    c = sub.add_parser("resume-child")
    c.add_argument("paths", nargs=3, type=Path)
    args = parser.parse_args()
    if args.command == "resume-child":
        resume_child(*args.paths)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.command == "writer":
        for batch in args.batches:
            print(json.dumps(bench_writer(args.records, batch, args.workdir)), flush=True)
    else:
        print(json.dumps(bench_resume(args.lines, args.workdir, args.runs)), flush=True)


if __name__ == "__main__":
    main()
