"""The logical view of an output directory: one current record per ``custom_id``.

A success is final. A failure stands until a later record of the same id (written by
``asyncgen retry-failed``, marked ``replaces_failure``) supersedes it; of several failures of
one id, the last one stands. Shards are numbered in the order they were written and records
within a shard are in commit order, so "later" is "further along in (shard number,
position)". Everything here only reads, so it is safe on a directory a job is writing to; a
record that is still being written is not seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec

from asyncgen.core.records import ErrorInfo, Result, Usage
from asyncgen.storage.partitions import part_dirs
from asyncgen.storage.shards import iter_lines
from asyncgen.storage.store import SHARD_RE

__all__ = [
    "Standing",
    "add_tokens",
    "failure_code",
    "iter_logical",
    "iter_results",
    "iter_standing_failures",
    "last_failures",
    "shards",
    "standing_failures",
]

Standing = dict[str, tuple[int, int, str, str]]
"""id -> (shard index, line index, normalised reason, error code) of the failure record that
stands for it."""


_NONE = "unknown"


def shards(root: Path, kind: str) -> list[Path]:
    """The ``kind`` shards (results, failures or errors) of ``root``, in writing order; of a
    job run by workers, every partition's shards, partition after partition (an id lives in
    one partition only, so "later" never compares two partitions)."""
    found = []
    if not root.is_dir():
        return []
    for path in root.iterdir():
        match = SHARD_RE.match(path.name)
        if match and match.group(1) == kind:
            found.append((int(match.group(2)), path))
    own = [p for _, p in sorted(found)]
    return own + [s for part in part_dirs(root) for s in shards(part, kind)]


class _FailureView(msgspec.Struct):
    custom_id: str
    error: ErrorInfo | None
    usage: Usage | None = None
    rejected_usage: Usage | None = None


class _RetryView(msgspec.Struct):
    custom_id: str
    replaces_failure: bool = False


_failure_decoder = msgspec.json.Decoder(_FailureView)
_retry_decoder = msgspec.json.Decoder(_RetryView)
_result_decoder = msgspec.json.Decoder(Result)


def _superseding_successes(root: Path, candidates: set[str]) -> set[str]:
    """Ids among ``candidates`` that a success of a retry run settled."""
    settled = set()
    for path in shards(root, "results"):
        for line in iter_lines(path):
            if b'"replaces_failure":true' not in line:
                continue  # only a retry run's records can settle a failure
            view = _retry_decoder.decode(line)
            if view.replaces_failure and view.custom_id in candidates:
                settled.add(view.custom_id)
    return settled


def last_failures(root: Path, spent: list[int] | None = None) -> Standing:
    """Each id's last failure record, superseded or not. Adds the tokens of every failure
    record (superseded ones too: they were paid for) to ``spent`` (prompt, completion), if
    given."""
    latest: Standing = {}
    for n, path in enumerate(shards(root, "failures")):
        for i, line in enumerate(iter_lines(path)):
            view = _failure_decoder.decode(line)
            error = view.error
            latest[view.custom_id] = (
                (n, i, error.reason or error.code, error.code) if error else (n, i, _NONE, _NONE)
            )
            if spent is not None:
                add_tokens(spent, view.usage, view.rejected_usage)
    return latest


def add_tokens(spent: list[int], *usages: Usage | None) -> None:
    """Add the prompt and completion tokens of ``usages`` to ``spent``."""
    for usage in usages:
        if usage is not None:
            spent[0] += usage.prompt_tokens or 0
            spent[1] += usage.completion_tokens or 0


def failure_code(line: bytes) -> str:
    """The error code of a failure or bad-line record; ``unknown`` if it has none."""
    try:
        error = _failure_decoder.decode(line).error
    except msgspec.DecodeError:
        return "unknown"
    return error.code if error else "unknown"


def standing_failures(root: Path) -> Standing:
    """The failures no later record supersedes. Memory grows with the number of failed
    items, not of all items."""
    latest = last_failures(root)
    for custom_id in _superseding_successes(root, set(latest)):
        del latest[custom_id]
    return latest


def _failures_at(root: Path, standing: Standing) -> Iterator[tuple[bytes, Result]]:
    """The failure records at the positions ``standing`` names, in writing order."""
    positions = {(n, i) for n, i, _, _ in standing.values()}
    if not positions:
        return
    for n, path in enumerate(shards(root, "failures")):
        for i, line in enumerate(iter_lines(path)):
            if (n, i) in positions:
                yield line, _result_decoder.decode(line)


def iter_standing_failures(root: Path) -> Iterator[tuple[bytes, Result]]:
    """Every standing failure, as (line as stored, decoded record), in writing order."""
    yield from _failures_at(root, standing_failures(root))


def iter_results(root: Path) -> Iterator[tuple[bytes, Result]]:
    """Every success, as (line as stored, decoded record)."""
    for path in shards(root, "results"):
        for line in iter_lines(path):
            yield line, _result_decoder.decode(line)


def iter_logical(root: Path, failures: bool) -> Iterator[tuple[bytes, Result]]:
    """Every success, then (if asked) every standing failure; the successes are read once."""
    standing = last_failures(root) if failures else {}
    for line, record in iter_results(root):
        if record.replaces_failure:
            standing.pop(record.custom_id, None)
        yield line, record
    yield from _failures_at(root, standing)
