"""Process-wide settings for long jobs; the CLI applies them, a program embedding the engine
decides for itself (the library never changes them on its own)."""

from __future__ import annotations

import gc
from typing import Any

__all__ = ["tune_gc"]


class _YoungThreshold:
    """A ``gc.callbacks`` hook that sizes the young generation's threshold to the job.

    CPython counts net container allocations since the last collection and collects when the
    count passes the threshold. A job with thousands of requests in flight keeps hundreds of
    thousands of objects alive (coroutines, futures, parsers, buffers: ~80 per request), and
    they turn over with every round trip; after each collection the count climbs back through
    that turnover alone, so a threshold below the job's working set means collections that
    find nothing, and the survivors they promote make the old generations' collections
    long (100+ ms pauses at 4 000 in flight). Measured on the engine: zero garbage in every
    collection after start-up. So a collection that found (almost) nothing doubles the
    threshold, one that found much halves it, between ``floor`` and ``ceiling``; cyclic
    garbage thus still gets collected, within about ``threshold`` allocations of appearing.
    """

    def __init__(self, floor: int, ceiling: int) -> None:
        self.floor = floor
        self.ceiling = ceiling

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase != "stop" or info["generation"] == 2:
            return  # full collections run on their own schedule (a quarter of the heap new)
        young, middle, old = gc.get_threshold()
        collected = info["collected"]
        if collected * 100 <= young:  # under 1 % of a threshold's worth: a wasted pass
            wanted = min(self.ceiling, young * 2)
        elif collected * 10 >= young:  # garbage is piling up: collect it sooner
            wanted = max(self.floor, young // 2)
        else:
            return
        if wanted != young:
            gc.set_threshold(wanted, middle, old)


def tune_gc(threshold: int = 10_000, *, ceiling: int = 1_000_000) -> None:
    """Make CPython's cyclic garbage collector cheap for a long, allocation-heavy job.

    Call once, after imports and set-up. What is alive then moves out of the collector's
    sight (:func:`gc.freeze`), so full collections no longer walk the interpreter's own
    objects. Young collections start every ``threshold`` net container allocations instead
    of every 700, and the threshold then adapts: it doubles after each collection that found
    (almost) no garbage and halves after one that found much, between ``threshold`` and
    ``ceiling``, so it settles above what the job keeps alive. With thousands of requests in
    flight the default settings spend a quarter of the client's CPU, and pauses of a tenth
    of a second, on collections that find nothing (``benchmarks/`` README). Reference
    counting still frees everything that is not in a cycle at once; garbage in cycles waits
    for about as many net allocations as the threshold has grown to (roughly the job's live
    objects), and a collection that finds much of it halves the threshold again. Calling it
    again resets the threshold and keeps one hook.
    """
    if not 1 <= threshold <= ceiling:
        raise ValueError(f"need 1 <= threshold <= ceiling, got {threshold} and {ceiling}")
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)
    gc.callbacks[:] = [cb for cb in gc.callbacks if not isinstance(cb, _YoungThreshold)]
    gc.callbacks.append(_YoungThreshold(threshold, ceiling))
