import pytest

from asyncgen.core.ledger import Claim, Ledger, bad_line_key


def test_claim_commit_release_cycle() -> None:
    ledger = Ledger()
    assert ledger.claim("a") is Claim.SEND
    assert ledger.claim("a") is Claim.DUPLICATE, "in flight twice"
    assert ledger.pending == 1
    ledger.commit(["a"])
    assert ledger.claim("a") is Claim.DUPLICATE, "committed by this run: the input repeats it"
    assert (ledger.committed, ledger.pending) == (1, 0)
    assert ledger.claim("b") is Claim.SEND
    ledger.release("b")
    assert ledger.claim("b") is Claim.SEND, "a released id may be claimed again"
    assert ledger.is_committed("a") and not ledger.is_committed("b")


def test_recovered_ids_are_done_not_duplicates() -> None:
    ledger = Ledger()
    ledger.recover(["x", "y", "x"])
    assert ledger.committed == 2
    assert ledger.claim("y") is Claim.DONE
    assert ledger.claim("y") is Claim.DONE, "skipping twice is still skipping"
    assert ledger.pending == 0, "a done id is never claimed, so never committed again"
    assert "committed=2" in repr(ledger)


def test_a_reopened_id_is_sent_once_more_and_counted_once() -> None:
    ledger = Ledger()
    ledger.recover(["p:1:math:0", "p:2:math:0"])
    ledger.reopen(["p:2:math:0"])
    assert ledger.claim("p:1:math:0") is Claim.DONE
    assert ledger.claim("p:2:math:0") is Claim.SEND
    assert ledger.claim("p:2:math:0") is Claim.DUPLICATE, "in flight"
    ledger.commit(["p:2:math:0"])
    assert ledger.claim("p:2:math:0") is Claim.DUPLICATE, "retried once per run"
    assert (ledger.committed, ledger.pending) == (2, 0)


def test_bad_line_keys_do_not_collide_with_custom_ids() -> None:
    ledger = Ledger()
    ledger.recover([bad_line_key("batch:1")])
    assert ledger.claim("batch:1") is Claim.SEND
    assert ledger.claim(bad_line_key("batch:1")) is Claim.DONE


def test_persona_ids_and_lookalikes_are_kept_apart() -> None:
    ledger = Ledger()
    ids = [f"shard-a:{line}:math:{sample}" for line in range(1, 2000, 3) for sample in (0, 1)]
    ledger.recover(ids)
    ledger.recover(ids[:10])  # recovering twice counts once
    assert ledger.committed == len(ids)
    assert all(ledger.is_committed(i) for i in ids)
    near = [
        "shard-a:2:math:0",  # a line not committed
        "shard-a:1:math:2",  # another sample
        "shard-a:1:npc:0",  # another template
        "shard-b:1:math:0",  # another shard
        "shard-a:01:math:0",  # not canonical: a different string, must not alias line 1
        "shard-a:1:math:00",
        "shard-a:1:math:",
        "shard-a:1:math",
        "shard-a:\u0661:math:0",  # Arabic-Indic digit one
        "shard-a:-1:math:0",
        "shard-a:99999999:math:0",  # far past the bitmap
    ]
    assert not any(ledger.is_committed(i) for i in near)
    ledger.recover(near)
    assert ledger.committed == len(ids) + len(near)
    assert all(ledger.is_committed(i) for i in near)
    assert ledger.claim("shard-a:01:math:0") is Claim.DONE
    assert ledger.claim("weird:id:with:colons:0:1") is Claim.SEND


def test_shard_names_may_contain_colons() -> None:
    ledger = Ledger()
    ledger.recover(["s3:bucket:shard:7:math:0", "batch-0001", "0:0:0:0"])
    assert ledger.is_committed("s3:bucket:shard:7:math:0")
    assert not ledger.is_committed("s3:bucket:shard:7:math:1")
    assert ledger.is_committed("batch-0001") and ledger.is_committed("0:0:0:0")
    assert ledger.committed == 3


def test_matches_a_plain_set_on_random_ids() -> None:
    import random

    rng = random.Random(7)
    parts = ["a", "b:c", "", "0", "01", "7", "12", "x:1", "math", "\u0663"]

    def random_id() -> str:
        return ":".join(rng.choice(parts) for _ in range(rng.randint(1, 5)))

    ledger, reference = Ledger(), set()
    for _ in range(3000):
        custom_id = random_id()
        assert ledger.is_committed(custom_id) == (custom_id in reference), custom_id
        if rng.random() < 0.5:
            ledger.recover([custom_id])
            reference.add(custom_id)
    assert ledger.committed == len(reference)


def bits(bitmap: bytes | None) -> set[int]:
    if bitmap is None:
        return set()
    return {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}


