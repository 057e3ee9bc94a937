"""A job's budgets divided among its workers (sans-IO)."""

from __future__ import annotations

import msgspec

__all__ = ["Share", "divide"]


class Share(msgspec.Struct, frozen=True):
    """What one worker may use of the job's limits: requests in flight, requests and tokens
    per minute (None: no limit)."""

    concurrency: int
    rpm: float | None = None
    tpm: float | None = None


def divide(concurrency: int, rpm: float | None, tpm: float | None, workers: int) -> Share:
    """Each of ``workers`` busy workers' share: the budgets split evenly, so that their sum
    never exceeds the job's (concurrency rounds down, but is at least 1)."""
    n = max(1, workers)
    return Share(
        concurrency=max(1, concurrency // n),
        rpm=None if rpm is None else rpm / n,
        tpm=None if tpm is None else tpm / n,
    )
