"""``asyncgen personas from-text`` and ``expand``: :mod:`asyncgen.personas.pipeline` with the
CLI's job runner (progress lines, Ctrl-C handling, one event loop per job)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asyncgen.cli.args import add_inputs, positive_int, run_async
from asyncgen.cli.console import say
from asyncgen.cli.exits import Exit
from asyncgen.cli.options import add_request_arguments, api_key, job_config_from_args
from asyncgen.cli.run import run_job
from asyncgen.engine.stats import Statistics
from asyncgen.job.config import JobConfig
from asyncgen.personas import pipeline
from asyncgen.personas.pipeline import JobRunner, StageReport

__all__ = ["add_commands"]

_EPILOG = (
    "Rerun the same command to resume after a crash or Ctrl-C. Exit status: 0 every item "
    "became a persona or an empty answer; 1 finished, but some items failed or input lines "
    "were bad (the shards hold the successes); 2 usage/input/setup error; 130 interrupted."
)


def _runner(args: argparse.Namespace) -> JobRunner:
    key = api_key(args)

    def run(config: JobConfig) -> Statistics:
        return run_async(
            run_job(
                config,
                api_key=key,
                progress_interval=args.progress_interval,
                quiet=args.quiet,
            )
        )

    return run


def _status(reports: Sequence[StageReport] | None) -> Exit:
    if reports is None:
        return Exit.INTERRUPTED
    return Exit.FAILURES if any(r.failed or r.bad_lines for r in reports) else Exit.OK


def _from_text(args: argparse.Namespace) -> Exit:
    report = pipeline.from_text(
        job_config_from_args(args), Path(args.output), run=_runner(args), notify=say
    )
    return _status(None if report is None else [report])


def _expand(args: argparse.Namespace) -> Exit:
    reports = pipeline.expand(
        job_config_from_args(args),
        Path(args.output),
        rounds=args.rounds,
        run=_runner(args),
        notify=say,
    )
    return _status(reports)


def _add_options(p: argparse.ArgumentParser, *, prompt: str) -> None:
    p.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="DIR",
        help="pipeline directory (created): jobs and persona shards go under it",
    )
    p.add_argument(
        "--prompt",
        "-p",
        default=prompt,
        metavar="NAME|PATH",
        help="template (default: %(default)s)",
    )
    add_request_arguments(p, model_required=True, samples_help="personas made from each input line")


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``asyncgen personas from-text`` and ``expand``."""
    p = sub.add_parser(
        "from-text",
        help="make personas from texts: who would write, read, like or dislike each one",
        description="Every line of the text shards becomes a request (template "
        "text_to_persona); the job runs in DIR/job and its answers become the persona shard "
        "DIR/personas.jsonl.zst, each with the text shard and line it came from.",
        epilog=_EPILOG,
    )
    add_inputs(p, "text shards")
    p.add_argument(
        "--text-field",
        dest="persona_field",
        default="text",
        metavar="FIELD",
        help="input field holding the text (default: %(default)s)",
    )
    _add_options(p, prompt="text_to_persona")
    p.set_defaults(handler=_from_text)

    p = sub.add_parser(
        "expand",
        help="make new personas from personas (persona-to-persona), for K rounds",
        description="Round 1 makes a persona related to each input persona (template "
        "persona), round r one for each persona of round r-1. Round r runs in DIR/round-r/job "
        "and writes DIR/round-r/round-r.jsonl.zst; each new persona names its parent and the "
        "text line its line descends from (origin), when known.",
        epilog=_EPILOG,
    )
    add_inputs(p, "persona shards")
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        metavar="K",
        help="rounds of expansion (default: %(default)s)",
    )
    p.add_argument(
        "--persona-field",
        default="persona",
        metavar="FIELD",
        help="field of the input shards holding the persona (default: %(default)s)",
    )
    _add_options(p, prompt="persona")
    p.set_defaults(handler=_expand)
