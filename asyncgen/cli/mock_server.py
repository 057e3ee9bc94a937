"""``asyncgen mock-server``: the mock of :mod:`asyncgen.mock.server` on a port until Ctrl-C or
SIGTERM, then one line on what it served."""

from __future__ import annotations

import argparse
import asyncio
import os

from asyncgen.cli.args import run_async
from asyncgen.cli.console import error, out, say
from asyncgen.cli.exits import Exit
from asyncgen.cli.signals import StopSignals
from asyncgen.mock.server import MockConfig, MockServer

__all__ = ["add_arguments", "add_command", "config_from_args", "main_from_args", "serve"]

_COMMAND = "asyncgen mock-server"


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``mock-server`` subcommand, handled by :func:`main_from_args`."""
    parser = sub.add_parser(
        "mock-server",
        help="serve an OpenAI/vLLM-compatible mock API with latency and fault injection",
        description="An OpenAI-compatible server for tests and benchmarks: deterministic "
        "synthetic completions, configurable latency and injected faults.",
    )
    add_arguments(parser)
    parser.set_defaults(handler=main_from_args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``asyncgen mock-server`` flags."""
    d = MockConfig()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    add("--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    add("--latency", type=float, default=d.latency, help="mean seconds per reply (default: 0)")
    add(
        "--latency-jitter",
        type=float,
        default=d.latency_jitter,
        help="latency varies uniformly by ± this many seconds (default: 0)",
    )
    add("--seed", type=int, default=d.seed, help="seed for replies and faults (default: 0)")
    add(
        "--output-tokens",
        type=int,
        default=d.output_tokens,
        help="words per reply unless max_tokens cuts it (default: %(default)s)",
    )
    add(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="serve only this model (repeatable); default: accept any model name",
    )
    add(
        "--api-key-env",
        metavar="VAR",
        help="require the API key held in this environment variable (default: no auth)",
    )
    add(
        "--fail-429",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of 429 Too Many Requests",
    )
    add(
        "--retry-after",
        type=float,
        default=d.retry_after,
        metavar="SECONDS",
        help="delay announced by injected 429s (and 503s with --503-retry-after) "
        "(default: %(default)s)",
    )
    add("--fail-500", type=float, default=0.0, metavar="P", help="probability of a 500")
    add("--fail-503", type=float, default=0.0, metavar="P", help="probability of a 503")
    add(
        "--503-retry-after",
        dest="retry_after_503",
        action="store_true",
        help="injected 503s carry retry-after too, as a gateway shedding load does "
        "(default: vLLM's bare 503)",
    )
    add(
        "--quota-exhausted",
        action="store_true",
        help="refuse every generation request as OpenAI refuses an account without credits "
        "(429, insufficient_quota)",
    )
    add(
        "--broken",
        action="store_true",
        help="answer 500 on every route, /v1/models and /health included",
    )
    add(
        "--drop",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of closing the connection without a reply",
    )
    add("--hang", type=float, default=0.0, metavar="P", help="probability of hanging")
    add(
        "--hang-seconds",
        type=float,
        default=d.hang_seconds,
        help="how long a hang lasts (default: %(default)s)",
    )
    add(
        "--malformed",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of a 200 with an empty, truncated or non-JSON body",
    )
    add(
        "--embed-partial",
        type=float,
        default=0.0,
        metavar="P",
        help="probability that a good reply to an embeddings request of several inputs "
        "leaves out one input's vector",
    )
    add(
        "--rpm-limit",
        type=float,
        metavar="N",
        help="admit at most N requests per minute (a leaky bucket); beyond it, 429 with "
        "retry-after-ms (default: no limit)",
    )
    add(
        "--tpm-limit",
        type=float,
        metavar="N",
        help="admit at most N tokens (prompt + completion) per minute (default: no limit)",
    )
    add(
        "--limit-burst",
        type=float,
        default=d.limit_burst,
        metavar="SECONDS",
        help="seconds of budget the rate buckets hold (default: %(default)s)",
    )
    add(
        "--no-ratelimit-headers",
        dest="ratelimit_headers",
        action="store_false",
        help="do not announce the budgets in x-ratelimit-* headers",
    )
    add(
        "--max-running",
        type=int,
        metavar="N",
        help="at most N requests generate at once; the rest wait in FIFO order (default: no limit)",
    )
    add(
        "--max-waiting",
        type=int,
        metavar="N",
        help="with --max-running: at most N wait; beyond, a bare 503 at once (default: no limit)",
    )
    add(
        "--charge-max-tokens",
        action="store_true",
        help="the TPM budget charges a request's max_tokens in full when it arrives, as "
        "OpenAI's limiter does (default: the reply's tokens)",
    )
    add(
        "--token-latency",
        type=float,
        default=d.token_latency,
        metavar="SECONDS",
        help="seconds per output token, after --latency (default: 0)",
    )
    add(
        "--load-slowdown",
        type=float,
        default=d.load_slowdown,
        metavar="F",
        help="per-token time grows by F for each other request generating at once (default: 0)",
    )
    add(
        "--stream-comments",
        action="store_true",
        help="streams also carry SSE comments and blank lines, and split events across writes",
    )
    add(
        "--stream-cut",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of closing a stream abruptly part-way (no [DONE])",
    )
    add(
        "--stream-stall",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of a stream pausing for --hang-seconds part-way",
    )
    add(
        "--invalid-json",
        type=float,
        default=0.0,
        metavar="RATE",
        help="share of structured replies (response_format json_schema / json_object) that "
        "are invalid: cut short or missing a field (default: 0)",
    )
    add(
        "--batch-delay",
        type=float,
        default=d.batch_delay,
        metavar="SECONDS",
        help="Batch API: seconds from a batch's creation until it is finished (default: 0)",
    )
    add(
        "--batch-error",
        type=float,
        default=d.batch_error,
        metavar="RATE",
        help="Batch API: share of a batch's requests answered 500, in its error file (default: 0)",
    )
    add(
        "--batch-fail",
        type=int,
        default=d.batch_fail,
        metavar="N",
        help="Batch API: the first N batches end failed, without output (default: 0)",
    )
    add(
        "--batch-expire",
        type=int,
        default=d.batch_expire,
        metavar="N",
        help="Batch API: the next N end expired with half their requests done (default: 0)",
    )


def config_from_args(args: argparse.Namespace) -> MockConfig:
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    return MockConfig(
        latency=args.latency,
        latency_jitter=args.latency_jitter,
        seed=args.seed,
        output_tokens=args.output_tokens,
        models=args.models or [],
        api_key=api_key,
        fail_429=args.fail_429,
        retry_after=args.retry_after,
        fail_500=args.fail_500,
        fail_503=args.fail_503,
        retry_after_503=args.retry_after_503,
        quota_exhausted=args.quota_exhausted,
        broken=args.broken,
        drop=args.drop,
        hang=args.hang,
        hang_seconds=args.hang_seconds,
        malformed=args.malformed,
        embed_partial=args.embed_partial,
        rpm_limit=args.rpm_limit,
        tpm_limit=args.tpm_limit,
        limit_burst=args.limit_burst,
        ratelimit_headers=args.ratelimit_headers,
        max_running=args.max_running,
        max_waiting=args.max_waiting,
        charge_max_tokens=args.charge_max_tokens,
        token_latency=args.token_latency,
        load_slowdown=args.load_slowdown,
        stream_comments=args.stream_comments,
        stream_cut=args.stream_cut,
        stream_stall=args.stream_stall,
        invalid_json=args.invalid_json,
        batch_delay=args.batch_delay,
        batch_error=args.batch_error,
        batch_fail=args.batch_fail,
        batch_expire=args.batch_expire,
    )


async def serve(config: MockConfig, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then say what was served."""
    stop = asyncio.Event()
    server = MockServer(config, host=host, port=port)
    with StopSignals(lambda _signal: stop.set()) as signals:
        try:
            async with server:
                out(f"asyncgen mock server listening on {server.base_url}")
                await stop.wait()
        except asyncio.CancelledError:  # a second signal while shutting down
            if not signals.absorb():
                raise
    stats = server.statistics()
    say(f"{stats.requests} requests, outcomes {stats.by_outcome}", command="asyncgen mock server")


def main_from_args(args: argparse.Namespace) -> int:
    """``asyncgen mock-server``: 0 once stopped by a signal, 2 for a bad flag or address."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        error(str(exc), command=_COMMAND)
        return Exit.USAGE
    try:
        run_async(serve(config, args.host, args.port))
    except OSError as exc:
        error(f"cannot listen on {args.host}:{args.port}: {exc}", command=_COMMAND)
        return Exit.USAGE
    return Exit.OK
