"""Flow control, sans-IO: routing, pauses, adaptive windows, the circuit breaker."""

from __future__ import annotations

import math

import pytest

from asyncgen.core.flow import FlowControl
from asyncgen.core.hints import Budget, RateLimitHints
from asyncgen.core.leases import Feedback, Lease, Signal, Wait
from asyncgen.core.limits import EndpointLimits

OK = Feedback(Signal.OK, prompt_tokens=10, completion_tokens=10)


def lease(flow: FlowControl, now: float = 0.0, prompt: int = 10) -> Lease:
    got = flow.try_acquire(now, prompt, 32)
    assert isinstance(got, Lease), f"expected a lease, got a wait of {got}"
    return got


def test_routes_to_the_endpoint_with_least_in_flight() -> None:
    flow = FlowControl(["a", "b", "c"], concurrency=8)
    leases = [lease(flow) for _ in range(6)]
    assert sorted(x.endpoint for x in leases) == [0, 0, 1, 1, 2, 2]
    flow.release(leases[0], OK, 0.1)  # one of a's finishes: a is now the least busy
    assert lease(flow, 0.1).endpoint == leases[0].endpoint


def test_a_large_request_counts_more_than_a_small_one() -> None:
    flow = FlowControl(["a", "b"], concurrency=8)
    big = lease(flow, prompt=10_000)
    smalls = [lease(flow, prompt=10) for _ in range(3)]
    assert {s.endpoint for s in smalls} == {1 - big.endpoint}


def test_window_limits_and_wait_is_infinite_until_a_release() -> None:
    flow = FlowControl(["a"], concurrency=2)
    first, _ = lease(flow), lease(flow)
    assert flow.try_acquire(0.0, 10, 32) == Wait(math.inf, True)
    flow.release(first, OK, 0.5)
    lease(flow, 0.5)


def test_429_pauses_only_that_endpoint_for_retry_after() -> None:
    flow = FlowControl(["a", "b"], concurrency=8)
    a = lease(flow)
    flow.release(a, Feedback(Signal.THROTTLED, retry_after=2.0), 1.0)
    for _ in range(4):
        assert lease(flow, 1.0).endpoint != a.endpoint
    stats = flow.endpoint_stats(1.0)
    assert stats[a.endpoint].paused_for == pytest.approx(2.0)
    assert stats[a.endpoint].throttled == 1


def test_all_paused_means_wait_for_the_earliest() -> None:
    flow = FlowControl(["a"], concurrency=8)
    flow.release(lease(flow), Feedback(Signal.THROTTLED, retry_after=1.5), 0.0)
    wait = flow.try_acquire(0.0, 10, 32)
    assert isinstance(wait, Wait) and not wait.on_release, "only time helps"
    assert wait.seconds == pytest.approx(1.5)
    assert isinstance(flow.try_acquire(1.5, 10, 32), Lease)


def test_429_without_hint_backs_off_exponentially() -> None:
    flow = FlowControl(["a"], concurrency=8)
    now, waits = 0.0, []
    for _ in range(4):
        flow.release(lease(flow, now), Feedback(Signal.THROTTLED), now)
        wait = flow.try_acquire(now, 10, 32)
        assert isinstance(wait, Wait)
        waits.append(wait.seconds)
        now += wait.seconds
    assert waits == pytest.approx([0.5, 1.0, 2.0, 4.0])


def test_multiplicative_decrease_once_per_round_trip_then_back_to_just_under_it() -> None:
    flow = FlowControl(["a"], concurrency=64, min_concurrency=4)
    leases = [lease(flow) for _ in range(64)]
    for x in leases[:10]:  # one burst of 503s: halve once, not ten times
        flow.release(x, Feedback(Signal.OVERLOADED), 0.2)
    assert flow.endpoint_stats(0.2)[0].window == 32
    flow.release(leases[10], Feedback(Signal.TIMEOUT), 5.0)  # a later event: halve again
    assert flow.endpoint_stats(5.0)[0].window == 16
    for x in leases[11:]:
        flow.release(x, OK, 6.0)
    window = flow.endpoint_stats(6.0)[0].window
    # Back fast to 85 % of the 32 in flight at the timeout (27), then about +1 per window.
    assert 27 <= window <= 30


