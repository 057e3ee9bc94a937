"""Peak memory while streaming large persona shards.

Each measurement runs in a fresh subprocess and reports its peak RSS:

* ``read``   — source + expand only (zstd decode, JSON parse, template render, id build):
  must stay flat whatever the input size.
* ``engine`` — the whole pipeline (gate, send, retry bookkeeping, msgspec, zstd, fsync'd
  commits) through an in-process transport that answers instantly, so the network is not what
  is measured. The exactly-once ledger keeps about one bit per committed persona item, so this
  too must stay flat.

Usage::

    python benchmarks/bench_memory.py --lines 100000 1000000 --modes read engine
    python benchmarks/bench_memory.py --lines 100000 1000000 --modes read --format parquet
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import lzma
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import zstandard

FORMATS = ("jsonl.zst", "jsonl.gz", "jsonl.xz", "parquet")


def persona(i: int) -> dict[str, Any]:
    return {
        "persona": f"A retired engineer number {i} who restores clocks and reads "
        "about the history of timekeeping in small coastal towns.",
        "id": i,
    }


def make_shard(path: Path, n: int) -> None:
    if path.exists():
        return
    if path.name.endswith(".parquet"):
        make_parquet(path, n)
        return
    opener: Any = {
        ".gz": lambda raw: gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6),
        ".xz": lambda raw: lzma.LZMAFile(raw, "wb", preset=1),  # noqa: SIM115 (opened by the with)
        ".zst": lambda raw: zstandard.ZstdCompressor(level=3).stream_writer(raw),
    }[path.suffix]
    with open(path, "wb") as raw, opener(raw) as out:
        for i in range(n):
            out.write(msgspec.json.encode(persona(i)) + b"\n")


def make_parquet(path: Path, n: int, group: int = 100_000) -> None:
    """Row groups of ``group`` rows (the reader must never hold more than one)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    for start in range(0, n, group):
        table = pa.Table.from_pylist([persona(i) for i in range(start, min(n, start + group))])
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    if writer is not None:
        writer.close()


def measure_read(shard: Path) -> dict[str, Any]:
    from asyncgen.job.items import Expander
    from asyncgen.job.prompts import load_template
    from asyncgen.storage.sources import ShardReader

    expander = Expander(load_template("math"), model="m")
    reader = ShardReader(shard)
    items = 0
    while batch := reader.read_batch(1024):
        for line in batch:
            items += len(expander.expand(line))
    return {"items": items}


class InstantTransport:
    base_url = "http://instant.invalid/v1"
    _reply = msgspec.json.encode(
        {
            "choices": [
                {"message": {"content": "A short synthetic answer."}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 40, "completion_tokens": 5, "total_tokens": 45},
        }
    )

    async def post(self, path: str, body: bytes) -> Any:
        from asyncgen.engine.transport import HttpResponse

        return HttpResponse(200, {}, self._reply)

    async def get(self, path: str) -> Any:
        from asyncgen.engine.transport import HttpResponse

        return HttpResponse(200, {}, b"{}")

    async def aclose(self) -> None:
        return None


def measure_engine(shard: Path, out: Path) -> dict[str, Any]:
    from asyncgen import Engine, JobConfig

    async def main() -> dict[str, Any]:
        config = JobConfig(
            inputs=[str(shard)], output=str(out), prompt="math", model="m", concurrency=256
        )
        async with Engine(config, transport=InstantTransport()) as engine:
            stats = await engine.run()
        return {"items": stats.succeeded, "requests": stats.requests}

    return asyncio.run(main())


def child(mode: str, shard: Path, out: Path) -> None:
    start = time.perf_counter()
    result = measure_read(shard) if mode == "read" else measure_engine(shard, out)
    result["seconds"] = round(time.perf_counter() - start, 2)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--modes", nargs="+", default=["read", "engine"], choices=["read", "engine"]
    )
    parser.add_argument("--format", default="jsonl.zst", choices=FORMATS, help="input format")
    parser.add_argument(
        "--workdir", type=Path, default=Path(tempfile.gettempdir()) / "asyncgen-bench"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.lines:
        shard = args.workdir / f"personas-{n}.{args.format}"
        make_shard(shard, n)
        for mode in args.modes:
            out = args.workdir / f"out-{mode}-{n}-{os.getpid()}"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", mode, str(shard), str(out)],
                capture_output=True,
                text=True,
                check=True,
            )
            row = {
                "lines": n,
                "format": args.format,
                "mode": mode,
                "shard_mb": round(shard.stat().st_size / 1e6, 1),
                **json.loads(proc.stdout),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            subprocess.run(["rm", "-rf", str(out)], check=False)
    print("\n| lines | format | mode | shard MB | items | seconds | peak RSS MB |")
    print("|---:|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['lines']:,} | {r['format']} | {r['mode']} | {r['shard_mb']} | {r['items']:,} | "
            f"{r['seconds']} | {r['peak_rss_mb']} |"
        )


if __name__ == "__main__":
    main()
