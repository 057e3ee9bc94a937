"""``asyncgen batches OUT [--cancel]``: the Batch API batches of a ``--backend batch`` job."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

from asyncgen.cli.args import run_async
from asyncgen.cli.console import out, say
from asyncgen.cli.exits import Exit
from asyncgen.cli.options import add_api_key_env, api_key
from asyncgen.engine.batch import job_batches

__all__ = ["add_command"]


def add_command(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``asyncgen batches``."""
    p = sub.add_parser(
        "batches",
        help="list (or cancel) the Batch API batches of a --backend batch job",
        description="List the batches a --backend batch job created, as the server reports "
        "them (every page of the server's batch list, matched by the job's metadata tag). "
        "With --cancel, cancel those still running; rerunning the job afterwards sends "
        "their items again.",
    )
    p.add_argument("output", metavar="DIR", help="the job's output directory")
    p.add_argument("--cancel", action="store_true", help="cancel the batches still running")
    add_api_key_env(p)
    p.set_defaults(handler=_batches)


def _batches(args: argparse.Namespace) -> Exit:
    found = run_async(job_batches(Path(args.output), api_key=api_key(args), cancel=args.cancel))
    if not found:
        say(f"{args.output}: no batches (not a --backend batch job, or none created yet)")
        return Exit.OK
    for b in found:
        when = datetime.datetime.fromtimestamp(b.created_at, datetime.UTC)
        out(
            f"{b.id}  {b.part:12} {b.status:11} {b.completed:,}/{b.total:,} done"
            f"{f', {b.failed:,} failed' if b.failed else ''}  created "
            f"{when:%Y-%m-%d %H:%M:%S} UTC"
        )
    return Exit.OK
