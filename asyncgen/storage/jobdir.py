"""Reading a job's output directory: its manifest, its records as one logical view, a status
summary and exports. Everything here only reads (exports write elsewhere), so it is safe to
use on a directory a job is writing to; a record that is still being written is not seen.

The logical view: each ``custom_id`` has one current record. A success is final. A failure
stands until a later record of the same id (written by ``asyncgen retry-failed``, marked
``replaces_failure``) supersedes it; of several failures of one id, the last one stands.
Shards are numbered in the order they were written and records within a shard are in commit
order, so "later" is "further along in (shard number, position)".
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from asyncgen.core.errors import ConfigError, OutputError
from asyncgen.core.records import ErrorInfo, Result, Usage
from asyncgen.storage.shards import LinesWriter, iter_lines
from asyncgen.storage.store import SHARD_RE

__all__ = [
    "JobStatus",
    "export",
    "iter_results",
    "iter_standing_failures",
    "read_manifest",
    "shards",
    "standing_failures",
    "status",
]


def shards(root: Path, kind: str) -> list[Path]:
    """The ``kind`` shards (results, failures or errors) of ``root``, in writing order."""
    found = []
    if not root.is_dir():
        return []
    for path in root.iterdir():
        match = SHARD_RE.match(path.name)
        if match and match.group(1) == kind:
            found.append((int(match.group(2)), path))
    return [p for _, p in sorted(found)]


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of an output directory; :class:`OutputError` if it is not one."""
    path = root / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutputError(
            f"{root} is not an asyncgen output directory (no manifest.json)"
        ) from None
    except (OSError, ValueError) as exc:
        raise OutputError(f"cannot read {path}: {exc}") from exc
    if not isinstance(manifest, dict) or "spec" not in manifest:
        raise OutputError(f"{path} is not an asyncgen manifest")
    return manifest


class _FailureView(msgspec.Struct):
    custom_id: str
    error: ErrorInfo | None
    usage: Usage | None = None
    rejected_usage: Usage | None = None


class _RetryView(msgspec.Struct):
    custom_id: str
    replaces_failure: bool = False


_failure_decoder = msgspec.json.Decoder(_FailureView)
_retry_decoder = msgspec.json.Decoder(_RetryView)
_result_decoder = msgspec.json.Decoder(Result)


def _superseding_successes(root: Path, candidates: set[str]) -> set[str]:
    """Ids among ``candidates`` that a success of a retry run settled."""
    settled = set()
    for path in shards(root, "results"):
        for line in iter_lines(path):
            if b'"replaces_failure":true' not in line:
                continue  # only a retry run's records can settle a failure
            view = _retry_decoder.decode(line)
            if view.replaces_failure and view.custom_id in candidates:
                settled.add(view.custom_id)
    return settled


def _last_failures(root: Path, spent: list[int] | None = None) -> dict[str, tuple[int, int, str]]:
    """id -> (shard index, line index, error code) of each id's last failure record. Adds
    the tokens of every failure record (superseded ones too: they were paid for) to
    ``spent`` (prompt, completion), if given."""
    latest: dict[str, tuple[int, int, str]] = {}
    for n, path in enumerate(shards(root, "failures")):
        for i, line in enumerate(iter_lines(path)):
            view = _failure_decoder.decode(line)
            latest[view.custom_id] = (n, i, view.error.code if view.error else "unknown")
            if spent is not None:
                _add_tokens(spent, view.usage, view.rejected_usage)
    return latest


def _add_tokens(spent: list[int], *usages: Usage | None) -> None:
    """Add the prompt and completion tokens of ``usages`` to ``spent``."""
    for usage in usages:
        if usage is not None:
            spent[0] += usage.prompt_tokens or 0
            spent[1] += usage.completion_tokens or 0


def standing_failures(root: Path) -> dict[str, tuple[int, int, str]]:
    """The failures no later record supersedes: id -> (shard index, line index, error code)
    of its last failure. Memory grows with the number of failed items, not of all items."""
    latest = _last_failures(root)
    for custom_id in _superseding_successes(root, set(latest)):
        del latest[custom_id]
    return latest


def _failures_at(
    root: Path, standing: dict[str, tuple[int, int, str]]
) -> Iterator[tuple[bytes, Result]]:
    """The failure records at the positions ``standing`` names, in writing order."""
    positions = {(n, i) for n, i, _ in standing.values()}
    if not positions:
        return
    for n, path in enumerate(shards(root, "failures")):
        for i, line in enumerate(iter_lines(path)):
            if (n, i) in positions:
                yield line, _result_decoder.decode(line)


def iter_standing_failures(root: Path) -> Iterator[tuple[bytes, Result]]:
    """Every standing failure, as (line as stored, decoded record), in writing order."""
    yield from _failures_at(root, standing_failures(root))


def iter_results(root: Path) -> Iterator[tuple[bytes, Result]]:
    """Every success, as (line as stored, decoded record)."""
    for path in shards(root, "results"):
        for line in iter_lines(path):
            yield line, _result_decoder.decode(line)