def test_window_never_below_floor() -> None:
    flow = FlowControl(["a"], concurrency=64, min_concurrency=4)
    for i in range(20):
        flow.release(lease(flow, i * 10.0), Feedback(Signal.THROTTLED, retry_after=0), i * 10.0)
    assert flow.endpoint_stats(1000.0)[0].window == 4


def test_circuit_breaker_ejects_probes_and_readmits() -> None:
    flow = FlowControl(["a", "b"], concurrency=8)
    flow.release(lease(flow), Feedback(Signal.UNREACHABLE), 0.0)  # a refused connection
    down = [i for i, e in enumerate(flow.endpoint_stats(0.0)) if not e.up]
    assert len(down) == 1
    assert all(lease(flow, 0.0).endpoint != down[0] for _ in range(5))
    assert flow.probes_due(0.0) == []
    assert flow.probes_due(0.25) == down
    flow.probe_result(down[0], False, 0.25)
    assert flow.probes_due(0.5) == []  # probing backs off: 0.5 s now
    assert flow.probes_due(0.75) == down
    now = 0.75
    for _ in range(10):
        flow.probe_result(down[0], False, now)
        now += 2.0  # but never to more than two seconds
        assert flow.probes_due(now) == down
    flow.probe_result(down[0], True, 1.5)
    assert flow.endpoint_stats(1.5)[down[0]].up
    assert flow.endpoint_stats(1.5)[down[0]].ejections == 1


def test_ejected_after_consecutive_errors_only() -> None:
    flow = FlowControl(["a"], concurrency=8)
    for _ in range(4):
        flow.release(lease(flow), Feedback(Signal.ERROR), 0.0)
    flow.release(lease(flow), OK, 0.0)  # a success resets the count
    for _ in range(4):
        flow.release(lease(flow), Feedback(Signal.ERROR), 0.0)
    assert flow.any_up
    flow.release(lease(flow), Feedback(Signal.ERROR), 0.0)
    assert not flow.any_up
    assert flow.try_acquire(0.0, 10, 32) == Wait(math.inf, True), "a probe may re-admit"


def test_which_failures_count_against_the_item() -> None:
    flow = FlowControl(["a"], concurrency=16)
    dropped = Feedback(Signal.DROPPED)
    assert not flow.release(lease(flow), Feedback(Signal.ERROR), 0.0).excused, "a 500 counts"
    flow.release(lease(flow), OK, 0.0)
    # One dropped connection among successes: maybe this request's fault, it counts.
    assert not flow.release(lease(flow), dropped, 0.0).excused
    flow.release(lease(flow), OK, 0.0)
    assert not flow.release(lease(flow), dropped, 0.0).excused
    flow.release(lease(flow), OK, 0.0)
    # A server going away drops everything in flight: from the second on, the endpoint's fault.
    storm = [lease(flow) for _ in range(8)]
    assert [flow.release(x, dropped, 0.0).excused for x in storm] == [False] + [True] * 7
    assert not flow.any_up
    # Rate limits and unreachable endpoints never count.
    flow.probe_result(0, True, 1.0)
    assert flow.release(lease(flow, 1.0), Feedback(Signal.THROTTLED, retry_after=0.1), 1.0).excused
    assert flow.release(lease(flow, 2.0), Feedback(Signal.UNREACHABLE), 2.0).excused
    assert not flow.any_up
    other = FlowControl(["b"], concurrency=4)
    assert not other.release(lease(other), Feedback(Signal.TIMEOUT), 0.0).excused, (
        "a timeout counts"
    )


def test_rejected_requests_do_not_hurt_the_endpoint() -> None:
    flow = FlowControl(["a"], concurrency=8)
    for _ in range(20):
        flow.release(lease(flow), Feedback(Signal.REJECTED), 0.0)
    assert flow.any_up and flow.endpoint_stats(0.0)[0].window == 8


def _run_for(
    flow: FlowControl, seconds: float, endpoints: int, feedback: Feedback = OK
) -> list[int]:
    """Lease and release at once for ``seconds`` of simulated time: leases per endpoint."""
    now, counts = 0.0, [0] * endpoints
    while now < seconds:
        got = flow.try_acquire(now, 10, 32)
        if isinstance(got, Lease):
            counts[got.endpoint] += 1
            flow.release(got, feedback, now)
        else:
            now += got.seconds
    return counts


