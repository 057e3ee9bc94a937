"""Commands on a job's output directory: ``status``, ``export`` and ``retry-failed``."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import Any

import msgspec

from asyncgen.cli.args import positive_float, positive_int, run_async
from asyncgen.cli.console import out, say
from asyncgen.cli.exits import Exit
from asyncgen.cli.options import add_api_key_env, api_key
from asyncgen.cli.run import exit_status, run_job
from asyncgen.core.errors import ConfigError, OutputError
from asyncgen.core.ledger import Redo
from asyncgen.job.config import JobConfig
from asyncgen.storage.export import EXPORT_FORMATS, export, ids_path
from asyncgen.storage.manifest import read_manifest
from asyncgen.storage.status import status as job_status
from asyncgen.storage.view import iter_standing_failures

__all__ = ["add_commands"]


def add_commands(sub: argparse._SubParsersAction[Any]) -> None:
    """Register ``status``, ``export`` and ``retry-failed``."""
    status = sub.add_parser(
        "status",
        help="summarise a job's output directory",
        description="Read a job's output directory and summarise it: successes, standing "
        "failures by reason, bad input lines, tokens, throughput and (with prices) cost. "
        "Safe while the job runs.",
    )
    status.add_argument("output", metavar="DIR", help="the job's output directory")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.add_argument(
        "--price-input",
        "--price-in",
        dest="price_input",
        type=float,
        metavar="USD",
        help="price per million prompt tokens, for a cost estimate",
    )
    status.add_argument(
        "--price-output",
        "--price-out",
        dest="price_output",
        type=float,
        metavar="USD",
        help="price per million completion tokens, for a cost estimate",
    )
    status.add_argument(
        "--batch-rate",
        type=float,
        default=0.5,
        metavar="R",
        help="outputs of --backend batch cost R times the prices (default: %(default)s, "
        "OpenAI's Batch API discount)",
    )
    status.set_defaults(handler=_status)

    export = sub.add_parser(
        "export",
        help="write a job's results as one plain JSONL, Parquet or OpenAI Batch output file",
        description="Write the logical view of a job (every success; with --failures also "
        "every standing failure; a failure that retry-failed fixed appears only as its "
        "success) to one file.",
    )
    export.add_argument("output", metavar="DIR", help="the job's output directory")
    export.add_argument(
        "--to", required=True, metavar="FILE", help="destination (.zst suffix: compressed)"
    )
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="jsonl",
        help="jsonl: records as stored; batch: OpenAI Batch output lines (for a "
        "--backend batch job, the server's own lines, byte for byte); parquet: one "
        "column per field (needs pyarrow); vectors: an embedding job's vectors as a float32 "
        ".npy matrix (--to NAME.npy), row i's custom_id, shard and line on line i of "
        "NAME.ids.jsonl (default: %(default)s)",
    )
    export.add_argument("--failures", action="store_true", help="include the standing failures")
    export.set_defaults(handler=_export)

    retry = sub.add_parser(
        "retry-failed",
        help="send a job's recorded failures again",
        description="Send the items whose latest record is a failure again, with the "
        "job's own settings (from its manifest) unless overridden below. A retried item "
        "that succeeds replaces its failure; one that fails again keeps a single, newer "
        "failure. Interrupted, it can be rerun: it retries what is still failed.",
        epilog="Exit status: 0 every retried item succeeded; 1 some failed again; 2 usage "
        "error; 130 interrupted.",
    )
    retry.add_argument("output", metavar="DIR", help="the job's output directory")
    retry.add_argument(
        "--reason",
        action="append",
        metavar="CODE",
        help="retry only failures with this reason (http_400, timeout, connection, "
        "invalid_output, quota, ...) or the server's own code (invalid_request_error); "
        "repeatable; 'asyncgen status' lists them",
    )
    retry.add_argument(
        "--base-url", action="append", metavar="URL", help="endpoint(s) to use instead"
    )
    add_api_key_env(retry)
    retry.add_argument("--concurrency", type=positive_int, metavar="N")
    retry.add_argument("--rpm", type=positive_float, metavar="N")
    retry.add_argument("--tpm", type=positive_float, metavar="N")
    retry.add_argument("--max-attempts", type=positive_int, metavar="N")
    retry.add_argument("--timeout", type=positive_float, metavar="SECONDS")
    retry.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    retry.add_argument("--progress-interval", type=positive_float, metavar="SECONDS")
    retry.set_defaults(handler=_retry_failed)


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _codes(codes: dict[str, int] | None, reason: str) -> str:
    """The server's own codes behind a reason, where they say more than it."""
    if not codes or set(codes) == {reason}:
        return ""
    return " (" + ", ".join(f"{code} {n:,}" for code, n in codes.items()) + ")"


