"""The diversity report's nearest-neighbour similarity past the exact bound, against numpy.

Planted vectors as ``bench_semantic.py`` makes them (near copies at cosine about 0.97,
distinct ones random-like); for a sample of queries, each vector's nearest other vector is
found exactly (numpy, in blocks) and by the report's index: semantic dedup's inverted file
(``asyncgen.personas.diversity.nearest_similarity``), and, with ``--hnsw``, the HNSW graph
the report used before. Printed: for copies and for distinct vectors, the share whose
similarity falls short of the exact one by more than 0.01, and the mean shortfall.

    python benchmarks/bench_diversity.py --n 200000 --hnsw
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
from bench_semantic import planted

from asyncgen.personas.diversity import NPROBE_REPORT, nearest_similarity
from asyncgen.personas.semantic import unit_rows


def exact_nearest(rows: Any, queries: Any) -> Any:
    out = np.empty(len(queries), dtype=np.float32)
    for s in range(0, len(queries), 256):
        block = queries[s : s + 256]
        sims = rows[block] @ rows.T
        sims[np.arange(len(block)), block] = -2.0
        out[s : s + 256] = sims.max(axis=1)
    return out


def hnsw_nearest(rows: Any, queries: Any) -> Any:
    import faiss

    index = faiss.IndexHNSWSQ(
        rows.shape[1], faiss.ScalarQuantizer.QT_fp16, 16, faiss.METRIC_INNER_PRODUCT
    )
    index.hnsw.efSearch, index.hnsw.efConstruction = 128, 64
    index.add(rows)
    sims, found = index.search(rows[queries], 2)
    return np.where(found[:, 0] == queries, sims[:, 1], sims[:, 0])


def shortfall(name: str, found: Any, exact: Any, is_copy: Any, seconds: float) -> dict[str, Any]:
    short = exact - found
    row: dict[str, Any] = {"index": name, "seconds": round(seconds, 1)}
    for kind, mask in (("copies", is_copy), ("distinct", ~is_copy)):
        row[f"{kind}_short_over_0.01"] = round(float((short[mask] > 0.01).mean()), 4)
        row[f"{kind}_mean_short"] = round(float(short[mask].mean()), 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dims", type=int, default=256)
    parser.add_argument("--share", type=float, default=0.2, help="planted copies")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--nprobe", type=int, default=NPROBE_REPORT)
    parser.add_argument("--hnsw", action="store_true", help="also the earlier HNSW graph")
    args = parser.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)
    vectors, _ = planted(args.n, args.dims, args.share, seed=3)
    rows = unit_rows(vectors)
    rng = np.random.default_rng(1)
    queries = rng.choice(args.n, size=args.queries, replace=False)
    # A copy's nearest is its original or a sibling; an original of a copy is near too.
    exact = exact_nearest(rows, queries)
    near = exact >= 0.9
    started = time.perf_counter()
    found = nearest_similarity(rows, queries, nprobe=args.nprobe, exact=False)
    rows_out = [
        shortfall(f"ivf nprobe={args.nprobe}", found, exact, near, time.perf_counter() - started)
    ]
    if args.hnsw:
        started = time.perf_counter()
        found = hnsw_nearest(rows, queries)
        rows_out.append(shortfall("hnsw ef=128", found, exact, near, time.perf_counter() - started))
    for row in rows_out:
        print(json.dumps({"n": args.n, "dims": args.dims, "near_queries": int(near.sum()), **row}))


if __name__ == "__main__":
    main()