def test_global_rpm_paces_all_endpoints_together() -> None:
    flow = FlowControl(["a", "b"], concurrency=1000, rpm=600)  # 10/s, burst 5
    assert 100 <= sum(_run_for(flow, 10.0, 2)) <= 106


def test_each_endpoint_keeps_its_own_rpm_beside_the_job_wide_one() -> None:
    limits = [EndpointLimits(rpm=600), EndpointLimits(rpm=1_200)]  # 10/s and 20/s
    flow = FlowControl(["a", "b"], concurrency=1000, limits=limits)
    a, b = _run_for(flow, 10.0, 2)
    assert 100 <= a <= 106 and 200 <= b <= 211, (a, b)
    # the job-wide budget still bounds the two together
    flow = FlowControl(["a", "b"], concurrency=1000, rpm=900, limits=limits)
    a, b = _run_for(flow, 10.0, 2)
    assert 150 <= a + b <= 158 and a <= 106, (a, b)


def test_an_endpoints_own_tpm_is_corrected_to_usage_and_outlives_announced_budgets() -> None:
    # 60 000 tokens a minute (1000/s); each request really uses 10 + 90 = 100 tokens
    flow = FlowControl(["a"], concurrency=1000, limits=[EndpointLimits(tpm=60_000)])
    hints = RateLimitHints(None, Budget(600_000, 500_000, 1.0))  # it announces ten times more
    used = Feedback(Signal.OK, hints, prompt_tokens=10, completion_tokens=90)
    (sent,) = _run_for(flow, 10.0, 1, used)
    assert 95 <= sent <= 106, sent  # its own 1000 tokens/s, not the 10 000 announced
    assert flow.endpoint_stats(10.0)[0].tpm_limit == 600_000


def test_an_endpoints_own_concurrency_caps_its_window() -> None:
    limits = [EndpointLimits(concurrency=3), None]
    flow = FlowControl(["a", "b"], concurrency=16, limits=limits)
    leases = [lease(flow) for _ in range(19)]  # (the gate keeps the job's 16 in all)
    assert sum(x.endpoint == 0 for x in leases) == 3
    assert flow.try_acquire(0.0, 10, 32) == Wait(math.inf, True)
    for x in leases:  # many successes grow no window past its ceiling
        flow.release(x, OK, 0.1)
    for _ in range(200):
        flow.release(lease(flow, 0.2), OK, 0.2)
    assert [s.window for s in flow.endpoint_stats(0.2)] == [3, 16]
    with pytest.raises(ValueError, match="below min_concurrency"):
        FlowControl(["a"], concurrency=16, min_concurrency=4, limits=[limits[0]])
    with pytest.raises(ValueError, match="one per endpoint"):
        FlowControl(["a", "b"], concurrency=16, limits=[limits[0]])


def test_announced_budget_is_learned_per_endpoint() -> None:
    flow = FlowControl(["a", "b"], concurrency=1000)
    hints = RateLimitHints(Budget(120, 100, 1.0), None)  # a: 2 requests per second
    first = lease(flow)
    flow.release(first, Feedback(Signal.OK, hints, prompt_tokens=10, completion_tokens=10), 0.0)
    assert flow.endpoint_stats(0.0)[first.endpoint].rpm_limit == 120
    counts = [0, 0]
    now = 0.0
    while now < 10.0:
        got = flow.try_acquire(now, 10, 32)
        if isinstance(got, Lease):
            counts[got.endpoint] += 1
            flow.release(got, OK, now)
        else:
            now += min(got.seconds, 0.01)
        if counts[1 - first.endpoint] > 10_000:
            now += 0.01  # b has no budget: keep time moving
    assert counts[first.endpoint] <= 2 * 10 + 2


def test_remaining_zero_pauses_until_replenished() -> None:
    flow = FlowControl(["a"], concurrency=8)
    hints = RateLimitHints(Budget(60, 0, 30.0), None)  # one per second, none left
    flow.release(
        lease(flow), Feedback(Signal.OK, hints, prompt_tokens=10, completion_tokens=10), 0.0
    )
    wait = flow.try_acquire(0.0, 10, 32)
    assert isinstance(wait, Wait) and wait.seconds == pytest.approx(1.0)


