"""Prometheus metrics of a running job, read from :meth:`Engine.statistics` at scrape time.

Nothing is counted per request: the engine already keeps every count in its statistics, so
a scrape takes one snapshot (on the engine's loop, so it never reads half-updated state) and
turns it into metric families. The job's hot path pays nothing for being watched.

``prometheus-client`` is an optional extra (``pip install 'asyncgen[metrics]'``)::

    metrics = Metrics(price_in=0.15, price_out=0.60)   # USD per million tokens, optional
    metrics.serve(9400)                                # or metrics.registry in your own app
    async with Engine(config, metrics=metrics) as engine:
        await engine.run()
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from asyncgen.core.errors import ConfigError
from asyncgen.core.records import Result
from asyncgen.engine.stats import Statistics

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = ["Metrics"]

_Copies = tuple[tuple[list[int], float], tuple[list[int], float]]

_SCRAPE_WAIT = 5.0
"""Seconds a scrape waits for the engine's loop to take the snapshot."""

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Histogram:
    """Counts per bucket, kept on the loop and copied with the snapshot (no lock needed)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, values: list[float]) -> None:
        """Count a batch: sorted once, then one bisection per bucket, not per value."""
        if not values:
            return
        values.sort()
        counts, below = self.counts, 0
        for i, bound in enumerate(self.bounds):
            upto = bisect.bisect_right(values, bound)  # Prometheus buckets: value <= bound
            counts[i] += upto - below
            below = upto
        counts[-1] += len(values) - below
        self.total += sum(values)

    def copy(self) -> tuple[list[int], float]:
        return list(self.counts), self.total

    def family(self, name: str, doc: str, copied: tuple[list[int], float]) -> Any:
        from prometheus_client.core import HistogramMetricFamily

        counts, total = copied
        cumulative, buckets = 0, []
        for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
            cumulative += n
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=total)


_KNOWN_STATUS = {"success": "200", "throttled": "429"}


def _statuses(s: Statistics) -> dict[tuple[str, str], dict[str, int]]:
    """The HTTP statuses of failed attempts, by (endpoint, outcome): 5xx and no reply are
    errors, other 4xx (a rejected request) "other"; 429s are throttled, and replies the
    template's checks rejected were 200s (successes, as far as HTTP goes)."""
    found: dict[tuple[str, str], dict[str, int]] = {}
    for e in s.errors:
        if e.status == 429 or e.code == "invalid_output":
            continue
        outcome = "error" if e.status is None or e.status >= 500 else "other"
        by_status = found.setdefault((e.endpoint, outcome), {})
        status = "" if e.status is None else str(e.status)
        by_status[status] = by_status.get(status, 0) + e.count
    return found


def _split(outcome: str, n: int, by_status: dict[str, int] | None) -> list[tuple[str, int]]:
    """``n`` attempts of ``outcome`` by status; what the statuses seen do not account for
    (or all, if they do not add up) under an empty status."""
    known = _KNOWN_STATUS.get(outcome)
    if known is not None:
        return [(known, n)]
    if not by_status or sum(by_status.values()) > n:
        return [("", n)]
    rest = n - sum(by_status.values())
    return [*by_status.items(), *([("", rest)] if rest or not by_status else [])]


def _client() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(
            "metrics need prometheus-client: pip install 'asyncgen[metrics]'"
        ) from None
    return prometheus_client


