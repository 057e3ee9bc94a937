"""Planning: the job's items into parts, written before anything is sent (the durable
answer to "which ids are in which batch"), and a part's request file."""

from __future__ import annotations

import msgspec

from asyncgen.core.errors import InputError
from asyncgen.core.ledger import bad_line_key
from asyncgen.core.records import BadLine, ErrorInfo, Line, Source, WorkItem
from asyncgen.engine.batch.state import JobBatches
from asyncgen.engine.stats import Counts
from asyncgen.job.config import JobConfig
from asyncgen.job.items import job_expander
from asyncgen.job.prompts import Template
from asyncgen.storage.formats import Input
from asyncgen.storage.sources import ShardReader
from asyncgen.storage.store import Store

__all__ = ["MAX_FILE_BYTES", "plan_parts", "request_file"]

MAX_FILE_BYTES = 190 * 2**20
"""A request file's size at most (OpenAI takes up to 200 MB)."""


def plan_parts(
    cfg: JobConfig,
    store: Store,
    batches: JobBatches,
    template: Template | None,
    paths: list[Input],
    counts: Counts,
) -> None:
    """Write parts for every item of ``paths`` neither committed nor in a part still to be
    ingested (at most ``batch_max_requests`` and about 190 MB each, one endpoint each);
    commit the bad lines met on the way."""
    ledger = store.ledger
    assigned: set[str] = set()
    for part in batches.parts.values():
        if not part.ingested:
            assigned.update(batches.read_items(part.name))
    numbers = [int(n[1:6]) for n in batches.parts if n[1:6].isdigit()]
    number = max(numbers, default=0)
    expander = job_expander(cfg, template)
    # Per endpoint: the part being filled and its request file's size so far.
    open_parts: dict[str, tuple[list[WorkItem], list[int]]] = {}
    given: set[str] = set()
    """The batch lines' ids read so far (persona items' ids are unique by making)."""
    batches.dir.mkdir(parents=True, exist_ok=True)
    size = msgspec.json.Encoder().encode

    def flush(url: str) -> None:
        nonlocal number
        number += 1
        batches.write_items(f"p{number:05d}", open_parts.pop(url)[0])

    bad: list[BadLine] = []

    def bad_line(line: Line, error: ErrorInfo) -> None:
        key = f"{line.shard}:{line.lineno}"
        if not ledger.is_committed(bad_line_key(key)):
            source = Source(line.shard, line.lineno)
            text = line.raw[:2000].decode("utf-8", "replace")
            bad.append(BadLine(key, line.path, source, error, text))

    for path in paths:
        reader = ShardReader(path)
        try:
            while True:
                try:
                    lines = reader.read_batch(1024)
                except InputError as exc:
                    # A truncated or corrupt file: its lines before the damage are planned;
                    # the file is recorded and the next one read, as online.
                    counts.bad_files += (str(exc),)
                    if cfg.strict:
                        raise
                    key = f"{reader.shard}:file"
                    if not ledger.is_committed(bad_line_key(key)):
                        source = Source(reader.shard, reader.lineno)
                        error = ErrorInfo("corrupt_input", exc.reason)
                        bad.append(BadLine(key, str(reader.path), source, error, ""))
                    break
                if not lines:
                    break
                for line in lines:
                    counts.lines_read += 1
                    try:
                        expanded = expander.expand(line)
                    except InputError as exc:
                        if cfg.strict:
                            raise
                        bad_line(line, ErrorInfo("bad_input", exc.reason))
                        continue
                    for item in expanded:
                        if item.template is None:
                            # A batch line's id is the input's: it may be given twice.
                            # The first time counts (it is first in every run); the
                            # others are bad lines, as online.
                            if item.custom_id in given:
                                message = f"custom_id {item.custom_id!r} appears twice"
                                if cfg.strict:
                                    raise InputError(message, path=line.path, line=line.lineno)
                                bad_line(line, ErrorInfo("duplicate_custom_id", message))
                                continue
                            given.add(item.custom_id)
                        if ledger.is_committed(item.custom_id):
                            counts.skipped += 1
                            continue
                        if item.custom_id in assigned:
                            continue
                        bucket, used = open_parts.setdefault(item.url, ([], [0]))
                        line_bytes = len(size(item.body)) + len(item.custom_id) + 64
                        if bucket and used[0] + line_bytes > MAX_FILE_BYTES:
                            flush(item.url)
                            bucket, used = open_parts.setdefault(item.url, ([], [0]))
                        bucket.append(item)
                        used[0] += line_bytes
                        if len(bucket) >= cfg.batch_max_requests:
                            flush(item.url)
        finally:
            reader.close()
    for url in list(open_parts):
        flush(url)
    if bad:
        ledger.commit(store.commit([], bad))
        counts.bad_lines += len(bad)


def request_file(items: dict[str, WorkItem]) -> bytes:
    """The OpenAI Batch input file of a part's items."""
    encode = msgspec.json.Encoder().encode
    return b"".join(
        encode({"custom_id": i.custom_id, "method": "POST", "url": "/v1" + i.url, "body": i.body})
        + b"\n"
        for i in items.values()
    )
