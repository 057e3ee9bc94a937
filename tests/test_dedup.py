"""The sans-IO deduplicator: normal form, datasketch-compatible MinHash, LSH, decisions."""

from __future__ import annotations

import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH  # type: ignore[import-untyped]

from asyncgen.personas.dedup import (
    Deduplicator,
    MinHasher,
    Verdict,
    exact_key,
    lsh_params,
    normalise,
    words,
)

# 20 distinct words. One word replaced leaves 19 of 21 (Jaccard 0.905), right at the default
# threshold, so MinHash estimates of such pairs fall on either side of it; this replacement's
# estimate is 0.9375 (deterministic: fixed permutations and word hashes).
BASE = (
    "A retired marine biologist from Maine who volunteers at the aquarium and writes picture "
    "books about tides for curious children"
)
ONE_WORD_CHANGED = BASE.replace("retired", "former")
TWO_WORDS_CHANGED = BASE.replace("Maine", "Oregon").replace("tides", "whales")  # J = 0.82
OTHER = "A software engineer in Berlin who contributes to open-source compilers on weekends"


def test_normal_form() -> None:
    assert normalise("  A\u00a0Nurse,\tfrom  OSLO!! ") == "a nurse, from oslo"
    fullwidth = "\uff26\uff55\uff4c\uff4c"  # "Full" in fullwidth letters
    assert normalise(f"«{fullwidth} width» straße…") == "full width» strasse"  # only the ends
    assert normalise("...") == ""
    assert exact_key(normalise("A nurse.")) == exact_key(normalise("a   NURSE"))
    assert len(exact_key("x")) == 16
    assert words(normalise("A nurse's nurse, from Oslo.")) == {"a", "nurse", "s", "from", "oslo"}


def test_signatures_equal_datasketch_minhash_bit_for_bit() -> None:
    rng = random.Random(7)
    vocab = [f"w{i}" for i in range(500)] + ["straße", "日本語", "naïve"]
    sets = [set(rng.sample(vocab, rng.randint(1, 40))) for _ in range(50)] + [set()]
    sigs = MinHasher(128).signatures(sets)
    assert sigs.shape == (51, 128) and sigs.dtype == np.uint32
    for shingles, row in zip(sets, sigs, strict=True):
        reference = MinHash(num_perm=128, seed=1, scheme="affine32")
        reference.update_batch([w.encode() for w in shingles])
        assert np.array_equal(reference.hashvalues, row)
    # and so similarities equal datasketch's estimate
    a = MinHash(num_perm=128, seed=1, scheme="affine32", hashvalues=sigs[0])
    b = MinHash(num_perm=128, seed=1, scheme="affine32", hashvalues=sigs[1])
    assert a.jaccard(b) == np.count_nonzero(sigs[0] == sigs[1]) / 128


def test_lsh_params_lean_to_recall() -> None:
    assert lsh_params(0.9, 128) == (8, 16)
    for threshold in (0.5, 0.7, 0.8, 0.9, 0.95):
        bands, rows = lsh_params(threshold, 128)
        assert bands * rows <= 128
        midway = (1 + threshold) / 2
        assert 1 - (1 - midway**rows) ** bands >= 0.99
        assert 1 - (1 - midway ** (rows + 1)) ** (128 // (rows + 1)) < 0.99  # the most rows
    # datasketch's own optimum for 0.9 finds a pair at 0.95 only 80% of the time
    lsh = MinHashLSH(threshold=0.9, num_perm=128)
    assert (lsh.b, lsh.r) == (5, 25)
    assert 1 - (1 - 0.95**25) ** 5 < 0.81


def test_first_occurrence_kept_exact_and_near_copies_dropped() -> None:
    d = Deduplicator()
    texts = [
        BASE,
        "  a RETIRED marine biologist from maine who volunteers at the aquarium and writes "
        "picture books about tides for curious children. ",
        ONE_WORD_CHANGED,
        OTHER,
        BASE + " too",  # one word added: 20/21
        TWO_WORDS_CHANGED,
    ]
    verdicts = d.check_batch(texts, [10, 11, 12, 13, 14, 15])
    assert verdicts[0] == Verdict("keep")
    assert verdicts[1] == Verdict("exact", 10, 1.0)
    assert verdicts[2] == Verdict("near", 10, 0.9375)
    assert verdicts[3] == Verdict("keep")
    assert verdicts[4].reason == "near" and verdicts[4].duplicate_of == 10
    assert verdicts[4].similarity is not None and verdicts[4].similarity >= 0.9
    assert verdicts[5] == Verdict("keep")  # 0.82 is not a near duplicate at 0.9
    s = d.statistics()
    assert (s.seen, s.kept, s.exact, s.near) == (6, 3, 1, 2)
    assert "kept=3" in repr(d) and "8x16" in repr(d)


def test_decisions_do_not_depend_on_batching() -> None:
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(300)]
    base = [" ".join(rng.sample(vocab, 25)) for _ in range(60)]
    texts = base + [t + " extra" for t in base[:20]] + [t.upper() for t in base[20:30]]
    rng.shuffle(texts)
    keys = list(range(len(texts)))
    whole = Deduplicator().check_batch(texts, keys)
    split = Deduplicator()
    pieces = [split.check_batch(texts[i : i + 7], keys[i : i + 7]) for i in range(0, 90, 7)]
    assert [v for piece in pieces for v in piece] == whole
    assert sum(v.reason == "keep" for v in whole) == 60


def test_near_copies_point_at_the_kept_text_not_at_a_dropped_one() -> None:
    d = Deduplicator()
    v = d.check_batch([BASE, ONE_WORD_CHANGED, ONE_WORD_CHANGED.upper()], [1, 2, 3])
    assert v[1] == Verdict("near", 1, 0.9375)
    assert v[2] == Verdict("near", 1, 0.9375)  # copy of a dropped text: compared to the kept one


def test_exact_only_and_wordless_texts() -> None:
    d = Deduplicator(near=False)
    v = d.check_batch([BASE, ONE_WORD_CHANGED, BASE.lower()], [1, 2, 3])
    assert [x.reason for x in v] == ["keep", "keep", "exact"]
    d = Deduplicator()
    v = d.check_batch(["!!!", "...", "🙂", "🙂 "], [1, 2, 3, 4])
    assert [x.reason for x in v] == ["keep", "exact", "keep", "exact"]


def test_bad_parameters() -> None:
    with pytest.raises(ValueError, match="threshold"):
        Deduplicator(threshold=0)
    with pytest.raises(ValueError, match="num_perm"):
        Deduplicator(num_perm=8)
    with pytest.raises(ValueError, match="20 bands of 10 rows need more than 128"):
        Deduplicator(lsh=(20, 10))
    assert Deduplicator(lsh=(5, 25)).bands == 5
    with pytest.raises(ValueError, match="length"):
        Deduplicator().check_batch(["a"], [])
