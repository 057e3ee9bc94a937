"""``asyncgen run``, and :func:`run_job`: a job with progress lines on stderr and graceful
Ctrl-C/SIGTERM handling, as every command that runs one (``demo``, ``retry-failed``, the
persona pipelines) runs it."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from asyncgen.cli.args import add_inputs, positive_int, run_async
from asyncgen.cli.console import out, report, say, warn
from asyncgen.cli.exits import Exit
from asyncgen.cli.logs import configure_logging
from asyncgen.cli.options import (
    OPENAI_BASE_URL,
    add_operations_arguments,
    add_request_arguments,
    api_keys,
    job_config_from_args,
    metrics_server,
)
from asyncgen.cli.progress import ProgressReporter, summary
from asyncgen.cli.signals import StopSignals
from asyncgen.core.errors import ConfigError
from asyncgen.core.ledger import Redo
from asyncgen.core.redact import redact_url
from asyncgen.engine.batch import BatchBackend
from asyncgen.engine.engine import Engine
from asyncgen.engine.events import event
from asyncgen.engine.metrics import Metrics
from asyncgen.engine.stats import Statistics
from asyncgen.job.config import JobConfig
from asyncgen.job.jobfile import read_job_file, render_job_file
from asyncgen.job.prompts import available_templates
from asyncgen.scale import Coordinator, workers_job
from asyncgen.storage.partitions import is_partitioned

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
    run.add_argument(
        "job",
        nargs="?",
        metavar="JOB.toml",
        help="a TOML job file setting any of the options below (inputs, template, endpoints "
        "with their key variables and their own rpm/tpm/concurrency, sampling, limits, logs, "
        "metrics); options given on the "
        "command line override it. See README, 'Running a long job'",
    )
    run.add_argument(
        "--print-config",
        action="store_true",
        help="print the job (the job file merged with the options given) as a job file, "
        "and exit without running it",
    )
    add_inputs(
        run,
        "input shards (required, here or in the job file)",
        required=False,
    )
    run.add_argument(
        "--output",
        "-o",
        metavar="DIR",
        help="output directory (created; one job per directory; required, here or in the job file)",
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
    g = run.add_argument_group("workers (see README, 'Many workers')")
    g.add_argument(
        "--workers",
        type=positive_int,
        metavar="N",
        help="run the job in N worker processes (each its own event loop), partitioned by "
        "input shard; --concurrency, --rpm and --tpm stay job-wide, divided among the busy "
        "workers; a worker that dies is replaced and its partition resumed (default: 1, "
        "one process; a job once run with --workers keeps its partitions)",
    )
    g.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the workers as actors of a Ray cluster (auto: the running one; "
        "ray://HOST:PORT; local: start one on this machine; needs "
        "pip install 'asyncgen[ray]' and --output on a filesystem every node shares, with "
        "working flock and rename)",
    )
    g.add_argument(
        "--partition-lines",
        type=positive_int,
        metavar="L",
        help="split every input into partitions of L lines (after counting them), fixed for "
        "the job once planned (default: one partition per input, or ~4 per worker when "
        "there are fewer inputs than workers)",
    )
    add_operations_arguments(run)
    run.set_defaults(handler=_run, parser=run)


def _with_job_file(args: argparse.Namespace) -> argparse.Namespace:
    """The options of ``run``: the job file's, overridden by those on the command line."""
    parser: argparse.ArgumentParser = args.parser
    if args.job is not None:
        job = read_job_file(args.job)
        # argparse fills in a default only where the namespace has no value yet, so the
        # file's values stand unless the command line sets them. Lists are the exception
        # (argparse extends them), so a list from the command line replaces the file's after.
        lists = {"input", "base_url", "endpoint_key_envs", "endpoint_limits"}
        given = argparse.Namespace(**{k: v for k, v in job.options.items() if k not in lists})
        argv = args.argv
        args = parser.parse_args(argv[2:], namespace=given)
        args.argv = argv
        if args.input is None:
            args.input = job.options.get("input")
        if args.base_url is None:
            args.base_url = job.options.get("base_url")
            args.endpoint_key_envs = job.options.get("endpoint_key_envs")
            args.endpoint_limits = job.options.get("endpoint_limits")
        args.job_file = str(Path(job.path).resolve())
        args.job_file_sha256 = job.sha256
    if args.base_url is None:
        args.base_url = [os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL]
    if not args.print_config:
        missing = [f"--{n}" for n in ("input", "output") if not getattr(args, n)]
        if missing:
            parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def _run(args: argparse.Namespace) -> Exit:
    args = _with_job_file(args)
    if args.print_config:
        # Credentials in a URL are secrets: the printed job names the endpoint without them.
        shown = {**vars(args), "base_url": [redact_url(u) for u in args.base_url]}
        out(render_job_file(shown).rstrip("\n"))
        return Exit.OK
    config = job_config_from_args(args)
    config.validate()  # before the metrics server takes its port
    configure_logging(args.log_format, args.log_level)
    metrics = metrics_server(args)
    try:
        stats = run_async(
            run_job(
                config,
                api_key=api_keys(args),
                progress_interval=args.progress_interval,
                # Progress lines would break a stream of JSON lines; metrics show progress.
                quiet=args.quiet or args.log_format == "json",
                metrics=metrics,
                prices=(args.price_in, args.price_out),
            )
        )
    finally:
        if metrics is not None:
            metrics.close()
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
    api_key: str | Mapping[str, str | None] | None,
    progress_interval: float | None = None,
    quiet: bool = False,
    redo: Redo | None = None,
    metrics: Metrics | None = None,
    prices: tuple[float | None, float | None] = (None, None),
) -> Statistics:
    """Run one job with progress on stderr and its summary at the end; the first Ctrl-C or
    SIGTERM stops intake and drains, the second stops at once (``finished`` is then False).
    ``redo``: a retry run of recorded failures; ``metrics``: served while it runs;
    ``prices``: USD per million prompt and completion tokens, for the cost on the progress
    line. A cancellation from elsewhere propagates."""
    if config.backend == "batch" and (config.workers > 1 or config.ray):
        raise ConfigError("--workers runs the online backend; a batch job needs none")
    if config.backend == "batch":
        if redo is not None:
            raise ConfigError("retry-failed runs online: give it --backend online")
        if isinstance(api_key, Mapping):
            raise ConfigError("the batch backend takes one key (api_key_env), not one per endpoint")
        return await _run_batch_job(config, api_key=api_key, quiet=quiet)
    if config.workers > 1 or config.ray or is_partitioned(Path(config.output)):
        async with workers_job(config, api_key=api_key, redo=redo, say=say) as coordinator:
            stats = await _run_watched(
                coordinator,
                config,
                quiet=quiet,
                metrics=metrics,
                progress_interval=progress_interval,
                prices=prices,
            )
    else:
        async with Engine(config, api_key=api_key, redo=redo, warn=warn, metrics=metrics) as engine:
            stats = await _run_watched(
                engine,
                config,
                quiet=quiet,
                metrics=None,  # the engine serves them itself
                progress_interval=progress_interval,
                prices=prices,
            )
    _ended(stats, config)
    return stats