def test_tpm_reservation_is_corrected_to_usage() -> None:
    flow = FlowControl(["a"], concurrency=1000, tpm=60_000)  # 1000 tokens/s, bucket 500
    first = lease(flow, prompt=100)  # reserves 100 + min(256, 32) = 132
    assert first.tokens == 132
    # The reply used far more than reserved: the difference is charged now.
    flow.release(first, Feedback(Signal.OK, prompt_tokens=100, completion_tokens=1_400), 0.0)
    wait = flow.try_acquire(0.0, 100, 32)
    assert isinstance(wait, Wait) and wait.seconds > 0.9 and not wait.on_release
    # A 429 refunds its reservation.
    flow2 = FlowControl(["a"], concurrency=1000, tpm=60_000)
    x = lease(flow2, prompt=300)
    flow2.release(x, Feedback(Signal.THROTTLED, retry_after=0.0), 0.0)
    assert isinstance(flow2.try_acquire(0.0, 1_000, None), Lease)


def test_cancelled_lease_is_returned() -> None:
    flow = FlowControl(["a"], concurrency=1)
    x = lease(flow)
    flow.release(x, Feedback(Signal.CANCELLED), 0.0)
    assert flow.endpoint_stats(0.0)[0].requests == 0
    lease(flow)


def test_429_on_a_paced_endpoint_pauses_but_keeps_the_window() -> None:
    flow = FlowControl(["a"], concurrency=64, rpm=60_000)
    leases = [lease(flow) for _ in range(10)]
    flow.release(leases[0], Feedback(Signal.THROTTLED, retry_after=0.5), 0.0)
    stats = flow.endpoint_stats(0.0)[0]
    assert stats.window == 64 and stats.paused_for == 0.5


def test_slow_start_back_to_the_window_before_ejection() -> None:
    flow = FlowControl(["a"], concurrency=200)
    for _ in range(5):
        flow.release(lease(flow), Feedback(Signal.ERROR), 0.0)
    assert not flow.any_up
    flow.probe_result(0, True, 1.0)
    assert flow.endpoint_stats(1.0)[0].window == 8
    now = 1.0
    for _ in range(5):  # five round trips of a full window each
        for x in [lease(flow, now) for _ in range(flow.endpoint_stats(now)[0].window)]:
            flow.release(x, OK, now + 0.1)
        now += 0.1
    assert flow.endpoint_stats(now)[0].window == 200  # 8 → 16 → 32 → 64 → 128 → 200 (cap)


async def test_gate_serves_leases_first_come_first_served() -> None:
    """With nobody queued a lease is granted without waiting; once someone waits, later
    arrivals queue behind them instead of taking what a release frees first."""
    import asyncio

    from asyncgen.engine.gate import Gate

    gate = Gate(FlowControl(["u"], concurrency=1), concurrency=10)
    first = gate.lease(1, None).__await__()
    with pytest.raises(StopIteration) as granted:
        first.send(None)  # no suspension at all
    held: Lease = granted.value.value
    order: list[str] = []

    async def take(name: str) -> Lease:
        lease = await gate.lease(1, None)
        order.append(name)
        return lease

    a = asyncio.ensure_future(take("a"))
    await asyncio.sleep(0)
    b = asyncio.ensure_future(take("b"))
    await asyncio.sleep(0)
    assert not a.done() and not b.done()
    ok = Feedback(Signal.OK, None)
    gate.release(held, ok)  # the window is still one: only the head of the queue gets it
    late = asyncio.ensure_future(take("late"))
    gate.release(await a, ok)
    gate.release(await b, ok)
    gate.release(await late, ok)
    assert order == ["a", "b", "late"]


