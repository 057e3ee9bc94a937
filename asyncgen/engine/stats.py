"""What a job has done so far: the counts its parts keep, and the snapshot made of them."""

from __future__ import annotations

import msgspec

from asyncgen.core.leases import EndpointStats

__all__ = ["Counts", "ErrorCount", "Statistics"]


class Counts(msgspec.Struct, kw_only=True):
    """This run's counts, kept by the part that sees each event (intake, sender, committer)."""

    lines_read: int = 0
    skipped: int = 0
    """Items already committed by an earlier run."""
    in_flight: int = 0
    retrying: int = 0
    succeeded: int = 0
    failed: int = 0
    bad_lines: int = 0
    requests: int = 0
    """HTTP attempts made by this run."""
    retries: int = 0
    """Attempts after an item's first, counted when sent (not when scheduled)."""
    rejected: int = 0
    """Replies the template's ``[output]`` checks rejected (retried, or the last of an
    ``invalid_output`` failure)."""
    throttled: int = 0
    """Attempts answered 429 in this run."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bad_files: tuple[str, ...] = ()
    """Input files this run could not read to the end (truncated, corrupt), each named with
    where and why; the lines before the damage were read."""


class ErrorCount(msgspec.Struct, frozen=True):
    """Attempts of this run that an endpoint answered with an error (or that timed out or
    lost the connection), by their error code and HTTP status (None: no reply)."""

    endpoint: str
    code: str
    status: int | None
    count: int


# msgspec lets a frozen Struct extend a mutable one; mypy applies dataclasses' rule instead.
class Statistics(Counts, frozen=True, kw_only=True):  # type: ignore[misc]
    """An immutable snapshot of a job's progress: this run's counts, and more. ``*_total``
    include earlier runs."""

    elapsed: float
    succeeded_total: int
    failed_total: int
    bad_lines_total: int
    input_fraction: float
    """Share of input bytes consumed, 0..1 (for an ETA)."""
    finished: bool
    """The whole input was read and every item committed."""
    stopped: bool
    endpoints: list[EndpointStats] = []
    waiting_for_endpoint: bool = False
    """No endpoint is up: the job waits for one to come back."""
    errors: list[ErrorCount] = []
    """This run's failed attempts by endpoint, code and status (a retry follows most)."""
    total_items: int | None = None
    """Items the whole input holds (its records x samples, earlier runs' included), once
    counted in the background (:mod:`asyncgen.storage.count`); None until then, and when it
    cannot be known cheaply (a remote JSON-lines input) or for a retry run."""
    pauses: dict[str, int] = {}
    """This run's endpoint pauses by cause (``refusals``, ``budget``), seen once every
    half second (:mod:`asyncgen.engine.events`)."""

    @property
    def items_finished(self) -> int:
        """Items of the input this run has seen through: its results, failures and bad
        lines, and the items earlier runs had committed (skipped)."""
        return self.succeeded + self.failed + self.bad_lines + self.skipped

    @property
    def items_left(self) -> int | None:
        """Items of the input not finished yet; None while :attr:`total_items` is unknown."""
        if self.total_items is None:
            return None
        return 0 if self.finished else max(0, self.total_items - self.items_finished)
