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
    "BusyError",
    "ConfigError",
    "ConnectError",
    "InputError",
    "OutputError",
    "RequestTimeout",
    "TransportError",
    "job_error",
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


class BusyError(OutputError):
    """A directory another process holds the lock of (a running job, or a partition leased
    to another worker)."""


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


def job_error(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error a task group's failure stands for, or None when it stands for several.

    Task groups wrap what stopped a job; callers want the error itself. Several tasks often
    hit the same job-level error at once (a refused key for every sender): when every
    ``Exception`` in the group (nested groups flattened; cancellations are not errors) is an
    :class:`AsyncgenError`, or there is just one, the first is the answer. Anything else
    keeps the whole group, so that no bug is hidden behind another error."""
    leaves = _leaves(group)
    if len(leaves) == 1 or (leaves and all(isinstance(e, AsyncgenError) for e in leaves)):
        return leaves[0]
    return None


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        elif isinstance(exc, Exception):  # not a cancellation (nor an interrupt)
            leaves.append(exc)
    return leaves
