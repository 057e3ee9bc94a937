"""The flow control's circuit breaker, sans-IO: ejecting an endpoint, probing, re-admitting.

An endpoint is ejected after :data:`EJECT_AFTER` consecutive failures (5xx, timeouts, broken
replies), or at once when it refuses the connection. While it is out, the gate probes it
(one small GET) at intervals doubling from :data:`PROBE_MIN` to :data:`PROBE_MAX` s; a
healthy probe re-admits it half open, with a small window that successes grow again. An
endpoint that answers :data:`PROBE_BUDGET` probes in a row with a server error is up but
cannot serve: :func:`broken` says so once every endpoint is. The state lives in
:class:`~asyncgen.core.endpoint.EndpointState` (``up`` is read on every attempt);
:class:`~asyncgen.core.flow.FlowControl` calls these with the caller's ``now``.
"""

from __future__ import annotations

from collections.abc import Sequence

from asyncgen.core.endpoint import EndpointState
from asyncgen.core.leases import EXCUSED, NOT_EXCUSED, Released, Signal

__all__ = [
    "EJECT_AFTER",
    "PROBE_BUDGET",
    "PROBE_MAX",
    "PROBE_MIN",
    "broken",
    "eject",
    "failed",
    "probe_result",
]

EJECT_AFTER = 5
"""Consecutive failures (5xx, timeouts, broken replies) that eject an endpoint; a refused
connection ejects it at once."""
PROBE_MIN = 0.25
PROBE_MAX = 2.0
"""Probe intervals double from the first to the second; a probe is one small GET, and a
replica that comes back should not sit idle for long."""
PROBE_BUDGET = 10
"""Probes an ejected endpoint may answer with server errors, one after another, before it
counts as broken (about 16 s at the intervals above)."""


def failed(ep: EndpointState, signal: Signal, now: float) -> Released:
    """Count a failure that is neither a refusal nor a cancellation, eject the endpoint when
    it is the last straw, and say whether the failure is the endpoint's (excused): no
    connection at all, or a dropped one while other requests to it are failing too."""
    if signal is Signal.REJECTED:
        ep.failures = 0
        return NOT_EXCUSED
    ep.failed += 1
    was_up = ep.up
    ep.failures += EJECT_AFTER if signal is Signal.UNREACHABLE else 1
    if ep.failures >= EJECT_AFTER and ep.up:
        eject(ep, now)
    if signal is Signal.UNREACHABLE:
        return EXCUSED
    if signal is Signal.DROPPED and (ep.failures >= 2 or not was_up):
        return EXCUSED
    return NOT_EXCUSED


def eject(ep: EndpointState, now: float) -> None:
    """Take the endpoint out; its first probe is due in :data:`PROBE_MIN` s."""
    ep.up = False
    ep.ejections += 1
    ep.down_since = now
    ep.probe_delay = PROBE_MIN
    ep.next_probe = now + PROBE_MIN


def probe_result(
    ep: EndpointState, healthy: bool, error: str | None, floor: float, now: float
) -> None:
    """What a probe of an ejected endpoint found (see
    :meth:`~asyncgen.core.flow.FlowControl.probe_result`); ``floor``: the job's smallest
    window."""
    if ep.up:
        return
    ep.broken_probes = ep.broken_probes + 1 if error is not None and not healthy else 0
    ep.last_error = error
    if healthy:
        # Half open: back with a small window that successes grow again.
        ep.up = True
        ep.failures = 0
        ep.ssthresh = max(ep.window, floor)
        ep.window = max(floor, min(ep.cap, 8.0))
        # A pause the server asked for stands: answering GET /models is no permission.
    else:
        ep.probe_delay = min(PROBE_MAX, ep.probe_delay * 2.0)
        ep.next_probe = now + ep.probe_delay


def broken(eps: Sequence[EndpointState]) -> str | None:
    """Why the job cannot go on, when no endpoint is up and every one has answered its last
    :data:`PROBE_BUDGET` probes with a server error; None otherwise."""
    if any(ep.up or ep.broken_probes < PROBE_BUDGET for ep in eps):
        return None
    return "; ".join(f"{ep.url}: {ep.last_error}" for ep in eps)
