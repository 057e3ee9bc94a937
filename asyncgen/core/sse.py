"""Turn the bytes of a streamed completion into the ``Completion`` a non-streamed reply gives.

Sans-IO: no sockets, no asyncio, no clock. ``SSEParser`` cuts bytes into event payloads by the
WHATWG server-sent events rules; ``StreamAssembler`` folds OpenAI ``chat.completion.chunk`` and
``text_completion`` payloads (and vLLM's additions) into a ``records.Completion``. The caller
reads the network and feeds them::

    for payload in parser.feed(data):
        assembler.add(payload)
    ...
    completion = assembler.completion()

Errors, all ``ValueError`` because each says the bytes were not a good answer::

    StreamError              bad framing, invalid JSON, a chunk of the wrong shape
    ├── StreamIncomplete     the stream ended before the completion did
    └── StreamServerError    the server reported an error inside the stream
"""

from __future__ import annotations

import codecs

import msgspec

from asyncgen.core.records import Completion, ErrorInfo, Usage, _Choice, _Message
from asyncgen.core.retry import retryable_status

__all__ = [
    "SSEParser",
    "StreamAssembler",
    "StreamError",
    "StreamIncomplete",
    "StreamServerError",
]


class StreamError(ValueError):
    """A malformed event stream."""


class StreamIncomplete(StreamError):
    """The stream ended before the completion did; ``str()`` says where."""


class StreamServerError(StreamError):
    """The server reported an error in the stream, after it had already answered 200.

    ``error.status`` is None: the HTTP status was 200, and a numeric code in the error chunk is
    kept in ``error.code`` as ``http_<code>`` and in ``status``: the status the error would
    have had before the 200 went out (vLLM), which says the same about the endpoint.
    """

    def __init__(self, error: ErrorInfo, retryable: bool, status: int | None = None) -> None:
        super().__init__(f"{error.code}: {error.message}")
        self.error = error
        self.retryable = retryable
        self.status = status


# --- framing -------------------------------------------------------------------------------------


class SSEParser:
    """Cut a byte stream into the ``data`` payloads of its events, chunk by chunk.

    ``max_size`` bounds, in characters, both one line and the data of one event, so a server
    that never ends a line or an event cannot exhaust memory.
    """

    __slots__ = ("_cr", "_data", "_data_size", "_decoder", "_line", "_line_size", "_max")

    def __init__(self, max_size: int = 16 << 20) -> None:
        self._max = max_size
        # utf-8-sig drops a leading BOM even when it arrives split over feeds, and only that
        # one; "replace" is the decoding the spec prescribes for invalid bytes.
        self._decoder = codecs.getincrementaldecoder("utf-8-sig")("replace")
        self._line: list[str] = []  # pieces of the last, unterminated line
        self._line_size = 0
        self._data: list[str] = []  # data lines of an event whose blank line has not come yet
        self._data_size = 0
        # The previous feed ended with "\r": a "\n" opening this one completes that "\r\n"
        # rather than ending an empty line, which would dispatch an event.
        self._cr = False

    def __repr__(self) -> str:
        return (
            f"<SSEParser pending_line={self._line_size} "
            f"pending_data_lines={len(self._data)} max_size={self._max}>"
        )

    def feed(self, data: bytes) -> list[str]:
        """The payloads of the events this chunk of bytes completes, in order."""
        text = self._decoder.decode(data)
        if not text:
            return []
        if self._cr:
            self._cr = False
            if text[0] == "\n":
                text = text[1:]
                if not text:
                    return []
        if "\r" in text:
            self._cr = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        end = text.rfind("\n") + 1
        if not end:
            self._add_partial(text)
            return []
        complete = text[:end]
        if self._line:
            complete = "".join(self._line) + complete
            self._line.clear()
            self._line_size = 0
        if end < len(text):
            self._add_partial(text[end:])
        if (
            not self._data
            and complete.startswith("data: ")
            and complete.endswith("\n\n")
            and len(complete) <= self._max
        ):
            # The usual feed holds nothing but one-line "data: " events: one split in C and no
            # Python work per event. A newline left inside a piece means it was something else.
            events = complete[6:-2].split("\n\ndata: ")
            if "\n" not in "".join(events):
                return events
        # Otherwise split on blank lines rather than on lines, so an event costs one loop
        # turn, and a one-line data event (TGI writes "data:" without the space) still needs
        # no per-line work.
        events = []
        blocks = complete.split("\n\n")
        tail = blocks.pop()  # lines after the last blank line: "" or ending in "\n"
        for block in blocks:
            if not self._data and block.startswith("data:") and "\n" not in block:
                value = block[6:] if block.startswith(" ", 5) else block[5:]
                if len(value) > self._max:
                    raise StreamError(f"an event larger than {self._max} characters")
                events.append(value)
            else:
                self._lines(block, events)
                self._dispatch(events)
        if tail:
            self._lines(tail[:-1], events)
        return events

    def close(self) -> None:
        """End of stream. Raises StreamIncomplete if it stopped inside a line or an event
        (whose payload the spec says to drop, so ``feed`` never returned it)."""
        rest = self._decoder.decode(b"", final=True)
        cut = bool(rest or self._line or self._data)
        self._line.clear()
        self._data.clear()
        self._line_size = self._data_size = 0
        if cut:
            raise StreamIncomplete("the stream ended inside an event")

    def _add_partial(self, piece: str) -> None:
        self._line_size += len(piece)
        if self._line_size > self._max:
            raise StreamError(f"a line longer than {self._max} characters")
        self._line.append(piece)

    def _lines(self, block: str, events: list[str]) -> None:
        for line in block.split("\n"):
            if not line:
                self._dispatch(events)
            elif line[0] != ":":  # ":" opens a comment: servers' keep-alives
                name, _, value = line.partition(":")
                if name == "data":  # event, id, retry and unknown fields mean nothing here
                    if value[:1] == " ":
                        value = value[1:]
                    self._data_size += len(value) + 1
                    if self._data_size > self._max:
                        raise StreamError(f"an event larger than {self._max} characters")
                    self._data.append(value)

    def _dispatch(self, events: list[str]) -> None:
        if self._data:
            events.append("\n".join(self._data))
            self._data.clear()
            self._data_size = 0


# --- chunks: views that decode only what the Completion keeps ------------------------------------


# gc=False: these views live for one chunk and cannot form cycles, and untracked structs
# decode faster.


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
    if status is not None:
        # vLLM's code is the status the error would have had before the 200 went out.
        name, retryable = f"http_{status}", retryable_status(status)
    else:
        # Without a status, assume a failure after the server took the request is transient.
        name = str(code or kind or "stream_error")
        retryable = kind not in _PERMANENT_TYPES
    error = ErrorInfo(name, message or "error in the event stream")
    return StreamServerError(error, retryable, status)
