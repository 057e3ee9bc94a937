"""The ``asyncgen bench`` command line: flags, the run with progress and Ctrl-C, the report
as a table and as JSON. The benchmark itself is :mod:`asyncgen.bench.runner`.

The first Ctrl-C or SIGTERM stops the run (nothing more is sent, the requests in flight are
abandoned) and the report covers what finished; a second one cancels the run where it is
(say, in a start-up check that hangs) and still reports what finished. Either way the exit
status is 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from asyncgen._version import __version__
from asyncgen.bench.config import DEFAULT_INPUT_LEN, BenchConfig
from asyncgen.bench.runner import Bench, BenchResult
from asyncgen.bench.stats import SLO_METRICS, format_report
from asyncgen.cli.args import json_object, non_negative_int, positive_float, positive_int, run_async
from asyncgen.cli.console import out, say
from asyncgen.cli.exits import Exit
from asyncgen.cli.signals import StopSignals
from asyncgen.core.errors import ConfigError
from asyncgen.core.redact import redact_text
from asyncgen.job.prompts import available_templates
from asyncgen.storage.files import atomic_write

__all__ = [
    "add_arguments",
    "add_command",
    "config_from_args",
    "main_from_args",
    "result_document",
    "run_cli",
]

_COMMAND = "asyncgen bench"
_encode = msgspec.json.encode


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``bench`` subcommand, handled by :func:`main_from_args`."""
    parser = sub.add_parser(
        "bench",
        help="benchmark a serving deployment: latency (TTFT, TPOT, ITL), throughput, goodput",
        description="Send a workload at a fixed or Poisson rate, or in a closed loop, to an "
        "OpenAI-compatible endpoint (vllm serve, OpenAI, a gateway) and report throughput, "
        "goodput and latency percentiles. Latencies count from each request's scheduled "
        "send time, so waiting in the client is included (no coordinated omission).",
        epilog="Exit status: 0 finished; 1 no measured request succeeded; 2 usage or "
        "endpoint error; 130 interrupted (the report covers what finished).",
    )
    add_arguments(parser)
    parser.set_defaults(handler=main_from_args)


# --- command line ---------------------------------------------------------------------------


