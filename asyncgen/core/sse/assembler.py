"""Fold OpenAI ``chat.completion.chunk`` / ``text_completion`` payloads (and vLLM's
additions) into the ``Completion`` a non-streamed reply gives."""

from __future__ import annotations

import msgspec

from asyncgen.core.records import Completion, ErrorInfo, Usage, _Choice, _Message
from asyncgen.core.retry import QUOTA_CODE, retryable_status
from asyncgen.core.sse.errors import StreamError, StreamIncomplete, StreamServerError

__all__ = ["StreamAssembler"]


# Views that decode only what the Completion keeps. gc=False: they live for one chunk and
# cannot form cycles, and untracked structs decode faster.


class _FunctionDelta(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _ToolCallDelta(msgspec.Struct, gc=False):
    index: int  # required, as OpenAI's own SDK requires it to merge deltas
    id: str | None = None
    type: str | None = None
    function: _FunctionDelta | None = None


class _Delta(msgspec.Struct, gc=False):
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallDelta] | None = None


class _ChunkChoice(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _ErrorBody(msgspec.Struct, gc=False):
    message: str | None = None
    code: str | int | None = None
    type: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    choices: list[_ChunkChoice] | None = None
    model: str | None = None
    usage: Usage | None = None
    error: _ErrorBody | str | None = None
    # Flat error shapes: {"error": "...", "code": ...} and vLLM's older {"object": "error", ...}
    object: str | None = None
    message: str | None = None
    code: str | int | None = None
    type: str | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)

# Error types that name a request the server will never accept, when no numeric code says so.
_PERMANENT_TYPES = frozenset({"invalid_request_error", "BadRequestError"})


class _ToolCall:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type: str | None = None
        self.name: list[str] = []
        self.arguments: list[str] = []

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": self.type or "function",
            "function": {"name": "".join(self.name), "arguments": "".join(self.arguments)},
        }