def test_done_lines_need_every_sample_from_an_earlier_run() -> None:
    ledger = Ledger()
    ledger.recover(["p:7:math:0", "p:7:math:1", "p:8:math:0", "p:9:npc:0", "p:9:npc:1"])
    ledger.recover(["p:30:math:1", "p:3:math:0"])
    assert bits(ledger.done_lines("p", "math", 2)) == {7}, "8 and 3 lack sample 1"
    assert bits(ledger.done_lines("p", "math", 1)) == {3, 7, 8}
    assert bits(ledger.done_lines("p", "npc", 2)) == {9}
    assert ledger.done_lines("p", "npc", 3) is None
    assert ledger.done_lines("q", "math", 1) is None, "another shard"
    ledger.claim("p:10:math:0")
    ledger.commit(["p:10:math:0"])
    assert 10 not in bits(ledger.done_lines("p", "math", 1)), "this run's ids are not skipped"


def test_bulk_recover_matches_a_plain_set() -> None:
    import random

    rng = random.Random(11)
    shards = ["p", "p:q", "a:1", ""]
    lines = ["0", "1", "01", "17", "9999", "\u0663", "", "x"]
    tails = ["math:0", "math:1", "m:0", "0:0", "math", ":"]

    def near_id() -> str:
        return f"{rng.choice(shards)}:{rng.choice(lines)}:{rng.choice(tails)}"

    ledger, reference = Ledger(), set()
    for _ in range(400):
        shard, tail = rng.choice(shards), rng.choice(tails)
        batch = [f"{shard}:{rng.randint(0, 3000)}:{tail}" for _ in range(rng.randint(0, 30))]
        batch += [near_id() for _ in range(rng.randint(0, 3))]
        rng.shuffle(batch)
        ledger.recover(batch)
        reference.update(batch)
    probes = list(reference)[:2000] + [near_id() for _ in range(2000)]
    probes += [
        f"{rng.choice(shards)}:{rng.randint(0, 3000)}:{rng.choice(tails)}" for _ in range(2000)
    ]
    for custom_id in probes:
        assert ledger.is_committed(custom_id) == (custom_id in reference), custom_id
    assert ledger.committed == len(reference)


def test_pack_ids_round_trips_exactly() -> None:
    import random

    from asyncgen.core.ledger import pack_ids

    rng = random.Random(5)
    ids = [f"s:{n}:math:0" for n in rng.sample(range(1, 5000), 1500)]  # runs with gaps
    ids += [f"s:{n}:math:1" for n in (3, 900, 90_000)]  # too few for a run
    ids += ["s:07:math:0", "batch-42", "a:b", "x:1:y:z", "s:0:math:0"]
    rest, runs = pack_ids(ids)
    assert len(rest) < 20 and runs
    assert all(base % 8 == 0 for *_, base, _ in runs)
    assert sum(len(bits) for *_, bits in runs) < 1500  # far smaller than the strings
    ledger = Ledger()
    ledger.recover(rest)
    ledger.recover_runs(runs)
    assert ledger.committed == len(set(ids))
    for custom_id in ids:
        assert ledger.is_committed(custom_id), custom_id
    for near in ("s:5001:math:0", "s:4:math:1", "s:7:math:0", "batch-4"):
        assert ledger.is_committed(near) == (near in ids), near


@pytest.mark.parametrize(
    "odd",
    ["s:077:math:0", "s:+77:math:0", "s: 77:math:0", "s:7_7:math:0", "s:-77:math:0", "t:77:math:0"],
)
def test_pack_ids_of_one_key_with_an_odd_one_out(odd: str) -> None:
    """A batch of one (shard, template, sample) takes a bulk path; one id that int() reads
    but str() never writes must still come back exactly as it was."""
    from asyncgen.core.ledger import pack_ids

    ids = [f"s:{n}:math:0" for n in range(1, 40)]
    ids.insert(17, odd)
    rest, runs = pack_ids(ids)
    ledger = Ledger()
    ledger.recover(rest)
    ledger.recover_runs(runs)
    assert ledger.committed == len(ids)
    assert all(ledger.is_committed(i) for i in ids)
    assert not ledger.is_committed("s:77:math:0")
    assert pack_ids(ids[:17] + ids[18:]) == ([], [("s", "math", "0", 0, b"\xfe\xff\xff\xff\xff")])


def test_id_set_membership_matches_a_plain_set() -> None:
    import random

    from asyncgen.core.ledger import _IdSet

    rng = random.Random(5)
    ids = set()
    for _ in range(3000):
        shard = rng.choice(["a", "b:c", "d"])
        template = rng.choice(["math", "npc"])
        ids.add(f"{shard}:{rng.randint(0, 400)}:{template}:{rng.randint(0, 2)}")
    ids |= {"x", "a:01:math:0", "a:1:math:00", "a::math:0", "::::"}
    members = set(rng.sample(sorted(ids), len(ids) // 2))
    id_set = _IdSet()
    for i in sorted(members):
        id_set.add(i)
    probes = sorted(ids)
    rng.shuffle(probes)
    probes += sorted(ids)  # in order too: the prefix/suffix fast path
    assert [p in id_set for p in probes] == [p in members for p in probes]
    assert len(id_set) == len(members)