async def test_a_newcomer_during_the_hand_over_between_waiters_queues_too() -> None:
    """Between the head leaving the queue and the next waiter waking up, the lock is free
    but someone is still waiting: a lease asked for in that instant must queue behind."""
    import asyncio

    from asyncgen.engine.gate import Gate

    gate = Gate(FlowControl(["u"], concurrency=1), concurrency=10)
    ok = Feedback(Signal.OK, None)
    held = await gate.lease(1, None)
    jumped: list[bool] = []

    async def head() -> None:
        lease = await gate.lease(1, None)  # the lock was just handed on, to `nxt`
        gate.release(lease, ok)  # capacity is free again, and `nxt` has not run yet
        newcomer = gate.lease(1, None).__await__()
        try:
            newcomer.send(None)
        except StopIteration as granted:
            jumped.append(True)
            gate.release(granted.value, ok)
        else:
            jumped.append(False)
            newcomer.close()

    a = asyncio.ensure_future(head())
    await asyncio.sleep(0)
    nxt = asyncio.ensure_future(gate.lease(1, None))
    await asyncio.sleep(0)
    gate.release(held, ok)
    await a
    gate.release(await nxt, ok)
    assert jumped == [False]


def _warm(flow: FlowControl, n: int = 200, now: float = 0.0) -> float:
    """``n`` successes of 0.1 s each, one at a time; the time after them."""
    for _ in range(n):
        x = lease(flow, now)
        now += 0.1
        flow.release(x, OK, now)
    return now


@pytest.mark.parametrize("signal", [Signal.THROTTLED, Signal.OVERLOADED])
def test_a_refusal_among_successes_is_the_items_alone(signal: Signal) -> None:
    """A gateway refusing a request at random: that item waits the server's Retry-After
    on its own; the endpoint neither pauses nor shrinks its window."""
    flow = FlowControl(["a"], concurrency=64)
    now = _warm(flow)
    window = flow.endpoint_stats(now)[0].window
    released = flow.release(lease(flow, now), Feedback(signal, retry_after=1.0), now)
    assert released.excused and released.wait == 1.0
    bare = flow.release(lease(flow, now), Feedback(signal), now)
    assert bare.excused is (signal is Signal.THROTTLED), "a 503 without retry-after counts"
    stats = flow.endpoint_stats(now)[0]
    assert stats.paused_for == 0 and stats.window == window
    assert isinstance(flow.try_acquire(now, 10, 32), Lease)


def test_random_refusals_of_thirty_percent_never_pause_the_endpoint() -> None:
    import random

    rng = random.Random(5)
    flow = FlowControl(["a"], concurrency=200)
    now = 0.0
    paused = 0
    for _ in range(20_000):
        while isinstance(got := flow.try_acquire(now, 10, 32), Wait):
            now += got.seconds  # a learned pace, while on trial
        x = got
        now += 0.001
        refused = rng.random() < 0.3
        feedback = Feedback(Signal.THROTTLED, retry_after=1.0) if refused else OK
        released = flow.release(x, feedback, now)
        assert released.excused == refused
        if released.held:
            paused += 1
    stats = flow.endpoint_stats(now)[0]
    assert paused == 0 and stats.paused_for == 0 and stats.window == 200
    assert 0.2 < stats.refused_share < 0.4
    # Pacing at the success rate did not lower the share: random, so no pace was kept.
    assert stats.rpm_limit is None


def test_mostly_refused_means_the_budget_is_spent() -> None:
    flow = FlowControl(["a"], concurrency=256)
    now = _warm(flow, 300)
    leases = [lease(flow, now) for _ in range(256)]
    outcomes = [flow.release(x, Feedback(Signal.THROTTLED, retry_after=2.0), now) for x in leases]
    # The first refusals look sporadic; once most recent replies are refusals, the endpoint
    # pauses for the Retry-After and the window shrinks (no budget is known to pace it).
    assert outcomes[0].wait == 2.0 and not outcomes[0].held
    assert outcomes[-1].held and outcomes[-1].wait is None
    sporadic = sum(o.wait is not None for o in outcomes)
    assert 100 < sporadic < 160  # a share of 0.4 over about the last 256 replies
    stats = flow.endpoint_stats(now)[0]
    assert stats.paused_for == pytest.approx(2.0) and stats.window < 256
    assert isinstance(flow.try_acquire(now, 10, 32), Wait)


def test_a_successful_probe_does_not_cut_a_retry_after_short() -> None:
    flow = FlowControl(["a"], concurrency=8)
    flow.release(lease(flow), Feedback(Signal.THROTTLED, retry_after=5.0), 0.0)
    for _ in range(5):  # then 500s eject it
        x = flow.try_acquire(0.0, 10, 32)
        if isinstance(x, Lease):
            flow.release(x, Feedback(Signal.ERROR), 0.0)
    flow.mark_down(0, 0.0)
    flow.probe_result(0, True, 0.5)
    assert flow.any_up
    wait = flow.try_acquire(0.5, 10, 32)
    assert isinstance(wait, Wait) and wait.seconds == pytest.approx(4.5)
    assert isinstance(flow.try_acquire(5.0, 10, 32), Lease)


