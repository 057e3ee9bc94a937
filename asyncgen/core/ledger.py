"""Exactly-once bookkeeping, sans-IO: which ``custom_id`` is committed, which is in flight.

No file or network code here. The store feeds it what the output directory already holds,
the engine asks :meth:`Ledger.claim` before sending and calls :meth:`Ledger.commit` once a
batch is durable (or :meth:`Ledger.release` when an item is abandoned, to be sent by a later run).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

__all__ = ["Claim", "Ledger", "Redo", "Run", "bad_line_key", "pack_ids"]

Run = tuple[str, str, str, int, bytes]
"""``(shard, template, sample, base, bitmap)``: persona ids ``{shard}:{base + i}:{template}:
{sample}`` for each bit ``i`` set in ``bitmap`` (little-endian bit order; ``base`` is a
multiple of 8). A compact form of many ids, for the ledger file."""

_RUN_GAP = 256  # lines apart that end a run: a bitmap over a long gap would waste bytes
_RUN_MIN = 8  # fewer ids than this stay strings


class Claim(enum.Enum):
    """The answer to :meth:`Ledger.claim`."""

    SEND = "send"
    """Not committed and not in flight: the caller now owns it."""
    DONE = "done"
    """Already committed (by this run or an earlier one): skip it."""
    DUPLICATE = "duplicate"
    """In flight in this run already: the input names the same id twice."""


class _IdSet:
    """A set of custom_ids that costs about one bit per persona item.

    Ids of the persona form ``{shard}:{line}:{template}:{sample}`` (canonical decimal line and
    sample, as :mod:`asyncgen.job.items` builds them) set one bit in a bitmap per
    ``(shard, template, sample)``, indexed by line. The mapping is reversible, so any string of
    that form is stored exactly; every other id is kept as a string.
    """

    __slots__ = ("_bitmaps", "_count", "_last", "_strings")

    def __init__(self) -> None:
        self._bitmaps: dict[tuple[str, str, str], bytearray] = {}
        self._strings: set[str] = set()
        self._count = 0
        self._last: tuple[str, str, bytearray] = ("", "", bytearray())

    @staticmethod
    def split(custom_id: str) -> tuple[tuple[str, str, str], int] | None:
        """``((shard, template, sample), line)`` of a persona id, or None."""
        parts = custom_id.rsplit(":", 3)
        if len(parts) != 4:
            return None
        shard, line, template, sample = parts
        if not (_canonical(line) and _canonical(sample)):
            return None
        return (shard, template, sample), int(line)

    def __contains__(self, custom_id: str) -> bool:
        if not self._count:
            return False
        # Lookups come in input order, so mostly with the (shard, template, sample) of the
        # one before: then only the line number needs parsing (see update()).
        prefix, suffix, bitmap = self._last
        if prefix and custom_id.startswith(prefix) and custom_id.endswith(suffix):
            digits = custom_id[len(prefix) : len(custom_id) - len(suffix)]
            if _canonical(digits):
                line = int(digits)
                byte = line >> 3
                return byte < len(bitmap) and bool(bitmap[byte] >> (line & 7) & 1)
        split = self.split(custom_id)
        if split is None:
            return custom_id in self._strings
        key, line = split
        found = self._bitmaps.get(key)
        if found is None:
            return False
        self._last = (f"{key[0]}:", f":{key[1]}:{key[2]}", found)
        byte = line >> 3
        return byte < len(found) and bool(found[byte] >> (line & 7) & 1)

    def add(self, custom_id: str) -> None:
        split = self.split(custom_id)
        if split is None:
            if custom_id not in self._strings:
                self._strings.add(custom_id)
                self._count += 1
            return
        key, line = split
        bitmap = self._bitmaps.get(key)
        if bitmap is None:
            bitmap = self._bitmaps[key] = bytearray()
        byte, bit = line >> 3, 1 << (line & 7)
        if byte >= len(bitmap):
            # grow geometrically so a shard read in order costs amortised O(1) per id
            bitmap.extend(bytes(max(byte + 1 - len(bitmap), len(bitmap) // 2)))
        if not bitmap[byte] & bit:
            bitmap[byte] |= bit
            self._count += 1

    def lines_with_all(self, shard: str, template: str, samples: int) -> bytes | None:
        """Bitmap of the lines ``l`` for which ``{shard}:{l}:{template}:{s}`` is in the set
        for every sample ``s < samples``."""
        maps = [self._bitmaps.get((shard, template, str(s))) for s in range(samples)]
        present = [m for m in maps if m is not None]
        if not present or len(present) < len(maps):
            return None
        size = min(len(m) for m in present)
        both = -1
        for m in present:
            both &= int.from_bytes(m[:size], "little")
        return both.to_bytes(size, "little")

    def add_run(self, run: Run) -> None:
        shard, template, sample, base, bits = run
        bitmap = self._bitmaps.get((shard, template, sample))
        if bitmap is None:
            bitmap = self._bitmaps[(shard, template, sample)] = bytearray()
        start = base >> 3
        stop = start + len(bits)
        if stop > len(bitmap):
            bitmap.extend(bytes(max(stop - len(bitmap), len(bitmap) // 2)))
        old = int.from_bytes(bitmap[start:stop], "little")
        new = old | int.from_bytes(bits, "little")
        bitmap[start:stop] = new.to_bytes(stop - start, "little")
        self._count += new.bit_count() - old.bit_count()

    def update(self, ids: Iterable[str]) -> None:
        """Add many ids: runs of nearby persona ids as bitmaps at once (as :func:`pack_ids`
        packs a ledger entry; a committed batch is mostly one run), the rest one by one."""
        rest, runs = pack_ids(ids)
        for run in runs:
            self.add_run(run)
        for custom_id in rest:
            self.add(custom_id)

    def __len__(self) -> int:
        return self._count


def pack_ids(ids: Iterable[str]) -> tuple[list[str], list[Run]]:
    """Split ids into runs of nearby persona ids (as bitmaps) and the rest (as they are).

    ``recover(rest)`` plus ``recover_runs(runs)`` marks exactly the ids given.
    """
    ids = list(ids)
    rest: list[str] = []
    same = _one_key(ids)
    groups = {same[0]: same[1]} if same is not None else _group(ids, rest)
    runs: list[Run] = []
    for (shard, template, sample), lines in groups.items():
        lines.sort()
        cuts = [i for i in range(1, len(lines)) if lines[i] - lines[i - 1] > _RUN_GAP]
        for first, end in zip([0, *cuts], [*cuts, len(lines)], strict=True):
            chunk = lines[first:end]
            if len(chunk) < _RUN_MIN:
                rest.extend(f"{shard}:{line}:{template}:{sample}" for line in chunk)
                continue
            base = chunk[0] & ~7
            bits = 0
            for line in chunk:
                bits |= 1 << (line - base)
            size = (chunk[-1] - base) // 8 + 1
            runs.append((shard, template, sample, base, bits.to_bytes(size, "little")))
    return rest, runs


def _one_key(ids: list[str]) -> tuple[tuple[str, str, str], list[int]] | None:
    """When all ``ids`` are persona ids of one (shard, template, sample), as a batch's mostly
    are: that key and their line numbers, checked in bulk rather than id by id. Else None."""
    split = _IdSet.split(ids[0]) if ids else None
    if split is None:
        return None
    key, _ = split
    prefix, suffix = f"{key[0]}:", f":{key[1]}:{key[2]}"
    start, stop = len(prefix), -len(suffix)
    try:
        lines = [int(custom_id[start:stop]) for custom_id in ids]
    except ValueError:
        return None
    # int() also reads forms that str() never writes (" 7", "+7", "07", "1_0", "-7") and
    # ignores whatever the slices cut off: the round trip rejects all of those.
    if min(lines) < 0 or [f"{prefix}{line}{suffix}" for line in lines] != ids:
        return None
    return key, lines


def _group(ids: list[str], rest: list[str]) -> dict[tuple[str, str, str], list[int]]:
    """Line numbers of the persona ids by (shard, template, sample); the others to ``rest``."""
    groups: dict[tuple[str, str, str], list[int]] = {}
    # While ids share (shard, template, sample), only the line number between the shared
    # prefix and suffix needs parsing (as in _IdSet.__contains__).
    prefix = suffix = ""
    lines: list[int] = []
    for custom_id in ids:
        if prefix and custom_id.startswith(prefix) and custom_id.endswith(suffix):
            digits = custom_id[len(prefix) : len(custom_id) - len(suffix)]
            if _canonical(digits):
                lines.append(int(digits))
                continue
        split = _IdSet.split(custom_id)
        if split is None:
            rest.append(custom_id)
            continue
        (shard, template, sample), line = split
        lines = groups.setdefault((shard, template, sample), [])
        lines.append(line)
        prefix, suffix = f"{shard}:", f":{template}:{sample}"
    return groups


def _canonical(digits: str) -> bool:
    """A decimal number written the one way ``str(int)`` writes it."""
    return digits.isdecimal() and digits.isascii() and (digits == "0" or digits[0] != "0")


def bad_line_key(custom_id: str) -> str:
    """The ledger key of a bad-input record, in a namespace of its own so that the id of a bad
    line (``{shard}:{line}``) never collides with a request's ``custom_id``."""
    return "\x00" + custom_id


