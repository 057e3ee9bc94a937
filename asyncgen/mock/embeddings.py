"""The mock's ``/v1/embeddings``: deterministic vectors in which texts sharing most words are
close, so the semantic stages can be measured on loopback.

A text's vector is the sum of one pseudo-random +-1 vector per word (lower-cased runs of
letters and digits, a word counted as often as it occurs), the sign pattern drawn from the
word's BLAKE2b digest, normalised to length 1. Two texts' cosine is then about the share of
words they have in common (``|A & B| / sqrt(|A| |B|)``), plus noise of order
``1 / sqrt(dimensions)`` from the words they do not share. Imports nothing of asyncgen but
the core, like the rest of the mock.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import struct
from typing import Any

import msgspec

from asyncgen.mock.completions import BadRequest, read_body

__all__ = ["DEFAULT_DIMENSIONS", "EmbedAsk", "embed_text", "embeddings_reply", "read_embed"]

DEFAULT_DIMENSIONS = 256
MAX_DIMENSIONS = 4096
_WORD = re.compile(r"[^\W_]+")
_CACHE_LIMIT = 65_536
_signs: dict[tuple[str, int], tuple[float, ...]] = {}


class EmbedAsk(msgspec.Struct, frozen=True):
    """What one embeddings request asks for."""

    model: str
    texts: list[str]
    dimensions: int
    base64: bool


def read_embed(raw: bytes, *, models: list[str]) -> EmbedAsk:
    """The request in ``raw``, or :class:`BadRequest` worded like OpenAI's refusal."""
    body, model = read_body(raw, models=models)
    texts = body.get("input")
    if isinstance(texts, str):
        texts = [texts]
    if (
        not isinstance(texts, list)
        or not texts
        or len(texts) > 2048
        or not all(isinstance(t, str) and t for t in texts)
    ):
        raise BadRequest(
            400, "'input' must be a non-empty string or a list of 1 to 2048 non-empty strings."
        )
    dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise BadRequest(400, "'dimensions' must be an integer.")
    if not 1 <= dimensions <= MAX_DIMENSIONS:
        raise BadRequest(400, f"'dimensions' must be between 1 and {MAX_DIMENSIONS}.")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise BadRequest(400, "'encoding_format' must be 'float' or 'base64'.")
    return EmbedAsk(model, texts, dimensions, encoding == "base64")


def _word_signs(word: str, dimensions: int) -> tuple[float, ...]:
    key = (word, dimensions)
    signs = _signs.get(key)
    if signs is None:
        bits = bytearray()
        counter = 0
        while len(bits) * 8 < dimensions:
            bits += hashlib.blake2b(f"{counter}:{word}".encode(), digest_size=64).digest()
            counter += 1
        number = int.from_bytes(bits, "little")
        signs = tuple(1.0 if number >> i & 1 else -1.0 for i in range(dimensions))
        if len(_signs) >= _CACHE_LIMIT:
            _signs.clear()
        _signs[key] = signs
    return signs


def embed_text(text: str, dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The unit vector of ``text`` (a text without words gets a vector of its own)."""
    words = _WORD.findall(text.lower()) or [f"\0{text}"]
    total = [0.0] * dimensions
    for word in words:
        total = [a + b for a, b in zip(total, _word_signs(word, dimensions), strict=True)]
    norm = math.sqrt(sum(x * x for x in total)) or 1.0
    return [x / norm for x in total]


def embeddings_reply(ask: EmbedAsk, *, leave_out: int | None = None) -> tuple[bytes, int]:
    """The JSON reply to ``ask`` and the prompt tokens it counts (about 4 characters each);
    ``leave_out``: the index of an input whose vector the reply lacks (a fault)."""
    data: list[dict[str, Any]] = []
    tokens = 0
    for index, text in enumerate(ask.texts):
        if index == leave_out:
            continue
        vector = embed_text(text, ask.dimensions)
        tokens += len(text) // 4 + 1
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            if ask.base64
            else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    body = {
        "object": "list",
        "data": data,
        "model": ask.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return msgspec.json.encode(body), tokens