async def _run_watched(
    job: Engine | Coordinator,
    config: JobConfig,
    *,
    quiet: bool,
    metrics: Metrics | None,
    progress_interval: float | None,
    prices: tuple[float | None, float | None],
) -> Statistics:
    """Run an engine or a coordinator with progress lines, metrics and the stop signals."""
    if metrics is not None:
        metrics.attach(job.statistics, streamed=config.stream)
    try:
        reporter = ProgressReporter(
            job.statistics, sys.stderr, interval=progress_interval, prices=prices
        )

        def graceful(signum: signal.Signals) -> None:
            reporter.finish()
            n = job.statistics().in_flight
            say(
                f"{signum.name}: no new requests; waiting up to {config.drain_timeout:g}s "
                f"for {n} in flight (again to stop now)"
            )
            job.stop()

        def now(signum: signal.Signals) -> None:
            # The run is cancelled next (a coordinator's slots then stop their workers at once).
            reporter.finish()
            say("stopping now; flushing what has come back")

        with StopSignals(graceful, now) as signals:
            progress = None if quiet else asyncio.create_task(reporter.run())
            try:
                stats = await job.run()
            except asyncio.CancelledError:
                if not signals.absorb():
                    raise
                stats = job.statistics()
            finally:
                if progress is not None:
                    progress.cancel()
                    # wait() neither raises the progress task's CancelledError nor hides ours
                    await asyncio.wait([progress])
                reporter.finish()
    finally:
        if metrics is not None:
            metrics.detach()
    return stats


def _ended(stats: Statistics, config: JobConfig) -> None:
    event(
        logging.INFO,
        "job_end",
        "job finished" if stats.finished else "job stopped; rerun to resume",
        finished=stats.finished,
        stopped=stats.stopped,
        succeeded=stats.succeeded,
        failed=stats.failed,
        bad_lines=stats.bad_lines,
        requests=stats.requests,
        retries=stats.retries,
        prompt_tokens=stats.prompt_tokens,
        completion_tokens=stats.completion_tokens,
        elapsed_s=round(stats.elapsed, 3),
    )
    for damage in stats.bad_files:
        warn(f"input not read to the end: {damage}")
    report(summary(stats, config.output))


async def _run_batch_job(config: JobConfig, *, api_key: str | None, quiet: bool) -> Statistics:
    """The job through the Batch API; Ctrl-C stops polling (the batches go on at the
    server, and a rerun picks them up), a second one stops at once."""
    progress = (lambda _: None) if quiet else say
    async with BatchBackend(config, api_key=api_key, report=progress, warn=warn) as job:

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
    for damage in stats.bad_files:
        warn(f"input not read to the end: {damage}")
    report(summary(stats, config.output))
    return stats