def _replies(flow: FlowControl, seconds: float, n: int, now: float) -> float:
    """``n`` replies of ``seconds`` each, a full window at a time, sent and answered
    ``PACE_EVERY`` apart (so that the flow control samples every one)."""
    done = 0
    step = FlowControl.PACE_EVERY
    while done < n:
        window = flow.endpoint_stats(now)[0].window
        batch = [lease(flow, now + i * step) for i in range(window)]
        for i, x in enumerate(batch):
            ok = Feedback(Signal.OK, prompt_tokens=10, completion_tokens=1)
            flow.release(x, ok, now + i * step + seconds)
        now += (window - 1) * step + seconds
        done += len(batch)
    return now


def test_a_server_that_queues_gets_a_smaller_window() -> None:
    """vLLM past its capacity refuses nothing: replies slow down. Three times the unloaded
    latency shrinks the window; back near it, the window grows again."""
    flow = FlowControl(["a"], concurrency=512)
    now = _replies(flow, 0.5, 2_000, 0.0)
    assert flow.endpoint_stats(now)[0].window == 512
    now = _replies(flow, 1.5, 2_000, now)
    shrunk = flow.endpoint_stats(now)[0].window
    assert shrunk < 200
    now = _replies(flow, 0.6, 3_000, now)
    assert flow.endpoint_stats(now)[0].window > shrunk


def test_a_little_slower_neither_shrinks_nor_is_noise_mistaken_for_a_queue() -> None:
    flow = FlowControl(["a"], concurrency=64)
    now = _replies(flow, 0.5, 500, 0.0)
    now = _replies(flow, 0.7, 500, now)  # 1.4 times: no shrinking
    assert flow.endpoint_stats(now)[0].window == 64
    fast = FlowControl(["b"], concurrency=64)
    now = _replies(fast, 0.001, 500, 0.0)
    now = _replies(fast, 0.2, 500, now)  # 200 times, but 0.2 s: a busy client, not a queue
    assert fast.endpoint_stats(now)[0].window == 64


def test_tokens_are_charged_up_front_once_a_429_says_they_ran_out() -> None:
    flow = FlowControl(["a"], concurrency=64, tpm=60_000)  # 1 000 tokens/s, bucket 500
    x = lease(flow, prompt=100)
    assert x.tokens == 132  # the expected output: min(256, 32)
    flow.release(x, Feedback(Signal.THROTTLED, retry_after=0.1, tokens_ran_out=True), 0.0)
    assert flow.estimate.upfront
    y = flow.try_acquire(10.0, 100, 1_000)
    assert isinstance(y, Lease) and y.tokens == 100 + 1_000  # max_tokens in full
    # The reply's usage refunds what it did not use: 150 tokens stay charged, not 1 100.
    flow.release(y, Feedback(Signal.OK, prompt_tokens=100, completion_tokens=50), 10.0)
    wait = flow.try_acquire(10.0, 100, 1_000)
    assert isinstance(wait, Wait) and wait.seconds == pytest.approx(0.15, abs=0.01)
    known = FlowControl(["b"], concurrency=8, tpm=60_000, upfront=True)
    assert lease(known, prompt=10).tokens == 10 + 32


def test_a_daily_budget_is_not_paced_as_a_minute_one_but_its_end_pauses() -> None:
    flow = FlowControl(["a"], concurrency=8)
    daily = RateLimitHints(Budget(14_400, 3, 7_200.0), Budget(6_000, 5_000, 2.0))
    x = lease(flow)
    flow.release(x, Feedback(Signal.OK, daily, prompt_tokens=10, completion_tokens=10), 0.0)
    stats = flow.endpoint_stats(0.0)[0]
    assert stats.rpm_limit is None and stats.tpm_limit == 6_000
    spent = RateLimitHints(Budget(14_400, 0, 7_200.0), None)
    flow.release(
        lease(flow), Feedback(Signal.OK, spent, prompt_tokens=10, completion_tokens=10), 1.0
    )
    wait = flow.try_acquire(1.0, 10, 32)
    assert isinstance(wait, Wait) and wait.seconds == pytest.approx(60.0)  # capped, then asks


