"""What a server says about its limits, parsed from response headers (sans-IO).

``retry-after-ms`` / ``retry-after`` (seconds or an HTTP date) say how long to wait before
trying again. OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` describe the
budget: ``limit`` per minute, ``remaining`` now, ``reset`` the time until the budget is full
again, written as Go-style durations (``6m0s``, ``1.5s``, ``12ms``). Other providers use the
same names with other windows: Groq's requests budget is per day (its reset is hours away),
Azure OpenAI sends ``remaining`` without ``limit``; both are read for when to pause, and only
a limit that resets within a minute is taken as a rate to pace at.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping
from typing import NamedTuple

__all__ = ["Budget", "RateLimitHints", "parse_duration", "parse_ratelimit", "parse_retry_after"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}


def parse_duration(text: str) -> float | None:
    """Seconds in a duration such as ``6m0s``, ``1.5s``, ``12ms`` or a bare number of seconds;
    None when it is not one."""
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    pos = total = 0.0
    end = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != end:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        end = match.end()
        pos += 1
    if not pos or end != len(text):
        return None
    return total


def _insensitive(headers: Mapping[str, str]) -> Mapping[str, str]:
    """Header names are case-insensitive: aiohttp's mappings know it, a plain dict (from a
    custom transport) gets lower-cased keys."""
    if isinstance(headers, dict):
        return {k.lower(): v for k, v in headers.items()}
    return headers


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds the server asks us to wait, from ``retry-after-ms`` or ``retry-after``."""
    headers = _insensitive(headers)
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            ms = float(value)
        except ValueError:
            pass
        else:
            if math.isfinite(ms) and ms >= 0:
                return ms / 1000.0
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class Budget(NamedTuple):
    """One announced budget: ``limit`` per window, ``remaining`` now, ``reset`` seconds until
    it is full again (None when not sent). OpenAI's windows are a minute; Groq's requests
    budget is a day's, and Azure OpenAI sends ``remaining`` alone."""

    limit: float | None
    remaining: float | None
    reset: float | None

    @property
    def per_minute(self) -> float | None:
        """The limit as a rate per minute, when the headers say it is one: a limit whose
        reset is more than a minute away (a daily budget) is no per-minute rate."""
        if self.limit is None or (self.reset is not None and self.reset > 60.0):
            return None
        return self.limit

    def wait_for(self, needed: float) -> float:
        """Seconds until ``needed`` units are available: at the announced rate if it is one,
        else at the reset (a second when the server does not say)."""
        if self.remaining is None or self.remaining >= needed:
            return 0.0
        per_minute = self.per_minute
        if per_minute is None or per_minute <= 0:
            return self.reset if self.reset is not None else 1.0
        wait = (needed - self.remaining) * 60.0 / per_minute
        return min(wait, self.reset) if self.reset is not None else wait


class RateLimitHints(NamedTuple):
    requests: Budget | None
    tokens: Budget | None


def _number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) and number >= 0 else None


def _budget(headers: Mapping[str, str], kind: str) -> Budget | None:
    limit = _number(headers, f"x-ratelimit-limit-{kind}")
    remaining = _number(headers, f"x-ratelimit-remaining-{kind}")
    if (limit is None or limit <= 0) and remaining is None:
        return None
    reset_text = headers.get(f"x-ratelimit-reset-{kind}")
    reset = parse_duration(reset_text) if reset_text is not None else None
    return Budget(limit if limit else None, remaining, reset)


_ANNOUNCING = tuple(
    f"x-ratelimit-{what}-{kind}"
    for what in ("limit", "remaining")
    for kind in ("requests", "tokens")
)


def parse_ratelimit(headers: Mapping[str, str]) -> RateLimitHints | None:
    """The ``x-ratelimit-*`` budgets in a response, or None when it announces none (a
    ``remaining`` without its ``limit`` counts: Azure OpenAI sends only those)."""
    headers = _insensitive(headers)
    if not any(name in headers for name in _ANNOUNCING):
        return None
    hints = RateLimitHints(_budget(headers, "requests"), _budget(headers, "tokens"))
    return hints if hints.requests or hints.tokens else None
