from asyncgen.ledger import Claim, Ledger


def test_claim_commit_release_cycle() -> None:
    ledger = Ledger()
    assert ledger.claim("a") is Claim.SEND
    assert ledger.claim("a") is Claim.DUPLICATE
    assert ledger.pending == 1
    ledger.commit(["a"])
    assert ledger.claim("a") is Claim.DONE
    assert (ledger.committed, ledger.pending) == (1, 0)
    assert ledger.claim("b") is Claim.SEND
    ledger.release("b")
    assert ledger.claim("b") is Claim.SEND, "a released id may be claimed again"
    assert ledger.is_committed("a") and not ledger.is_committed("b")


def test_commit_without_claim_is_recovery() -> None:
    ledger = Ledger()
    ledger.commit(["x", "y", "x"])
    assert ledger.committed == 2
    assert ledger.claim("y") is Claim.DONE
    assert "committed=2" in repr(ledger)
