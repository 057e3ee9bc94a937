"""``asyncgen run``, and :func:`run_job`: a job with progress lines on stderr and graceful
Ctrl-C/SIGTERM handling, as every command that runs one (``demo``, ``retry-failed``, the
persona pipelines) runs it."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from typing import Any

from asyncgen.cli.args import add_inputs, run_async
from asyncgen.cli.console import report, say, warn
from asyncgen.cli.exits import Exit
from asyncgen.cli.options import add_request_arguments, api_key, job_config_from_args
from asyncgen.cli.progress import ProgressReporter, summary
from asyncgen.cli.signals import StopSignals
from asyncgen.core.errors import ConfigError
from asyncgen.core.ledger import Redo
from asyncgen.engine.batch import BatchBackend
from asyncgen.engine.engine import Engine
from asyncgen.engine.stats import Statistics
from asyncgen.job.config import JobConfig
from asyncgen.job.prompts import available_templates

__all__ = ["EPILOG", "add_command", "exit_status", "run_job"]

EPILOG = (
    "Exit status: 0 all succeeded; 1 some items failed or input lines were bad; "
    "2 usage/input/setup error; 3 internal error (a bug); 130 interrupted (rerun to "
    "resume)."
)


def add_command(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``asyncgen run``."""
    run = sub.add_parser(
        "run",
        help="run a generation job",
        description="Run a job: every persona line of the inputs (or OpenAI Batch request "
        "line) becomes a request; results go to --output as zstd JSON lines. Rerunning the "
        "same command resumes: committed items are skipped, nothing is written twice.",
        epilog=EPILOG,
    )
    add_inputs(run, "input shards")
    run.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="DIR",
        help="output directory (created; one job per directory)",
    )
    run.add_argument(
        "--prompt",
        "-p",
        metavar="NAME|PATH",
        help="template name (" + ", ".join(available_templates()) + ") or path "
        "to a .toml template; not needed when inputs are OpenAI Batch lines",
    )
    run.add_argument(
        "--persona-field",
        default="persona",
        metavar="FIELD",
        help="input field holding the persona text (default: %(default)s)",
    )
    add_request_arguments(run)
    run.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> Exit:
    stats = run_async(
        run_job(
            job_config_from_args(args),
            api_key=api_key(args),
            progress_interval=args.progress_interval,
            quiet=args.quiet,
        )
    )
    return exit_status(stats)


def exit_status(s: Statistics, *, retry: bool = False) -> Exit:
    """How a run ended (see :mod:`asyncgen.cli.exits`); ``retry``: a run of
    ``retry-failed``, which answers for the items it retried, not for failures it left
    alone."""
    if not s.finished:
        return Exit.INTERRUPTED
    if retry:
        return Exit.FAILURES if s.failed or s.bad_lines else Exit.OK
    return Exit.FAILURES if s.failed_total or s.bad_lines_total else Exit.OK


async def run_job(
    config: JobConfig,
    *,
    api_key: str | None,
    progress_interval: float | None = None,
    quiet: bool = False,
    redo: Redo | None = None,
) -> Statistics:
    """Run one job with progress on stderr and its summary at the end; the first Ctrl-C or
    SIGTERM stops intake and drains, the second stops at once (``finished`` is then False).
    ``redo``: a retry run of recorded failures. A cancellation from elsewhere propagates."""
    if config.backend == "batch":
        if redo is not None:
            raise ConfigError("retry-failed runs online: give it --backend online")
        return await _run_batch_job(config, api_key=api_key, quiet=quiet)
    async with Engine(config, api_key=api_key, redo=redo, warn=warn) as engine:
        reporter = ProgressReporter(engine.statistics, sys.stderr, interval=progress_interval)

        def graceful(signum: signal.Signals) -> None:
            reporter.finish()
            n = engine.statistics().in_flight
            say(
                f"{signum.name}: no new requests; waiting up to {config.drain_timeout:g}s "
                f"for {n} in flight (again to stop now)"
            )
            engine.stop()

        def now(signum: signal.Signals) -> None:
            reporter.finish()
            say("stopping now; flushing what has come back")

        with StopSignals(graceful, now) as signals:
            progress = None if quiet else asyncio.create_task(reporter.run())
            try:
                stats = await engine.run()
            except asyncio.CancelledError:
                if not signals.absorb():
                    raise
                stats = engine.statistics()
            finally:
                if progress is not None:
                    progress.cancel()
                    # wait() neither raises the progress task's CancelledError nor hides ours
                    await asyncio.wait([progress])
                reporter.finish()
    for damage in stats.bad_files:
        warn(f"input not read to the end: {damage}")
    report(summary(stats, config.output))
    return stats


async def _run_batch_job(config: JobConfig, *, api_key: str | None, quiet: bool) -> Statistics:
    """The job through the Batch API; Ctrl-C stops polling (the batches go on at the
    server, and a rerun picks them up), a second one stops at once."""
    progress = (lambda _: None) if quiet else say
    async with BatchBackend(config, api_key=api_key, report=progress) as job:

        def graceful(signum: signal.Signals) -> None:
            say(f"{signum.name}: no more polling; rerun the same command to pick up the batches")
            job.stop()

        def now(signum: signal.Signals) -> None:
            say("stopping now")

        with StopSignals(graceful, now) as signals:
            try:
                stats = await job.run()
            except asyncio.CancelledError:
                if not signals.absorb():
                    raise
                stats = job.statistics()
    report(summary(stats, config.output))
    return stats
