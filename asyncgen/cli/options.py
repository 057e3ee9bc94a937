"""The options every command that runs a job shares (``run``, ``personas from-text`` and
``expand``): what to ask, how to behave, where to send it, and the
:class:`~asyncgen.engine.engine.JobConfig` they make."""

from __future__ import annotations

import argparse
import gc
import os

from asyncgen.cli.args import (
    json_object,
    non_negative_int,
    number,
    positive_float,
    positive_int,
)
from asyncgen.cli.console import say
from asyncgen.core.limits import EndpointLimits
from asyncgen.engine.metrics import Metrics
from asyncgen.job.config import BACKENDS, JobConfig

__all__ = [
    "OPENAI_BASE_URL",
    "add_api_key_env",
    "add_operations_arguments",
    "add_request_arguments",
    "api_key",
    "api_keys",
    "job_config_from_args",
    "metrics_server",
]

OPENAI_BASE_URL = "https://api.openai.com/v1"


def _add_backend_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backend")
    g.add_argument(
        "--backend",
        choices=BACKENDS,
        default="online",
        help="online (default): one HTTP request per item, results in seconds; batch: the "
        "OpenAI Batch API (files of requests, results within its 24 h window, at half the "
        "price); rerunning a batch job picks up its batches where they stand",
    )
    g.add_argument(
        "--batch-poll",
        type=positive_float,
        default=30.0,
        metavar="S",
        help="batch: seconds between looks at a running batch, growing to 4x (default: "
        "%(default)s)",
    )
    g.add_argument(
        "--batch-max-requests",
        type=positive_int,
        default=50_000,
        metavar="N",
        help="batch: requests per batch file at most (default and OpenAI's limit: %(default)s)",
    )


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    _add_backend_arguments(p)
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
        "--embed-batch",
        type=positive_int,
        default=1,
        metavar="K",
        help="embedding templates: send K texts per /embeddings request ('input' as a list; "
        "OpenAI takes up to 2048 per request and 300 000 tokens in all; vLLM takes a list "
        "too, each text within the model's length); each text still gets its own record "
        "and id, a failed request is retried as a whole, and texts a reply leaves out are "
        "sent again (default: %(default)s)",
    )
    add_api_key_env(g)
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
        help="seconds between progress lines (default: 0.5 on a terminal, rewritten in "
        "place, else 30); a line shows items done / total, %%, ETA once the input is "
        "counted (in the background), rates, cost, retries; NO_COLOR turns its color off",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the start-up check that the endpoint answers GET /models",
    )
    _add_job_arguments(p)


def job_config_from_args(args: argparse.Namespace) -> JobConfig:
    """The job the parsed options of ``run`` (or a persona pipeline) describe."""
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
        template=getattr(args, "template", None),
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
        embed_batch=args.embed_batch,
        rpm=args.rpm,
        tpm=args.tpm,
        endpoint_limits=[
            None if own is None else EndpointLimits(**own)
            for own in getattr(args, "endpoint_limits", None) or []
        ],
        max_attempts=args.max_attempts,
        max_invalid=args.max_invalid,
        timeout=args.timeout,
        deadline=args.deadline,
        strict=args.strict,
        drain_timeout=args.drain_timeout,
        check_endpoint=not args.no_check,
        backend=args.backend,
        batch_poll=args.batch_poll,
        batch_max_requests=args.batch_max_requests,
        workers=getattr(args, "workers", None) or 1,
        ray=getattr(args, "ray", None),
        partition_lines=getattr(args, "partition_lines", None),
        job_file=getattr(args, "job_file", None),
        job_file_sha256=getattr(args, "job_file_sha256", None),
    )


def add_operations_arguments(p: argparse.ArgumentParser) -> None:
    """How a long job is watched: structured logs and a Prometheus endpoint."""
    g = p.add_argument_group("logs and metrics")
    g.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="events (pauses, ejections, bad input lines, the job's stop) on stderr as "
        "'asyncgen: ...' lines, or one JSON object a line (default: %(default)s)",
    )
    g.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="info",
        help="the least severe event shown (default: %(default)s)",
    )
    g.add_argument(
        "--metrics-port",
        type=non_negative_int,
        metavar="PORT",
        help="serve Prometheus metrics on this port (needs the 'metrics' extra; default: none)",
    )
    g.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address the metrics server binds (default: %(default)s; 0.0.0.0 exposes it)",
    )
    g.add_argument(
        "--price-in",
        "--price-input",
        dest="price_in",
        type=number,
        metavar="USD",
        help="price of a million prompt tokens, for the estimated-cost metric",
    )
    g.add_argument(
        "--price-out",
        "--price-output",
        dest="price_out",
        type=number,
        metavar="USD",
        help="price of a million completion tokens, for the estimated-cost metric",
    )


def metrics_server(args: argparse.Namespace) -> Metrics | None:
    """The job's metrics, served on ``--metrics-port`` (None when not asked for)."""
    if args.metrics_port is None:
        return None
    metrics = Metrics(price_in=args.price_in, price_out=args.price_out)
    port = metrics.serve(args.metrics_port, host=args.metrics_host)
    if gc.get_freeze_count():
        # A process tuned for a long job (asyncgen.tune_gc) froze its start-up; prometheus-
        # client, imported just now, is start-up too. Left to the collector, its objects cost
        # 2 % more instructions per item (benchmarks/README.md, instructions).
        gc.freeze()
    say(f"metrics on http://{args.metrics_host}:{port}/metrics")
    return metrics


def add_api_key_env(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--api-key-env VAR``, read by :func:`api_key`."""
    p.add_argument(
        "--api-key-env",
        default="OPENAI_API_KEY",
        metavar="VAR",
        help="environment variable holding the API key (default: %(default)s); "
        "the key is never printed or stored",
    )


def api_key(args: argparse.Namespace) -> str | None:
    """The API key from the variable ``--api-key-env`` names (None when unset or empty)."""
    return os.environ.get(args.api_key_env) or None


def api_keys(args: argparse.Namespace) -> str | dict[str, str | None] | None:
    """:func:`api_key`, or with a job file's ``[[endpoints]]`` that name their own
    variable, one key per base URL."""
    default = api_key(args)
    envs = getattr(args, "endpoint_key_envs", None)
    if not envs:
        return default
    return {
        url: (os.environ.get(env) or None) if env else default
        for url, env in zip(args.base_url, envs, strict=True)
    }
