"""The vocabulary between the flow control and the engine: a lease to send, a wait, the
feedback of an attempt, what it means for its item, and an endpoint's snapshot."""

from __future__ import annotations

import enum

import msgspec

from asyncgen.core.hints import RateLimitHints

__all__ = [
    "EXCUSED",
    "HELD",
    "NOT_EXCUSED",
    "EndpointStats",
    "Feedback",
    "Lease",
    "Released",
    "Signal",
    "Wait",
]


class Signal(enum.Enum):
    """What an attempt says about the endpoint that served it."""

    OK = "ok"
    THROTTLED = "throttled"  # 429: over the budget
    OVERLOADED = "overloaded"  # 503: busy, come back later
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  # no connection: the request never reached the server
    DROPPED = "dropped"  # the connection was lost before a complete reply
    ERROR = "error"  # 5xx or a broken reply
    REJECTED = "rejected"  # a 4xx about the request itself: the endpoint is fine
    CANCELLED = "cancelled"  # the lease was not used, or the attempt was abandoned


class Feedback(msgspec.Struct, frozen=True, gc=False):
    signal: Signal
    hints: RateLimitHints | None = None
    retry_after: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_ran_out: bool = False
    """A 429 that names the token budget (its message, or ``remaining-tokens`` at zero)."""


class Wait(msgspec.Struct, frozen=True, gc=False):
    """No lease now: ask again after ``seconds`` (``math.inf``: not before a change), or as
    soon as an attempt is released or an endpoint re-admitted, if ``on_release``."""

    seconds: float
    on_release: bool


class Lease(msgspec.Struct, frozen=True, gc=False):
    """Permission to send one attempt to endpoint ``endpoint``."""

    endpoint: int
    tokens: float
    """Tokens reserved against TPM budgets (corrected on release)."""
    prompt_estimate: int
    started: float


class Released(msgspec.Struct, frozen=True, gc=False):
    """What a finished attempt means for its item."""

    excused: bool
    """The failure was the endpoint's, not the item's: it does not use up an attempt."""
    wait: float | None = None
    """A refusal of this request alone: seconds the item waits on its own before its next
    attempt (the server's ``retry-after``; None: no advice, back off as usual)."""
    held: bool = False
    """The refusal paused the whole endpoint: the gate holds the item until the pause ends,
    or routes it to another endpoint at once; it waits for nothing else."""


NOT_EXCUSED = Released(False)
EXCUSED = Released(True)
HELD = Released(True, held=True)


class EndpointStats(msgspec.Struct, frozen=True):
    url: str
    up: bool
    window: int
    outstanding: int
    paused_for: float
    requests: int
    succeeded: int
    throttled: int
    failed: int
    ejections: int
    rpm_limit: float | None
    """The requests-per-minute budget the endpoint announced, if it did."""
    tpm_limit: float | None
    refused_share: float = 0.0
    """Of its recent replies, the share that were refusals (429, 503)."""
