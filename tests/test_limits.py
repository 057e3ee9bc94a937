"""Rate buckets pace continuously, charge large requests in full and take corrections."""

from __future__ import annotations

import pytest

from asyncgen.core.limits import RateBucket, TokenEstimate


def admitted_in(bucket: RateBucket, units: float, seconds: float, step: float = 0.001) -> float:
    """Units admitted when asking as often as possible for ``seconds``."""
    now, total = 0.0, 0.0
    while now < seconds:
        if bucket.delay(units, now) == 0:
            bucket.charge(units, now)
            total += units
        else:
            now += step
    return total


def test_rpm_is_paced_not_burst() -> None:
    bucket = RateBucket(1_200, now=0.0)  # 20 per second, half a second of burst
    assert bucket.capacity == 10
    total = admitted_in(bucket, 1, 10.0)
    assert 200 <= total <= 211  # 10 s at 20/s, plus the burst


def test_no_burst_at_a_minute_boundary() -> None:
    """Asked as often as possible for two minutes, a 600/min bucket admits 10 a second
    (plus its half-second of burst once), in every second alike: a fixed window would admit
    a minute's worth at 0 s and again at 60 s."""
    bucket = RateBucket(600, now=0.0)  # 10/s, capacity 5
    admitted: list[float] = []
    now = 0.0
    while now < 120.0:
        if bucket.delay(1, now) == 0:
            bucket.charge(1, now)
            admitted.append(now)
        else:
            now += 0.001
    assert 1_200 <= len(admitted) <= 1_200 + bucket.capacity + 1
    for start in (0.0, 30.0, 59.5, 59.9, 60.0, 119.0):
        window = [t for t in admitted if start <= t < start + 1.0]
        assert len(window) <= 10 + bucket.capacity + 1, (start, len(window))
    # after the start, every second has its 10, none more
    for second in range(1, 120):
        in_second = sum(1 for t in admitted if second <= t < second + 1)
        assert 9 <= in_second <= 11, (second, in_second)


def test_a_charge_larger_than_the_bucket_is_paid_in_full() -> None:
    bucket = RateBucket(60_000, now=0.0)  # 1 000 tokens/s, bucket 500
    assert bucket.delay(1_300, 0.0) == 0  # empty bucket: admitted
    bucket.charge(1_300, 0.0)
    # the debt must drain to the capacity before 1 more token fits
    assert bucket.delay(1, 0.0) == pytest.approx(0.801, abs=0.01)
    total = admitted_in(bucket, 1_300, 13.0)
    assert total <= 13 * 1_000 + 1_300


def test_adjust_corrects_and_refunds_without_creating_budget() -> None:
    bucket = RateBucket(6_000, now=0.0)  # 100/s, capacity 50
    bucket.charge(40, 0.0)
    bucket.adjust(+30, 0.0)  # the reply used more than reserved
    assert bucket.level(0.0) == 70
    assert bucket.delay(1, 0.0) == pytest.approx(0.21, abs=0.001)
    bucket.adjust(-500, 0.1)  # a refund larger than what is left
    assert bucket.level(0.1) == 0


def test_set_rate_keeps_level() -> None:
    bucket = RateBucket(60, now=0.0)
    bucket.charge(1, 0.0)
    bucket.set_rate(6_000, now=0.0)
    assert bucket.capacity == 50
    assert bucket.level(0.0) == 1
    with pytest.raises(ValueError, match="positive"):
        bucket.set_rate(0, now=1.0)


def test_token_estimate_learns_output_and_prompt_scale() -> None:
    est = TokenEstimate(initial_output=256)
    assert est.reserve(100, 64) == 100 + 64  # bounded by max_tokens
    assert est.reserve(100, None) == 356
    for _ in range(30):
        est.observe(100, 50, 20)  # prompts are half the estimate, outputs 20 tokens
    assert est.reserve(100, None) == pytest.approx(70, abs=1)
    assert est.reserve(100, 10) == pytest.approx(60, abs=1)