class StreamAssembler:
    """Fold the payloads of a completion stream into one ``records.Completion``.

    Keeps choice 0 only (asyncgen asks for one). Text arrives in pieces kept in lists and
    joined once, in ``completion()``.
    """

    __slots__ = (
        "_calls",
        "_chat",
        "_choice_seen",
        "_chunks",
        "_content",
        "_done",
        "_finish_reason",
        "_got_token",
        "_model",
        "_reasoning",
        "_reasoning_content",
        "_text",
        "_token_chunks",
        "_usage",
    )

    def __init__(self) -> None:
        self._done = False
        self._chunks = 0
        self._token_chunks = 0
        self._choice_seen = False
        self._chat = False
        self._got_token = False
        self._finish_reason: str | None = None
        self._model: str | None = None
        self._usage: Usage | None = None
        self._content: list[str] = []
        self._reasoning_content: list[str] = []
        self._reasoning: list[str] = []
        self._text: list[str] = []
        self._calls: dict[int, _ToolCall] = {}

    def __repr__(self) -> str:
        return (
            f"<StreamAssembler chunks={self._chunks} got_token={self._got_token} "
            f"finish_reason={self._finish_reason!r} done={self._done}>"
        )

    @property
    def done(self) -> bool:
        """``[DONE]`` has arrived."""
        return self._done

    @property
    def finish_reason(self) -> str | None:
        return self._finish_reason

    @property
    def got_token(self) -> bool:
        """Some generated output (text, reasoning or a tool call piece) has arrived."""
        return self._got_token

    @property
    def chunks(self) -> int:
        """JSON chunks added so far (``[DONE]`` not counted)."""
        return self._chunks

    @property
    def token_chunks(self) -> int:
        """Chunks so far that carried generated output (text, reasoning or a tool call piece)
        for choice 0. A chunk may hold several tokens; the role, finish and usage chunks
        hold none. What a benchmark times inter-token gaps by."""
        return self._token_chunks

    def add(self, payload: str) -> None:
        """Take one event payload. Raises StreamServerError for an error chunk and StreamError
        for a payload after ``[DONE]``, invalid JSON or a chunk of the wrong shape."""
        if self._done:
            raise StreamError("data after [DONE]")
        if payload == "[DONE]":
            self._done = True
            return
        try:
            chunk = _chunk_decoder.decode(payload)
        except msgspec.ValidationError as exc:
            raise StreamError(f"chunk {self._chunks + 1} of the wrong shape: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise StreamError(f"chunk {self._chunks + 1} is not JSON: {exc}") from exc
        self._chunks += 1
        if chunk.error is not None or chunk.object == "error":
            raise _server_error(chunk)
        if chunk.model is not None:
            self._model = chunk.model
        if chunk.usage is not None:
            self._usage = chunk.usage  # with vLLM's continuous_usage_stats, the last is the total
        if chunk.choices is None:
            if chunk.usage is None:
                raise StreamError(f"chunk {self._chunks} has neither choices nor usage")
            return
        carried = False
        for choice in chunk.choices:
            if choice.index:
                continue
            self._choice_seen = True
            delta = choice.delta
            if delta is not None:
                self._chat = True
                # Kept even when "": content "" and content never sent (None) differ, as they
                # do in a non-streamed reply.
                if (piece := delta.content) is not None:
                    self._content.append(piece)
                    carried = carried or bool(piece)
                if (piece := delta.reasoning_content) is not None:
                    self._reasoning_content.append(piece)
                    carried = carried or bool(piece)
                if (piece := delta.reasoning) is not None:
                    self._reasoning.append(piece)
                    carried = carried or bool(piece)
                if delta.tool_calls and self._add_tool_calls(delta.tool_calls):
                    carried = True
            if (piece := choice.text) is not None:
                self._text.append(piece)
                carried = carried or bool(piece)
            if choice.finish_reason is not None:
                self._finish_reason = choice.finish_reason
        if carried:
            self._got_token = True
            self._token_chunks += 1

    def _add_tool_calls(self, deltas: list[_ToolCallDelta]) -> bool:
        """Merge the deltas; True when they carried a piece of a call."""
        carried = False
        for delta in deltas:
            call = self._calls.get(delta.index)
            if call is None:
                call = self._calls[delta.index] = _ToolCall()
            if delta.id:
                call.id = delta.id
                carried = True
            if delta.type:
                call.type = delta.type
            function = delta.function
            if function is not None:
                # Pieces are appended, names included, as OpenAI's SDK merges them.
                if function.name:
                    call.name.append(function.name)
                    carried = True
                if function.arguments:
                    call.arguments.append(function.arguments)
                    carried = True
        return carried

    def completion(self) -> Completion:
        """The assembled completion. Raises StreamIncomplete unless the stream got as far as
        ``[DONE]`` or a finish_reason (some servers omit ``[DONE]``)."""
        if not self._chunks:
            raise StreamIncomplete("no chunks" + (" before [DONE]" if self._done else ""))
        if not self._done and self._finish_reason is None:
            raise StreamIncomplete(f"no finish_reason and no [DONE] after {self._chunks} chunks")
        if not self._choice_seen:
            raise StreamIncomplete(f"no choice in {self._chunks} chunks")
        message = None
        if self._chat:
            calls = [self._calls[i].as_dict() for i in sorted(self._calls)]
            message = _Message(
                content=_join(self._content),
                reasoning_content=_join(self._reasoning_content),
                reasoning=_join(self._reasoning),
                tool_calls=calls or None,
            )
        choice = _Choice(message=message, text=_join(self._text), finish_reason=self._finish_reason)
        return Completion(choices=[choice], model=self._model, usage=self._usage)


def _join(pieces: list[str]) -> str | None:
    return "".join(pieces) if pieces else None


def _server_error(chunk: _Chunk) -> StreamServerError:
    if isinstance(chunk.error, _ErrorBody):
        message, code, kind = chunk.error.message, chunk.error.code, chunk.error.type
    else:
        message = chunk.error if isinstance(chunk.error, str) else chunk.message
        code, kind = chunk.code, chunk.type
    status = code if isinstance(code, int) else None
    if isinstance(code, str) and code.isascii() and code.isdigit():
        status = int(code)
    if QUOTA_CODE in (code, kind):
        # A used-up quota, whatever status a gateway gave it: no retry can help.
        name, retryable = QUOTA_CODE, False
    elif status is not None:
        # vLLM's code is the status the error would have had before the 200 went out.
        name, retryable = f"http_{status}", retryable_status(status)
    else:
        # Without a status, assume a failure after the server took the request is transient.
        name = str(code or kind or "stream_error")
        retryable = kind not in _PERMANENT_TYPES
    error = ErrorInfo(name, message or "error in the event stream")
    return StreamServerError(error, retryable, status)
