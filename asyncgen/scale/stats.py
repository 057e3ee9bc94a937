"""One job's statistics from the statistics of its partitions' runs (sans-IO: the
coordinator's progress line, metrics and summary read what this makes)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from asyncgen.core.leases import EndpointStats
from asyncgen.engine.stats import Counts, ErrorCount, Statistics

__all__ = ["combine"]

_COUNTS = [f for f in Counts.__struct_fields__ if f != "bad_files"]


def combine(
    parts: Sequence[Statistics],
    *,
    endpoints: Sequence[Sequence[EndpointStats]],
    elapsed: float,
    totals: Sequence[tuple[int, int, int]],
    fraction: float,
    finished: bool,
    stopped: bool,
    waiting: bool = False,
    total_items: int | None = None,
) -> Statistics:
    """One job's statistics from its partitions' runs: counts summed, each worker's
    ``endpoints`` merged by URL, errors by endpoint, code and status."""
    counts = {f: sum(getattr(s, f) for s in parts) for f in _COUNTS}
    merged: dict[str, EndpointStats] = {}
    for each in endpoints:
        for e in each:
            seen = merged.get(e.url)
            merged[e.url] = e if seen is None else _merged(seen, e)
    errors: dict[tuple[str, str, int | None], int] = {}
    for s in parts:
        for err in s.errors:
            key = (err.endpoint, err.code, err.status)
            errors[key] = errors.get(key, 0) + err.count
    pauses: dict[str, int] = {}
    for s in parts:
        for cause, n in s.pauses.items():
            pauses[cause] = pauses.get(cause, 0) + n
    return Statistics(
        **counts,
        bad_files=tuple(f for s in parts for f in s.bad_files),
        elapsed=elapsed,
        succeeded_total=sum(t[0] for t in totals),
        failed_total=sum(t[1] for t in totals),
        bad_lines_total=sum(t[2] for t in totals),
        input_fraction=fraction,
        finished=finished,
        stopped=stopped,
        endpoints=list(merged.values()),
        waiting_for_endpoint=waiting,
        total_items=total_items,
        errors=[ErrorCount(u, c, st, n) for (u, c, st), n in errors.items()],
        pauses=pauses,
    )


def _merged(a: EndpointStats, b: EndpointStats) -> EndpointStats:
    return msgspec.structs.replace(
        a,
        up=a.up or b.up,
        window=a.window + b.window,
        outstanding=a.outstanding + b.outstanding,
        paused_for=max(a.paused_for, b.paused_for),
        requests=a.requests + b.requests,
        succeeded=a.succeeded + b.succeeded,
        throttled=a.throttled + b.throttled,
        failed=a.failed + b.failed,
        ejections=a.ejections + b.ejections,
        refused_share=max(a.refused_share, b.refused_share),
    )
