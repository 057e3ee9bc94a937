"""Human-readable progress: a live line on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from typing import TextIO

from asyncgen.engine.stats import Statistics

__all__ = ["ProgressReporter", "format_duration", "summary"]


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}" if value >= 10 or value == 0 else f"{value:.1f}"


class ProgressReporter:
    """Prints a progress line for ``stats()`` every ``interval`` seconds until cancelled.

    On a terminal (``live``) the line is rewritten in place, cut to the terminal's width,
    with failures and pauses in color unless ``NO_COLOR`` is set (or ``TERM=dumb``); in a
    pipe, a plain line every ``interval`` (30 s by default). Once the input's size in items
    is known (:attr:`Statistics.total_items`) the line shows items done / total, the share
    and an ETA from the recent completion rate; until then, the share of input bytes read."""

    ETA_SECONDS = 30.0
    """Time constant of the completion rate an ETA is taken from: recent enough to follow a
    job that speeds up or slows down, long enough not to jump with each line."""

    def __init__(
        self,
        stats: Callable[[], Statistics],
        stream: TextIO,
        *,
        interval: float | None = None,
        live: bool | None = None,
        prices: tuple[float | None, float | None] = (None, None),
        color: bool | None = None,
    ) -> None:
        self._stats = stats
        self._prices = prices
        """USD per million prompt and completion tokens (for the cost so far)."""
        self._stream = stream
        self.live = stream.isatty() if live is None else live
        self.color = (self.live and _color_allowed()) if color is None else color
        self.interval = interval if interval is not None else (0.5 if self.live else 30.0)
        self._last: tuple[float, int, int] | None = None
        self._rate: float | None = None
        """Completions a second, smoothed over about :attr:`ETA_SECONDS` (for the ETA)."""
        self._shown = False
        self._broken = False

    def line(self, s: Statistics) -> str:
        now = time.monotonic()
        done = s.succeeded + s.failed + s.bad_lines
        rate = tok_rate = 0.0
        last = self._last
        if last is not None and now > last[0]:
            dt = now - last[0]
            rate = (done - last[1]) / dt
            tok_rate = (s.completion_tokens - last[2]) / dt
            smooth = self._rate if self._rate is not None else rate
            self._rate = smooth + (1.0 - math.exp(-dt / self.ETA_SECONDS)) * (rate - smooth)
        elif s.elapsed > 0:
            rate, tok_rate = done / s.elapsed, s.completion_tokens / s.elapsed
            self._rate = rate
        self._last = (now, done, s.completion_tokens)
        return (
            f"[{format_duration(s.elapsed)}] {self._progress(s)} | "
            f"{_si(rate)} req/s {_si(tok_rate)} tok/s{self._cost(s)} | done {s.succeeded:,} "
            f"failed {s.failed:,} bad {s.bad_lines:,} skipped {s.skipped:,} | in flight "
            f"{s.in_flight} retrying {s.retrying} retries {s.retries:,} 429s {s.throttled:,}"
            f"{endpoint_note(s)}"
        )

    def _progress(self, s: Statistics) -> str:
        """Items done / total, %, ETA; or, with no total yet, the share of input bytes."""
        eta = "?"
        if s.total_items is None:
            if 0 < s.input_fraction < 1 and s.elapsed > 1:
                eta = format_duration(s.elapsed * (1 - s.input_fraction) / s.input_fraction)
            return f"input {100 * s.input_fraction:.1f}% ETA {eta}"
        finished = s.items_finished
        total = max(s.total_items, finished)  # (blank lines are counted in the total)
        left = s.items_left
        if not left:
            eta = format_duration(0)
        elif self._rate:
            eta = format_duration(left / self._rate)
        share = 100.0 * finished / total if total else 100.0
        return f"{finished:,}/{total:,} items {share:.1f}% ETA {eta}"

    def _cost(self, s: Statistics) -> str:
        price_in, price_out = self._prices
        if price_in is None and price_out is None:
            return ""
        cost = (
            s.prompt_tokens * (price_in or 0.0) + s.completion_tokens * (price_out or 0.0)
        ) / 1e6
        return f" ${cost:,.2f}"

    def show(self) -> None:
        text = self.line(self._stats())
        if self.live:
            # A line wider than the terminal wraps, and "\r" would rewrite only its last row.
            width = shutil.get_terminal_size().columns - 1
            if len(text) > width:
                text = text[: max(width - 1, 0)] + "…"
            self._write("\r" + (_painted(text) if self.color else text) + "\x1b[K")
            self._shown = True
        else:
            self._write(text + "\n")

    def finish(self) -> None:
        """End a live line so the next output starts on its own line."""
        if self.live and self._shown:
            self._write("\n")
            self._shown = False

    def _write(self, text: str) -> None:
        # Progress is a courtesy: a closed stderr (``2>&1 | head``) must not fail the job.
        if self._broken:
            return
        try:
            self._stream.write(text)
            self._stream.flush()
        except OSError:
            self._broken = True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.show()


def _color_allowed() -> bool:
    """Color unless ``NO_COLOR`` is set to anything (no-color.org) or the terminal is dumb."""
    return not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


_RED, _YELLOW, _RESET = "\x1b[31m", "\x1b[33m", "\x1b[0m"
_TROUBLE = re.compile(r"(failed [1-9][\d,]*|bad [1-9][\d,]*)|( \| (?:WAITING|PAUSED|endpoints).*)$")


def _painted(text: str) -> str:
    """``text`` with failures in red and endpoint trouble in yellow."""

    def paint(m: re.Match[str]) -> str:
        color = _RED if m.group(1) else _YELLOW
        return f"{color}{m.group(0)}{_RESET}"

    return _TROUBLE.sub(paint, text)


def endpoint_note(s: Statistics) -> str:
    """Endpoint health, when there is something to say about it."""
    up = sum(e.up for e in s.endpoints)
    if s.waiting_for_endpoint or (s.endpoints and up == 0):
        return " | WAITING: no endpoint is answering, probing"
    if up < len(s.endpoints):
        down = ", ".join(e.url for e in s.endpoints if not e.up)
        return f" | endpoints {up}/{len(s.endpoints)} up (down: {down})"
    paused = [e.paused_for for e in s.endpoints if e.paused_for > 0]
    if paused and len(paused) == len(s.endpoints):
        return f" | PAUSED {min(paused):.1f}s: the server's budget is spent, as it asked"
    return ""


def summary(s: Statistics, output: str) -> str:
    """The closing report of a run."""
    lines = []
    new = s.succeeded + s.failed + s.bad_lines
    if s.finished and s.lines_read == 0 and not s.bad_files:
        lines.append("nothing to do: the input holds no records (empty files?); 0 requests sent")
    elif s.finished and new == 0 and s.requests == 0:
        lines.append(
            f"nothing to do: all {s.skipped:,} items were already committed in {output}; "
            "0 requests sent"
        )
    else:
        state = "finished" if s.finished else "stopped early (rerun the same command to resume)"
        rate = (s.succeeded + s.failed) / s.elapsed if s.elapsed > 0 else 0.0
        lines.append(
            f"{state} in {format_duration(s.elapsed)}: {s.succeeded:,} succeeded, "
            f"{s.failed:,} failed, {s.bad_lines:,} bad input lines this run; "
            f"{s.skipped:,} skipped as already done"
        )
        lines.append(
            f"  {s.requests:,} requests ({s.retries:,} retries, {s.throttled:,} answered 429, "
            f"{s.rejected:,} replies rejected by the template's checks), "
            f"{s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion tokens, "
            f"{rate:.1f} items/s"
        )
        if len(s.endpoints) > 1:
            lines.extend(
                f"  {e.url}: {e.succeeded:,} ok, {e.throttled:,} 429s, {e.failed:,} errors, "
                f"ejected {e.ejections} times{'' if e.up else ', down at the end'}"
                for e in s.endpoints
            )
    lines.append(
        f"  {output}: {s.succeeded_total:,} results, {s.failed_total:,} failures, "
        f"{s.bad_lines_total:,} bad input lines in total"
    )
    return "\n".join(lines)