class JobStatus(msgspec.Struct, kw_only=True):
    """What ``asyncgen status`` reports."""

    output: str
    running: bool
    asyncgen: str | None
    model: str | None
    template: str | None
    succeeded: int
    failed: int
    """Standing failures (retried ones that succeeded are not counted)."""
    failed_by_reason: dict[str, int]
    bad_lines: int
    bad_lines_by_reason: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    first_started: float | None
    last_finished: float | None
    items_per_second: float | None
    """Successes over the seconds the job was active (see ``active_seconds``)."""
    active_seconds: float | None = None
    """The span from the first attempt to the last outcome, less the pauses of more than a
    minute in it (between a run and a later one, say ``retry-failed`` a day after)."""
    cost: float | None = None
    """Estimated from the token counts and the prices given, if any."""


def _locked(root: Path) -> bool:
    import fcntl
    import os

    try:
        fd = os.open(root / ".lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops a lock we may have taken
    return False


def status(
    root: Path, *, price_input: float | None = None, price_output: float | None = None
) -> JobStatus:
    """Summarise ``root`` by reading every record (seconds per million records).

    Prices are per million tokens; with either given, ``cost`` is estimated from the usage
    the server reported.
    """
    manifest = read_manifest(root)
    spec = manifest.get("spec", {})
    template = spec.get("template")
    attempts = succeeded = 0
    first: float | None = None
    last: float | None = None
    # Tokens of every reply the server reported: successes, failures, rejected replies.
    spent = [0, 0]
    # One pass over the successes: totals, and the failures that retries settled.
    failures = _last_failures(root, spent)
    active = _ActiveTime()
    for _, r in iter_results(root):
        if r.replaces_failure:
            failures.pop(r.custom_id, None)
        succeeded += 1
        attempts += r.attempts
        _add_tokens(spent, r.usage, r.rejected_usage)
        start = r.started if r.started is not None else r.created - r.latency_s
        first = start if first is None else min(first, start)
        last = r.created if last is None else max(last, r.created)
        active.add(start, r.created)
    by_reason = Counter(code for _, _, code in failures.values())
    bad: Counter[str] = Counter()
    for path in shards(root, "errors"):
        for line in iter_lines(path):
            bad[_failure_code(line)] += 1
    prompt_tokens, completion_tokens = spent
    cost = None
    if price_input is not None or price_output is not None:
        cost = (
            prompt_tokens * (price_input or 0.0) + completion_tokens * (price_output or 0.0)
        ) / 1e6
    busy = active.seconds()
    return JobStatus(
        output=str(root),
        running=_locked(root),
        asyncgen=manifest.get("asyncgen"),
        model=spec.get("model"),
        template=template.get("name") if isinstance(template, dict) else None,
        succeeded=succeeded,
        failed=len(failures),
        failed_by_reason=dict(by_reason.most_common()),
        bad_lines=sum(bad.values()),
        bad_lines_by_reason=dict(bad.most_common()),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        attempts=attempts,
        first_started=first,
        last_finished=last,
        items_per_second=succeeded / busy if busy else None,
        active_seconds=busy,
        cost=cost,
    )


class _ActiveTime:
    """Seconds covered by (start, end) intervals that come roughly in time order (records in
    writing order), leaving out pauses longer than ``gap``; constant memory."""

    def __init__(self, gap: float = 60.0) -> None:
        self.gap = gap
        self._done = 0.0
        self._span: tuple[float, float] | None = None

    def add(self, start: float, end: float) -> None:
        span = self._span
        if span is None:
            self._span = (start, end)
        elif start > span[1] + self.gap:
            self._done += span[1] - span[0]
            self._span = (start, end)
        else:
            self._span = (min(span[0], start), max(span[1], end))

    def seconds(self) -> float | None:
        if self._span is None:
            return None
        return self._done + self._span[1] - self._span[0]


def _failure_code(line: bytes) -> str:
    try:
        error = _failure_decoder.decode(line).error
    except msgspec.DecodeError:
        return "unknown"
    return error.code if error else "unknown"


# --- export ----------------------------------------------------------------------------------

EXPORT_FORMATS = ("jsonl", "batch", "parquet")


def _logical(root: Path, failures: bool) -> Iterator[tuple[bytes, Result]]:
    """Every success, then (if asked) every standing failure; the successes are read once."""
    standing = _last_failures(root) if failures else {}
    for line, record in iter_results(root):
        if record.replaces_failure:
            standing.pop(record.custom_id, None)
        yield line, record
    yield from _failures_at(root, standing)


def _batch_line(r: Result, endpoint: str) -> dict[str, Any]:
    """A record in the OpenAI Batch output format (one line of a batch's output file)."""
    request_id = f"asyncgen-{hashlib.sha256(r.custom_id.encode()).hexdigest()[:24]}"
    if r.error is not None and r.error.status is not None and r.error.status != 200:
        # The server answered with an error status: OpenAI records that as a response.
        error_body = {"error": {"message": r.error.message, "code": r.error.code}}
        return {
            "id": request_id,
            "custom_id": r.custom_id,
            "response": {
                "status_code": r.error.status,
                "request_id": request_id,
                "body": error_body,
            },
            "error": None,
        }
    if r.error is not None:
        # No error response to show (a timeout, a dropped connection, an invalid reply).
        return {
            "id": request_id,
            "custom_id": r.custom_id,
            "response": None,
            "error": {"code": r.error.code, "message": r.error.message},
        }
    if endpoint == "completions":
        obj = "text_completion"
        choice: dict[str, Any] = {"index": 0, "text": r.output, "finish_reason": r.finish_reason}
    else:
        obj = "chat.completion"
        message: dict[str, Any] = {"role": "assistant", "content": r.output}
        if r.tool_calls:
            message["tool_calls"] = r.tool_calls
        if r.reasoning is not None:
            message["reasoning_content"] = r.reasoning
        choice = {"index": 0, "message": message, "finish_reason": r.finish_reason}
    body = {
        "id": request_id,
        "object": obj,
        "created": int(r.created),
        "model": r.model,
        "choices": [choice],
    }
    if r.usage is not None:
        body["usage"] = msgspec.to_builtins(r.usage)
    return {
        "id": request_id,
        "custom_id": r.custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


_PARQUET_BATCH = 50_000
_PARQUET_COLUMNS = [
    ("custom_id", "str"),
    ("output", "str"),
    ("error_code", "str"),
    ("error_message", "str"),
    ("finish_reason", "str"),
    ("model", "str"),
    ("template", "str"),
    ("persona", "str"),
    ("source_shard", "str"),
    ("source_line", "int"),
    ("attempts", "int"),
    ("latency_s", "float"),
    ("ttft_s", "float"),
    ("started", "float"),
    ("created", "float"),
    ("endpoint", "str"),
    ("prompt_tokens", "int"),
    ("completion_tokens", "int"),
    ("persona_sha256", "str"),
    ("template_sha256", "str"),
    ("reasoning", "str"),
    ("sampling", "str"),
    ("meta", "str"),
    ("parsed", "str"),
    ("tool_calls", "str"),
]
"""Parquet columns and their types, in the order of :func:`_parquet_row`."""


def _parquet_row(r: Result) -> dict[str, Any]:
    usage = r.usage or Usage(None, None, None)
    dump = msgspec.json.encode
    return {
        "custom_id": r.custom_id,
        "output": r.output,
        "error_code": r.error.code if r.error else None,
        "error_message": r.error.message if r.error else None,
        "finish_reason": r.finish_reason,
        "model": r.model,
        "template": r.template,
        "persona": r.persona,
        "source_shard": r.source.shard,
        "source_line": r.source.line,
        "attempts": r.attempts,
        "latency_s": r.latency_s,
        "ttft_s": r.ttft_s,
        "started": r.started,
        "created": r.created,
        "endpoint": r.endpoint,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "persona_sha256": r.persona_sha256,
        "template_sha256": r.template_sha256,
        "reasoning": r.reasoning,
        "sampling": dump(r.sampling).decode(),
        "meta": dump(r.meta).decode(),
        "parsed": None if r.parsed is None else dump(r.parsed).decode(),
        "tool_calls": None if r.tool_calls is None else dump(r.tool_calls).decode(),
    }


def export(root: Path, destination: Path, fmt: str = "jsonl", *, failures: bool = False) -> int:
    """Write the logical view of ``root`` to ``destination`` (plain, or zstd if its name ends
    in ``.zst``; ``parquet`` needs pyarrow); return the number of records written.

    ``jsonl`` keeps each record's line as stored; ``batch`` is the OpenAI Batch output format;
    ``parquet`` has one column per field (nested ones as JSON text). Written to a temporary
    file and renamed, so ``destination`` is either the old file or the complete new one.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (one of {', '.join(EXPORT_FORMATS)})")
    manifest = read_manifest(root)
    records = _logical(root, failures)
    if fmt == "parquet":
        tmp = destination.with_name(destination.name + ".tmp")
        try:
            n = _export_parquet(records, tmp)
            os.replace(tmp, destination)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return n
    endpoint = _endpoint(manifest)
    encoder = msgspec.json.Encoder()
    with LinesWriter(destination) as out:
        for line, record in records:
            out.write(encoder.encode(_batch_line(record, endpoint)) if fmt == "batch" else line)
    return out.lines


def _endpoint(manifest: dict[str, Any]) -> str:
    job = manifest.get("job") or {}
    return "completions" if job.get("template_endpoint") == "completions" else "chat"


def _export_parquet(records: Iterator[tuple[bytes, Result]], tmp: Path) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "Parquet export needs pyarrow: pip install 'asyncgen[parquet]' (or pyarrow)"
        ) from None
    # One schema for every batch: inferred from the first, a column that batch held only as
    # nulls (no failures among the first 50 000 records, say) would refuse later values.
    types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}
    schema = pa.schema([(name, types[kind]) for name, kind in _PARQUET_COLUMNS])
    n = 0
    rows: list[dict[str, Any]] = []
    with pq.ParquetWriter(tmp, schema) as writer:
        for _, record in records:
            rows.append(_parquet_row(record))
            if len(rows) >= _PARQUET_BATCH:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                n, rows = n + len(rows), []
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return n + len(rows)
