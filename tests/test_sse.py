import random
import re
from typing import Any

import msgspec
import pytest

from asyncgen.core.records import Usage
from asyncgen.core.retry import interpret
from asyncgen.core.sse import (
    SSEParser,
    StreamAssembler,
    StreamError,
    StreamIncomplete,
    StreamServerError,
)


def parse(*pieces: bytes, parser: SSEParser | None = None) -> list[str]:
    parser = parser or SSEParser()
    return [payload for piece in pieces for payload in parser.feed(piece)]


def sse(*chunks: Any, done: bool = True) -> bytes:
    """A stream as a server writes it: one ``data:`` event per chunk, then ``[DONE]``."""
    events = [b"data: " + msgspec.json.encode(c) + b"\n\n" for c in chunks]
    return b"".join(events) + (b"data: [DONE]\n\n" if done else b"")


def assemble(stream: bytes) -> StreamAssembler:
    assembler = StreamAssembler()
    parser = SSEParser()
    for payload in parser.feed(stream):
        assembler.add(payload)
    parser.close()
    return assembler


def chat_chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> Any:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [choice],
        **extra,
    }


# --- framing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    stream = b"data: a" + eol + eol + b"data: b" + eol + b"data: c" + eol + eol
    assert parse(stream) == ["a", "b\nc"]


# A realistic stream: keep-alive comments, an id and event field, a multi-line event, a
# character of four UTF-8 bytes and one of three, CRLF endings next to LF ones.
REALISTIC = (
    b": keep-alive\n\n"
    b'data: {"choices":[{"delta":{"content":"h\xc3\xa9llo"}}]}\n\n'
    b"id: 7\r\nevent: message\r\nretry: 3000\r\n"
    b'data: {"choices":[{"delta":{"content":" \xf0\x9f\x8e\x89 \xe4\xb8\x96"}}]}\r\n\r\n'
    b"\n\n"
    b"data: first\ndata:second\ndata\n\n"
    b"data: [DONE]\r\n\r\n"
)
REALISTIC_PAYLOADS = [
    '{"choices":[{"delta":{"content":"héllo"}}]}',
    '{"choices":[{"delta":{"content":" 🎉 世"}}]}',
    "first\nsecond\n",
    "[DONE]",
]


def test_realistic_stream_whole_and_byte_by_byte() -> None:
    assert parse(REALISTIC) == REALISTIC_PAYLOADS
    assert parse(*(REALISTIC[i : i + 1] for i in range(len(REALISTIC)))) == REALISTIC_PAYLOADS


def test_every_split_point_gives_the_same_payloads() -> None:
    for cut in range(len(REALISTIC) + 1):
        parser = SSEParser()
        assert parse(REALISTIC[:cut], REALISTIC[cut:], parser=parser) == REALISTIC_PAYLOADS, cut
        parser.close()


def test_shortcuts_for_plain_data_events_agree_with_the_rules() -> None:
    # Feeds of nothing but one-line "data: " events take a shortcut; whatever breaks that
    # shape must fall back to the rules, wherever the feed boundaries fall.
    stream = (
        b'data: {"a": "data: x"}\n\n'
        b"data:  two\n\n"
        b"data:tight\n\n"
        b"data:\n\n"
        b"data: \n\n"
        b"data: b\ndata: c\n\n"
        b"data: d\n\n"
    )
    payloads = ['{"a": "data: x"}', " two", "tight", "", "", "b\nc", "d"]
    for cut in range(len(stream) + 1):
        assert parse(stream[:cut], stream[cut:]) == payloads, cut
    # An event whose data lines straddle feeds is not cut in two by a shortcut.
    assert parse(b"data: a\n", b"data: b\n\n") == ["a\nb"]
    assert parse(b"data: a\n", b"data:b\n\ndata: c\n\n") == ["a\nb", "c"]


def reference(stream: bytes) -> list[str]:
    """The WHATWG algorithm read literally, on the whole stream at once."""
    text = stream.decode().removeprefix("\ufeff")
    events, buffer = [], ""
    for line in re.split("\r\n|\r|\n", text)[:-1]:  # the last line is unterminated
        if not line:
            if buffer:
                events.append(buffer[:-1])
            buffer = ""
        elif not line.startswith(":"):
            name, _, value = line.partition(":")
            if name == "data":
                buffer += value.removeprefix(" ") + "\n"
    return events


