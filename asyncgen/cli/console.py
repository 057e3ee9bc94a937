"""The one way the CLI talks to a person: messages on stderr, reports on stdout.

Every message is one line prefixed with the command (``asyncgen: ...``,
``asyncgen bench: error: ...``). A closed or broken stderr never changes a command's outcome,
and a reader that stops early (``asyncgen prompts | head``) ends the command quietly.
"""

from __future__ import annotations

import contextlib
import logging
import sys

from asyncgen.cli.logs import json_logs

__all__ = ["error", "out", "report", "say", "warn"]


def say(message: str, *, command: str = "asyncgen", level: int = logging.INFO) -> None:
    """``command: message`` on stderr (an event of the JSON log with ``--log-format json``)."""
    if json_logs():
        logging.getLogger("asyncgen").log(level, message, extra={"event": "message"})
        return
    with contextlib.suppress(OSError):  # a closed stderr does not change the outcome
        print(f"{command}: {message}", file=sys.stderr, flush=True)


def warn(message: str, *, command: str = "asyncgen") -> None:
    """``command: warning: message`` on stderr."""
    if json_logs():
        say(message, level=logging.WARNING)
    else:
        say(f"warning: {message}", command=command)


def error(message: str, *, command: str = "asyncgen") -> None:
    """``command: error: message`` on stderr."""
    if json_logs():
        say(message, level=logging.ERROR)
    else:
        say(f"error: {message}", command=command)


def report(text: str) -> None:
    """A command's closing report on stderr, as it is: its lines follow the prefixed ones."""
    if json_logs():
        logging.getLogger("asyncgen").info(text, extra={"event": "report"})
        return
    with contextlib.suppress(OSError):
        print(text, file=sys.stderr, flush=True)


def out(text: str) -> None:
    """A line of a command's output proper, on stdout. A reader that goes away (a closed
    pipe) raises ``BrokenPipeError``, which :func:`asyncgen.cli.main.main` ends quietly."""
    print(text, flush=True)
