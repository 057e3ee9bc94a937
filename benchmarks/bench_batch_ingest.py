"""Ingest rate of Batch API output files (records/s) and the memory it takes, by file size.

The batch backend's ingest (decode each output line, check it, build its record, commit 256
at a time through the store and ledger) on an output file already on disk, as the backend
leaves it after the download; a part of N items, all succeeded. Memory: the peak Python
allocation (tracemalloc, in a second run) during the ingest, beyond the part's own items
(which the backend holds for the part, at most ``--batch-max-requests``).

    python benchmarks/bench_batch_ingest.py --sizes 10000 50000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec

from asyncgen.core.records import Source, WorkItem
from asyncgen.engine.batch import BatchBackend
from asyncgen.engine.batch.state import Part
from asyncgen.job.config import JobConfig


def _output_line(custom_id: str, n: int) -> bytes:
    body = {
        "id": f"chatcmpl-{n}",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "word " * 60},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 80, "completion_tokens": 60, "total_tokens": 140},
    }
    return msgspec.json.encode(
        {
            "id": f"batch_req_{n}",
            "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": f"req_{n}", "body": body},
            "error": None,
        }
    )


async def one(n: int, *, trace: bool) -> dict[str, Any]:
    import openai  # noqa: F401 - loaded before the clock starts, as in a run (run() loads it)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inp = root / "in.jsonl"
        inp.write_bytes(b"")
        cfg = JobConfig(inputs=[str(inp)], output=str(root / "out"), backend="batch")
        items = {
            f"in:{i + 1}:t:0": WorkItem(
                f"in:{i + 1}:t:0",
                "/chat/completions",
                {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                Source("in", i + 1),
                template=None,
            )
            for i in range(n)
        }
        async with BatchBackend(cfg, api_key=None) as job:
            path = job._batches.dir / "p00001.file-x.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            data = b"".join(_output_line(c, i) + b"\n" for i, c in enumerate(items))
            await asyncio.to_thread(path.write_bytes, data)
            del data
            size = path.stat().st_size
            batch = SimpleNamespace(id="batch_x", created_at=1_700_000_000, completed_at=None)
            batch.expired_at = batch.failed_at = batch.cancelled_at = None
            outcome: dict[str, Any] = {}
            if trace:
                tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            start = time.perf_counter()
            await job._ingest.file(Part(name="p00001", round=0), items, batch, "file-x", outcome)
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] - base
            if trace:
                tracemalloc.stop()
            assert job.counts.succeeded == n
    return {
        "records": n,
        "file_mb": round(size / 2**20, 1),
        "records_per_s": round(n / elapsed),
        "peak_mb": round(peak / 2**20, 1),
        "seconds": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000])
    args = parser.parse_args()
    print("| records | file MB | records/s | peak MB during ingest |")
    print("|---|---|---|---|")
    for n in args.sizes:
        # Timed without tracemalloc (it slows every allocation), then measured with it.
        r = asyncio.run(one(n, trace=False))
        peak = asyncio.run(one(n, trace=True))["peak_mb"]
        print(f"| {r['records']:,} | {r['file_mb']} | {r['records_per_s']:,} | {peak} |")


if __name__ == "__main__":
    main()