def test_random_streams_and_splits_match_the_reference() -> None:
    rng = random.Random(7)
    lines = ["data: x", "data:y", "data:  é", "data", "data: [DONE]", ": ping", "event: e", ""]
    for _ in range(300):
        body = "".join(rng.choice(lines) + rng.choice(["\n", "\r\n", "\r"]) for _ in range(12))
        stream = (b"\xef\xbb\xbf" if rng.random() < 0.2 else b"") + body.encode()
        cuts = sorted(rng.sample(range(len(stream) + 1), 4))
        pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        assert parse(*pieces) == reference(stream), pieces


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    # Were the "\n" read as a second line end, it would be a blank line dispatching "a" alone.
    assert parse(b"data: a\r", b"\ndata: b\r\n\r\n") == ["a\nb"]
    assert parse(b"data: a\r", b"\n", b"\r", b"\n") == ["a"]
    assert parse(b"data: a\r", b"\r") == ["a"]


def test_dispatch_happens_as_soon_as_the_blank_line_arrives() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: a\n") == []
    assert parser.feed(b"\n") == ["a"]
    assert parser.feed(b"data: b\r\r") == ["b"]


def test_comments_and_blank_keepalives_dispatch_nothing() -> None:
    assert parse(b": ping\n\n\n\n:\n\r\n: x\rdata: a\n\n") == ["a"]


def test_field_syntax() -> None:
    # One leading space is removed, no more; a line without a colon is a field with no value.
    assert parse(b"data:  two spaces\n\n") == [" two spaces"]
    assert parse(b"data:x:y\n\n") == ["x:y"]
    assert parse(b"data\n\n") == [""]
    assert parse(b"data\ndata\n\n") == ["\n"]
    assert parse(b"event: x\nid: 1\nretry: 5\nfoo: bar\n\n") == []
    assert parse(b"DATA: a\n\n") == []


def test_bom_skipped_only_at_the_start() -> None:
    assert parse(b"\xef\xbb\xbfdata: a\n\n") == ["a"]
    assert parse(b"\xef", b"\xbb", b"\xbfdata: a\n\n") == ["a"]
    # A second BOM is part of a field name, so the line is not a data line.
    assert parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n") == []


def test_invalid_utf8_is_replaced() -> None:
    assert parse(b"data: \xff\n\n") == ["\ufffd"]


def test_close_tells_a_stream_cut_inside_an_event() -> None:
    for tail in (b"data: a", b"data: a\n", b"data: \xe4\xb8"):
        parser = SSEParser()
        assert parser.feed(b"data: x\n\n" + tail) == ["x"]
        with pytest.raises(StreamIncomplete):
            parser.close()
    parser = SSEParser()
    assert parser.feed(b"data: x\n\n: bye\n") == ["x"]
    parser.close()


def test_size_cap() -> None:
    with pytest.raises(StreamError, match="line longer"):
        parse(b"data: " + b"x" * 50, b"x" * 50, parser=SSEParser(max_size=64))
    with pytest.raises(StreamError, match="event larger"):
        parse(b"data: " + b"x" * 65 + b"\n\n", parser=SSEParser(max_size=64))
    with pytest.raises(StreamError, match="event larger"):
        parse(b"data: " + b"x" * 40 + b"\ndata: " + b"x" * 40 + b"\n", parser=SSEParser(64))
    with pytest.raises(StreamError, match="line longer"):
        parse(*[b": ping"] * 20, parser=SSEParser(max_size=64))
    # Within the cap, however it is fed, all is well.
    assert parse(b"data: " + b"x" * 30, b"x" * 30 + b"\n\n", parser=SSEParser(64)) == ["x" * 60]


# --- assembly -----------------------------------------------------------------------------------

USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_chat_stream_equals_the_non_streamed_reply() -> None:
    stream = sse(
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": "Hel"}),
        chat_chunk({"content": "lo, "}),
        chat_chunk({"content": "wörld"}, finish_reason="stop"),
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "model": "m",
            "choices": [],
            "usage": USAGE,
        },
    )
    assembler = assemble(stream)
    assert assembler.done and assembler.finish_reason == "stop" and assembler.chunks == 5
    reply = {
        "model": "m",
        "choices": [{"message": {"content": "Hello, wörld"}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
    expected = interpret(200, msgspec.json.encode(reply)).completion
    assert assembler.completion() == expected
    assert assembler.completion().usage == Usage(5, 3, 8)


def test_text_completion_stream() -> None:
    def chunk(text: str, finish_reason: str | None = None) -> Any:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {"object": "text_completion", "model": "m", "choices": [choice]}

    completion = assemble(sse(chunk("Once"), chunk(" upon"), chunk("", "length"))).completion()
    assert completion.choices[0].text == "Once upon"
    assert completion.choices[0].message is None
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is None and completion.model == "m"


def test_continuous_usage_last_one_wins() -> None:
    def usage(n: int) -> dict[str, int]:
        return {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}

    stream = sse(
        chat_chunk({"content": "a"}, usage=usage(1)),
        chat_chunk({"content": "b"}, "stop", usage=usage(2)),
        {"choices": [], "usage": usage(2)},
    )
    assert assemble(stream).completion().usage == Usage(5, 2, 7)


def test_reasoning_fields() -> None:
    stream = sse(
        chat_chunk({"role": "assistant", "reasoning_content": "Let me "}),
        chat_chunk({"reasoning_content": "think."}),
        chat_chunk({"reasoning": "also"}),
        chat_chunk({"content": "42"}, "stop"),
    )
    message = assemble(stream).completion().choices[0].message
    assert message is not None
    assert message.reasoning_content == "Let me think."
    assert message.reasoning == "also"
    assert message.content == "42"
    assert message.tool_calls is None


def test_content_is_none_when_never_sent() -> None:
    stream = sse(chat_chunk({"role": "assistant"}), chat_chunk({}, "stop"))
    message = assemble(stream).completion().choices[0].message
    assert message is not None and message.content is None and message.reasoning is None


def test_tool_call_deltas_interleaved_by_index() -> None:
    def tool(index: int, **fields: Any) -> Any:
        return chat_chunk({"tool_calls": [{"index": index, **fields}]})

    stream = sse(
        chat_chunk({"role": "assistant", "content": None}),
        tool(0, id="call_a", type="function", function={"name": "get_weather", "arguments": ""}),
        tool(0, function={"arguments": '{"city": '}),
        tool(1, id="call_b", type="function", function={"name": "get_time", "arguments": '{"tz"'}),
        tool(0, function={"arguments": '"Paris"}'}),
        tool(1, function={"arguments": ': "CET"}'}),
        chat_chunk({}, "tool_calls"),
    )
    completion = assemble(stream).completion()
    message = completion.choices[0].message
    assert message is not None and message.content is None
    assert message.tool_calls == [
        {
            "id": "call_a",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "call_b",
            "type": "function",
            "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
        },
    ]
    assert completion.choices[0].finish_reason == "tool_calls"


def test_got_token_flips_on_the_first_generated_piece() -> None:
    assembler = StreamAssembler()
    seen = []
    for chunk in (
        chat_chunk({"role": "assistant", "content": ""}),
        chat_chunk({"content": ""}),
        chat_chunk({"content": "x"}),
        chat_chunk({"content": "y"}, "stop"),
    ):
        assembler.add(msgspec.json.encode(chunk).decode())
        seen.append(assembler.got_token)
    assert seen == [False, False, True, True]
    assembler = StreamAssembler()
    assembler.add(
        msgspec.json.encode(chat_chunk({"tool_calls": [{"index": 0, "id": "c"}]})).decode()
    )
    assert assembler.got_token


def test_other_choice_indexes_ignored() -> None:
    chunk = chat_chunk({"content": "a"}, "stop")
    chunk["choices"].append({"index": 1, "delta": {"content": "b"}, "finish_reason": "stop"})
    message = assemble(sse(chunk)).completion().choices[0].message
    assert message is not None and message.content == "a"


@pytest.mark.parametrize(
    ("chunk", "code", "message", "retryable"),
    [
        # vLLM: the status the error would have had, as code
        (
            {"error": {"message": "boom", "type": "InternalServerError", "code": 500}},
            "http_500",
            "boom",
            True,
        ),
        (
            {"error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}},
            "http_400",
            "bad",
            False,
        ),
        # OpenAI: a type, no code
        (
            {"error": {"message": "server had an error", "type": "server_error", "code": None}},
            "server_error",
            "server had an error",
            True,
        ),
        (
            {
                "error": {
                    "message": "too long",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
            },
            "context_length_exceeded",
            "too long",
            False,
        ),
        # gateways: a flat string, maybe a code beside it
        ({"error": "upstream timed out", "code": "504"}, "http_504", "upstream timed out", True),
        ({"error": "overloaded"}, "stream_error", "overloaded", True),
        # vLLM's older flat shape
        (
            {"object": "error", "message": "gone", "type": "NotFoundError", "code": 404},
            "http_404",
            "gone",
            False,
        ),
    ],
)
def test_error_chunk_raises_server_error(
    chunk: Any, code: str, message: str, retryable: bool
) -> None:
    stream = sse(chat_chunk({"content": "partial"}), chunk)
    with pytest.raises(StreamServerError) as info:
        assemble(stream)
    assert info.value.error.code == code
    assert info.value.error.message == message
    assert info.value.error.status is None
    assert info.value.status == (int(code[5:]) if code.startswith("http_") else None)
    assert info.value.retryable is retryable
    assert isinstance(info.value, StreamError)


def test_truncated_stream_is_incomplete() -> None:
    stream = sse(chat_chunk({"content": "Hel"}), chat_chunk({"content": "lo"}), done=False)
    assembler = assemble(stream)
    assert not assembler.done and assembler.finish_reason is None
    with pytest.raises(StreamIncomplete, match="after 2 chunks"):
        assembler.completion()


def test_no_chunks_is_incomplete() -> None:
    with pytest.raises(StreamIncomplete, match="no chunks"):
        StreamAssembler().completion()
    with pytest.raises(StreamIncomplete, match="no chunks"):
        assemble(b"data: [DONE]\n\n").completion()
    with pytest.raises(StreamIncomplete, match="no choice"):
        assemble(sse({"choices": [], "usage": USAGE})).completion()


def test_finish_reason_without_done_is_complete() -> None:
    stream = sse(chat_chunk({"content": "hi"}), chat_chunk({}, "stop"), done=False)
    assembler = assemble(stream)
    assert not assembler.done
    completion = assembler.completion()
    assert completion.choices[0].finish_reason == "stop" and completion.usage is None


def test_data_after_done_rejected() -> None:
    assembler = StreamAssembler()
    assembler.add("[DONE]")
    with pytest.raises(StreamError, match="after \\[DONE\\]"):
        assembler.add(msgspec.json.encode(chat_chunk({"content": "x"})).decode())
    with pytest.raises(StreamError, match="after \\[DONE\\]"):
        assembler.add("[DONE]")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ('{"choices": [', "not JSON"),
        ("hello", "not JSON"),
        ("", "not JSON"),
        ("[1, 2]", "wrong shape"),
        ('{"choices": "x"}', "wrong shape"),
        ('{"choices": [{"delta": {"content": 5}}]}', "wrong shape"),
        ('{"choices": [{"delta": {"tool_calls": [{"id": "no index"}]}}]}', "wrong shape"),
        ('{"id": "x"}', "neither choices nor usage"),
    ],
)
def test_malformed_chunks_rejected(payload: str, reason: str) -> None:
    with pytest.raises(StreamError, match=reason) as info:
        StreamAssembler().add(payload)
    assert not isinstance(info.value, StreamServerError | StreamIncomplete)


def test_repr_tells_the_state() -> None:
    assembler = assemble(sse(chat_chunk({"content": "x"}, "stop")))
    assert repr(assembler) == (
        "<StreamAssembler chunks=1 got_token=True finish_reason='stop' done=True>"
    )
    assert "pending_line=0" in repr(SSEParser())
