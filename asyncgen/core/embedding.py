"""Embedding vectors as asyncgen keeps them: little-endian float32 bytes, sans-IO.

An ``/v1/embeddings`` reply carries each vector either as a JSON list of floats or, with
``encoding_format = "base64"`` (what embedding templates ask for unless told otherwise), as
the base64 of its little-endian float32 bytes. Both become the same ``bytes``, which a
:class:`~asyncgen.core.records.Result` holds in ``embedding`` (msgspec writes bytes as
base64 in the JSON line: 5.3 characters a dimension before zstd, against ~10 as decimal
floats, and lossless).
"""

from __future__ import annotations

import base64
import binascii
import sys
from array import array

__all__ = ["EmbeddingError", "vector_bytes", "vector_floats"]

_LITTLE = sys.byteorder == "little"


class EmbeddingError(ValueError):
    """A reply's vector that is neither a list of numbers nor base64 of float32 bytes."""


def vector_bytes(embedding: object) -> bytes:
    """The float32 little-endian bytes of one reply's ``embedding`` field."""
    if isinstance(embedding, str):
        try:
            raw = base64.b64decode(embedding, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise EmbeddingError(f"embedding is not valid base64: {exc}") from None
        if not raw or len(raw) % 4:
            raise EmbeddingError(f"base64 embedding of {len(raw)} bytes is not float32s")
        return raw
    if isinstance(embedding, list) and embedding:
        try:
            values = array("f", embedding)
        except TypeError:
            raise EmbeddingError("embedding list holds something other than numbers") from None
        if not _LITTLE:
            values.byteswap()
        return values.tobytes()
    raise EmbeddingError(f"embedding is {type(embedding).__name__}, not a vector")


def vector_floats(raw: bytes) -> list[float]:
    """The floats of :func:`vector_bytes`'s bytes (for tests and small tools)."""
    values = array("f")
    values.frombytes(raw)
    if not _LITTLE:
        values.byteswap()
    return values.tolist()
