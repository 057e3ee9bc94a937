"""The ``asyncgen`` command: a thin layer over the public API.

Exit status of ``asyncgen run`` (and ``demo``):

* 0 — every item of the job has a successful result;
* 1 — the job finished, but some items ended as failures or some input lines were bad
  (see ``failures-*.jsonl.zst`` and ``errors-*.jsonl.zst`` in the output directory);
* 2 — usage, configuration, input or output-directory error, unreachable endpoint, or a bad
  line under ``--strict``; nothing was lost, fix the cause and rerun;
* 3 — an unexpected internal error (a bug; the traceback follows): please report it;
* 130 — interrupted (Ctrl-C / SIGTERM) before the end; rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import traceback
from collections.abc import Sequence

from asyncgen._version import __version__
from asyncgen.cli.args import (
    add_inputs,
    json_object,
    number,
    positive_float,
    positive_int,
    run_async,
)
from asyncgen.cli.progress import ProgressReporter, summary
from asyncgen.core.errors import AsyncgenError
from asyncgen.core.ledger import Redo
from asyncgen.engine.engine import Engine
from asyncgen.engine.runtime import tune_gc
from asyncgen.engine.stats import Statistics
from asyncgen.job.config import JobConfig
from asyncgen.job.prompts import available_templates, load_template

__all__ = ["main"]

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
OPENAI_BASE_URL = "https://api.openai.com/v1"


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("endpoint")
    g.add_argument(
        "--base-url",
        action="append",
        metavar="URL",
        help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1 "
        f"(default: $OPENAI_BASE_URL, else {OPENAI_BASE_URL}); give it several times for "
        "replicas serving the same model: each request goes to the healthy one with the "
        "least work in flight, and one that stops answering is ejected and probed until it "
        "is back",
    )
    g.add_argument(
        "--stream",
        action="store_true",
        help="request server-sent events: once tokens flow, an attempt is retried only "
        "after --idle-timeout of silence (--timeout still caps it), and each result records "
        "its time to first token",
    )
    g.add_argument(
        "--idle-timeout",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="with --stream, retry an attempt after this long without a byte once the "
        "stream has begun; the wait for its first byte (a queue) is bounded by --timeout "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default: %(default)s); "
        "the key is never printed or stored",
    )
    g = p.add_argument_group("limits and retries")
    g.add_argument(
        "--concurrency",
        type=positive_int,
        default=256,
        metavar="N",
        help="requests in flight at most, over all endpoints (default: %(default)s); each "
        "endpoint's share adapts: it halves on 429, 503 and timeouts and grows back on success",
    )
    g.add_argument(
        "--min-concurrency",
        type=positive_int,
        default=1,
        metavar="N",
        help="an endpoint's adaptive share never drops below this (default: %(default)s)",
    )
    g.add_argument(
        "--rpm",
        type=positive_float,
        metavar="N",
        help="requests per minute, paced evenly (default: none, but budgets a server "
        "announces in x-ratelimit-* headers are always followed)",
    )
    g.add_argument(
        "--tpm",
        type=positive_float,
        metavar="N",
        help="tokens per minute, paced evenly: each request reserves its estimated prompt plus "
        "the expected output, corrected to the reply's usage",
    )
    g.add_argument(
        "--max-attempts",
        type=positive_int,
        default=6,
        metavar="N",
        help="attempts per item before it is recorded as failed (default: %(default)s)",
    )
    g.add_argument(
        "--max-invalid",
        type=positive_int,
        default=3,
        metavar="N",
        help="replies failing the template's [output] checks (JSON schema, prefix, regex) per "
        "item before it is recorded as failed; counted apart from --max-attempts "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--timeout",
        type=positive_float,
        default=600.0,
        metavar="SECONDS",
        help="time limit of one attempt, streamed or not (default: %(default)s)",
    )
    g.add_argument(
        "--deadline",
        type=positive_float,
        default=3600.0,
        metavar="SECONDS",
        help="no new attempt for an item after this long (default: %(default)s)",
    )
    g.add_argument(
        "--drain-timeout",
        type=positive_float,
        default=30.0,
        metavar="SECONDS",
        help="on Ctrl-C/SIGTERM, how long in-flight requests may finish (default: %(default)s)",
    )


def add_request_arguments(
    p: argparse.ArgumentParser,
    *,
    model_required: bool = False,
    samples_help: str = "requests per persona",
) -> None:
    """The options of every command that runs a job: what to ask, how to behave, where to
    send it (``asyncgen run``, ``asyncgen personas from-text`` and ``expand``)."""
    p.add_argument("--model", "-m", required=model_required, help="model name sent in each request")
    p.add_argument(
        "--samples",
        type=positive_int,
        default=1,
        metavar="N",
        help=f"{samples_help} (default: %(default)s)",
    )
    p.add_argument(
        "--max-tokens",
        type=positive_int,
        metavar="N",
        help="max output tokens per request (overrides the template)",
    )
    p.add_argument(
        "--temperature", type=number, help="sampling temperature (overrides the template)"
    )
    p.add_argument("--top-p", type=number, help="nucleus sampling (overrides the template)")
    p.add_argument(
        "--extra-body",
        type=json_object,
        default={},
        metavar="JSON",
        help='extra request fields, e.g. \'{"top_k": 20, "min_p": 0.05}\' for vLLM',
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad input line instead of recording it in "
        "errors-*.jsonl.zst and going on",
    )
    p.add_argument(
        "--progress-interval",
        type=positive_float,
        metavar="SECONDS",
        help="seconds between progress lines (default: 0.5 on a terminal, else 30)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the start-up check that the endpoint answers GET /models",
    )
    _add_job_arguments(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncgen",
        description="Persona-driven synthetic data generation against OpenAI-compatible APIs: "
        "render a prompt template for every persona, send the requests concurrently within "
        "rate limits, retry what can be retried, and write every result exactly once.",
        epilog="Exit status: 0 all succeeded; 1 some items failed or input lines were bad; "
        "2 usage/input/setup error; 3 internal error (a bug); 130 interrupted (rerun to "
        "resume).",
    )
    parser.add_argument("--version", action="version", version=f"asyncgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run a generation job",
        description="Run a job: every persona line of the inputs (or OpenAI Batch request "
        "line) becomes a request; results go to --output as zstd JSON lines. Rerunning the "
        "same command resumes: committed items are skipped, nothing is written twice.",
        epilog="Exit status: 0 all succeeded; 1 some items failed or input lines were bad; "
        "2 usage/input/setup error; 3 internal error (a bug); 130 interrupted (rerun to "
        "resume).",
    )
    add_inputs(run, "input shards (.jsonl or .jsonl.zst) or glob patterns")
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

    mock = sub.add_parser(
        "mock-server",
        help="serve an OpenAI/vLLM-compatible mock API with latency and fault injection",
        description="An OpenAI-compatible server for tests and benchmarks: deterministic "
        "synthetic completions, configurable latency and injected faults.",
    )
    from asyncgen.mock import server as mock_module

    mock_module.add_arguments(mock)

    bench = sub.add_parser(
        "bench",
        help="benchmark a serving deployment: latency (TTFT, TPOT, ITL), throughput, goodput",
        description="Send a workload at a fixed or Poisson rate, or in a closed loop, to an "
        "OpenAI-compatible endpoint (vllm serve, OpenAI, a gateway) and report throughput, "
        "goodput and latency percentiles. Latencies count from each request's scheduled "
        "send time, so waiting in the client is included (no coordinated omission).",
        epilog="Exit status: 0 finished; 1 no measured request succeeded; 2 usage or "
        "endpoint error; 130 interrupted (the report covers what finished).",
    )
    from asyncgen.cli import bench as bench_module

    bench_module.add_arguments(bench)

    personas = sub.add_parser(
        "personas",
        help="create, expand, select and deduplicate persona shards",
        description="Persona shards are JSON lines with a 'persona' field (plain or .zst). "
        "These commands make them from text (from-text), grow them through relationships "
        "(expand), pick some (sample, filter), describe them (stats) and remove copies "
        "(dedup).",
    )
    persona_commands = personas.add_subparsers(dest="persona_command", required=True)
    from asyncgen.personas import pipeline
    from asyncgen.personas import tools as personatools

    pipeline.add_commands(persona_commands)
    personatools.add_commands(persona_commands)

    from asyncgen.cli import jobtools

    jobtools.add_commands(sub)

    sub.add_parser("prompts", help="list the shipped prompt templates")
    return parser


def job_config_from_args(args: argparse.Namespace) -> JobConfig:
    extra = dict(args.extra_body)
    if args.temperature is not None:
        extra["temperature"] = args.temperature
    if args.top_p is not None:
        extra["top_p"] = args.top_p
    base_url = args.base_url or [os.environ.get("OPENAI_BASE_URL") or OPENAI_BASE_URL]
    return JobConfig(
        inputs=list(args.input),
        output=args.output,
        prompt=args.prompt,
        model=args.model,
        base_url=base_url[0] if len(base_url) == 1 else base_url,
        samples=args.samples,
        max_tokens=args.max_tokens,
        persona_field=args.persona_field,
        extra_body=extra,
        concurrency=args.concurrency,
        min_concurrency=min(args.min_concurrency, args.concurrency),
        stream=args.stream,
        idle_timeout=args.idle_timeout,
        rpm=args.rpm,
        tpm=args.tpm,
        max_attempts=args.max_attempts,
        max_invalid=args.max_invalid,
        timeout=args.timeout,
        deadline=args.deadline,
        strict=args.strict,
        drain_timeout=args.drain_timeout,
        check_endpoint=not args.no_check,
    )


def exit_status(s: Statistics) -> int:
    if not s.finished:
        return EXIT_INTERRUPTED
    return EXIT_FAILURES if s.failed_total or s.bad_lines_total else EXIT_OK


async def run_job(
    config: JobConfig,
    *,
    api_key: str | None,
    progress_interval: float | None = None,
    quiet: bool = False,
    redo: Redo | None = None,
) -> int:
    """Run one job with progress on stderr and graceful Ctrl-C/SIGTERM handling
    (``redo``: a retry run of recorded failures)."""
    err = sys.stderr
    async with Engine(config, api_key=api_key, redo=redo) as engine:
        reporter = ProgressReporter(engine.statistics, err, interval=progress_interval)
        main_task = asyncio.current_task()
        assert main_task is not None
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:
            if engine.statistics().stopped:
                reporter.finish()
                err.write("asyncgen: stopping now; flushing what has come back\n")
                main_task.cancel()
                return
            reporter.finish()
            n = engine.statistics().in_flight
            err.write(
                f"asyncgen: {signal.Signals(signum).name}: no new requests; waiting up to "
                f"{config.drain_timeout:g}s for {n} in flight (again to stop now)\n"
            )
            engine.stop()

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)
        progress: asyncio.Task[None] | None = None
        try:
            if not quiet:
                progress = asyncio.create_task(reporter.run())
            try:
                stats = await engine.run()
            except asyncio.CancelledError:
                if main_task.cancelling() == 0:
                    raise
                main_task.uncancel()
                stats = engine.statistics()
        finally:
            if progress is not None:
                progress.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await progress
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
            reporter.finish()
    with contextlib.suppress(OSError):  # a closed stderr does not change the outcome
        err.write(summary(stats, config.output) + "\n")
    if redo is not None and stats.finished:
        # A retry run answers for the items it retried, not for failures it left alone.
        return EXIT_FAILURES if stats.failed or stats.bad_lines else EXIT_OK
    return exit_status(stats)


def entry() -> int:
    """The ``asyncgen`` command: :func:`main` in a process tuned for long jobs (the
    garbage collector, see :func:`asyncgen.tune_gc`). ``main`` alone leaves the process as
    it is, for callers that run it in their own."""
    tune_gc()
    return main()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        handler = getattr(args, "handler", None)
        if handler is not None:
            # Subcommands registered by their own modules: handler(args) -> exit status.
            return int(handler(args))
        if args.command == "prompts":
            for name in available_templates():
                print(f"{name:18} {load_template(name).description}")
            return EXIT_OK
        if args.command == "mock-server":
            from asyncgen.mock import server as mock_module

            return mock_module.main_from_args(args)
        if args.command == "bench":
            from asyncgen.cli import bench as bench_module

            typed = sys.argv[1:] if argv is None else list(argv)
            return bench_module.main_from_args(args, ["asyncgen", *typed])
        if args.command == "demo":
            from asyncgen.cli.demo import run_demo

            return run_async(run_demo(args.output, personas=args.personas, prompt=args.prompt))
        config = job_config_from_args(args)
        api_key = os.environ.get(args.api_key_env) or None
        return run_async(
            run_job(
                config, api_key=api_key, progress_interval=args.progress_interval, quiet=args.quiet
            )
        )
    except AsyncgenError as exc:
        print(f"asyncgen: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("asyncgen: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        # Not 1, which scripts read as "finished with some failures".
        traceback.print_exc()
        print(
            "asyncgen: internal error (a bug; please report it with the traceback above); "
            "committed results are safe, rerun to resume",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