class Ledger:
    """Committed and pending ids; the committed sets only ever grow.

    Ids found in the output directory at start (:meth:`recover`) are *done*: the input is
    skipping work an earlier run finished. An id committed or in flight in *this* run that the
    input names again is a *duplicate*. Committed persona ids cost about a bit each (see
    :class:`_IdSet`), so a job over a billion personas resumes without a billion strings.
    """

    __slots__ = ("_committed", "_pending", "_recovered", "_reopened")

    def __init__(self) -> None:
        self._recovered = _IdSet()
        self._committed = _IdSet()
        self._pending: set[str] = set()
        self._reopened: frozenset[str] = frozenset()

    def reopen(self, ids: Iterable[str]) -> None:
        """Let a retry run send these recovered ids once more (their records so far are
        failures, which the new records supersede)."""
        self._reopened = frozenset(ids)

    def claim(self, custom_id: str) -> Claim:
        if custom_id in self._recovered and custom_id not in self._reopened:
            return Claim.DONE
        if custom_id in self._pending or custom_id in self._committed:
            return Claim.DUPLICATE
        self._pending.add(custom_id)
        return Claim.SEND

    def done_lines(self, shard: str, template: str, samples: int) -> bytes | None:
        """A bitmap by line number of the persona lines of ``shard`` an earlier run committed
        every sample of (None: no such line). Those lines need not even be decoded: their
        ids are known from where they are."""
        return self._recovered.lines_with_all(shard, template, samples)

    def recover(self, ids: Iterable[str]) -> None:
        """Mark ids an earlier run made durable."""
        self._recovered.update(ids)

    def recover_runs(self, runs: Iterable[Run]) -> None:
        """Mark the ids of :func:`pack_ids` runs an earlier run made durable."""
        for run in runs:
            self._recovered.add_run(run)

    def commit(self, ids: Iterable[str]) -> None:
        """Mark ids this run claimed as durable."""
        # Only claimed ids get here: never a recovered one, unless reopened for a retry run.
        ids = list(ids)
        self._pending.difference_update(ids)
        self._committed.update(ids)

    def release(self, custom_id: str) -> None:
        """Give back a claimed id that will not be committed by this run."""
        self._pending.discard(custom_id)

    def is_committed(self, custom_id: str) -> bool:
        return custom_id in self._recovered or custom_id in self._committed

    @property
    def committed(self) -> int:
        again = sum(1 for i in self._reopened if i in self._committed)
        return len(self._recovered) + len(self._committed) - again

    @property
    def pending(self) -> int:
        return len(self._pending)

    def __repr__(self) -> str:
        return f"<Ledger committed={self.committed} pending={self.pending}>"


class Redo:
    """The items a retry run sends again (recorded failures), by id and by input line, so
    the run decodes only the input lines that hold one."""

    __slots__ = ("_lines", "ids")

    def __init__(self, failures: Iterable[tuple[str, str, int]]) -> None:
        """``failures``: (custom_id, source shard, source line) of each item to retry."""
        self.ids: set[str] = set()
        self._lines: dict[str, set[int]] = {}
        for custom_id, shard, line in failures:
            self.ids.add(custom_id)
            self._lines.setdefault(shard, set()).add(line)

    def last_line(self, shard: str) -> int:
        """The last line of ``shard`` holding an item to retry (0: none)."""
        lines = self._lines.get(shard)
        return max(lines) if lines else 0

    def skip_bitmap(self, shard: str) -> bytes:
        """A bitmap by line number, up to :meth:`last_line`, of the lines *not* to decode."""
        lines = self._lines.get(shard, set())
        bits = bytearray(b"\xff" * ((max(lines, default=0) >> 3) + 1))
        for line in lines:
            bits[line >> 3] &= ~(1 << (line & 7)) & 0xFF
        return bytes(bits)

    def __len__(self) -> int:
        return len(self.ids)
