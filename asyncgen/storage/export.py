"""``asyncgen export``: the logical view of an output directory as one file, in the
records' own JSON lines, the OpenAI Batch output format, or Parquet; an embedding job's
vectors as a NumPy ``.npy`` matrix beside an id file.

The file is written whole and renamed into place, so the destination is either the old file
or the complete new one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import msgspec

from asyncgen.core.errors import ConfigError, InputError
from asyncgen.core.records import NO_LINE, Result, Usage
from asyncgen.storage.files import AtomicFile
from asyncgen.storage.manifest import read_manifest
from asyncgen.storage.shards import LinesWriter
from asyncgen.storage.view import iter_logical

__all__ = ["EXPORT_FORMATS", "export", "ids_path"]

EXPORT_FORMATS = ("jsonl", "batch", "parquet", "vectors")


def _batch_line(r: Result, endpoint: str) -> dict[str, Any]:
    """A record in the OpenAI Batch output format (one line of a batch's output file), for
    records that do not keep the server's own line (the online backend's, and failures no
    line explains); ``endpoint`` is the job's, for records that do not say which path they
    were sent to."""
    request_id = f"asyncgen-{hashlib.sha256(r.custom_id.encode()).hexdigest()[:24]}"
    if r.error is not None and r.error.status is not None and r.error.status != 200:
        # The server answered with an error status: OpenAI records that as a response.
        error_body = {"error": {"message": r.error.message, "code": r.error.code}}
        return {
            "id": request_id,
            "custom_id": r.custom_id,
            "response": {
                "status_code": r.error.status,
                "request_id": request_id,
                "body": error_body,
            },
            "error": None,
        }
    if r.error is not None:
        # No error response to show (a timeout, a dropped connection, an invalid reply).
        return {
            "id": request_id,
            "custom_id": r.custom_id,
            "response": None,
            "error": {"code": r.error.code, "message": r.error.message},
        }
    if r.url == "/completions" or (r.url is None and endpoint == "completions"):
        obj = "text_completion"
        choice: dict[str, Any] = {"index": 0, "text": r.output, "finish_reason": r.finish_reason}
    else:
        obj = "chat.completion"
        message: dict[str, Any] = {"role": "assistant", "content": r.output}
        if r.tool_calls:
            message["tool_calls"] = r.tool_calls
        if r.reasoning is not None:
            message["reasoning_content"] = r.reasoning
        choice = {"index": 0, "message": message, "finish_reason": r.finish_reason}
    body = {
        "id": request_id,
        "object": obj,
        "created": int(r.created),
        "model": r.model,
        "choices": [choice],
    }
    if r.usage is not None:
        body["usage"] = msgspec.to_builtins(r.usage)
    return {
        "id": request_id,
        "custom_id": r.custom_id,
        "response": {"status_code": 200, "request_id": request_id, "body": body},
        "error": None,
    }


_PARQUET_BATCH = 50_000
_PARQUET_COLUMNS = [
    ("custom_id", "str"),
    ("output", "str"),
    ("error_code", "str"),
    ("error_reason", "str"),
    ("error_message", "str"),
    ("finish_reason", "str"),
    ("model", "str"),
    ("template", "str"),
    ("persona", "str"),
    ("source_shard", "str"),
    ("source_line", "int"),
    ("attempts", "int"),
    ("latency_s", "float"),
    ("ttft_s", "float"),
    ("started", "float"),
    ("created", "float"),
    ("endpoint", "str"),
    ("prompt_tokens", "int"),
    ("completion_tokens", "int"),
    ("persona_sha256", "str"),
    ("template_sha256", "str"),
    ("reasoning", "str"),
    ("sampling", "str"),
    ("meta", "str"),
    ("parsed", "str"),
    ("tool_calls", "str"),
]
"""Parquet columns and their types, in the order of :func:`_parquet_row`."""


def _parquet_row(r: Result) -> dict[str, Any]:
    usage = r.usage or Usage()
    dump = msgspec.json.encode
    return {
        "custom_id": r.custom_id,
        "output": r.output,
        "error_code": r.error.code if r.error else None,
        "error_reason": r.error.reason if r.error else None,
        "error_message": r.error.message if r.error else None,
        "finish_reason": r.finish_reason,
        "model": r.model,
        "template": r.template,
        "persona": r.persona,
        "source_shard": r.source.shard,
        "source_line": r.source.line,
        "attempts": r.attempts,
        "latency_s": r.latency_s,
        "ttft_s": r.ttft_s,
        "started": r.started,
        "created": r.created,
        "endpoint": r.endpoint,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "persona_sha256": r.persona_sha256,
        "template_sha256": r.template_sha256,
        "reasoning": r.reasoning,
        "sampling": dump(r.sampling).decode(),
        "meta": dump(r.meta).decode(),
        "parsed": None if r.parsed is None else dump(r.parsed).decode(),
        "tool_calls": None if r.tool_calls is None else dump(r.tool_calls).decode(),
    }


def export(root: Path, destination: Path, fmt: str = "jsonl", *, failures: bool = False) -> int:
    """Write the logical view of ``root`` to ``destination`` (plain, or zstd if its name ends
    in ``.zst``; ``parquet`` needs pyarrow); return the number of records written.

    ``jsonl`` keeps each record's line as stored; ``batch`` is the OpenAI Batch output format;
    ``parquet`` has one column per field (nested ones as JSON text); ``vectors`` is an
    embedding job's vectors (see :func:`_export_vectors`; ``failures`` does not apply).
    Written to a temporary file and renamed, so ``destination`` is either the old file or
    the complete new one.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r} (one of {', '.join(EXPORT_FORMATS)})")
    job = read_manifest(root).job
    if fmt == "vectors":
        if destination.suffix != ".npy":
            raise ConfigError(f"export --format vectors writes a .npy file, not {destination}")
        return _export_vectors(iter_logical(root, False), root, destination)
    records = iter_logical(root, failures)
    if fmt == "parquet":
        with AtomicFile(destination) as atomic:
            return _export_parquet(records, atomic.file)
    endpoint = "completions" if job and job.template_endpoint == "completions" else "chat"
    encoder = msgspec.json.Encoder()
    with LinesWriter(destination) as out:
        for line, record in records:
            if fmt != "batch":
                out.write(line)
            elif record.batch_line != NO_LINE:
                # A Batch API backend's record: the server's own line, byte for byte.
                out.write(bytes(record.batch_line))
            else:
                out.write(encoder.encode(_batch_line(record, endpoint)))
    return out.lines


