"""How the mock behaves: :class:`MockConfig`, every knob of latency, load, budgets and faults,
checked when it is made."""

from __future__ import annotations

import math

import msgspec

__all__ = ["MockConfig"]

_PROBABILITIES = (
    "fail_429",
    "fail_500",
    "fail_503",
    "drop",
    "hang",
    "malformed",
    "stream_cut",
    "stream_stall",
    "invalid_json",
    "embed_partial",
    "batch_error",
)
_NON_NEGATIVE = (
    "latency",
    "latency_jitter",
    "retry_after",
    "hang_seconds",
    "token_latency",
    "batch_delay",
    "load_slowdown",
)


class MockConfig(msgspec.Struct, kw_only=True):
    """How the mock behaves. Probabilities are per generation request, in [0, 1]."""

    latency: float = 0.0
    """Seconds before a reply (or a stream's first token), on average."""
    latency_jitter: float = 0.0
    """Latency is drawn uniformly from ``latency ± latency_jitter`` (never below 0)."""
    seed: int = 0
    output_tokens: int = 32
    """Words in a reply that is not cut short by ``max_tokens``."""
    models: list[str] = msgspec.field(default_factory=list)
    """Models served; when empty, any model name is accepted (``/models`` lists ``mock-model``)."""
    api_key: str | None = None
    """When set, requests must carry ``Authorization: Bearer <api_key>``."""
    fail_429: float = 0.0
    retry_after: float = 1.0
    """Seconds announced by a 429 in ``retry-after-ms`` (and rounded up in ``retry-after``)."""
    fail_500: float = 0.0
    fail_503: float = 0.0
    retry_after_503: bool = False
    """Injected 503s carry ``retry-after`` too (as a gateway shedding load does); without
    it they are vLLM's bare 503."""
    quota_exhausted: bool = False
    """Every generation request is refused as OpenAI refuses an account without credits: 429
    with ``insufficient_quota`` as error type and code."""
    broken: bool = False
    """Every route, ``/models`` and ``/health`` included, answers 500 (a server that is up
    but cannot serve)."""
    drop: float = 0.0
    """Close the connection without a reply."""
    hang: float = 0.0
    """Wait ``hang_seconds`` before replying."""
    hang_seconds: float = 3600.0
    malformed: float = 0.0
    """Reply 200 with an empty, truncated or non-JSON body."""
    rpm_limit: float | None = None
    """Requests per minute admitted (a leaky bucket); beyond it, 429 ``rate_limit_exceeded``."""
    tpm_limit: float | None = None
    """Tokens (prompt + completion) per minute admitted, like ``rpm_limit``."""
    limit_burst: float = 1.0
    """Seconds of budget each bucket holds (at least one request, and any one request's tokens)."""
    ratelimit_headers: bool = True
    """Announce the budgets in ``x-ratelimit-*`` headers (off: a gateway that hides them)."""
    max_running: int | None = None
    """At most this many requests generate at once; the rest wait in FIFO order."""
    max_waiting: int | None = None
    """With ``max_running``: at most this many wait; beyond, a bare 503 at once (a server
    or gateway that sheds load when its queue is full)."""
    charge_max_tokens: bool = False
    """The TPM budget charges ``max_tokens`` (when given) instead of the reply's completion
    tokens, when a request arrives, as OpenAI's limiter does."""
    token_latency: float = 0.0
    """Seconds per output token, after ``latency``."""
    load_slowdown: float = 0.0
    """Per-token time grows by this fraction for each other request generating at once."""
    stream_comments: bool = False
    """Streams also carry SSE comments and blank lines, and split events across writes."""
    stream_cut: float = 0.0
    """Close a stream abruptly after some content (no finish chunk, no ``[DONE]``)."""
    stream_stall: float = 0.0
    """Pause a stream for ``hang_seconds`` after some content, then finish it."""
    invalid_json: float = 0.0
    """Share of structured replies (``response_format`` JSON) that are invalid: cut short
    (``finish_reason`` "length") or missing a field."""
    embed_partial: float = 0.0
    """Share of embeddings requests of several inputs whose good reply leaves out one
    input's vector (a gateway splitting a batch and losing a part)."""

    batch_delay: float = 0.0
    """Batch API: seconds from a batch's creation until a look at it finds it finished."""
    batch_error: float = 0.0
    """Batch API: share of a batch's requests answered with a 500 (in the error file)."""
    batch_fail: int = 0
    """Batch API: the first this many batches to finish end ``failed``, without output."""
    batch_expire: int = 0
    """Batch API: the next this many end ``expired`` with half their requests done."""

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in _NON_NEGATIVE:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative")
        if self.batch_fail < 0 or self.batch_expire < 0:
            raise ValueError("batch_fail and batch_expire must not be negative")
        if self.output_tokens < 1:
            raise ValueError("output_tokens must be at least 1")
        for name in ("rpm_limit", "tpm_limit"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not 0 < self.limit_burst < math.inf:
            raise ValueError(
                f"limit_burst must be a positive number of seconds, got {self.limit_burst}"
            )
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {self.max_running}")
        if self.max_waiting is not None and (self.max_waiting < 0 or self.max_running is None):
            raise ValueError("max_waiting must not be negative, and needs max_running")
