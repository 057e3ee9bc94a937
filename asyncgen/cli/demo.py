"""``asyncgen demo``: a real job end to end against the built-in mock server."""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import msgspec
import zstandard

from asyncgen.cli.args import positive_int, run_async
from asyncgen.cli.console import out, say
from asyncgen.cli.exits import Exit
from asyncgen.cli.run import exit_status, run_job
from asyncgen.job.config import JobConfig
from asyncgen.mock.server import MockConfig, MockServer
from asyncgen.storage.files import atomic_write

__all__ = ["add_command", "make_personas", "run_demo"]

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


def add_command(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``asyncgen demo``."""
    demo = sub.add_parser(
        "demo",
        help="run a small job end to end against the built-in mock server (no key, no network)",
        description="Generate a small persona shard, start the built-in mock server on "
        "127.0.0.1, run a real job through it, and show where the results are.",
    )
    demo.add_argument(
        "--output",
        "-o",
        default="asyncgen-demo",
        metavar="DIR",
        help="directory for the demo's input and results (default: %(default)s)",
    )
    demo.add_argument(
        "--personas",
        type=positive_int,
        default=500,
        metavar="N",
        help="how many personas to generate (default: %(default)s)",
    )
    demo.add_argument(
        "--prompt",
        "-p",
        default="math",
        metavar="NAME|PATH",
        help="template (default: %(default)s)",
    )
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> Exit:
    return run_async(run_demo(args.output, personas=args.personas, prompt=args.prompt))


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
    data = b"".join(msgspec.json.encode(r) + b"\n" for r in records)
    with atomic_write(path) as f:  # a torn input would fail every rerun
        f.write(zstandard.ZstdCompressor(level=3).compress(data))


async def run_demo(output: str, *, personas: int = 500, prompt: str = "math") -> Exit:
    """Run the demo job in ``output`` (its input made first, if missing) and say how to read
    the results; the job's exit status."""
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
    async with MockServer(mock) as server:
        say(
            f"mock server at {server.base_url}; {personas} personas in {shard}",
            command="asyncgen demo",
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
        stats = await run_job(config, api_key=None, progress_interval=1.0)
    pattern = f"{results}/results-*.jsonl.zst"
    read = (
        "import glob, json, zstandard; "
        f"f = zstandard.open(sorted(glob.glob('{pattern}'))[0]); "
        "print(json.loads(f.readline())['output'])"
    )
    out(
        f"\nResults are in {results}/ as zstd-compressed JSON lines. Read them with\n"
        f"  zstdcat {pattern} | head -n 2\n"
        f'  python -c "{read}"\n'
        f"Rerunning `asyncgen demo --output {output}` resumes: every item is done, nothing is "
        "sent.\nYour own job: asyncgen run --input PERSONAS.jsonl.zst --prompt math "
        "--model MODEL --base-url URL --output DIR"
    )
    return exit_status(stats)
