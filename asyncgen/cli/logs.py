"""The CLI's handler for the library's events (logger ``asyncgen``, see
:mod:`asyncgen.engine.events`): ``asyncgen: message`` lines, or one JSON object a line
(``--log-format json``: ``time``, ``level``, ``event``, ``message`` and the event's fields),
both on stderr."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import Any

from asyncgen.core.redact import redact_text

__all__ = ["JsonFormatter", "configure_logging", "json_logs"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR
_HANDLER_NAME = "asyncgen-cli"


class JsonFormatter(logging.Formatter):
    """One JSON object per record; an event's fields beside the standard keys."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        line: dict[str, Any] = {
            "time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", "message"),
            "message": redact_text(record.getMessage()),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update({k: v for k, v in fields.items() if k not in line})
        return json.dumps(line, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "warning: " if record.levelno == logging.WARNING else ""
        if record.levelno >= logging.ERROR:
            prefix = "error: "
        return f"asyncgen: {prefix}{redact_text(record.getMessage())}"


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Always the current ``sys.stderr`` (tests swap it); a closed one is ignored."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def handleError(self, record: logging.LogRecord) -> None:
        pass  # a closed stderr does not change the outcome


class _FirstBadLines(logging.Filter):
    """Pass the first :attr:`SHOWN` bad input lines; turn the next into one notice that the
    rest are not shown, and drop them. A damaged file can hold millions; the errors shard
    keeps every one, and the closing report and ``job_end`` count them. (The library still
    logs each as an event, for an embedding application's handlers.)"""

    SHOWN = 10

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "event", None) != "bad_input_line":
            return True
        self.seen += 1
        if self.seen <= self.SHOWN:
            return True
        if self.seen > self.SHOWN + 1:
            return False
        # Python 3.11's filters cannot hand back another record: this one is rewritten (the
        # handler is the ``asyncgen`` logger's only one, and the logger does not propagate).
        record.msg = (
            f"more bad input lines: only the first {self.SHOWN} are shown; every one is "
            "recorded in the errors shard (errors-*.jsonl.zst), counted at the end"
        )
        record.args = ()
        record.event = "bad_input_lines_not_shown"
        record.fields = {"shown": self.SHOWN}
        return True


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Show the library's events on stderr as ``fmt`` (text or json) from ``level`` up;
    called again, it replaces the handler it installed before."""
    logger = logging.getLogger("asyncgen")
    for old in [h for h in logger.handlers if h.get_name() == _HANDLER_NAME]:
        logger.removeHandler(old)
    handler = _Stderr()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter())
    if fmt != "json":
        # The closing report says it in full, in the words a person reads.
        handler.addFilter(lambda record: getattr(record, "event", None) != "job_end")
    handler.addFilter(_FirstBadLines())
    logger.addHandler(handler)
    logger.setLevel(_LEVELS[level])
    logger.propagate = False


def json_logs() -> bool:
    """Is the CLI writing JSON lines (so messages to a person go that way too)?"""
    logger = logging.getLogger("asyncgen")
    return any(
        h.get_name() == _HANDLER_NAME and isinstance(h.formatter, JsonFormatter)
        for h in logger.handlers
    )
