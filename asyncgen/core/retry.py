"""Failure classification and backoff, sans-IO: decisions only, no sleeping, no clock.

What is retried: connection errors, timeouts, HTTP 408/409/429/5xx, and 200 responses whose
body is empty, truncated or not a completion. Every other 4xx is permanent. Some answers are
the same for every request of a job, whatever the status says: a used-up quota or billing
limit (``insufficient_quota`` as the error's ``type`` or ``code``: OpenAI sends it with a 429,
which is otherwise retried), a refused key (401, 403), an unknown model (404, or a 400 whose
message says the model does not exist, as LiteLLM's proxy answers); :attr:`Outcome.stop`
names them so the job can stop instead of failing or retrying every item. Delays are
exponential with full jitter and a cap; a server hint (``retry-after-ms``, ``retry-after`` in
seconds or as an HTTP date) replaces the computed delay. Bounded by attempts and by a total
per-item deadline.
"""

from __future__ import annotations

import enum
import random
import re

import msgspec

from asyncgen.core.embedding import EmbeddingError, vector_bytes
from asyncgen.core.records import Completion, ErrorInfo

__all__ = ["QUOTA_CODE", "Outcome", "RetryPolicy", "Stop", "interpret", "retryable_status"]

_completion_decoder = msgspec.json.Decoder(Completion)


class _ErrorBody(msgspec.Struct):
    message: str | None = None
    code: str | int | None = None
    type: str | None = None


class _ErrorEnvelope(msgspec.Struct):
    error: _ErrorBody | str | None = None
    message: str | None = None  # vLLM's older flat error shape
    type: str | None = None


_error_decoder = msgspec.json.Decoder(_ErrorEnvelope)


def retryable_status(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


class Stop(enum.Enum):
    """Why every request of the job would get the same answer."""

    QUOTA = "quota"  # credits or the spend limit used up: retrying cannot help
    KEY = "key"  # the API key is refused
    MODEL = "model"  # the model (or the URL) does not exist there


class Outcome(msgspec.Struct, frozen=True, gc=False):
    """What one attempt produced: a completion, or an error and whether to try again;
    ``stop`` when the answer says the job itself cannot go on."""

    completion: Completion | None
    error: ErrorInfo | None
    retryable: bool
    stop: Stop | None = None


QUOTA_CODE = "insufficient_quota"
"""The error type or code of a used-up quota or spend limit (OpenAI's, kept by gateways)."""
# "The model `x` does not exist", "model 'x' not found", "Invalid model name passed in
# model=x" (LiteLLM), "model_not_found", "Unknown model".
_NO_MODEL = re.compile(
    r"(?i)\bmodel\b.{0,200}?\b(does not exist|doesn't exist|not found|is not available)"
    r"|invalid model name|model_not_found|unknown model"
)


def interpret(status: int, body: bytes, *, embeddings: int = 0) -> Outcome:
    """Classify an HTTP response to a completion request (``embeddings``: to an embeddings
    request of that many inputs, whose good reply holds vectors in ``data`` instead of
    choices)."""
    if status == 200:
        try:
            completion = _completion_decoder.decode(body)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            kind = "empty" if not body.strip() else "not a valid completion"
            return Outcome(
                None, ErrorInfo("malformed_response", f"200 with {kind} body: {exc}", 200), True
            )
        if not completion.choices:
            if embeddings:
                if completion.data:
                    return _embedding(completion, embeddings)
                error = ErrorInfo("malformed_response", "200 with no vectors", 200)
                return Outcome(None, error, True)
            return Outcome(None, ErrorInfo("malformed_response", "200 with no choices", 200), True)
        return Outcome(completion, None, False)
    error = _error_info(status, body)
    stop = _stop(status, error)
    retryable = retryable_status(status) and stop is not Stop.QUOTA
    return Outcome(None, error, retryable, stop)


def _embedding(completion: Completion, inputs: int) -> Outcome:
    """An embeddings reply to ``inputs`` texts: each vector a vector, each for a different
    input (by ``index``, else by position). A reply that leaves inputs out is good for the
    ones it has: the sender sends the others again."""
    data = completion.data
    malformed: str | None = None
    if len(data) > inputs:
        malformed = f"{len(data)} vectors for {inputs} inputs"
    elif inputs == 1:
        if data[0].index not in (None, 0):
            malformed = f"a vector for input {data[0].index} of one"
    else:
        seen = {i if e.index is None else e.index for i, e in enumerate(data)}
        if len(seen) < len(data) or not seen <= set(range(inputs)):
            malformed = f"vectors for inputs {sorted(seen)} do not match {inputs} inputs"
    if malformed is not None:
        return Outcome(None, ErrorInfo("malformed_response", malformed, 200), True)
    try:
        for entry in data:
            vector_bytes(entry.embedding)
    except EmbeddingError as exc:
        return Outcome(None, ErrorInfo("malformed_response", str(exc), 200), True)
    return Outcome(completion, None, False)


def _stop(status: int, error: ErrorInfo) -> Stop | None:
    if error.code == QUOTA_CODE:
        return Stop.QUOTA
    if status in (401, 403):
        return Stop.KEY
    if status == 404 or (status == 400 and _NO_MODEL.search(f"{error.code} {error.message}")):
        return Stop.MODEL
    return None


def _error_info(status: int, body: bytes) -> ErrorInfo:
    """The error a response body describes (a used-up quota as code ``insufficient_quota``,
    whichever of ``type`` and ``code`` says so)."""
    message = ""
    code: str | None = None
    kind: str | None = None
    try:
        envelope = _error_decoder.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError):
        message = body[:300].decode("utf-8", "replace").strip()
    else:
        if isinstance(envelope.error, _ErrorBody):
            message = envelope.error.message or ""
            kind = envelope.error.type
            if envelope.error.code is not None:
                code = str(envelope.error.code)
        elif isinstance(envelope.error, str):
            message = envelope.error
        message = message or envelope.message or ""
        kind = kind or envelope.type
    if QUOTA_CODE in (code, kind):
        code = QUOTA_CODE  # a gateway may rewrite the code ("429") but keep the type, or not
    elif not code or code.isdigit():
        code = f"http_{status}"
    return ErrorInfo(code, message or f"HTTP {status}", status)


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """When to give up, and how long to wait before the next attempt."""

    max_attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    deadline: float = 3600.0
    """Seconds from an item's first attempt after which no new attempt starts."""

    def next_delay(
        self,
        attempt: int,
        elapsed: float,
        hint: float | None,
        rng: random.Random,
        *,
        counted: int | None = None,
    ) -> float | None:
        """Delay before attempt ``attempt + 1``, or ``None`` to give up.

        ``attempt`` counts attempts made so far (1 after the first); ``elapsed`` is seconds since
        the first began; ``hint`` is the server's Retry-After, if any. ``counted`` is how many
        of the attempts count against ``max_attempts`` (default: all): rate-limit rejections
        are the server pacing us, not the item failing, so only the deadline bounds them.
        """
        if (attempt if counted is None else counted) >= self.max_attempts:
            return None
        if hint is not None:
            # Never sooner than the server asked; spread over as long again (full jitter
            # above the hint), so the requests it refused together do not return together.
            delay = hint + rng.uniform(0.0, min(hint, self.max_delay))
        else:
            delay = rng.uniform(0.0, min(self.max_delay, self.base_delay * 2.0 ** (attempt - 1)))
        if elapsed + delay > self.deadline:
            return None
        return delay
