"""Human-readable progress: a live line on a terminal, periodic plain lines otherwise."""

from __future__ import annotations

import asyncio
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
    """Prints a progress line for ``stats()`` every ``interval`` seconds until cancelled."""

    def __init__(
        self,
        stats: Callable[[], Statistics],
        stream: TextIO,
        *,
        interval: float | None = None,
        live: bool | None = None,
        prices: tuple[float | None, float | None] = (None, None),
    ) -> None:
        self._stats = stats
        self._prices = prices
        """USD per million prompt and completion tokens (for the cost so far)."""
        self._stream = stream
        self.live = stream.isatty() if live is None else live
        self.interval = interval if interval is not None else (0.5 if self.live else 30.0)
        self._last: tuple[float, int, int] | None = None
        self._shown = False
        self._broken = False

    def line(self, s: Statistics) -> str:
        now = time.monotonic()
        done = s.succeeded + s.failed
        rate = tok_rate = 0.0
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            rate = (done - self._last[1]) / dt
            tok_rate = (s.completion_tokens - self._last[2]) / dt
        elif s.elapsed > 0:
            rate, tok_rate = done / s.elapsed, s.completion_tokens / s.elapsed
        self._last = (now, done, s.completion_tokens)
        eta = "?"
        if 0 < s.input_fraction < 1 and s.elapsed > 1:
            eta = format_duration(s.elapsed * (1 - s.input_fraction) / s.input_fraction)
        return (
            f"[{format_duration(s.elapsed)}] done {s.succeeded:,} failed {s.failed:,} "
            f"bad {s.bad_lines:,} skipped {s.skipped:,} | in flight {s.in_flight} "
            f"retrying {s.retrying} retries {s.retries:,} 429s {s.throttled:,} | "
            f"{_si(rate)} req/s {_si(tok_rate)} tok/s{self._cost(s)} | "
            f"input {100 * s.input_fraction:.1f}% ETA {eta}{endpoint_note(s)}"
        )

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
            self._write("\r" + text + "\x1b[K")
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
