"""Exactly-once bookkeeping, sans-IO: which ``custom_id`` is committed, which is in flight.

No file or network code here. The store feeds it what the output directory already holds,
the engine asks :meth:`Ledger.claim` before sending and calls :meth:`Ledger.commit` once a
batch is durable (or :meth:`Ledger.release` when an item is abandoned, to be sent by a later run).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["Claim", "Ledger"]


class Claim(enum.Enum):
    """The answer to :meth:`Ledger.claim`."""

    SEND = "send"
    """Not committed and not in flight: the caller now owns it."""
    DONE = "done"
    """Already committed (by this run or an earlier one): skip it."""
    DUPLICATE = "duplicate"
    """In flight in this run already: the input names the same id twice."""


class Ledger:
    """Committed and pending ids; the committed set only ever grows."""

    __slots__ = ("_committed", "_pending")

    def __init__(self) -> None:
        self._committed: set[str] = set()
        self._pending: set[str] = set()

    def claim(self, custom_id: str) -> Claim:
        if custom_id in self._committed:
            return Claim.DONE
        if custom_id in self._pending:
            return Claim.DUPLICATE
        self._pending.add(custom_id)
        return Claim.SEND

    def commit(self, ids: Iterable[str]) -> None:
        """Mark ids durable. Ids committed without a claim (recovery) are accepted."""
        for custom_id in ids:
            self._pending.discard(custom_id)
            self._committed.add(custom_id)

    def release(self, custom_id: str) -> None:
        """Give back a claimed id that will not be committed by this run."""
        self._pending.discard(custom_id)

    def is_committed(self, custom_id: str) -> bool:
        return custom_id in self._committed

    @property
    def committed(self) -> int:
        return len(self._committed)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return f"<Ledger committed={self.committed} pending={self.pending}>"