def _status(args: argparse.Namespace) -> Exit:
    root = Path(args.output)
    s = job_status(
        root,
        price_input=args.price_input,
        price_output=args.price_output,
        batch_rate=args.batch_rate,
    )
    if args.json:
        out(msgspec.json.encode(s).decode())
        return Exit.OK
    lines = [
        f"{s.output}: {'RUNNING' if s.running else 'not running'}; model {s.model or '-'}, "
        f"template {s.template or '(batch lines)'}, asyncgen {s.asyncgen or '?'}",
        f"  succeeded      {s.succeeded:,} ({s.attempts:,} attempts)",
        f"  failed         {s.failed:,}"
        + "".join(
            f"\n    {reason:20} {n:,}{_codes(s.failed_by_code.get(reason), reason)}"
            for reason, n in s.failed_by_reason.items()
        ),
        f"  bad input      {s.bad_lines:,}"
        + "".join(f"\n    {code:20} {n:,}" for code, n in s.bad_lines_by_reason.items()),
        f"  tokens         {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion"
        + (
            f" ({s.batch_prompt_tokens:,} + {s.batch_completion_tokens:,} by the Batch API)"
            if s.batch_prompt_tokens or s.batch_completion_tokens
            else ""
        )
        + (
            f"\n  no usage       {s.no_usage:,} successes the server reported no token "
            "counts for (unknown: not in the tokens or the cost)"
            if s.no_usage
            else ""
        ),
        *(
            [f"  partitions     {s.partitions:,} (run by workers; {s.partitions_running} held now)"]
            if s.partitions
            else []
        ),
        f"  first attempt  {_when(s.first_started)}",
        f"  last outcome   {_when(s.last_finished)}",
    ]
    if s.items_per_second is not None:
        active = s.active_seconds or 0.0
        lines.append(
            f"  throughput     {s.items_per_second:,.1f} successes/s over "
            f"{active:,.0f} s active (pauses over a minute left out)"
        )
    if s.cost is not None:
        # Cents, but a small job's fraction of a cent is not "$0.00".
        shown = f"{s.cost:,.2f}" if s.cost >= 1 or s.cost == 0 else f"{s.cost:.4g}"
        lines.append(f"  cost estimate  ${shown}")
    if s.failed:
        lines.append(f"  retry them with: asyncgen retry-failed {s.output}")
    out("\n".join(lines))
    return Exit.OK


def _export(args: argparse.Namespace) -> Exit:
    n = export(Path(args.output), Path(args.to), args.format, failures=args.failures)
    if args.format == "vectors":
        say(f"wrote {n:,} vectors to {args.to} (their ids: {ids_path(Path(args.to))})")
    else:
        say(f"wrote {n:,} records to {args.to}")
    return Exit.OK


def retry_config(root: Path, **overrides: Any) -> JobConfig:
    """The job of ``root`` as its manifest records it, with ``overrides`` (None: keep)."""
    job = read_manifest(root, JobConfig).job
    if job is None:
        raise OutputError(
            f"{root / 'manifest.json'} does not record the job's settings (written by an "
            "older asyncgen); rerun the original 'asyncgen run' command once to record them"
        )
    changes = {k: v for k, v in overrides.items() if v is not None}
    urls = job.base_urls
    if "base_url" not in changes and any("***@" in u for u in urls):
        raise ConfigError(
            "the job's base URL carried credentials, which the manifest does not keep; "
            "give --base-url again"
        )
    if "base_url" in changes:
        changes["endpoint_limits"] = []  # they were the replaced endpoints' own
    elif len(urls) == 1:
        changes["base_url"] = urls[0]
    return msgspec.structs.replace(job, output=str(root), **changes)


def _retry_failed(args: argparse.Namespace) -> Exit:
    root = Path(args.output)
    wanted = set(args.reason or ())
    chosen = [
        (r.custom_id, r.source.shard, r.source.line)
        for _, r in iter_standing_failures(root)
        if not wanted or (r.error is not None and {r.error.code, r.error.reason} & wanted)
    ]
    if not chosen:
        which = f" with reason {', '.join(sorted(wanted))}" if wanted else ""
        say(f"{root} has no standing failures{which}; nothing to retry")
        return Exit.OK
    base_url = args.base_url
    config = retry_config(
        root,
        base_url=(base_url[0] if len(base_url) == 1 else base_url) if base_url else None,
        concurrency=args.concurrency,
        rpm=args.rpm,
        tpm=args.tpm,
        max_attempts=args.max_attempts,
        timeout=args.timeout,
    )
    redo = Redo(chosen)
    say(f"retrying {len(redo):,} failed items of {root}")
    stats = run_async(
        run_job(
            config,
            api_key=api_key(args),
            progress_interval=args.progress_interval,
            quiet=args.quiet,
            redo=redo,
        )
    )
    return exit_status(stats, retry=True)
