"""Framing: cut the bytes of a response into server-sent event payloads (WHATWG rules)."""

from __future__ import annotations

import codecs

from asyncgen.core.sse.errors import StreamError, StreamIncomplete

__all__ = ["SSEParser"]


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