def _slo(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    name = name.strip().lower()
    name = "e2e" if name == "e2el" else name
    if not sep or name not in SLO_METRICS:
        raise argparse.ArgumentTypeError(
            f"expected METRIC=SECONDS with METRIC one of {', '.join(SLO_METRICS)}, got {text!r}"
        )
    return name, positive_float(value)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``asyncgen bench`` flags."""
    g = parser.add_argument_group("endpoint")
    g.add_argument(
        "--base-url",
        metavar="URL",
        help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 "
        "(default: $OPENAI_BASE_URL)",
    )
    g.add_argument("--model", "-m", help="model name (default: the first one GET /models lists)")
    g.add_argument(
        "--endpoint",
        choices=("chat", "completions"),
        help="/v1/chat/completions or /v1/completions (default: the template's, else chat)",
    )
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default: %(default)s); "
        "the key is never printed or stored",
    )
    g.add_argument("--no-check", action="store_true", help="skip the start-up GET /models check")
    g.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="a request not complete after this long counts as failed: timeout "
        "(default: %(default)s)",
    )
    g = parser.add_argument_group("workload")
    g.add_argument(
        "--prompt",
        "-p",
        metavar="NAME|PATH",
        help="render prompts from this template ("
        + ", ".join(available_templates())
        + ", or a .toml path) and the --input persona shards",
    )
    g.add_argument(
        "--input",
        "-i",
        nargs="+",
        action="extend",
        metavar="FILE",
        help="persona shards for --prompt (.jsonl, .jsonl.zst or globs); cycled when "
        "there are fewer lines than requests",
    )
    g.add_argument(
        "--persona-field",
        default="persona",
        metavar="FIELD",
        help="input field holding the persona (default: %(default)s)",
    )
    g.add_argument(
        "--input-len",
        type=positive_int,
        metavar="N",
        help="without --prompt: synthetic prompts of random words, about N tokens (default: 256)",
    )
    g.add_argument(
        "--output-len",
        type=positive_int,
        metavar="N",
        help="max_tokens of each request (default for synthetic prompts: 128); with "
        "--ignore-eos every reply has exactly N tokens",
    )
    g.add_argument(
        "--ignore-eos",
        action="store_true",
        help='send vLLM\'s "ignore_eos": true, so generation runs to max_tokens',
    )
    g.add_argument(
        "--max-tokens",
        type=positive_int,
        metavar="N",
        help="max_tokens of each request (overrides the template's)",
    )
    g.add_argument(
        "--extra-body",
        type=json_object,
        default={},
        metavar="JSON",
        help='extra request fields, e.g. \'{"temperature": 0, "top_k": 20}\'',
    )
    g.add_argument(
        "--no-stream",
        dest="stream",
        action="store_false",
        help="plain requests instead of server-sent events (no TTFT, TPOT or ITL then)",
    )
    g.add_argument("--seed", type=int, default=0, help="seed for prompts and arrivals (default: 0)")
    g = parser.add_argument_group("load and length")
    g.add_argument(
        "--rate",
        type=positive_float,
        metavar="R",
        help="R requests per second, at fixed intervals (default: no rate, a closed loop "
        "keeping --concurrency requests in flight)",
    )
    g.add_argument(
        "--poisson",
        action="store_true",
        help="with --rate: exponential inter-arrival times of mean 1/R (a Poisson process)",
    )
    g.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="N",
        help="requests in flight at most (default: unlimited with --rate, else 64); "
        "arrivals beyond it wait, and the wait counts in their latency",
    )
    g.add_argument(
        "--num-requests",
        "-n",
        type=positive_int,
        metavar="N",
        help="measured requests to send (default: 200 unless --duration is given)",
    )
    g.add_argument(
        "--duration",
        type=positive_float,
        metavar="SECONDS",
        help="send measured requests for this long (with --num-requests, whichever "
        "ends first), then wait for those in flight",
    )
    g.add_argument(
        "--warmup",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="send N requests first, under the same load, and leave them out of the "
        "statistics (default: 0)",
    )
    g = parser.add_argument_group("report")
    g.add_argument(
        "--slo",
        type=_slo,
        action="append",
        default=[],
        metavar="METRIC=SECONDS",
        help="a service-level objective for goodput, repeatable: ttft=0.5, tpot=0.05, "
        "e2e=10; goodput counts completed requests within all of them per second",
    )
    g.add_argument(
        "--json",
        metavar="PATH",
        help="write every figure, the configuration and the command line as JSON",
    )
    g.add_argument(
        "--save-requests",
        metavar="PATH",
        help="write one JSON line per request (timings in seconds from the start)",
    )
    g.add_argument(
        "--progress-interval",
        type=positive_float,
        default=5.0,
        metavar="SECONDS",
        help="seconds between progress lines on stderr (default: %(default)s)",
    )
    g.add_argument("--quiet", "-q", action="store_true", help="no progress lines")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    base_url = args.base_url or os.environ.get("OPENAI_BASE_URL")
    if not base_url:
        raise ConfigError("give the endpoint with --base-url (or set OPENAI_BASE_URL)")
    return BenchConfig(
        base_url=base_url,
        model=args.model,
        endpoint=args.endpoint,
        prompt=args.prompt,
        inputs=list(args.input or []),
        persona_field=args.persona_field,
        input_len=args.input_len,
        output_len=args.output_len,
        ignore_eos=args.ignore_eos,
        max_tokens=args.max_tokens,
        extra_body=args.extra_body,
        rate=args.rate,
        poisson=args.poisson,
        concurrency=args.concurrency,
        num_requests=args.num_requests,
        duration=args.duration,
        warmup=args.warmup,
        stream=args.stream,
        timeout=args.timeout,
        seed=args.seed,
        slo=dict(args.slo),
        check_endpoint=not args.no_check,
    )


def _writable(path: str | None, flag: str) -> None:
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise ConfigError(f"{flag} {path}: the directory does not exist")


def result_document(result: BenchResult, config: BenchConfig, argv: Sequence[str]) -> Any:
    """What ``--json`` writes: the figures, the configuration, version and command line."""
    settings = msgspec.to_builtins(config)
    # The values in effect, defaults resolved, so runs compare without knowing the defaults.
    settings.update(
        base_url=redact_text(config.base_url),
        model=result.model,
        endpoint=result.endpoint,
        concurrency=config.max_in_flight,
        num_requests=None if config.total is None else config.total - config.warmup,
        max_tokens=config.max_tokens_sent,
    )
    if config.prompt is None:
        settings["input_len"] = config.input_len or DEFAULT_INPUT_LEN
    command = [redact_text(arg) for arg in argv]
    return {
        "asyncgen_version": __version__,
        "command": command,
        "command_line": shlex.join(command),
        "created": time.time(),
        "interrupted": result.interrupted,
        "config": settings,
        "results": msgspec.to_builtins(result.report),
    }


async def run_cli(
    config: BenchConfig,
    *,
    api_key: str | None,
    progress_interval: float = 5.0,
    quiet: bool = False,
) -> BenchResult:
    """Run the benchmark with progress lines on stderr; Ctrl-C or SIGTERM ends it early with
    what has finished (a second one at once). A cancellation from elsewhere goes on."""
    async with Bench(config, api_key=api_key, notify=lambda m: say(m, command=_COMMAND)) as bench:

        def graceful(_signal: object) -> None:
            say("interrupted; reporting what has finished", command=_COMMAND)
            bench.stop()

        with StopSignals(graceful) as signals:
            try:
                async with _progress_lines(bench, None if quiet else progress_interval):
                    return await bench.run()
            except asyncio.CancelledError:
                if not signals.absorb():
                    raise
    return bench.result()


@contextlib.asynccontextmanager
async def _progress_lines(bench: Bench, interval: float | None) -> AsyncIterator[None]:
    """A progress line on stderr every ``interval`` seconds (None: none) while inside."""
    if interval is None:
        yield
        return

    async def report() -> None:
        while True:
            await asyncio.sleep(interval)
            p = bench.statistics()
            rate = p.done / p.elapsed if p.elapsed else 0.0
            say(
                f"{p.elapsed:.1f}s  {p.done} done ({p.failed} failed)  "
                f"{p.in_flight} in flight  {rate:.1f} req/s",
                command=_COMMAND,
            )

    task = asyncio.create_task(report())
    try:
        yield
    finally:
        task.cancel()
        # wait(), unlike awaiting the task, raises only for a cancellation of our own.
        await asyncio.wait([task])


def main_from_args(args: argparse.Namespace) -> int:
    """``asyncgen bench``: the report on stdout; ``args.argv``, the command line as typed, is
    kept in the JSON. Exit status 0, or 1 when no measured request succeeded, or 130 when
    interrupted (the report covers what finished)."""
    config = config_from_args(args)
    _writable(args.json, "--json")
    _writable(args.save_requests, "--save-requests")
    coro = run_cli(
        config,
        api_key=os.environ.get(args.api_key_env) or None,
        progress_interval=args.progress_interval,
        quiet=args.quiet,
    )
    result = run_async(coro)
    if result.skipped_inputs:
        say(f"skipped {result.skipped_inputs} bad input lines", command=_COMMAND)
    title = f"asyncgen bench: {result.model} at {redact_text(config.base_url)}"
    out(format_report(result.report, title=title))
    # Written whole or not at all (storage.files): a report is never half a file.
    if args.json is not None:
        document = result_document(result, config, args.argv)
        with atomic_write(args.json) as f:
            f.write(msgspec.json.format(_encode(document)) + b"\n")
    if args.save_requests is not None:
        with atomic_write(args.save_requests) as f:
            for record in result.records:
                f.write(_encode(record) + b"\n")
    if result.interrupted:
        return Exit.INTERRUPTED
    return Exit.OK if result.report.completed or not result.report.requests else Exit.FAILURES
