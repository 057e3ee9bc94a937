"""Exact and near-duplicate detection for persona texts, in one pass and sans-IO.

:class:`Deduplicator` sees texts in input order and decides for each: *keep* it, drop it as an
*exact* copy of a kept text (same 16-byte blake2b hash of the normalised text), or drop it as a
*near* copy (MinHash of its word set, LSH candidates, estimated Jaccard >= threshold). The first
occurrence is always the one kept. It reads and writes no files; the caller streams.

Shingles are the set of words (1-grams) of the normalised text, as Persona Hub did for its
one- or two-sentence personas. Longer shingles do not fit a 0.9 threshold on texts this short:
one word changed in a 20-word persona leaves 15 of 21 word 3-grams (Jaccard 0.71) and about
100 of 120 character 5-grams (0.83), so no such pair could ever reach 0.9; its word sets share
19 of 21 (0.905). The flip side: word order is ignored, and texts under about ten distinct
words can only be exact duplicates at 0.9 (one word more already gives 9/10).

The MinHash is datasketch's (``affine32`` scheme, seed 1, ``sha1_hash32`` of each word, the
same permutations), computed for a whole batch at once with numpy: signatures equal
``datasketch.MinHash.update_batch`` bit for bit, and similarities ``MinHash.jaccard``.

Held per kept text: its exact hash (a dict entry, ~110 B), its signature (4 B per permutation,
512 B at 128), one LSH entry per band (~75 B each, 8 bands at the defaults) and its caller key
(8 B), with dict slack about 1.4 KB measured. Dropped texts cost nothing.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from array import array
from collections.abc import Sequence
from typing import Literal, NamedTuple

import msgspec
import numpy as np
import numpy.typing as npt

__all__ = [
    "DedupStatistics",
    "Deduplicator",
    "MinHasher",
    "Verdict",
    "exact_key",
    "lsh_params",
    "normalise",
    "words",
]

Signatures = npt.NDArray[np.uint32]

_WORD = re.compile(r"\w+")
_MASK32 = np.uint32(0xFFFFFFFF)
_KEY_BITS = (1 << 60) - 1  # band keys fit a 32-byte Python int
_CHUNK_BITS = 16  # signatures are stored in blocks of 65 536 rows, so nothing is ever copied
_WORD_CACHE = 1 << 17


def normalise(text: str) -> str:
    """NFKC, casefold, whitespace runs to one space, punctuation and spaces off both ends."""
    text = " ".join(unicodedata.normalize("NFKC", text).casefold().split())
    start, end = 0, len(text)
    while start < end and _is_edge(text[start]):
        start += 1
    while end > start and _is_edge(text[end - 1]):
        end -= 1
    return text[start:end]


def _is_edge(char: str) -> bool:
    return char == " " or unicodedata.category(char).startswith("P")


def exact_key(normalised: str) -> bytes:
    """The 16-byte blake2b digest two texts share when they are exact duplicates."""
    return hashlib.blake2b(normalised.encode("utf-8"), digest_size=16).digest()


def words(normalised: str) -> set[str]:
    """The shingle set of a normalised text: its distinct words."""
    return set(_WORD.findall(normalised))


def lsh_params(threshold: float, num_perm: int, *, recall: float = 0.99) -> tuple[int, int]:
    """``(bands, rows)``: the most rows per band whose candidate recall is at least ``recall``
    halfway between ``threshold`` and 1 (a pair at Jaccard J shares one of b bands of r rows
    with probability 1-(1-J^r)^b).

    Candidates are verified, so the index leans to recall, but not all the way: every false
    candidate costs a comparison, and texts from one mould (personas share phrasing) make
    many. At 0.9 and 128 permutations this gives (8, 16): recall 99% at J=0.95, 84% at 0.9,
    where the MinHash estimate itself passes only half the pairs, and 1e-4 at J=0.5.
    (12, 10), 99% at 0.9, found 0.65 points more planted copies for 23 times the candidates
    (``benchmarks/bench_dedup.py --lsh-sweep``); datasketch's equal-weight optimum, (5, 25),
    found 13 points fewer.
    """
    target = (1 + threshold) / 2
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - target**rows) ** bands >= recall:
            return bands, rows
    return num_perm, 1


class MinHasher:
    """datasketch-compatible MinHash signatures, a batch of word sets at a time."""

    def __init__(self, num_perm: int = 128, *, seed: int = 1) -> None:
        from datasketch import MinHash  # type: ignore[import-untyped]  # loads scipy: 1 s

        template = MinHash(num_perm=num_perm, seed=seed, scheme="affine32")
        a, b = template.permutations
        self.num_perm = num_perm
        self.seed = seed
        self._a = np.asarray(a, dtype=np.uint32)
        self._b = np.asarray(b, dtype=np.uint32)
        self._cache = _WordHashes()

    def signatures(self, sets: Sequence[set[str]]) -> Signatures:
        """One row per set (``num_perm`` uint32); an empty set gets the all-ones row."""
        out = np.full((len(sets), self.num_perm), _MASK32, dtype=np.uint32)
        if len(self._cache) > _WORD_CACHE:
            self._cache.clear()  # bounded; frequent words come back at once
        lookup = self._cache.__getitem__
        hashes: list[int] = []
        starts: list[int] = []
        rows: list[int] = []
        for i, shingles in enumerate(sets):
            if shingles:
                starts.append(len(hashes))
                rows.append(i)
                hashes.extend(map(lookup, shingles))
        if not hashes:
            return out
        hv = _fmix32(np.array(hashes, dtype=np.uint32))
        # (num_perm, words): reduceat along the last axis is several times faster.
        permuted = self._a[:, None] * hv + self._b[:, None]  # wraps mod 2^32, as datasketch's
        out[rows] = np.minimum.reduceat(permuted, starts, axis=1).T
        return out


class _WordHashes(dict[str, int]):
    """datasketch's default hash of each word (``sha1_hash32``), remembered: sha1 costs more
    than a lookup."""

    def __missing__(self, word: str) -> int:
        h = int.from_bytes(hashlib.sha1(word.encode("utf-8")).digest()[:4], "little")
        self[word] = h
        return h


def _fmix32(hv: Signatures) -> Signatures:
    """MurmurHash3's finaliser, which datasketch applies to each input hash before permuting."""
    hv = hv ^ (hv >> np.uint32(16))
    hv = hv * np.uint32(0x85EBCA6B)
    hv = hv ^ (hv >> np.uint32(13))
    hv = hv * np.uint32(0xC2B2AE35)
    return hv ^ (hv >> np.uint32(16))


