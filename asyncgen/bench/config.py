"""What a benchmark run sends, how fast, and when it stops: :class:`BenchConfig`, checked when
it is made, with the defaults it resolves."""

from __future__ import annotations

import math
from typing import Any, Literal

import msgspec

from asyncgen.bench.stats import SLO_METRICS
from asyncgen.core.errors import ConfigError
from asyncgen.job.prompts import RESERVED_BODY

__all__ = ["DEFAULT_INPUT_LEN", "DEFAULT_OUTPUT_LEN", "BenchConfig"]

DEFAULT_INPUT_LEN = 256
"""Tokens (about) of a synthetic prompt."""
DEFAULT_OUTPUT_LEN = 128
"""``max_tokens`` of a synthetic prompt's request."""


class BenchConfig(msgspec.Struct, kw_only=True, frozen=True):
    """What to send, how fast, and when to stop. Times are in seconds."""

    base_url: str
    model: str | None = None
    """None: the first model the endpoint lists under ``GET /models``."""
    endpoint: Literal["chat", "completions"] | None = None
    """None: the template's, or chat for synthetic prompts."""
    prompt: str | None = None
    """A template name or path; then ``inputs`` are persona shards rendered through it."""
    inputs: list[str] = []
    persona_field: str = "persona"
    input_len: int | None = None
    """Synthetic prompts of random words, about this many tokens (default 256)."""
    output_len: int | None = None
    """Sets ``max_tokens`` (default 128 for synthetic prompts)."""
    ignore_eos: bool = False
    max_tokens: int | None = None
    extra_body: dict[str, Any] = {}
    rate: float | None = None
    """Requests per second; None for a closed loop at ``concurrency``."""
    poisson: bool = False
    concurrency: int | None = None
    """Requests in flight at most; None: unlimited with a rate, else 64."""
    num_requests: int | None = None
    """Measured requests (warmup comes on top); with neither this nor ``duration``, 200."""
    duration: float | None = None
    """Seconds of measured arrivals; with ``num_requests``, whichever ends first."""
    warmup: int = 0
    stream: bool = True
    timeout: float = 600.0
    seed: int = 0
    slo: dict[str, float] = {}
    check_endpoint: bool = True

    def __post_init__(self) -> None:
        checks = (
            (self.model is None or bool(self.model), "the model name is empty"),
            (
                self.model is not None or self.check_endpoint,
                "--no-check needs --model (the model is otherwise picked from GET /models)",
            ),
            (self.prompt is None or bool(self.inputs), "--prompt needs --input files"),
            (self.prompt is not None or not self.inputs, "--input needs --prompt"),
            (
                self.prompt is None or self.input_len is None,
                "--input-len is for synthetic "
                "prompts; with --prompt the prompts come from the inputs",
            ),
            (self.input_len is None or self.input_len >= 1, "--input-len must be at least 1"),
            (self.output_len is None or self.output_len >= 1, "--output-len must be at least 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be at least 1"),
            (
                self.output_len is None or self.max_tokens is None,
                "--output-len sets max_tokens; give --output-len or --max-tokens, not both",
            ),
            (self.rate is None or 0 < self.rate < math.inf, "--rate must be a positive number"),
            (not self.poisson or self.rate is not None, "--poisson needs --rate"),
            (self.concurrency is None or self.concurrency >= 1, "--concurrency must be >= 1"),
            (self.num_requests is None or self.num_requests >= 1, "--num-requests must be >= 1"),
            (self.duration is None or 0 < self.duration < math.inf, "--duration must be > 0"),
            (self.warmup >= 0, "--warmup must not be negative"),
            (0 < self.timeout < math.inf, "--timeout must be positive"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        reserved = sorted(RESERVED_BODY & self.extra_body.keys())
        if reserved:
            raise ConfigError(
                f"--extra-body may not set {', '.join(reserved)} (use --model, --no-stream)"
            )
        for metric, bound in self.slo.items():
            if metric not in SLO_METRICS:
                raise ConfigError(
                    f"--slo {metric}: unknown metric; known: {', '.join(SLO_METRICS)}"
                )
            if not 0 < bound < math.inf:
                raise ConfigError(f"--slo {metric}: the bound must be a positive number of seconds")
            if metric != "e2e" and not self.stream:
                raise ConfigError(f"--slo {metric} needs streaming (drop --no-stream)")

    @property
    def total(self) -> int | None:
        """Requests to send, warmup included; None when only the duration bounds them."""
        if self.num_requests is None and self.duration is not None:
            return None
        return self.warmup + (self.num_requests or 200)

    @property
    def max_tokens_sent(self) -> int | None:
        """``max_tokens`` in each request, unless a template sets its own."""
        sent = self.max_tokens or self.output_len
        return sent or (DEFAULT_OUTPUT_LEN if self.prompt is None else None)

    @property
    def max_in_flight(self) -> int | None:
        if self.concurrency is not None:
            return self.concurrency
        return None if self.rate is not None else 64
