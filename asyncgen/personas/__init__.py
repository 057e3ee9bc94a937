"""Persona shards: making them as resumable jobs and choosing among them, all streaming.

* :mod:`.pipeline` — from text and persona-to-persona expansion, each stage a job whose
  results become a persona shard (the job runner is the caller's);
* :mod:`.reader` — :class:`~.reader.PersonaReader` over shards, naming bad lines;
* :mod:`.select` — uniform samples and keyword, pattern and field filters;
* :mod:`.stats` — counts, length percentiles, top terms, exact duplicates;
* :mod:`.dedup` — exact and MinHash near-duplicate detection, sans-IO;
  :mod:`.dedup_files` runs it over shards.
"""
