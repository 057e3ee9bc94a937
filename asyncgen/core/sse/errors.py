"""What can be wrong with an event stream; all ``ValueError``, since each says the bytes
were not a good answer (the tree is drawn in :mod:`asyncgen.core.sse`)."""

from __future__ import annotations

from asyncgen.core.records import ErrorInfo

__all__ = ["StreamError", "StreamIncomplete", "StreamServerError"]


class StreamError(ValueError):
    """A malformed event stream."""


class StreamIncomplete(StreamError):
    """The stream ended before the completion did; ``str()`` says where."""


class StreamServerError(StreamError):
    """The server reported an error in the stream, after it had already answered 200.

    ``error.status`` is None: the HTTP status was 200, and a numeric code in the error chunk is
    kept in ``error.code`` as ``http_<code>`` and in ``status``: the status the error would
    have had before the 200 went out (vLLM), which says the same about the endpoint.
    """

    def __init__(self, error: ErrorInfo, retryable: bool, status: int | None = None) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.retryable = retryable
        self.status = status