def _export_parquet(records: Iterator[tuple[bytes, Result]], sink: BinaryIO) -> int:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            "Parquet export needs pyarrow: pip install 'asyncgen[parquet]' (or pyarrow)"
        ) from None
    # One schema for every batch: inferred from the first, a column that batch held only as
    # nulls (no failures among the first 50 000 records, say) would refuse later values.
    types = {"str": pa.string(), "int": pa.int64(), "float": pa.float64()}
    schema = pa.schema([(name, types[kind]) for name, kind in _PARQUET_COLUMNS])
    n = 0
    rows: list[dict[str, Any]] = []
    with pq.ParquetWriter(sink, schema) as writer:
        for _, record in records:
            rows.append(_parquet_row(record))
            if len(rows) >= _PARQUET_BATCH:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema))
                n, rows = n + len(rows), []
        writer.write_table(pa.Table.from_pylist(rows, schema=schema))
    return n + len(rows)


_NPY_HEADER = 128
"""Bytes the .npy header takes (magic, version, length, dict, padding): written first with
a placeholder shape, rewritten with the real one at the end."""


def _npy_header(rows: int, dims: int) -> bytes:
    """A .npy 1.0 header for a C-order little-endian float32 matrix, padded to
    :data:`_NPY_HEADER` bytes."""
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dims}), }}"
    body = text.encode("latin1").ljust(_NPY_HEADER - 10 - 1) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body


def ids_path(destination: Path) -> Path:
    """The id file beside a vectors export: ``emb.npy`` → ``emb.ids.jsonl``."""
    return destination.with_name(destination.name.removesuffix(".npy") + ".ids.jsonl")


def _export_vectors(records: Iterator[tuple[bytes, Result]], root: Path, destination: Path) -> int:
    """Every success's vector, in the logical view's order, as one float32 ``.npy`` matrix
    (the bytes as stored, so lossless), and line for line in :func:`ids_path` its
    ``custom_id`` and source shard and line. Both written whole and renamed into place."""
    encoder = msgspec.json.Encoder()
    rows = 0
    width: int | None = None
    with AtomicFile(destination) as matrix, LinesWriter(ids_path(destination)) as ids:
        matrix.file.write(b"\0" * _NPY_HEADER)
        for _, record in records:
            raw = record.embedding
            if raw is None:
                raise InputError(
                    f"{root}: result {record.custom_id} has no embedding; export --format "
                    'vectors needs the output of a job whose template has endpoint = "embeddings"'
                )
            if width is None:
                width = len(raw)
            elif len(raw) != width:
                raise InputError(
                    f"{root}: vectors of {len(raw) // 4} and {width // 4} dimensions in one job"
                )
            matrix.file.write(raw)
            ids.write(
                encoder.encode(
                    {
                        "custom_id": record.custom_id,
                        "shard": record.source.shard,
                        "line": record.source.line,
                    }
                )
            )
            rows += 1
        matrix.file.seek(0)
        matrix.file.write(_npy_header(rows, (width or 0) // 4))
    return rows