def _queueing_server(flow: FlowControl, seconds: float, slots: int = 64) -> tuple[float, float]:
    """Simulate a server that runs ``slots`` requests at once for 1 s each and queues the rest
    (first come, first served), kept as busy as the flow control lets it be for ``seconds``.
    Returns the mean window over the last third and the server's busy share over it."""
    import heapq

    free = [0.0] * slots  # when each slot is next free
    done: list[tuple[float, int, Lease]] = []
    now, n, busy, window_sum, samples = 0.0, 0, 0.0, 0.0, 0
    while now < seconds:
        while isinstance(got := flow.try_acquire(now, 10, 32), Lease):
            start = max(now, heapq.heappop(free))
            heapq.heappush(free, start + 1.0)
            heapq.heappush(done, (start + 1.0, n, got))
            n += 1
            if start >= 2 * seconds / 3:
                busy += 1.0
        now, _, finished = heapq.heappop(done)
        flow.release(finished, Feedback(Signal.OK, prompt_tokens=10, completion_tokens=32), now)
        if now >= 2 * seconds / 3:
            window_sum += flow.endpoint_stats(now)[0].window
            samples += 1
    return window_sum / samples, busy / (slots * seconds / 3)


def test_a_server_that_queues_is_found_at_its_capacity() -> None:
    """Told it may send 1 024 at once, against a server that runs 64 and queues the rest (vLLM
    past its batch capacity): the window settles near 1.5 times the capacity (where it stops
    growing), not near the cap, and keeps the server busy. A cut in proportion to the
    slowdown went on cutting while the backlog drained and ended at 31, the server idle
    half the time."""
    window, busy = _queueing_server(FlowControl(["a"], concurrency=1024), 120.0)
    assert 64 <= window <= 140
    assert busy >= 0.9


def _hidden_budget(flow: FlowControl, seconds: float, budget: float) -> tuple[float, float]:
    """Simulate a server that keeps a budget of ``budget`` requests a second (one second of
    burst) and says nothing of it but 429s with the seconds until a request would fit;
    refused items wait that (full jitter) and come back. 0.1 s a reply. Returns the share
    refused and the successes a second, both over the last half."""
    import heapq
    import random

    rng = random.Random(3)
    level, filled = budget, 0.0
    events: list[tuple[float, int, Lease | None]] = []
    retries: list[float] = []
    now, n, refused, ok, late = 0.0, 0, 0, 0, 0
    while now < seconds:
        while isinstance(got := flow.try_acquire(now, 10, 32), Lease):
            if retries and retries[0] <= now:
                heapq.heappop(retries)
            level = min(budget, level + (now - filled) * budget)
            filled = now
            fits = level >= 1.0
            level -= fits
            n += 1
            heapq.heappush(events, (now + 0.1, n if fits else -n, got))
        if isinstance(got, Wait) and got.seconds < math.inf:
            heapq.heappush(events, (now + got.seconds, 0, None))
        now, tag, finished = heapq.heappop(events)
        if finished is None:
            continue
        if tag > 0:
            feedback = Feedback(Signal.OK, prompt_tokens=10, completion_tokens=32)
        else:
            feedback = Feedback(Signal.THROTTLED, retry_after=max(0.01, (1.0 - level) / budget))
        released = flow.release(finished, feedback, now)
        if tag < 0:
            heapq.heappush(retries, now + (released.wait or 0.0) * (1 + rng.random()))
        if now >= seconds / 2:
            late += 1
            refused += tag < 0
            ok += tag > 0
    return refused / late, ok / (seconds / 2)


def test_a_budget_kept_hidden_is_learned_from_the_success_rate() -> None:
    """No x-ratelimit headers, only 429s: the success rate shows the budget, which is then
    paced. A rule on the refused share alone kept 38 % of requests refused."""
    share, rate = _hidden_budget(FlowControl(["a"], concurrency=256), 30.0, budget=100.0)
    assert share < 0.08
    assert rate >= 95.0
