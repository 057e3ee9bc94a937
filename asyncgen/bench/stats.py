"""The statistics of ``asyncgen bench``, sans-IO: per-request records in, a report out.

No clock, no network: every time in a :class:`RequestRecord` is seconds since the benchmark
started, taken by the caller. Definitions (all latencies from the *scheduled* send time, so
time spent waiting in the client counts, which avoids coordinated omission)::

    e2e       end - scheduled
    ttft      first token chunk - scheduled                        (streaming only)
    tpot      (e2e - ttft) / (output_tokens - 1)                   (streaming, > 1 token)
    itl       gaps between consecutive token chunks of a request, pooled over requests
    queueing  sent - scheduled

Percentiles interpolate linearly between closest ranks (numpy's default method). Failed
requests are counted by error kind and left out of every latency figure.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import msgspec

__all__ = [
    "SLO_METRICS",
    "Distribution",
    "Report",
    "RequestRecord",
    "distribution",
    "format_report",
    "percentile",
    "summarize",
]

SLO_METRICS = ("ttft", "tpot", "e2e")
"""What ``--slo`` may bound, as in vLLM's ``--goodput`` (there: ``e2el``)."""


class RequestRecord(msgspec.Struct, kw_only=True):
    """One request as the client saw it; times are seconds since the benchmark started."""

    index: int
    warmup: bool = False
    scheduled: float
    """When it was due to be sent: the arrival process's time, or (closed loop) the moment a
    concurrency slot freed."""
    sent: float
    """When the client actually started sending it."""
    end: float
    """When the whole reply (or the error) was in."""
    token_times: list[float] = []
    """Arrival of each streamed chunk that carried output; the first is the first token."""
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    status: int | None = None
    error: str | None = None
    """The kind of failure (``http_429``, ``timeout``, ``stream_cut`` ...); None if it succeeded."""
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def e2e(self) -> float:
        return self.end - self.scheduled

    @property
    def queueing(self) -> float:
        return self.sent - self.scheduled

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.scheduled if self.token_times else None

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first; None without a first token or with
        fewer than two output tokens."""
        if not self.token_times or self.output_tokens is None or self.output_tokens < 2:
            return None
        return (self.end - self.token_times[0]) / (self.output_tokens - 1)

    def gaps(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times)]


class Distribution(msgspec.Struct, frozen=True):
    """Summary of one latency metric, in seconds."""

    n: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: float


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """Everything ``asyncgen bench`` reports; rates are per second of ``duration_s``."""

    duration_s: float
    """From the first measured request's scheduled time to the last one's end."""
    requests: int
    completed: int
    failed: int
    warmup: int
    errors: dict[str, int]
    input_tokens: int
    output_tokens: int
    request_throughput: float
    input_token_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    slo: dict[str, float]
    good: int | None
    """Completed requests within every SLO (None when no SLO was given)."""
    goodput: float | None
    e2e: Distribution | None
    ttft: Distribution | None
    tpot: Distribution | None
    itl: Distribution | None
    queueing: Distribution | None


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ascending ``ordered``, interpolating linearly
    between the closest ranks."""
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution(values: Iterable[float]) -> Distribution | None:
    """Mean, p50, p90, p99 and max of ``values``; None when there are none."""
    ordered = sorted(values)
    if not ordered:
        return None
    return Distribution(
        n=len(ordered),
        mean=math.fsum(ordered) / len(ordered),
        p50=percentile(ordered, 50),
        p90=percentile(ordered, 90),
        p99=percentile(ordered, 99),
        max=ordered[-1],
    )


def _meets(record: RequestRecord, slo: Mapping[str, float]) -> bool:
    for metric, bound in slo.items():
        if metric == "e2e":
            value: float | None = record.e2e
        elif metric == "ttft":
            value = record.ttft
        elif metric == "tpot":
            # One output token has no per-token time: no TPOT to miss (vLLM counts it as 0).
            value = record.tpot if record.output_tokens and record.output_tokens > 1 else 0.0
        else:
            raise ValueError(f"unknown SLO metric {metric!r}; known: {', '.join(SLO_METRICS)}")
        if value is None or value > bound:
            return False
    return True


