"""How diverse a set of embeddings is: the similarity of each one to its nearest neighbour
and of random pairs (the measures Persona Hub compares persona sets and outputs with).

The nearest neighbours of a sample of the vectors (every vector up to ``sample``) are
searched among all of them: exactly up to ``EXACT_UP_TO`` vectors, else in the inverted
file over fp16 vectors that semantic dedup uses (:func:`~asyncgen.personas.semantic.ivf_index`,
as many lists for as many vectors, trained on a sample of them). An HNSW graph, the earlier
choice, lost near neighbours as it grew, so the report under-stated how close the set was
at large n. Needs the ``semantic`` extra.
"""

from __future__ import annotations

from typing import Any

import msgspec

from asyncgen.personas.semantic import NPROBE, inverted_lists, ivf_index, modules, unit_rows

__all__ = ["EXACT_UP_TO", "NPROBE_REPORT", "Diversity", "Spread", "diversity", "nearest_similarity"]

EXACT_UP_TO = 50_000
NPROBE_REPORT = 4 * NPROBE
"""Lists a report's search scans: more than dedup's, as only the sample is searched. On
random-like vectors a vector's nearest distinct neighbour is often in a list far from it
(a near copy never is); ``benchmarks/README.md``, diversity report, measures the shortfall."""
_TRAIN_PER_LIST = 64
"""Vectors a list the inverted file is trained on (a sample when there are more)."""
_BLOCK = 65_536


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
    """Whether the nearest neighbours were searched exactly (else in the inverted file)."""


def _spread(values: Any) -> Spread | None:
    np, _ = modules()
    if len(values) == 0:
        return None
    q = np.quantile(values, [0.1, 0.5, 0.9, 0.99])
    r = [round(float(x), 4) for x in (values.mean(), *q, values.max())]
    return Spread(len(values), *r)


def nearest_similarity(
    rows: Any,
    queries: Any,
    *,
    seed: int = 0,
    nprobe: int = NPROBE_REPORT,
    exact: bool | None = None,
) -> Any:
    """The cosine of each of ``rows[queries]`` to its nearest other row (``rows``: unit
    float32 rows, at least two); searched exactly up to ``EXACT_UP_TO`` rows unless
    ``exact`` says otherwise."""
    np, faiss = modules()
    n, dims = rows.shape
    if exact if exact is not None else n <= EXACT_UP_TO:
        index = faiss.IndexFlatIP(dims)
    else:
        lists = inverted_lists(n)
        rng = np.random.default_rng(seed)
        take = min(n, lists * _TRAIN_PER_LIST)
        train = rows if take == n else rows[np.sort(rng.choice(n, size=take, replace=False))]
        index = ivf_index(train, lists, nprobe)
    for s in range(0, n, _BLOCK):
        index.add(rows[s : s + _BLOCK])
    sims, found = index.search(rows[queries], 2)
    # The first hit is the vector itself, unless an exact copy came first: either way the
    # best hit that is another vector is the neighbour.
    own = found[:, 0] == queries
    return np.where(own, sims[:, 1], sims[:, 0])


def diversity(
    vectors: Any, *, sample: int = 10_000, pairs: int = 100_000, seed: int = 0
) -> Diversity:
    """The nearest-neighbour and pairwise similarity of ``vectors`` (one row each)."""
    np, _ = modules()
    rows = unit_rows(vectors)
    n, dims = rows.shape
    rng = np.random.default_rng(seed)
    nearest = pair_sims = None
    exact = n <= EXACT_UP_TO
    if n >= 2:
        queries = rng.choice(n, size=min(sample, n), replace=False)
        nearest = nearest_similarity(rows, queries, seed=seed, exact=exact)
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