class Metrics:
    """A job's metrics in a Prometheus registry of their own (``registry``); give it to
    :class:`~asyncgen.engine.engine.Engine` as ``metrics=``. Prices, in USD per million
    tokens, add an estimated-cost counter."""

    def __init__(self, *, price_in: float | None = None, price_out: float | None = None) -> None:
        client = _client()
        self.price_in = price_in
        self.price_out = price_out
        self.registry: CollectorRegistry = client.CollectorRegistry(auto_describe=False)
        self._source: Callable[[], Statistics] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: Statistics | None = None
        self._server: Any = None
        self._streamed = False
        self._latency = _Histogram(LATENCY_BUCKETS)
        self._ttft = _Histogram(TTFT_BUCKETS)
        self._last_histograms = (self._latency.copy(), self._ttft.copy())
        self.registry.register(self)

    def observe(self, results: list[Result]) -> None:
        """Count a committed batch's latencies (the engine calls it, on its loop)."""
        self._latency.observe([r.latency_s for r in results if r.error is None])
        if self._streamed:
            self._ttft.observe([r.ttft_s for r in results if r.ttft_s is not None])

    def attach(self, statistics: Callable[[], Statistics], *, streamed: bool = False) -> None:
        """Read ``statistics`` at each scrape, on the running loop (the engine's);
        ``streamed``: the results carry a time to first token."""
        self._source = statistics
        self._streamed = streamed
        self._loop = asyncio.get_running_loop()

    def detach(self) -> None:
        """Keep serving the last snapshot (the job's final counts)."""
        if self._source is not None:
            self._last = self._source()
            self._last_histograms = (self._latency.copy(), self._ttft.copy())
        self._source = self._loop = None

    def serve(self, port: int, *, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread; the port bound (``port``
        0 picks a free one)."""
        client = _client()
        try:
            started = client.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror}") from exc
        self._server = started[0] if isinstance(started, tuple) else None
        return int(self._server.server_port) if self._server is not None else port

    def close(self) -> None:
        """Stop the server :meth:`serve` started."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def snapshot(self) -> tuple[Statistics, _Copies] | None:
        """The engine's statistics and the histograms now (taken on its loop), or the last."""
        source, loop = self._source, self._loop
        last = None if self._last is None else (self._last, self._last_histograms)
        if source is None or loop is None:
            return last
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False

        def now() -> tuple[Statistics, _Copies]:
            return source(), (self._latency.copy(), self._ttft.copy())

        if on_loop or loop.is_closed():
            return now() if on_loop else last
        future: concurrent.futures.Future[tuple[Statistics, _Copies]] = concurrent.futures.Future()

        def take() -> None:
            try:
                future.set_result(now())
            except BaseException as exc:  # handed to the scraping thread
                future.set_exception(exc)

        try:
            loop.call_soon_threadsafe(take)
            return future.result(timeout=_SCRAPE_WAIT)
        except (RuntimeError, concurrent.futures.TimeoutError):  # the loop went away
            return last

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        """The metric families of one snapshot (prometheus-client's collector protocol)."""
        taken = self.snapshot()
        if taken is None:
            return
        s, (latency, ttft) = taken
        yield self._latency.family(
            "asyncgen_item_latency_seconds",
            "Seconds from an item's first attempt to its result (successes)",
            latency,
        )
        yield self._ttft.family(
            "asyncgen_time_to_first_token_seconds",
            "Seconds from sending to the first token (streamed successes)",
            ttft,
        )
        from prometheus_client.core import CounterMetricFamily as counter
        from prometheus_client.core import GaugeMetricFamily as gauge

        requests = counter(
            "asyncgen_requests",
            "HTTP attempts, by endpoint, outcome and HTTP status (empty: no reply)",
            labels=["endpoint", "outcome", "status"],
        )
        window = gauge(
            "asyncgen_endpoint_window", "Adaptive concurrency window", labels=["endpoint"]
        )
        outstanding = gauge(
            "asyncgen_endpoint_in_flight", "Attempts in flight to the endpoint", labels=["endpoint"]
        )
        up = gauge("asyncgen_endpoint_up", "1 while the endpoint is admitted", labels=["endpoint"])
        paused = gauge(
            "asyncgen_endpoint_paused_seconds",
            "Seconds left of the endpoint's pause (0: not paused)",
            labels=["endpoint"],
        )
        ejections = counter(
            "asyncgen_endpoint_ejections", "Times the endpoint was ejected", labels=["endpoint"]
        )
        refused = gauge(
            "asyncgen_endpoint_refused_ratio",
            "Share of the endpoint's recent replies that were refusals (429, 503)",
            labels=["endpoint"],
        )
        statuses = _statuses(s)
        for ep in s.endpoints:
            other = ep.requests - ep.succeeded - ep.throttled - ep.failed
            for outcome, n in (
                ("success", ep.succeeded),
                ("throttled", ep.throttled),
                ("error", ep.failed),
                ("other", other),
            ):
                for status, count in _split(outcome, max(0, n), statuses.get((ep.url, outcome))):
                    requests.add_metric([ep.url, outcome, status], count)
            window.add_metric([ep.url], ep.window)
            outstanding.add_metric([ep.url], ep.outstanding)
            up.add_metric([ep.url], 1 if ep.up else 0)
            paused.add_metric([ep.url], ep.paused_for)
            ejections.add_metric([ep.url], ep.ejections)
            refused.add_metric([ep.url], ep.refused_share)
        yield from (requests, window, outstanding, up, paused, ejections, refused)

        errors = counter(
            "asyncgen_request_errors",
            "Attempts without a result, by endpoint, reason (error code) and HTTP status "
            "(empty: no reply); most are followed by a retry",
            labels=["endpoint", "reason", "status"],
        )
        for e in s.errors:
            errors.add_metric(
                [e.endpoint, e.code, "" if e.status is None else str(e.status)], e.count
            )
        yield errors
        pauses = counter("asyncgen_pauses", "Endpoint pauses, by cause", labels=["cause"])
        for cause in ("refusals", "budget"):
            pauses.add_metric([cause], s.pauses.get(cause, 0))
        yield pauses
        yield counter("asyncgen_retries", "Attempts after an item's first", value=s.retries)
        yield counter("asyncgen_throttled", "Attempts answered 429", value=s.throttled)
        yield gauge("asyncgen_in_flight", "Items with an attempt in flight", value=s.in_flight)
        yield gauge("asyncgen_retrying", "Items waiting for their next attempt", value=s.retrying)
        tokens = counter("asyncgen_tokens", "Tokens, as the replies' usage says", labels=["kind"])
        tokens.add_metric(["prompt"], s.prompt_tokens)
        tokens.add_metric(["completion"], s.completion_tokens)
        yield tokens
        if self.price_in is not None or self.price_out is not None:
            cost = (
                s.prompt_tokens * (self.price_in or 0.0)
                + s.completion_tokens * (self.price_out or 0.0)
            ) / 1e6
            yield counter(
                "asyncgen_estimated_cost_dollars",
                "Estimated cost of this run's tokens at the given prices, in USD",
                value=cost,
            )
        items = counter("asyncgen_items", "Items this run finished, by outcome", labels=["outcome"])
        items.add_metric(["succeeded"], s.succeeded)
        items.add_metric(["failed"], s.failed)
        items.add_metric(["bad_line"], s.bad_lines)
        items.add_metric(["skipped"], s.skipped)
        yield items
        job = gauge(
            "asyncgen_job_items", "Items the job holds, earlier runs included", labels=["outcome"]
        )
        job.add_metric(["succeeded"], s.succeeded_total)
        job.add_metric(["failed"], s.failed_total)
        job.add_metric(["bad_line"], s.bad_lines_total)
        yield job
        if s.total_items is not None:
            yield gauge(
                "asyncgen_input_items",
                "Items the whole input holds (records x samples), once counted",
                value=s.total_items,
            )
            yield gauge(
                "asyncgen_items_left",
                "Items of the input not finished yet (once the input is counted)",
                value=s.items_left or 0,
            )
        yield counter("asyncgen_lines_read", "Input lines read this run", value=s.lines_read)
        yield gauge(
            "asyncgen_input_read_ratio", "Share of input bytes read", value=s.input_fraction
        )
        yield gauge(
            "asyncgen_waiting_for_endpoint",
            "1 while no endpoint is up",
            value=1 if s.waiting_for_endpoint else 0,
        )
        yield gauge("asyncgen_elapsed_seconds", "Seconds since the run began", value=s.elapsed)
        yield gauge("asyncgen_finished", "1 once the job is finished", value=1 if s.finished else 0)

    def __repr__(self) -> str:
        state = "attached" if self._source is not None else "detached"
        return f"<Metrics {state} server={self._server is not None}>"
