"""Ctrl-C and SIGTERM, handled one way by every long-running command.

The first signal asks for a graceful stop (``graceful(signal)``: stop intake, drain, report
what finished); a second one cancels the task that entered the block, which then stops at
once (still committing what has come back). :attr:`StopSignals.count` says how many came, so
the command can exit 130 after a stop it did not finish.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from types import TracebackType

__all__ = ["STOP_SIGNALS", "StopSignals"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """``with StopSignals(graceful): ...`` inside a running loop: SIGINT and SIGTERM call
    ``graceful`` the first time and cancel the current task the second time (after calling
    ``now``, if given, so the command can say so before the task unwinds). The handlers are
    removed when the block ends."""

    def __init__(
        self,
        graceful: Callable[[signal.Signals], None],
        now: Callable[[signal.Signals], None] | None = None,
    ) -> None:
        self._graceful = graceful
        self._now = now
        self.count = 0
        self.cancelled = False
        """The second signal cancelled the task (see :meth:`absorb`)."""
        self._task: asyncio.Task[object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> StopSignals:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for signum in STOP_SIGNALS:
            self._loop.add_signal_handler(signum, self._on_signal, signum)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._loop is not None
        for signum in STOP_SIGNALS:
            self._loop.remove_signal_handler(signum)

    def _on_signal(self, signum: int) -> None:
        self.count += 1
        if self.count == 1:
            self._graceful(signal.Signals(signum))
        elif self._task is not None and not self.cancelled:
            self.cancelled = True
            if self._now is not None:
                self._now(signal.Signals(signum))
            self._task.cancel()

    def absorb(self) -> bool:
        """In an ``except CancelledError`` of the entered task: True (and the cancellation
        withdrawn) when it was this object's second signal alone that cancelled the task, so
        the command can report and exit 130; False when someone else cancelled it too and
        the cancellation must go on."""
        task = self._task
        if not self.cancelled or task is None:
            return False
        return task.uncancel() == 0
