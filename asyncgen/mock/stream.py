"""A reply as server-sent events, like OpenAI and vLLM, perhaps cut or stalled part-way.

The events: a role chunk per choice (chat), one chunk per word and choice, a
``finish_reason`` chunk per choice, a usage chunk when ``stream_options.include_usage`` is
set (every other chunk then carries ``"usage": null``, as OpenAI's do), then
``data: [DONE]``. ``stream_cut`` closes the connection abruptly after some content (no
finish chunk, no ``[DONE]``); ``stream_stall`` pauses for ``hang_seconds`` after some content,
then finishes. With ``stream_comments`` the stream also carries keep-alive comments and blank
lines and splits events across writes, so client parsers are exercised.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from asyncgen.mock.completions import Reply
from asyncgen.mock.config import MockConfig

__all__ = ["COMPLETE", "send_stream"]

COMPLETE = frozenset({"ok", "stream_stalled"})
"""The outcomes of a stream that was sent to the end, whose tokens count as served."""
_DONE = b"data: [DONE]\n\n"
_encode = msgspec.json.encode


async def send_stream(
    request: web.Request,
    reply: Reply,
    *,
    config: MockConfig,
    rng: random.Random,
    token_time: Callable[[], float],
    headers: dict[str, str],
    include_usage: bool,
) -> tuple[str, web.StreamResponse]:
    """Send ``reply`` as events, one chunk per token ``token_time()`` seconds apart; the
    outcome (``ok``, ``stream_cut``, ``stream_stalled`` or ``disconnected``) and the response.
    ``rng`` is the server's fault stream: it draws whether the stream is cut or stalled."""
    # Cut points and comments come from the reply's own rng, so they do not shift the
    # fault draws of other requests.
    local = random.Random(f"{config.seed}/{reply.id}")
    cut_at = stall_at = 0
    if config.stream_cut or config.stream_stall:
        draw = rng.random()
        if draw < config.stream_cut:
            cut_at = local.randint(1, reply.steps)
        elif draw - config.stream_cut < config.stream_stall:
            stall_at = local.randint(1, reply.steps)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
    )
    writer = _EventWriter(response, local if config.stream_comments else None)
    created = int(time.time())
    words = [text.split(" ") for text in reply.texts]

    async def send(choice: dict[str, Any] | None, usage: dict[str, int] | None = None) -> None:
        choices = [] if choice is None else [choice]
        await writer.send(_event(reply, created, choices, include_usage, usage))

    try:
        await response.prepare(request)
        if reply.chat:
            for index in range(len(words)):
                await send(_choice(reply, index, "", role=True))
        for step in range(reply.steps):
            if step and config.token_latency:
                await asyncio.sleep(token_time())
            for index, choice_words in enumerate(words):
                if step >= len(choice_words):  # a shorter structured reply is done
                    continue
                piece = choice_words[step] if step == 0 else " " + choice_words[step]
                await send(_choice(reply, index, piece))
            if step + 1 == cut_at:
                if request.transport is not None:
                    request.transport.abort()
                return "stream_cut", response
            if step + 1 == stall_at:
                await asyncio.sleep(config.hang_seconds)
        for index in range(len(words)):
            await send(_choice(reply, index, "", finish=reply.finish))
        if include_usage:
            await send(None, reply.usage())
        await writer.send(_DONE)
    except ConnectionError:  # the client went away
        return "disconnected", response
    return ("stream_stalled" if stall_at else "ok"), response


def _choice(
    reply: Reply, index: int, text: str, *, role: bool = False, finish: str | None = None
) -> dict[str, Any]:
    """A chunk's choice: the role (chat only), a piece of text, or the finish reason."""
    if not reply.chat:
        return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _event(
    reply: Reply,
    created: int,
    choices: list[dict[str, Any]],
    include_usage: bool,
    usage: dict[str, int] | None,
) -> bytes:
    chunk: dict[str, Any] = {
        "id": reply.id,
        "object": "chat.completion.chunk" if reply.chat else "text_completion",
        "created": created,
        "model": reply.model,
        "choices": choices,
    }
    if include_usage:  # OpenAI sends "usage": null on every chunk but the last
        chunk["usage"] = usage
    return b"data: " + _encode(chunk) + b"\n\n"


class _EventWriter:
    """Writes SSE events; given an rng, it also writes keep-alive comments and blank lines,
    and splits events across writes."""

    def __init__(self, response: web.StreamResponse, rng: random.Random | None) -> None:
        self._response = response
        self._rng = rng

    async def send(self, event: bytes) -> None:
        write = self._response.write
        if self._rng is None:
            await write(event)
            return
        roll = self._rng.random()
        if roll < 0.2:
            await write(b": keep-alive\n\n")
            await write(event)
        elif roll < 0.4:
            await write(event)
            await write(b"\n" * self._rng.randint(1, 3))
        elif roll < 0.6:
            cut = self._rng.randrange(1, len(event))
            await write(event[:cut])
            await asyncio.sleep(0.001)  # so the halves leave in separate segments
            await write(event[cut:])
        else:
            await write(event)
