"""The one error hierarchy of asyncgen.

Foreign exceptions (aiohttp, zstandard, OSError, msgspec) are mapped at the edge with
``raise ... from exc`` so callers only ever need to catch these::

    AsyncgenError
    ├── ConfigError        a job spec, flag or template that cannot work
    ├── InputError         a bad input file or line (carries file and line)
    ├── OutputError        an output directory that cannot be used safely
    └── TransportError     a request that did not produce an HTTP response
        ├── ConnectError   could not connect, or the connection dropped
        └── RequestTimeout no complete response within the timeout
"""

from __future__ import annotations

__all__ = [
    "AsyncgenError",
    "ConfigError",
    "ConnectError",
    "InputError",
    "OutputError",
    "RequestTimeout",
    "TransportError",
]


class AsyncgenError(Exception):
    """Base class of every error asyncgen raises on purpose."""


class ConfigError(AsyncgenError):
    """A job specification, flag or template that cannot work."""


class InputError(AsyncgenError):
    """A bad input file or line; ``str()`` names the file and line when known."""

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None) -> None:
        self.reason = message
        self.path = path
        self.line = line
        where = path if line is None else f"{path}:{line}"
        super().__init__(f"{where}: {message}" if path else message)


class OutputError(AsyncgenError):
    """An output directory that is unwritable, locked, or belongs to another job."""


class TransportError(AsyncgenError):
    """A request that did not produce an HTTP response."""


class ConnectError(TransportError):
    """The connection could not be made, or was dropped before a full response.

    ``sent`` is False when no connection was made, so the server never saw the request.
    """

    def __init__(self, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent


class RequestTimeout(TransportError):
    """No complete response arrived within the timeout."""
