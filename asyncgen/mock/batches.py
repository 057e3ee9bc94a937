"""The mock's Batch API: ``/v1/files`` and ``/v1/batches`` as OpenAI documents them.

Routes: ``POST /v1/files`` (multipart upload, ``purpose`` and ``file``),
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``;
``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (newest first,
``limit`` and ``after``, with ``has_more``), ``POST /v1/batches/{id}/cancel``.

A batch is ``validating`` when created and ``in_progress`` on its first look; once
``batch_delay`` seconds have passed since its creation, the next look finishes it: each
request line gets the reply the online routes would give (deterministic: an embeddings
batch's lines get the vectors ``/v1/embeddings`` gives), except a share
``batch_error`` that gets a 500 in the error file. The first ``batch_fail`` batches end
``failed`` (no output), the next ``batch_expire`` end ``expired`` with the first half of
their requests done and the rest in the error file with ``batch_expired``. Everything is in
memory; :attr:`BatchApi.created` logs every create, for tests that count them.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from aiohttp import BodyPartReader, web

from asyncgen.mock.completions import BadRequest, Replies, read_request
from asyncgen.mock.config import MockConfig
from asyncgen.mock.embeddings import embeddings_reply, read_embed
from asyncgen.mock.faults import openai_error

__all__ = ["BatchApi", "Hook"]

Hook = Callable[[str, str], Awaitable[None]]
"""``hook(point, id)``, awaited at ``upload``, ``create`` (before the batch exists),
``created`` (after it exists, before the reply) and ``content``: tests kill clients there."""

_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_encode = msgspec.json.encode
_decode = msgspec.json.decode


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=_encode(body), content_type="application/json")


def _not_found(what: str) -> web.Response:
    return openai_error(404, f"No such {what}", "invalid_request_error", None)


class BatchApi:
    """The files and batches of one mock server; :meth:`add_routes` mounts them."""

    def __init__(
        self,
        config: MockConfig,
        replies: Replies,
        authorized: Callable[[web.Request], bool],
        unauthorized: Callable[[], web.Response],
        rng_draw: Callable[[], float],
    ) -> None:
        self._config = config
        self._replies = replies
        self._authorized = authorized
        self._unauthorized = unauthorized
        self._draw = rng_draw
        self._files: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._batches: dict[str, dict[str, Any]] = {}
        self._order: list[str] = []
        self._finished = 0
        self.created: list[tuple[str, dict[str, str]]] = []
        """Every batch created: its id and metadata, in order."""
        self.uploads = 0
        """Files uploaded."""
        self.submitted: Counter[str] = Counter()
        """How many created batches each custom_id was in."""
        self.hook: Hook | None = None

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/v1/files", self._upload)
        r.add_get("/v1/files/{id}", self._file)
        r.add_get("/v1/files/{id}/content", self._content)
        r.add_delete("/v1/files/{id}", self._delete)
        r.add_post("/v1/batches", self._create)
        r.add_get("/v1/batches", self._list)
        r.add_get("/v1/batches/{id}", self._retrieve)
        r.add_post("/v1/batches/{id}/cancel", self._cancel)

    async def _at(self, point: str, ident: str) -> None:
        if self.hook is not None:
            await self.hook(point, ident)

    # -- files -------------------------------------------------------------------------------

    def _store_file(self, name: str, purpose: str, data: bytes) -> dict[str, Any]:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": name,
            "purpose": purpose,
            "status": "processed",
        }
        self._files[file_id] = (meta, data)
        return meta

    async def _upload(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        # Read part by part (request.post() would spool the file to a temporary file).
        purpose: str | None = None
        name, data = "upload.jsonl", None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = await part.text()
            elif part.name == "file":
                name = part.filename or name
                data = bytes(await part.read())
        if purpose is None or data is None:
            return openai_error(400, "purpose and file are required", "invalid_request_error", None)
        meta = self._store_file(name, purpose, data)
        self.uploads += 1
        await self._at("upload", meta["id"])
        return _json(meta)

    async def _file(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        found = self._files.get(request.match_info["id"])
        return _not_found("file") if found is None else _json(found[0])

    async def _content(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        file_id = request.match_info["id"]
        await self._at("content", file_id)  # before the lookup: a hook may change the file
        found = self._files.get(file_id)
        if found is None:
            return _not_found("file")
        return web.Response(body=found[1], content_type="application/octet-stream")

    async def _delete(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        file_id = request.match_info["id"]
        if not self.delete_file(file_id):
            return _not_found("file")
        return _json({"id": file_id, "object": "file", "deleted": True})

    def delete_file(self, file_id: str) -> bool:
        """Forget a file (as OpenAI does 30 days after a batch's output was made); was it
        there?"""
        return self._files.pop(file_id, None) is not None

    def file_content(self, file_id: str) -> bytes:
        """A file's bytes (KeyError if there is none)."""
        return self._files[file_id][1]

    def replace_content(self, file_id: str, data: bytes) -> None:
        """Give a file other bytes (tests: an output file with lines a server should not
        write)."""
        meta, _ = self._files[file_id]
        self._files[file_id] = ({**meta, "bytes": len(data)}, data)

    # -- batches -----------------------------------------------------------------------------

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            body = _decode(await request.read())
        except msgspec.DecodeError:
            return openai_error(400, "invalid JSON body", "invalid_request_error", None)
        endpoint = body.get("endpoint")
        file_id = body.get("input_file_id")
        if endpoint not in _ENDPOINTS or body.get("completion_window") != "24h":
            return openai_error(
                400, "unsupported endpoint or completion_window", "invalid_request_error", None
            )
        if file_id not in self._files:
            return _not_found("file")
        await self._at("create", file_id)
        now = int(time.time())
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        lines = self._files[file_id][1].splitlines()
        metadata = body.get("metadata") or {}
        batch: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        batch["_started"] = time.monotonic()
        self._batches[batch_id] = batch
        self._order.append(batch_id)
        self.created.append((batch_id, dict(metadata)))
        for line in lines:
            custom_id = _decode(line).get("custom_id")
            if isinstance(custom_id, str):
                self.submitted[custom_id] += 1
        await self._at("created", batch_id)
        return _json(_public(batch))

    async def _retrieve(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        batch = self._batches.get(request.match_info["id"])
        if batch is None:
            return _not_found("batch")
        self._advance(batch)
        return _json(_public(batch))

    async def _list(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        try:
            limit = max(1, min(100, int(request.query.get("limit", "20"))))
        except ValueError:
            return openai_error(400, "limit must be an integer", "invalid_request_error", None)
        newest = list(reversed(self._order))
        after = request.query.get("after")
        start = newest.index(after) + 1 if after in self._batches else 0
        page = newest[start : start + limit]
        for batch_id in page:
            self._advance(self._batches[batch_id])
        data = [_public(self._batches[b]) for b in page]
        return _json(
            {
                "object": "list",
                "data": data,
                "first_id": page[0] if page else None,
                "last_id": page[-1] if page else None,
                "has_more": start + limit < len(newest),
            }
        )

    async def _cancel(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._unauthorized()
        batch = self._batches.get(request.match_info["id"])
        if batch is None:
            return _not_found("batch")
        if batch["status"] in ("validating", "in_progress"):
            now = int(time.time())
            batch["status"] = "cancelled"
            batch["cancelling_at"] = batch["cancelled_at"] = now
        return _json(_public(batch))

    # -- processing --------------------------------------------------------------------------

    def _advance(self, batch: dict[str, Any]) -> None:
        """Move a batch along: in progress on its first look, finished after the delay."""
        status = batch["status"]
        if status == "validating":
            batch["status"] = "in_progress"
            batch["in_progress_at"] = int(time.time())
            status = "in_progress"
        if status != "in_progress":
            return
        elapsed = time.monotonic() - batch["_started"]
        delay = self._config.batch_delay
        counts = batch["request_counts"]
        if elapsed < delay:
            counts["completed"] = int(counts["total"] * elapsed / delay)
            return
        self._finish(batch)

    def _finish(self, batch: dict[str, Any]) -> None:
        cfg = self._config
        now = int(time.time())
        order = self._finished
        self._finished += 1
        batch["finalizing_at"] = now
        if order < cfg.batch_fail:
            batch["status"] = "failed"
            batch["failed_at"] = now
            batch["errors"] = {
                "object": "list",
                "data": [{"code": "server_error", "message": "mock: the batch failed"}],
            }
            return
        expire = order < cfg.batch_fail + cfg.batch_expire
        lines = self._files[batch["input_file_id"]][1].splitlines()
        cut = len(lines) // 2 if expire else len(lines)
        out: list[bytes] = []
        err: list[bytes] = []
        for index, raw in enumerate(lines):
            request = _decode(raw)
            custom_id = request.get("custom_id")
            line_id = f"batch_req_{uuid.uuid4().hex[:24]}"
            if index >= cut:
                err.append(
                    _encode(
                        {
                            "id": line_id,
                            "custom_id": custom_id,
                            "response": None,
                            "error": {
                                "code": "batch_expired",
                                "message": "This request could not be executed before the "
                                "completion window expired.",
                            },
                        }
                    )
                )
                continue
            status, reply = self._reply(batch["endpoint"], request.get("body"))
            line = _encode(
                {
                    "id": line_id,
                    "custom_id": custom_id,
                    "response": {
                        "status_code": status,
                        "request_id": uuid.uuid4().hex,
                        "body": reply,
                    },
                    "error": None,
                }
            )
            (out if status == 200 else err).append(line)
        counts = batch["request_counts"]
        counts["completed"], counts["failed"] = len(out), len(err)
        if out:
            name = f"{batch['id']}_output.jsonl"
            batch["output_file_id"] = self._store_file(name, "batch_output", _lines(out))["id"]
        if err:
            name = f"{batch['id']}_error.jsonl"
            batch["error_file_id"] = self._store_file(name, "batch_output", _lines(err))["id"]
        if expire:
            batch["status"] = "expired"
            batch["expired_at"] = now
        else:
            batch["status"] = "completed"
            batch["completed_at"] = now

    def _reply(self, endpoint: str, body: Any) -> tuple[int, Any]:
        """The status and body one request line of a batch gets."""
        if self._draw() < self._config.batch_error:
            return 500, {
                "error": {
                    "message": "The server had an error while processing your request.",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        chat = endpoint == "/v1/chat/completions"
        raw = _encode(body)
        try:
            if endpoint == "/v1/embeddings":
                reply, _ = embeddings_reply(read_embed(raw, models=self._config.models))
                return 200, msgspec.Raw(reply)
            ask = read_request(raw, chat=chat, models=self._config.models)
        except BadRequest as exc:
            kind = "invalid_request_error"
            return exc.status, {
                "error": {"message": str(exc), "type": kind, "param": None, "code": exc.code}
            }
        return 200, _decode(self._replies.make(ask, chat=chat).body())


def _public(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if not k.startswith("_")}


def _lines(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"
