"""What a job has done so far: the counters its parts keep, and the snapshot they make."""

from __future__ import annotations

import msgspec

from asyncgen.core.flow import EndpointStats

__all__ = ["Counters", "Statistics"]


class Statistics(msgspec.Struct, frozen=True, kw_only=True):
    """An immutable snapshot of a job's progress. ``*_total`` include earlier runs."""

    elapsed: float
    lines_read: int
    skipped: int
    """Items already committed by an earlier run."""
    in_flight: int
    retrying: int
    succeeded: int
    failed: int
    bad_lines: int
    requests: int
    """HTTP attempts made by this run."""
    retries: int
    throttled: int
    """Attempts answered 429 in this run."""
    prompt_tokens: int
    completion_tokens: int
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


class Counters:
    """This run's counts, kept by the part that sees each event (intake, sender, committer);
    plain attributes, since they change several times per item."""

    __slots__ = (
        "bad_lines",
        "completion_tokens",
        "failed",
        "in_flight",
        "lines_read",
        "prompt_tokens",
        "requests",
        "retries",
        "retrying",
        "skipped",
        "succeeded",
        "throttled",
    )

    def __init__(self) -> None:
        self.lines_read = 0
        self.skipped = 0
        self.in_flight = 0
        self.retrying = 0
        self.succeeded = 0
        self.failed = 0
        self.bad_lines = 0
        self.requests = 0
        self.retries = 0
        self.throttled = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def __repr__(self) -> str:
        counts = " ".join(f"{name}={getattr(self, name)}" for name in self.__slots__)
        return f"<Counters {counts}>"
