"""A job's budgets divided among its workers (sans-IO)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from asyncgen.core.limits import EndpointLimits

__all__ = ["Share", "divide"]


class Share(msgspec.Struct, frozen=True):
    """What one worker may use of the job's limits: requests in flight, requests and tokens
    per minute (None: no limit), and of each endpoint's own limits (a job file's
    ``[[endpoints]]``; empty: none)."""

    concurrency: int
    rpm: float | None = None
    tpm: float | None = None
    endpoints: tuple[EndpointLimits | None, ...] = ()


def divide(
    concurrency: int,
    rpm: float | None,
    tpm: float | None,
    workers: int,
    endpoints: Sequence[EndpointLimits | None] = (),
) -> Share:
    """Each of ``workers`` busy workers' share: the budgets split evenly, so that their sum
    never exceeds the job's (a concurrency rounds down, but is at least 1)."""
    n = max(1, workers)
    return Share(
        concurrency=max(1, concurrency // n),
        rpm=_part(rpm, n),
        tpm=_part(tpm, n),
        endpoints=tuple(
            None
            if own is None
            else EndpointLimits(
                rpm=_part(own.rpm, n),
                tpm=_part(own.tpm, n),
                concurrency=None if own.concurrency is None else max(1, own.concurrency // n),
            )
            for own in endpoints
        ),
    )


def _part(budget: float | None, n: int) -> float | None:
    return None if budget is None else budget / n
