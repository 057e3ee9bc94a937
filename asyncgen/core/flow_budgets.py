"""What the flow control learns of an endpoint's budgets, sans-IO: announced and hidden.

An endpoint's budgets come three ways. The job tells some (``own_rpm``/``own_tpm``, kept by
:class:`~asyncgen.core.flow.FlowControl`); the server announces some in ``x-ratelimit-*``
headers (:func:`apply_hints`); and a server that refuses with 429s and says nothing may keep
one hidden, which :func:`review` looks for in the refused share. Everything here works on
one :class:`~asyncgen.core.endpoint.EndpointState`; the caller passes ``now``.
"""

from __future__ import annotations

from asyncgen.core.endpoint import EndpointState
from asyncgen.core.hints import RateLimitHints
from asyncgen.core.limits import RateBucket

__all__ = [
    "LEARN_ABOVE",
    "MARGIN",
    "REVIEW_EVERY",
    "REVIEW_MIN",
    "apply_hints",
    "paced",
    "rebucket",
    "review",
]

REVIEW_EVERY = 2.0
REVIEW_MIN = 400
"""An endpoint paced by no known budget has its refused share reviewed every
:data:`REVIEW_EVERY` s, over at least :data:`REVIEW_MIN` replies (the share of 400 replies
refused at random at 15 % varies by about 2 points)."""
LEARN_ABOVE = 0.05
"""Refused share (beyond :attr:`EndpointState.random_floor`) over which a hidden budget is
looked for: the endpoint is paced, on trial, at 80 % of what it sent."""
MARGIN = 0.05
"""A learned pace that is cut goes to the success rate plus half this."""


def paced(ep: EndpointState, job_paced: bool) -> bool:
    """Paced by a budget told or announced (a learned one is a guess on trial);
    ``job_paced``: the job has an RPM or TPM budget of its own."""
    if job_paced:
        return True
    rpm = None if ep.learned else ep.rpm
    budgets = (rpm, ep.tpm, ep.own_rpm, ep.own_tpm)
    return any(b is not None for b in budgets)


def apply_hints(ep: EndpointState, hints: RateLimitHints, tokens: float, now: float) -> bool:
    """Learn the announced budgets; pause the endpoint (and say so) when what remains is
    less than the next request (``tokens``) needs."""
    pause = 0.0
    if hints.requests is not None:
        if hints.requests.per_minute is not None:
            ep.learned, ep.trial = False, None  # the server's word replaces a guess
        ep.rpm = _learn(ep.rpm, hints.requests.per_minute, now)
        pause = hints.requests.wait_for(1.0)
    if hints.tokens is not None:
        ep.tpm = _learn(ep.tpm, hints.tokens.per_minute, now)
        pause = max(pause, hints.tokens.wait_for(tokens))
    if pause > 0:
        ep.paused_until = max(ep.paused_until, now + min(pause, 60.0))
    return pause > 0


def _learn(bucket: RateBucket | None, per_minute: float | None, now: float) -> RateBucket | None:
    if per_minute is None:
        return bucket
    if bucket is None:
        return RateBucket(per_minute, now=now)
    if bucket.per_minute != per_minute:
        bucket.set_rate(per_minute, now=now)
    return bucket


def rebucket(bucket: RateBucket | None, per_minute: float | None, now: float) -> RateBucket | None:
    """``bucket`` at a new rate (a told budget that changed): None without one, a new
    bucket where there was none; an existing one keeps what was charged to it."""
    if not per_minute:
        return None
    if bucket is None:
        return RateBucket(per_minute, now=now)
    bucket.set_rate(per_minute, now=now)
    return bucket


def review(ep: EndpointState, job_paced: bool, now: float) -> None:
    """Learn a budget the server keeps hidden (429s without ``x-ratelimit-*`` headers);
    ``job_paced`` as for :func:`paced`.

    A refused share that stays high though every refused item waits out its Retry-After is
    either a budget or a gateway refusing at random, whatever the load. They differ in what
    sending less does: under a budget, the success rate stays where it was (the budget) and
    the refusals fall; at random, the success rate falls with what is sent and the share
    stays. So past :data:`LEARN_ABOVE` the endpoint is paced, on trial, at 80 % of what it
    sent. If the successes fell with it and the share did not, the refusals are random: the
    pace goes, and the share becomes the floor later shares are judged above. Otherwise it
    was a budget, and the pace follows it: down to the success rate while the share stays
    high, up 2 % a review while it is low, to find a budget that grew. The first review is
    not judged (a budget's burst allowance inflates its success rate). A threshold on the
    share alone settled just under it: 38 % of requests refused against a hidden budget."""
    span = now - ep.review_since
    if span != span:  # nan: the first reply starts the first review
        ep.review_since, ep.review_ok, ep.review_refused = now, ep.succeeded, ep.refused
        return
    ok, refused = ep.succeeded - ep.review_ok, ep.refused - ep.review_refused
    if span < REVIEW_EVERY or ok + refused < REVIEW_MIN:
        return
    first = ep.reviews == 0
    ep.reviews += 1
    ep.review_since, ep.review_ok, ep.review_refused = now, ep.succeeded, ep.refused
    share = refused / (ok + refused)
    ok_rate = 60.0 * ok / span
    bucket = ep.rpm
    above = LEARN_ABOVE + ep.random_floor
    if not ep.learned:
        if first or bucket is not None or paced(ep, job_paced):
            return  # the opening, or a budget told or announced paces it
        if share <= above:
            ep.random_floor = min(ep.random_floor, share)
            return
        sent_rate = 60.0 * (ok + refused) / span
        ep.rpm = RateBucket(0.8 * sent_rate, now=now)
        ep.learned, ep.trial, ep.trial_ok = True, share, ok_rate
        return
    assert bucket is not None
    trial, ep.trial = ep.trial, None
    if trial is not None and ok_rate < 0.9 * ep.trial_ok and share >= 0.6 * trial:
        ep.rpm, ep.learned, ep.random_floor = None, False, trial
        return
    if share > above:
        # Lower the pace, on trial again: if the successes fall with it and the share does
        # not, the refusals were random after all (else the pace would fall for ever against
        # a gateway's random refusals).
        rate = min(bucket.per_minute, ok_rate) * (1.0 + MARGIN / 2)
        if rate < 0.95 * bucket.per_minute:
            ep.trial, ep.trial_ok = share, ok_rate
        bucket.set_rate(rate, now=now)
    elif share < above / 2:
        bucket.set_rate(bucket.per_minute * 1.02, now=now)
