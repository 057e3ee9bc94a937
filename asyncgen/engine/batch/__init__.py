"""The Batch API backend: the same job, sent as OpenAI Batch files through the openai SDK.

The items are written into *parts* (``OUT/batch/NAME.items.jsonl``, at most
``batch_max_requests`` each, one endpoint per part), durably, before anything is sent. Each
part then goes through upload (``files.create``), ``batches.create`` (tagged with
``metadata`` naming the job and the part), polling, and ingest: its output and error files
are downloaded and every line committed as a result or failure through the store and its
ledger, exactly as the online backend commits. Items that need another go (a batch that
failed, expired or was cancelled; ids missing from the output; retryable errors; replies
failing ``[output]``) go into a retry part, ``NAME-rK``, sent the same way, up to
``max_attempts`` (``max_invalid`` for invalid replies) rounds.

Crash safety: every step is recorded in an append-only journal (``OUT/batch/journal.jsonl``,
each line fsynced) after it happened and before anything relies on it:

- a part file exists (atomic write) before its ids are sent, so a rerun finds the same parts;
- ``uploaded`` (its file id) is logged before the batch is created; a crash before that
  uploads the file again (the orphan costs nothing);
- ``created`` (the batch id) is logged before polling; a crash before that is covered by
  the lookup a rerun makes before creating anything: ``batches.list``, all pages, for the
  job's batches by their metadata, so no part gets a second batch;
- ``ingested`` is logged after the whole output is committed and the retry part written; a
  crash mid-ingest ingests the same files again, and the ledger skips what was committed.

A finished job (every part ingested, every id committed) sends nothing.

Modules, along the lifecycle: :mod:`.state` (what is on disk: the token, the parts, the
journal), :mod:`.plan` (items into parts), :mod:`.backend` (upload, create, poll),
:mod:`.ingest` (output files into records), :mod:`.listing` (``asyncgen batches``).
"""

from asyncgen.engine.batch.backend import BatchBackend
from asyncgen.engine.batch.listing import BatchInfo, job_batches
from asyncgen.engine.batch.state import TERMINAL, JobBatches, job_token

__all__ = ["TERMINAL", "BatchBackend", "BatchInfo", "JobBatches", "job_batches", "job_token"]
