"""``asyncgen status``: a summary of an output directory, read from its records.

Only reads, so it is safe on a directory a job is writing to.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import msgspec

from asyncgen.core.errors import OutputError
from asyncgen.storage.files import is_locked
from asyncgen.storage.manifest import MANIFEST_NAME, read_manifest
from asyncgen.storage.partitions import part_dirs
from asyncgen.storage.shards import iter_lines
from asyncgen.storage.view import add_tokens, failure_code, iter_results, last_failures, shards

__all__ = ["JobStatus", "status"]


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
    """Standing failures by normalised reason (``http_400``, ``timeout``, ``quota``, ...)."""
    bad_lines: int
    bad_lines_by_reason: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    """Tokens the server reported; records without usage are not in them (``no_usage``)."""
    attempts: int
    first_started: float | None
    last_finished: float | None
    items_per_second: float | None
    """Successes over the seconds the job was active (see ``active_seconds``)."""
    active_seconds: float | None = None
    """The span from the first attempt to the last outcome, less the pauses of more than a
    minute in it (between a run and a later one, say ``retry-failed`` a day after)."""
    cost: float | None = None
    """Estimated from the token counts and the prices given, if any; tokens of Batch API
    outputs at ``batch_rate`` times the prices."""
    batch_prompt_tokens: int = 0
    """Of ``prompt_tokens``, those of successes the Batch API produced."""
    batch_completion_tokens: int = 0
    no_usage: int = 0
    """Successes whose server reported no token counts (or only some): their tokens are
    unknown, so they are left out of the totals and the cost, not priced at zero."""
    partitions: int = 0
    """Of a job run by workers (``--workers``): its partitions (0: a one-process job)."""
    partitions_running: int = 0
    """Partitions a worker holds now."""
    failed_by_code: dict[str, dict[str, int]] = {}
    """Standing failures by reason, then by the code the record gives (the server's own,
    ``invalid_request_error`` say, where it sent one)."""


class _Template(msgspec.Struct):
    name: str


class _Described(msgspec.Struct):
    """What a status names of the spec (whose other keys are the job layer's business)."""

    model: str | None = None
    template: _Template | None = None


def _described(root: Path, spec: dict[str, Any]) -> _Described:
    try:
        return msgspec.convert(spec, _Described)
    except msgspec.ValidationError as exc:
        raise OutputError(
            f"{root / MANIFEST_NAME} records a spec asyncgen cannot read ({exc})"
        ) from exc


def status(
    root: Path,
    *,
    price_input: float | None = None,
    price_output: float | None = None,
    batch_rate: float = 0.5,
) -> JobStatus:
    """Summarise ``root`` by reading every record (seconds per million records).

    Prices are per million tokens; with either given, ``cost`` is estimated from the usage
    the server reported (``no_usage`` counts the successes it covers not), the successes
    of Batch API outputs at ``batch_rate`` times them (OpenAI bills batches at half price).
    """
    manifest = read_manifest(root)
    described = _described(root, manifest.spec)
    attempts = succeeded = no_usage = 0
    first: float | None = None
    last: float | None = None
    # Tokens of every reply the server reported: successes, failures, rejected replies.
    spent = [0, 0]
    batch = [0, 0]
    # One pass over the successes: totals, and the failures that retries settled.
    failures = last_failures(root, spent)
    active = _ActiveTime()
    for _, r in iter_results(root):
        if r.replaces_failure:
            failures.pop(r.custom_id, None)
        succeeded += 1
        attempts += r.attempts
        add_tokens(spent, r.usage, r.rejected_usage)
        if r.usage is None or not r.usage.known:
            no_usage += 1
        if r.batch_id is not None:
            add_tokens(batch, r.usage)
        start = r.started if r.started is not None else r.created - r.latency_s
        first = start if first is None else min(first, start)
        last = r.created if last is None else max(last, r.created)
        active.add(start, r.created)
    by_reason = Counter(reason for _, _, reason, _ in failures.values())
    by_code: dict[str, Counter[str]] = {}
    for _, _, reason, code in failures.values():
        by_code.setdefault(reason, Counter())[code] += 1
    bad: Counter[str] = Counter()
    for path in shards(root, "errors"):
        for line in iter_lines(path):
            bad[failure_code(line)] += 1
    prompt_tokens, completion_tokens = spent
    cost = None
    if price_input is not None or price_output is not None:
        prices = (price_input or 0.0, price_output or 0.0)
        online = sum((s - b) * p for s, b, p in zip(spent, batch, prices, strict=True))
        batched = sum(b * p * batch_rate for b, p in zip(batch, prices, strict=True))
        cost = (online + batched) / 1e6
    busy = active.seconds()
    parts = part_dirs(root)
    return JobStatus(
        partitions=len(parts),
        partitions_running=sum(map(is_locked, parts)),
        output=str(root),
        running=is_locked(root),
        asyncgen=manifest.asyncgen,
        model=described.model,
        template=described.template.name if described.template else None,
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
        no_usage=no_usage,
        failed_by_code={r: dict(c.most_common()) for r, c in by_code.items()},
        batch_prompt_tokens=batch[0],
        batch_completion_tokens=batch[1],
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
