"""``asyncgen batches``: a job's batches as the server reports them, found by their
metadata, and cancelling those still running."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec

from asyncgen.core.errors import ConfigError
from asyncgen.engine.batch.state import BATCH_DIR, META_JOB, META_PART, TERMINAL, TOKEN, Token

__all__ = ["BatchInfo", "job_batches"]


class BatchInfo(msgspec.Struct, frozen=True):
    """One of a job's batches as the server reports it (``asyncgen batches``)."""

    id: str
    part: str
    status: str
    total: int
    completed: int
    failed: int
    created_at: int


async def job_batches(root: Path, *, api_key: str | None, cancel: bool = False) -> list[BatchInfo]:
    """The batches of the job in ``root`` at the server its manifest names (every page of
    ``batches.list``, matched by metadata), oldest first; ``cancel``: cancel those still
    running, and report them as the server answered the cancel."""
    import openai

    from asyncgen.storage.manifest import read_manifest

    manifest = await asyncio.to_thread(read_manifest, root)
    job = manifest.job
    if job is None or len(job.base_url) != 1:
        raise ConfigError(f"{root} does not record one endpoint to ask")
    token_path = root / BATCH_DIR / TOKEN
    if not token_path.exists():
        return []
    token = msgspec.json.decode(token_path.read_bytes(), type=Token).job
    found: list[BatchInfo] = []
    async with openai.AsyncOpenAI(base_url=job.base_url[0], api_key=api_key or "none") as client:
        async for batch in client.batches.list(limit=100):
            meta = batch.metadata or {}
            if meta.get(META_JOB) != token:
                continue
            if cancel and batch.status not in TERMINAL and batch.status != "cancelling":
                batch = await client.batches.cancel(batch.id)
            counts = batch.request_counts
            found.append(
                BatchInfo(
                    batch.id,
                    meta.get(META_PART, "?"),
                    batch.status,
                    counts.total if counts else 0,
                    counts.completed if counts else 0,
                    counts.failed if counts else 0,
                    batch.created_at,
                )
            )
    found.reverse()
    return found
