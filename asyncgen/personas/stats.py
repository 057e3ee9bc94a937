"""What ``asyncgen personas stats`` measures, in one streaming pass: counts, exact length
percentiles, top terms and exact duplicates (as dedup sees them)."""

from __future__ import annotations

import heapq
import re
from collections import Counter
from collections.abc import Callable

import msgspec

__all__ = ["LengthSummary", "PersonaStats", "StatsCollector"]

_WORD = re.compile(r"\w+")
_STOPWORD_TEXT = (
    "a an and are as at be been but by for from has have he her his i in into is it its me my "
    "not of on or our s she so than that the their them they this to was we were what when "
    "where which who whom with you your"
)
_STOPWORDS = frozenset(_STOPWORD_TEXT.split())


class LengthSummary(msgspec.Struct, frozen=True):
    min: int
    mean: float
    p50: float
    p90: float
    p99: float
    max: int


class PersonaStats(msgspec.Struct, frozen=True):
    """What ``asyncgen personas stats`` reports."""

    records: int
    bad_lines: int
    exact_duplicates: int
    """Records whose normalised text (as ``dedup`` sees it) appeared before."""
    chars: LengthSummary | None
    words: LengthSummary | None
    top_terms: list[tuple[str, int]]
    top_terms_exact: bool
    """False once the vocabulary outgrew the counter: counts are then lower bounds."""


class StatsCollector:
    """Streaming statistics: exact length percentiles from histograms; top terms from a bounded
    Misra-Gries counter (exact while the vocabulary stays under ``max_terms``)."""

    def __init__(self, *, top: int = 20, max_terms: int = 100_000) -> None:
        from asyncgen.personas.dedup import exact_key, normalise

        self._key: Callable[[str], bytes] = lambda text: exact_key(normalise(text))
        self.top = top
        self.max_terms = max_terms
        self._chars: Counter[int] = Counter()
        self._words: Counter[int] = Counter()
        self._terms: Counter[str] = Counter()
        self._undercount = 0
        self._seen: set[bytes] = set()
        self._records = 0

    def add(self, text: str) -> None:
        self._records += 1
        self._chars[len(text)] += 1
        self._words[len(text.split())] += 1
        self._seen.add(self._key(text))
        self._terms.update(
            w for w in _WORD.findall(text.casefold()) if w not in _STOPWORDS and not w.isdigit()
        )
        if len(self._terms) > 2 * self.max_terms:
            # Misra-Gries in bulk: take the (max_terms+1)-th count off every term.
            cut = heapq.nlargest(self.max_terms + 1, self._terms.values())[-1]
            self._undercount += cut
            self._terms = Counter({t: c - cut for t, c in self._terms.items() if c > cut})

    def result(self, bad_lines: int = 0) -> PersonaStats:
        return PersonaStats(
            records=self._records,
            bad_lines=bad_lines,
            exact_duplicates=self._records - len(self._seen),
            chars=_summary(self._chars),
            words=_summary(self._words),
            top_terms=self._terms.most_common(self.top),
            top_terms_exact=self._undercount == 0,
        )


def _summary(histogram: Counter[int]) -> LengthSummary | None:
    n = histogram.total()
    if not n:
        return None
    values = sorted(histogram.items())
    mean = sum(v * c for v, c in values) / n
    return LengthSummary(
        min=values[0][0],
        mean=round(mean, 2),
        p50=_percentile(values, n, 50),
        p90=_percentile(values, n, 90),
        p99=_percentile(values, n, 99),
        max=values[-1][0],
    )


def _percentile(values: list[tuple[int, int]], n: int, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), from a histogram."""
    rank = q / 100 * (n - 1)
    low, frac = int(rank), rank - int(rank)

    def at(k: int) -> int:
        seen = 0
        for value, count in values:
            seen += count
            if k < seen:
                return value
        return values[-1][0]

    lo = at(low)
    return float(lo) if frac == 0 else round(lo + (at(low + 1) - lo) * frac, 2)
