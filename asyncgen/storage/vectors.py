"""The vectors of an embedding job's output directory, read back in commit order.

An embedding job (a template with ``endpoint = "embeddings"``) keeps each vector in its
result record, as float32 bytes in the record's ``embedding`` field, inside the same zstd
frames the ledger names: a vector is committed exactly when its record is, so a crash never
leaves a vector without its record or the other way round. This module only reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec

from asyncgen.core.errors import InputError
from asyncgen.core.records import Source
from asyncgen.storage.shards import iter_lines
from asyncgen.storage.view import shards

__all__ = ["iter_vectors"]


class _VectorView(msgspec.Struct, gc=False):
    custom_id: str
    source: Source
    embedding: bytes | None = None


_decoder = msgspec.json.Decoder(_VectorView)


def iter_vectors(root: Path) -> Iterator[tuple[Source, bytes]]:
    """Each result's source line and float32 vector bytes; InputError if ``root`` holds no
    results, or results without vectors (not an embedding job's)."""
    found = shards(root, "results")
    if not found:
        raise InputError(f"{root}: no result shards (is it an embedding job's output directory?)")
    for path in found:
        for line in iter_lines(path):
            view = _decoder.decode(line)
            if view.embedding is None:
                raise InputError(
                    f"{path}: result {view.custom_id} has no embedding; give the output of a "
                    'job whose template has endpoint = "embeddings"'
                )
            yield view.source, view.embedding
