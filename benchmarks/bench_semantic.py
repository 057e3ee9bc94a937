"""Semantic dedup at scale: time, peak memory, and how many planted near copies it removes.

Vectors are made the way the mock makes them (a sum of one random +-1 vector per word, 30
words of a 20 000-word vocabulary, normalised), in numpy instead of through HTTP: a near
copy changes one word of its original (cosine about 0.97), distinct personas share about
none. ``--compare`` first runs the same blocked search-then-add loop over faiss and usearch
(the measurement behind asyncgen.personas.semantic's choice).

    python benchmarks/bench_semantic.py --n 1000000
    python benchmarks/bench_semantic.py --n 200000 --nprobe 8
    python benchmarks/bench_semantic.py --n 50000 --compare
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from typing import Any

import numpy as np

from asyncgen.personas.semantic import NPROBE, SemanticDeduplicator

WORDS, VOCABULARY, BLOCK = 30, 20_000, 2048


def planted(n: int, dims: int, share: float, seed: int) -> tuple[Any, Any]:
    """``n`` unit vectors (float16, as the dedup stage keeps them) and which are copies."""
    rng = np.random.default_rng(seed)
    signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=(VOCABULARY, dims))
    words = rng.integers(0, VOCABULARY, size=(n, WORDS))
    is_copy = rng.random(n) < share
    is_copy[:BLOCK] = False
    for i in np.flatnonzero(is_copy):  # a copy of an earlier persona, one word changed
        words[i] = words[rng.integers(0, i)]
        words[i, rng.integers(0, WORDS)] = rng.integers(0, VOCABULARY)
    out = np.empty((n, dims), dtype=np.float16)
    for s in range(0, n, 4096):  # a small block: signs[words] is 30 x the output
        block = signs[words[s : s + 4096]].sum(axis=1)
        out[s : s + 4096] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out, is_copy


def run_asyncgen(vectors: Any, is_copy: Any, threshold: float, nprobe: int) -> dict[str, Any]:
    dedup = SemanticDeduplicator(threshold=threshold, nprobe=nprobe, expected=len(vectors))
    removed = np.zeros(len(vectors), dtype=bool)
    started = time.perf_counter()
    for s in range(0, len(vectors), BLOCK):
        block = vectors[s : s + BLOCK]
        verdicts = dedup.check_block(block, range(s, s + len(block)))
        removed[s : s + BLOCK] = [not v.kept for v in verdicts]
    seconds = time.perf_counter() - started
    return {
        "library": "faiss exact, then IndexIVFScalarQuantizer fp16 (asyncgen)",
        "lists": dedup.lists,
        "nprobe": nprobe,
        "n": len(vectors),
        "seconds": round(seconds, 1),
        "per_second": round(len(vectors) / seconds),
        "copies_removed": round(float(removed[is_copy].mean()), 4),
        "distinct_removed": round(float(removed[~is_copy].mean()), 5),
    }


def run_usearch(vectors: Any, dtype: str) -> dict[str, Any]:
    from usearch.index import Index

    index = Index(ndim=vectors.shape[1], metric="ip", dtype=dtype, connectivity=16)
    started = time.perf_counter()
    for s in range(0, len(vectors), BLOCK):
        block = vectors[s : s + BLOCK].astype(np.float32)
        if len(index):
            index.search(block, 1, threads=1)
        index.add(np.arange(s, s + len(block)), block, threads=1)
    return {"library": f"usearch {dtype}", "seconds": round(time.perf_counter() - started, 1)}


def run_faiss_flat(vectors: Any) -> dict[str, Any]:
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    started = time.perf_counter()
    for s in range(0, len(vectors), BLOCK):
        block = vectors[s : s + BLOCK].astype(np.float32)
        if index.ntotal:
            index.search(block, 1)
        index.add(block)
    return {"library": "faiss HNSWFlat f32", "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dims", type=int, default=256)
    p.add_argument("--copies", type=float, default=0.1, help="share of near copies")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--compare", action="store_true", help="time faiss and usearch first")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--nprobe", type=int, default=NPROBE, help="inverted lists a search scans")
    args = p.parse_args()
    vectors, is_copy = planted(args.n, args.dims, args.copies, args.seed)
    if args.compare:
        import faiss

        faiss.omp_set_num_threads(1)
        for row in (
            run_faiss_flat(vectors),
            run_usearch(vectors, "f32"),
            run_usearch(vectors, "f16"),
        ):
            print(json.dumps({"n": args.n, **row}), flush=True)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = run_asyncgen(vectors, is_copy, args.threshold, args.nprobe)
    row["vectors_mb"] = round(vectors.nbytes / 2**20)
    row["peak_rss_mb_before"] = round(rss_before)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