def summarize(
    records: Iterable[RequestRecord], *, slo: Mapping[str, float] | None = None
) -> Report:
    """The report over the records that are not warmup."""
    slo = dict(slo or {})
    measured: list[RequestRecord] = []
    warmup = 0
    for record in records:
        if record.warmup:
            warmup += 1
        else:
            measured.append(record)
    ok = [r for r in measured if r.ok]
    errors = Counter(r.error for r in measured if r.error is not None)
    duration = 0.0
    if measured:
        duration = max(r.end for r in measured) - min(r.scheduled for r in measured)
    input_tokens = sum(r.prompt_tokens or 0 for r in ok)
    output_tokens = sum(r.output_tokens or 0 for r in ok)
    good = sum(_meets(r, slo) for r in ok) if slo else None

    def rate(count: float) -> float:
        return count / duration if duration > 0 else 0.0

    tpots = (r.tpot for r in ok)
    ttfts = (r.ttft for r in ok)
    return Report(
        duration_s=duration,
        requests=len(measured),
        completed=len(ok),
        failed=len(measured) - len(ok),
        warmup=warmup,
        errors=dict(sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        request_throughput=rate(len(ok)),
        input_token_throughput=rate(input_tokens),
        output_token_throughput=rate(output_tokens),
        total_token_throughput=rate(input_tokens + output_tokens),
        slo=slo,
        good=good,
        goodput=None if good is None else rate(good),
        e2e=distribution(r.e2e for r in ok),
        ttft=distribution(t for t in ttfts if t is not None),
        tpot=distribution(t for t in tpots if t is not None),
        itl=distribution(gap for r in ok for gap in r.gaps()),
        queueing=distribution(r.queueing for r in ok),
    )


def _rate(value: float, unit: str) -> str:
    return f"{value:,.2f} {unit}"


def format_report(report: Report, *, title: str = "asyncgen bench") -> str:
    """The report as a table for people: counts and rates, then latencies in milliseconds."""
    lines = [f" {title} ".center(78, "=")]

    def row(label: str, value: str) -> None:
        lines.append(f"{label:<28}{value}")

    done = f"{report.completed} completed, {report.failed} failed"
    if report.warmup:
        done += f" (+{report.warmup} warmup, not counted)"
    row("Requests", done)
    if report.errors:
        row("Errors", ", ".join(f"{kind}: {n}" for kind, n in report.errors.items()))
    row("Duration", f"{report.duration_s:,.2f} s")
    row("Request throughput", _rate(report.request_throughput, "req/s"))
    if report.goodput is not None:
        bounds = ", ".join(f"{k} <= {v * 1000:g} ms" for k, v in report.slo.items())
        row(
            "Goodput",
            f"{_rate(report.goodput, 'req/s')} ({report.good} of {report.completed} "
            f"completed within {bounds})",
        )
    row(
        "Input tokens",
        f"{report.input_tokens:,} ({_rate(report.input_token_throughput, 'tok/s')})",
    )
    row(
        "Output tokens",
        f"{report.output_tokens:,} ({_rate(report.output_token_throughput, 'tok/s')})",
    )
    row("Total token throughput", _rate(report.total_token_throughput, "tok/s"))
    lines.append("")
    lines.append(
        f"{'latency (ms)':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}{'max':>10}{'n':>10}"
    )
    for name, label in (
        ("e2e", "e2e"),
        ("ttft", "ttft"),
        ("tpot", "tpot"),
        ("itl", "itl"),
        ("queueing", "queueing"),
    ):
        d: Distribution | None = getattr(report, name)
        if d is None:
            lines.append(f"  {label:<12}{'n/a':>10}")
            continue
        figures = "".join(f"{v * 1000:>10.1f}" for v in (d.mean, d.p50, d.p90, d.p99, d.max))
        lines.append(f"  {label:<12}{figures}{d.n:>10}")
    lines.append("=" * 78)
    return "\n".join(lines)
