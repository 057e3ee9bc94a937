"""Process-wide settings for long jobs; the CLI applies them, a program embedding the engine
decides for itself (the library never changes them on its own)."""

from __future__ import annotations

import gc

__all__ = ["tune_gc"]


def tune_gc(threshold: int = 10_000) -> None:
    """Make CPython's cyclic garbage collector cheap for a long, allocation-heavy job.

    Call once, after imports and set-up. What is alive then moves out of the collector's
    sight (:func:`gc.freeze`), so full collections no longer walk the interpreter's own
    objects; young collections run every ``threshold`` net container allocations instead
    of every 700. With thousands of requests in flight, each holding coroutines, futures and
    buffers for a round trip, the default settings promote them into the old generations
    and run full collections every second or so: a quarter of the client's CPU in
    ``benchmarks/`` (see its README). Reference counting still frees everything that is not
    in a cycle at once; cycles wait a little longer.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)
