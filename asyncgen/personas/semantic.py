"""Semantic dedup: drop a persona whose embedding is within a cosine threshold of one kept
before it, first kept wins in input order (as the MinHash stage does).

The kept set lives in a faiss index, searched by inner product (cosine, on unit vectors):
exact (``IndexFlatIP``) until it holds 40 vectors per inverted list, then an inverted file
over fp16 vectors (``IndexIVFScalarQuantizer``) trained on those kept so far, each search
scanning the ``nprobe`` lists nearest the query. A near copy falls in its original's list or
a neighbouring one, so the IVF finds it where an HNSW graph over random-like vectors lost it
as the graph grew (``benchmarks/README.md``, semantic dedup: 89 % of planted copies at
200 000 with HNSW, 99.4 % with the IVF, in a fifth of the time). The number of lists grows
with the number of vectors expected (about 2 sqrt(n), a power of two), so a search costs
about the same share of the kept set at any size.

Vectors arrive in blocks: each block is searched against the index (the kept personas of
earlier blocks), then checked within itself exactly (one matrix product), in order, so a
persona is compared with every persona kept before it. Memory: the index holds only kept
vectors, 2 bytes a dimension and an 8-byte id each once inverted (4 bytes a dimension before).

numpy and faiss are the ``semantic`` extra; they load when a deduplicator is made.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

from asyncgen.core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "NPROBE",
    "SemanticDeduplicator",
    "SemanticStats",
    "Verdict",
    "inverted_lists",
    "ivf_index",
    "modules",
    "unit_rows",
]

NPROBE = 16
"""Inverted lists a dedup search scans (``benchmarks/README.md``, semantic dedup)."""
_PER_LIST = 40
"""Kept vectors per list before the index is trained (faiss's k-means wants 39 or more)."""
_TRAIN_ITERATIONS = 10


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


def ivf_index(train: npt.NDArray[np.float32], lists: int, nprobe: int = NPROBE) -> Any:
    """An empty inverted file over fp16 vectors, by inner product, its ``lists`` trained on
    the unit rows ``train`` (39 or more a list); searches scan ``nprobe`` lists."""
    _, faiss = modules()
    dimensions = train.shape[1]
    quantizer = faiss.IndexFlatIP(dimensions)
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, dimensions, lists, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT
    )
    index.cp.niter = _TRAIN_ITERATIONS
    index.cp.seed = 1
    index.train(train)
    index.nprobe = nprobe
    return index  # faiss's wrapper keeps a reference to the quantizer it does not own


def inverted_lists(expected: int | None) -> int:
    """Inverted lists for about ``expected`` vectors: a power of two near 2 sqrt(n), from 256
    to 65 536 (1 024 when unknown)."""
    if not expected:
        return 1024
    return min(65_536, max(256, 1 << round(math.log2(2 * math.sqrt(expected)))))


class SemanticDeduplicator:
    """Sans-IO: give it blocks of vectors in input order with their keys, get a verdict each.
    ``expected``: about how many vectors will come (it sizes the inverted file).

    ``shard_size``: the kept set in shards of that many vectors, for a kept set larger than
    memory. A full shard is handed to ``spill`` (which may write it out and give back a
    memory-mapped copy) and searched from then on beside the later ones; a new, empty shard
    with the same trained lists takes the kept vectors that follow."""

    def __init__(
        self,
        *,
        threshold: float = 0.9,
        threads: int = 1,
        nprobe: int = NPROBE,
        expected: int | None = None,
        shard_size: int | None = None,
        spill: Callable[[Any], Any] | None = None,
    ) -> None:
        if not -1.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (-1, 1], got {threshold}")
        if nprobe < 1:
            raise ValueError(f"nprobe must be at least 1, got {nprobe}")
        if shard_size is not None and shard_size < 1:
            raise ValueError(f"index shard size must be at least 1, got {shard_size}")
        self._np, self._faiss = modules()
        self._faiss.omp_set_num_threads(threads)
        self.threshold = threshold
        self._nprobe = nprobe
        self.lists = inverted_lists(expected)
        self._index: Any = None
        self._exact: list[npt.NDArray[np.float32]] | None = []
        """The kept vectors while the index is exact (None once inverted): its training set."""
        self._shard_size = shard_size
        self._spill = spill
        self._full: list[tuple[Any, int]] = []
        """The full shards (as ``spill`` gave them back), each with the position in
        :attr:`_keys` of its first vector."""
        self._offset = 0
        """The position in :attr:`_keys` of the current shard's first vector."""
        self._keys: list[int] = []
        """Key of each kept vector, by its position (shard after shard)."""
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
            self._index = self._faiss.IndexFlatIP(rows.shape[1])
        elif rows.shape[1] != self._dimensions:
            raise ValueError(f"vectors of {rows.shape[1]} dimensions after {self._dimensions}")
        self._seen += n
        threshold = self.threshold
        # The nearest kept persona of earlier blocks, over every shard.
        best_sim = np.full(n, -2.0, dtype=np.float32)
        best_at = np.full(n, -1, dtype=np.int64)
        for index, offset in (*self._full, (self._index, self._offset)):
            if index.ntotal:
                sims, positions = index.search(rows, 1)
                better = (positions[:, 0] >= 0) & (sims[:, 0] > best_sim)
                best_sim = np.where(better, sims[:, 0], best_sim)
                best_at = np.where(better, positions[:, 0] + offset, best_at)
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
            added = rows[chosen]
            self._index.add(added)
            self._keys.extend(keys[int(i)] for i in chosen)
            if self._exact is not None:
                self._exact.append(added)
                if self._index.ntotal >= self.lists * _PER_LIST:
                    self._invert()
            if self._shard_size is not None and self._index.ntotal >= self._shard_size:
                self._next_shard()
        return verdicts

    def _next_shard(self) -> None:
        """Set the full current shard aside (through ``spill``) and start an empty one."""
        if self._exact is not None:
            # Trained on what the shard holds: about 40 vectors a list at most.
            most = max(1, self._index.ntotal // _PER_LIST)
            self.lists = min(self.lists, 1 << (most.bit_length() - 1))  # a power of two
            self._invert()
        full = self._index
        empty = self._faiss.clone_index(full)  # the same trained lists, empty
        empty.reset()
        if self._spill is not None:
            full = self._spill(full)
            full.nprobe = self._nprobe  # whatever the copy read back says
        self._full.append((full, self._offset))
        self._offset += full.ntotal
        self._index = empty

    def expect(self, n: int) -> None:
        """Size the inverted file for about ``n`` vectors (before it is trained)."""
        if self._exact is not None:
            self.lists = inverted_lists(n)
            if self._index is not None and self._index.ntotal >= self.lists * _PER_LIST:
                self._invert()

    def _invert(self) -> None:
        """Replace the exact index by an inverted file trained on the vectors it holds (the
        same vectors, in the same order, so positions still name keys)."""
        assert self._exact is not None
        kept = self._np.concatenate(self._exact)
        self._exact = None
        self._index = ivf_index(kept, self.lists, self._nprobe)
        self._index.add(kept)

    @property
    def shards(self) -> int:
        """Index shards so far (the current one included)."""
        return len(self._full) + 1

    def statistics(self) -> SemanticStats:
        kept = len(self._keys)
        return SemanticStats(self._seen, kept, self._seen - kept, self._dimensions)

    def __repr__(self) -> str:
        s = self.statistics()
        kind = "exact" if self._exact is not None else f"ivf{self.lists}"
        if self._full:
            kind += f" x{self.shards}"
        return (
            f"<SemanticDeduplicator threshold={self.threshold} {kind} seen={s.seen} kept={s.kept}>"
        )
