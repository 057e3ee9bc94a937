"""Server hints: durations, retry-after and x-ratelimit budgets."""

from __future__ import annotations

import pytest

from asyncgen.core.hints import Budget, RateLimitHints, parse_duration, parse_ratelimit


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1.5s", 1.5),
        ("12ms", 0.012),
        ("1m30.5s", 90.5),
        ("1h0m0s", 3600.0),
        ("20", 20.0),
        ("0s", 0.0),
        ("250us", 0.00025),
        (".5s", 0.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5x", "1s2", "-3s", "s", "nan", "1s soon"])
def test_bad_durations(text: str) -> None:
    assert parse_duration(text) is None


def test_ratelimit_headers() -> None:
    hints = parse_ratelimit(
        {
            "x-ratelimit-limit-requests": "500",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "120ms",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "29000",
            "x-ratelimit-reset-tokens": "2s",
        }
    )
    assert hints is not None
    assert hints.requests == Budget(500, 0, 0.12)
    assert hints.tokens == Budget(30000, 29000, 2.0)
    # one request needs 60/500 s of replenishment, bounded by the announced reset
    assert hints.requests.wait_for(1) == pytest.approx(0.12)
    assert hints.tokens.wait_for(500) == 0.0
    assert hints.tokens.wait_for(29_600) == pytest.approx(600 * 60 / 30_000)


def test_ratelimit_absent_or_garbage() -> None:
    assert parse_ratelimit({}) is None
    assert parse_ratelimit({"x-ratelimit-limit-requests": "lots"}) is None
    hints = parse_ratelimit({"x-ratelimit-limit-tokens": "1000", "x-ratelimit-reset-tokens": "?"})
    assert hints is not None and hints.requests is None
    assert hints.tokens == Budget(1000, None, None)
    assert hints.tokens.wait_for(10**6) == 0.0  # nothing said about what remains


def test_header_names_in_a_plain_dict_are_case_insensitive() -> None:
    """A custom transport may hand over headers as a dict with the server's own spelling."""
    from asyncgen.core.hints import parse_retry_after

    headers = {
        "X-RateLimit-Limit-Requests": "600",
        "X-RateLimit-Remaining-Requests": "0",
        "X-RateLimit-Reset-Requests": "1.5s",
        "Retry-After": "3",
    }
    hints = parse_ratelimit(headers)
    assert hints is not None and hints.requests == Budget(600.0, 0.0, 1.5)
    assert parse_retry_after(headers) == 3.0
    assert parse_retry_after({"Retry-After-Ms": "250", "Retry-After": "3"}) == 0.25


def test_groq_counts_requests_per_day_and_tokens_per_minute() -> None:
    hints = parse_ratelimit(
        {
            "x-ratelimit-limit-requests": "14400",
            "x-ratelimit-limit-tokens": "6000",
            "x-ratelimit-remaining-requests": "14370",
            "x-ratelimit-remaining-tokens": "5997",
            "x-ratelimit-reset-requests": "2m59.56s",
            "x-ratelimit-reset-tokens": "7.66s",
        }
    )
    assert hints is not None and hints.requests is not None and hints.tokens is not None
    assert hints.requests.per_minute is None, "a daily budget is no per-minute rate"
    assert hints.tokens.per_minute == 6000
    spent = Budget(14400, 0, 179.56)
    assert spent.wait_for(1) == pytest.approx(179.56)  # until the reset, not 60/14400 s


def test_azure_sends_remaining_alone() -> None:
    hints = parse_ratelimit(
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "1200"}
    )
    assert hints == RateLimitHints(Budget(None, 0, None), Budget(None, 1200, None))
    assert hints.requests is not None and hints.requests.per_minute is None
    assert hints.requests.wait_for(1) == 1.0  # none left, no reset said: a second
    assert hints.tokens is not None and hints.tokens.wait_for(1000) == 0.0
