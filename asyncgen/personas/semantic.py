"""Semantic dedup: drop a persona whose embedding is within a cosine threshold of one kept
before it, first kept wins in input order (as the MinHash stage does).

The kept set lives in an approximate nearest-neighbour index, faiss HNSW over fp16-quantised
vectors (``IndexHNSWSQ``, inner product on unit vectors = cosine; chosen over usearch by
``benchmarks/bench_semantic.py``). Vectors arrive in blocks: each block is searched against
the index (the kept personas of earlier blocks), then checked within itself exactly (one
matrix product), in order, so a persona is compared with every persona kept before it.
Memory: the index holds only kept vectors, 2 bytes a dimension plus the graph (about
``8 * M`` bytes at the bottom layer, M = 16 here).

numpy and faiss are the ``semantic`` extra; they load when a deduplicator is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from asyncgen.core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "EF_SEARCH",
    "SemanticDeduplicator",
    "SemanticStats",
    "Verdict",
    "hnsw_index",
    "modules",
    "unit_rows",
]

_M = 16  # HNSW links per node: recall of near copies is high at this, memory is modest
EF_SEARCH = 128
"""Candidates an HNSW search keeps: at 64, 89 % of planted copies were found among 200 000
random-like vectors; 128 is the default (see benchmarks/README.md, semantic dedup)."""
_EF_CONSTRUCTION = 64


class Verdict(NamedTuple):
    """One persona's fate: kept, or dropped with its nearest kept neighbour (that one's key)."""

    kept: bool
    neighbour: int | None
    similarity: float | None


class SemanticStats(msgspec.Struct, frozen=True):
    seen: int
    kept: int
    dropped: int
    dimensions: int | None


def modules() -> tuple[Any, Any]:
    try:
        import faiss
        import numpy
    except ImportError as exc:
        raise ConfigError(
            "semantic dedup needs numpy and faiss-cpu: pip install 'asyncgen[semantic]'"
        ) from exc
    return numpy, faiss


def unit_rows(vectors: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """``vectors`` as float32 rows of length 1 (a zero row stays zero)."""
    numpy, _ = modules()
    rows = numpy.ascontiguousarray(vectors, dtype=numpy.float32)
    norms = numpy.linalg.norm(rows, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: npt.NDArray[np.float32] = rows / norms
    return out


def hnsw_index(dimensions: int, ef_search: int = EF_SEARCH) -> Any:
    """An empty faiss HNSW index over fp16-quantised vectors, by inner product."""
    _, faiss = modules()
    index = faiss.IndexHNSWSQ(
        dimensions, faiss.ScalarQuantizer.QT_fp16, _M, faiss.METRIC_INNER_PRODUCT
    )
    index.hnsw.efSearch = ef_search
    index.hnsw.efConstruction = _EF_CONSTRUCTION
    return index


class SemanticDeduplicator:
    """Sans-IO: give it blocks of vectors in input order with their keys, get a verdict each."""

    def __init__(
        self, *, threshold: float = 0.9, threads: int = 1, ef_search: int = EF_SEARCH
    ) -> None:
        if not -1.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (-1, 1], got {threshold}")
        self._np, self._faiss = modules()
        self._faiss.omp_set_num_threads(threads)
        self.threshold = threshold
        self._ef_search = ef_search
        self._index: Any = None
        self._keys: list[int] = []
        """Key of each vector in the index, by its position there."""
        self._seen = 0
        self._dimensions: int | None = None

    def check_block(self, vectors: npt.NDArray[Any], keys: Sequence[int]) -> list[Verdict]:
        """The verdicts for ``vectors`` (one row per persona, in input order); kept ones join
        the index."""
        np = self._np
        rows = unit_rows(vectors)
        n = len(rows)
        if n != len(keys):
            raise ValueError(f"{n} vectors for {len(keys)} keys")
        if n == 0:
            return []
        if self._index is None:
            self._dimensions = rows.shape[1]
            self._index = hnsw_index(rows.shape[1], self._ef_search)
        elif rows.shape[1] != self._dimensions:
            raise ValueError(f"vectors of {rows.shape[1]} dimensions after {self._dimensions}")
        self._seen += n
        threshold = self.threshold
        # The nearest kept persona of earlier blocks.
        if self._index.ntotal:
            sims, positions = self._index.search(rows, 1)
            best_sim, best_at = sims[:, 0], positions[:, 0]
        else:
            best_sim = np.full(n, -2.0, dtype=np.float32)
            best_at = np.full(n, -1, dtype=np.int64)
        within = rows @ rows.T
        kept = np.zeros(n, dtype=bool)
        verdicts: list[Verdict] = []
        for i in range(n):
            sim, at = float(best_sim[i]), int(best_at[i])
            key = self._keys[at] if at >= 0 else None
            earlier = np.flatnonzero(kept[:i])
            if earlier.size:
                j = int(earlier[np.argmax(within[i, earlier])])
                if key is None or within[i, j] > sim:
                    sim, key = float(within[i, j]), keys[j]
            if key is not None and sim >= threshold:
                verdicts.append(Verdict(False, key, round(min(sim, 1.0), 4)))
            else:
                kept[i] = True
                verdicts.append(Verdict(True, None, None))
        chosen = np.flatnonzero(kept)
        if chosen.size:
            self._index.add(rows[chosen])
            self._keys.extend(keys[int(i)] for i in chosen)
        return verdicts

    def statistics(self) -> SemanticStats:
        kept = len(self._keys)
        return SemanticStats(self._seen, kept, self._seen - kept, self._dimensions)

    def __repr__(self) -> str:
        s = self.statistics()
        return f"<SemanticDeduplicator threshold={self.threshold} seen={s.seen} kept={s.kept}>"