class Verdict(NamedTuple):
    """What became of one text: ``duplicate_of`` is the caller's key of the kept text."""

    reason: Literal["keep", "exact", "near"]
    duplicate_of: int | None = None
    similarity: float | None = None


class DedupStatistics(msgspec.Struct, frozen=True):
    """A snapshot of a :class:`Deduplicator`'s counts."""

    seen: int
    kept: int
    exact: int
    near: int
    candidates: int
    """LSH candidates verified (the work the index caused)."""


class Deduplicator:
    """Keeps the first of each group of exact or near duplicates, texts given in input order.

    ``near=False`` makes it exact-only (no signatures, a hash per kept text). ``lsh`` overrides
    :func:`lsh_params` with ``(bands, rows)``.
    """

    def __init__(
        self,
        *,
        threshold: float = 0.9,
        num_perm: int = 128,
        near: bool = True,
        lsh: tuple[int, int] | None = None,
    ) -> None:
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if not 16 <= num_perm <= 1024:
            raise ValueError(f"num_perm must be between 16 and 1024, got {num_perm}")
        self.threshold = threshold
        self.near = near
        self.num_perm = num_perm
        self.bands, self.rows = lsh or lsh_params(threshold, num_perm)
        if self.bands * self.rows > num_perm:
            raise ValueError(f"{self.bands} bands of {self.rows} rows need more than {num_perm}")
        self._hasher = MinHasher(num_perm) if near else None
        # Band multipliers for a 64-bit universal hash of each band's rows (odd, fixed).
        rng = np.random.default_rng(0x5EED)
        self._mult = rng.integers(1, 1 << 63, (self.bands, self.rows), dtype=np.uint64) | 1
        self._exact: dict[bytes, int] = {}  # exact key -> ordinal of the kept text
        self._index: list[dict[int, int]] = [{} for _ in range(self.bands)]  # first kept text
        self._more: list[dict[int, list[int]]] = [{} for _ in range(self.bands)]  # any others
        self._sigs: list[Signatures] = []
        self._keys = array("q")  # ordinal -> caller key
        self._seen = self._exact_dropped = self._near_dropped = self._candidates = 0

    def check_batch(self, texts: Sequence[str], keys: Sequence[int]) -> list[Verdict]:
        """Decide for each text in order (later texts see earlier kept ones, batch or not)."""
        if len(texts) != len(keys):
            raise ValueError("texts and keys differ in length")
        norm = [normalise(t) for t in texts]
        hashes = [exact_key(n) for n in norm]
        sigs: Signatures | None = None
        bands: list[list[int]] = []
        has_words = [False] * len(texts)
        if self._hasher is not None:
            # Copies of texts kept in earlier batches need no signature.
            sets = [
                set() if h in self._exact else words(n) for n, h in zip(norm, hashes, strict=True)
            ]
            has_words = [bool(s) for s in sets]
            sigs = self._hasher.signatures(sets)
            bands = self._band_keys(sigs)
        verdicts: list[Verdict] = []
        for i, h in enumerate(hashes):
            self._seen += 1
            ordinal = self._exact.get(h)
            if ordinal is not None:
                self._exact_dropped += 1
                verdicts.append(Verdict("exact", self._keys[ordinal], 1.0))
                continue
            if sigs is not None and has_words[i]:
                match = self._best_candidate(sigs[i], bands[i])
                if match is not None:
                    self._near_dropped += 1
                    verdicts.append(Verdict("near", self._keys[match[0]], match[1]))
                    continue
            ordinal = len(self._keys)
            self._keys.append(keys[i])
            self._exact[h] = ordinal
            if sigs is not None:
                self._store(ordinal, sigs[i], bands[i] if has_words[i] else [])
            verdicts.append(Verdict("keep"))
        return verdicts

    def statistics(self) -> DedupStatistics:
        return DedupStatistics(
            seen=self._seen,
            kept=len(self._keys),
            exact=self._exact_dropped,
            near=self._near_dropped,
            candidates=self._candidates,
        )

    def _band_keys(self, sigs: Signatures) -> list[list[int]]:
        used = sigs[:, : self.bands * self.rows].reshape(len(sigs), self.bands, self.rows)
        x = (used.astype(np.uint64) * self._mult).sum(axis=2, dtype=np.uint64)
        x ^= x >> np.uint64(29)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(32)
        keys: list[list[int]] = (x & np.uint64(_KEY_BITS)).tolist()
        return keys

    def _best_candidate(self, sig: Signatures, band_keys: list[int]) -> tuple[int, float] | None:
        """The most similar kept text, if at or above the threshold (the earliest on ties)."""
        found: set[int] = set()
        for index, more, key in zip(self._index, self._more, band_keys, strict=True):
            first = index.get(key)
            if first is not None:
                found.add(first)
                if more and key in more:
                    found.update(more[key])
        if not found:
            return None
        self._candidates += len(found)
        ordinals = sorted(found)
        mask = (1 << _CHUNK_BITS) - 1
        rows = np.stack([self._sigs[o >> _CHUNK_BITS][o & mask] for o in ordinals])
        matches = np.count_nonzero(rows == sig, axis=1)
        best = int(matches.argmax())  # the earliest kept text among the most similar
        similarity = int(matches[best]) / self.num_perm
        return (ordinals[best], similarity) if similarity >= self.threshold else None

    def _store(self, ordinal: int, sig: Signatures, band_keys: list[int]) -> None:
        block, row = ordinal >> _CHUNK_BITS, ordinal & ((1 << _CHUNK_BITS) - 1)
        if block == len(self._sigs):
            self._sigs.append(np.empty((1 << _CHUNK_BITS, self.num_perm), np.uint32))
        self._sigs[block][row] = sig
        if not band_keys:
            return  # no words: nothing to be near to
        for index, more, key in zip(self._index, self._more, band_keys, strict=True):
            first = index.setdefault(key, ordinal)
            if first != ordinal:
                more.setdefault(key, []).append(ordinal)

    def __repr__(self) -> str:
        s = self.statistics()
        mode = f"near>={self.threshold} bands={self.bands}x{self.rows}" if self.near else "exact"
        return f"<Deduplicator {mode} seen={s.seen} kept={s.kept} exact={s.exact} near={s.near}>"
