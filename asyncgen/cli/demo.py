"""``asyncgen demo``: a real job end to end against the built-in mock server."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import msgspec
import zstandard

from asyncgen.cli.main import run_job
from asyncgen.job.config import JobConfig
from asyncgen.mock.server import MockConfig, MockServer

__all__ = ["make_personas", "run_demo"]

_AGES = ["retired", "young", "mid-career", "semi-retired", "newly qualified", "veteran"]
_ROLES = [
    "aerospace engineer",
    "hospice nurse",
    "beekeeper",
    "bus driver",
    "court stenographer",
    "glassblower",
    "marine biologist",
    "night-shift baker",
    "orchestra librarian",
    "rural veterinarian",
    "school bus mechanic",
    "tax accountant",
    "tea importer",
    "tunnel surveyor",
    "wind-farm technician",
    "sign-language interpreter",
    "chess coach",
    "cartographer",
    "fishing-boat captain",
    "museum conservator",
]
_INTERESTS = [
    "restores antique clocks",
    "keeps a detailed weather diary",
    "builds model railways",
    "competes in amateur astronomy contests",
    "brews cider from heirloom apples",
    "volunteers at a food bank",
    "collects vintage maps",
    "runs ultramarathons",
    "teaches chess to children",
    "writes crossword puzzles",
    "grows bonsai trees",
    "studies medieval history",
    "repairs old radios",
    "photographs bridges",
]
_PLACES = [
    "in a coastal village",
    "in a mountain town",
    "in a busy port city",
    "on a family farm",
    "in a university town",
    "near a desert observatory",
    "in a river delta",
]


def make_personas(n: int, seed: int = 7) -> list[dict[str, str]]:
    """``n`` synthetic persona records (PersonaHub schema: a ``persona`` field)."""
    rng = random.Random(seed)
    return [
        {
            "id": f"demo-{i:06d}",
            "persona": f"A {rng.choice(_AGES)} {rng.choice(_ROLES)} {rng.choice(_PLACES)} "
            f"who {rng.choice(_INTERESTS)}.",
        }
        for i in range(n)
    ]


def _write_shard(path: Path, records: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join(msgspec.json.encode(r) + b"\n" for r in records)
    path.write_bytes(zstandard.ZstdCompressor(level=3).compress(data))


async def run_demo(output: str, *, personas: int = 500, prompt: str = "math") -> int:
    root = Path(output)
    shard = root / "input" / "personas-demo.jsonl.zst"
    if not shard.exists():
        _write_shard(shard, make_personas(personas))
    results = root / "results"
    # A little latency and a few injected faults, so retries show up in the progress line.
    mock = MockConfig(
        latency=0.05,
        latency_jitter=0.04,
        fail_429=0.03,
        retry_after=0.2,
        fail_500=0.02,
        malformed=0.01,
        seed=1,
    )
    out = sys.stderr
    async with MockServer(mock) as server:
        out.write(
            f"asyncgen demo: mock server at {server.base_url}; {personas} personas in {shard}\n"
        )
        config = JobConfig(
            inputs=[str(shard)],
            output=str(results),
            prompt=prompt,
            model="mock-model",
            base_url=server.base_url,
            concurrency=64,
            backoff_base=0.1,
            backoff_cap=2.0,
            max_attempts=8,
        )
        status = await run_job(config, api_key=None, progress_interval=1.0)
    pattern = f"{results}/results-*.jsonl.zst"
    read = (
        "import glob, json, zstandard; "
        f"f = zstandard.open(sorted(glob.glob('{pattern}'))[0]); "
        "print(json.loads(f.readline())['output'])"
    )
    print(
        f"\nResults are in {results}/ as zstd-compressed JSON lines. Read them with\n"
        f"  zstdcat {pattern} | head -n 2\n"
        f'  python -c "{read}"\n'
        f"Rerunning `asyncgen demo --output {output}` resumes: every item is done, nothing is "
        "sent.\nYour own job: asyncgen run --input PERSONAS.jsonl.zst --prompt math "
        "--model MODEL --base-url URL --output DIR"
    )
    return status
