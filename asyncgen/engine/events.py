"""The job's events on the stdlib logger ``asyncgen``: endpoint pauses, ejections and
returns, bad input lines, the job's stop and end. An embedding application's handlers get
them as they are; the CLI formats them as text or JSON lines (``--log-format``).

Each event is a log record whose ``event`` attribute names it and whose ``fields``
attribute holds its details (a dict of JSON values); the message says the same for a
person. Endpoint events come from comparing the engine's statistics once a second, so the
attempts' hot path logs nothing. Nothing here carries a key: URLs are the transports'
(credentials removed) and error texts are the redacted ones the records keep.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from asyncgen.core.leases import EndpointStats
from asyncgen.engine.gate import GateStatistics

__all__ = ["LOGGER", "EndpointWatcher", "event", "listened"]

LOGGER = logging.getLogger("asyncgen")
# The library's convention: silent unless the application configures logging (without it,
# Python's last-resort handler would print warnings to stderr).
LOGGER.addHandler(logging.NullHandler())

WATCH_INTERVAL = 0.5
"""Seconds between the comparisons that find endpoint events."""
_SLACK = 0.05
"""Seconds a pause's end may seem to move by the snapshots' timing alone."""


def listened() -> bool:
    """Has the application asked for the events (a level or a handler set on the
    ``asyncgen`` logger, as ``--log-format`` does)? Only then does the engine watch its
    endpoints for them: the watcher wakes on real time, which a test's virtual clock must not
    see."""
    return LOGGER.level != logging.NOTSET or any(
        not isinstance(h, logging.NullHandler) for h in LOGGER.handlers
    )


def event(level: int, name: str, message: str, **fields: Any) -> None:
    """Log the event ``name`` with ``fields`` (cheap when nobody listens at ``level``)."""
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, message, extra={"event": name, "fields": fields})


def _cause(ep: EndpointStats) -> tuple[str, str]:
    """A pause's cause: a short name (a metric label) and the words for a person."""
    if ep.refused_share >= 0.4:
        return "refusals", f"refusals ({ep.refused_share:.0%} of recent replies were 429/503)"
    if ep.rpm_limit is not None or ep.tpm_limit is not None:
        return "budget", "the announced rate-limit budget is spent"
    return "refusals", "refusals from the server"


class EndpointWatcher:
    """Finds endpoint events by comparing snapshots, and counts pauses by cause."""

    def __init__(self) -> None:
        self.pauses: dict[str, int] = {}

    def compare(
        self,
        before: Sequence[EndpointStats],
        after: Sequence[EndpointStats],
        elapsed: float = 0.0,
    ) -> None:
        """Log what changed between two snapshots of the endpoints taken ``elapsed``
        seconds apart. A pause is new when it ends later than the one seen before would
        have (a pause renewed before it ran out is a new one too)."""
        for old, new in zip(before, after, strict=False):
            url = new.url
            if new.ejections > old.ejections:
                event(
                    logging.WARNING,
                    "endpoint_ejected",
                    f"endpoint {url} ejected (not answering); probing until it is back",
                    endpoint=url,
                    cause="no answer or server errors",
                    ejections=new.ejections,
                )
            elif new.up and not old.up:
                event(logging.INFO, "endpoint_back", f"endpoint {url} is back", endpoint=url)
            if new.paused_for > 0 and new.paused_for > old.paused_for - elapsed + _SLACK:
                kind, cause = _cause(new)
                self.pauses[kind] = self.pauses.get(kind, 0) + 1
                event(
                    logging.WARNING,
                    "endpoint_paused",
                    f"endpoint {url} paused for {new.paused_for:.1f}s: {cause}",
                    endpoint=url,
                    seconds=round(new.paused_for, 3),
                    cause=cause,
                    refused_share=round(new.refused_share, 3),
                    window=new.window,
                )

    async def run(
        self, statistics: Callable[[], GateStatistics], interval: float = WATCH_INTERVAL
    ) -> None:
        """Compare the gate's snapshots every ``interval`` seconds until cancelled. On the
        loop's own time, not the job's clock: a test's virtual clock is not disturbed."""
        loop = asyncio.get_running_loop()
        last, then = statistics(), loop.time()
        while True:
            await asyncio.sleep(interval)
            now, at = statistics(), loop.time()
            self.compare(last.endpoints, now.endpoints, at - then)
            if now.waiting_for_endpoint and not last.waiting_for_endpoint:
                event(
                    logging.WARNING,
                    "no_endpoint",
                    "no endpoint is up: waiting for one to come back",
                )
            last, then = now, at
