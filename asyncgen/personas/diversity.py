"""How diverse a set of embeddings is: the similarity of each one to its nearest neighbour
and of random pairs (the measures Persona Hub compares persona sets and outputs with).

The nearest neighbours of a sample of the vectors (every vector up to ``sample``) are
searched among all of them: exactly up to ``EXACT_UP_TO`` vectors, else in the same faiss
HNSW index over fp16 vectors that semantic dedup uses. Needs the ``semantic`` extra.
"""

from __future__ import annotations

from typing import Any

import msgspec

from asyncgen.personas.semantic import hnsw_index, modules, unit_rows

__all__ = ["EXACT_UP_TO", "Diversity", "Spread", "diversity"]

EXACT_UP_TO = 50_000


class Spread(msgspec.Struct, frozen=True):
    """Cosine similarities: how many, their mean and quantiles."""

    count: int
    mean: float
    p10: float
    p50: float
    p90: float
    p99: float
    max: float


class Diversity(msgspec.Struct, frozen=True):
    vectors: int
    dimensions: int
    nearest: Spread | None
    """Each sampled vector's nearest other vector (lower: a more diverse set)."""
    pairs: Spread | None
    """Random pairs of distinct vectors."""
    exact: bool
    """Whether the nearest neighbours were searched exactly (else by HNSW)."""


def _spread(values: Any) -> Spread | None:
    np, _ = modules()
    if len(values) == 0:
        return None
    q = np.quantile(values, [0.1, 0.5, 0.9, 0.99])
    r = [round(float(x), 4) for x in (values.mean(), *q, values.max())]
    return Spread(len(values), *r)


def diversity(
    vectors: Any, *, sample: int = 10_000, pairs: int = 100_000, seed: int = 0
) -> Diversity:
    """The nearest-neighbour and pairwise similarity of ``vectors`` (one row each)."""
    np, faiss = modules()
    rows = unit_rows(vectors)
    n, dims = rows.shape
    rng = np.random.default_rng(seed)
    nearest = pair_sims = None
    exact = n <= EXACT_UP_TO
    if n >= 2:
        queries = rng.choice(n, size=min(sample, n), replace=False)
        index = faiss.IndexFlatIP(dims) if exact else hnsw_index(dims)
        for s in range(0, n, 65_536):
            index.add(rows[s : s + 65_536])
        sims, found = index.search(rows[queries], 2)
        # The first hit is the vector itself, unless an exact copy came first: either way
        # the best hit that is another vector is the neighbour.
        own = found[:, 0] == queries
        nearest = np.where(own, sims[:, 1], sims[:, 0])
        a = rng.integers(0, n, size=pairs)
        b = rng.integers(0, n - 1, size=pairs)
        b = b + (b >= a)  # a different vector
        pair_sims = np.einsum("ij,ij->i", rows[a], rows[b])
    return Diversity(
        n,
        dims,
        _spread(nearest) if nearest is not None else None,
        _spread(pair_sims) if pair_sims is not None else None,
        exact,
    )
