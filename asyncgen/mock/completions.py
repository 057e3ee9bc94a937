"""What the mock answers, decided before anything is sent: the request read and checked, and a
deterministic reply with its usage.

A reply's text is derived from a hash of the model, the prompt, the choice's index and the
seed; ``usage`` counts whitespace-separated words (a prompt counts at least one), and a reply
is cut at ``max_tokens`` with ``finish_reason="length"``. A request with a ``response_format``
of type ``json_schema`` or ``json_object`` gets JSON that fits it (see
:mod:`asyncgen.mock.jsonreply`); ``invalid_json`` makes a share of those replies invalid.
No I/O here: the server sends what these functions return.
"""

from __future__ import annotations

import hashlib
import random
import time
from typing import Any, NamedTuple

import msgspec

from asyncgen.mock.config import MockConfig
from asyncgen.mock.jsonreply import break_json, requested_schema, sample_json

__all__ = ["DEFAULT_MODEL", "Ask", "BadRequest", "Replies", "Reply", "read_body", "read_request"]

_VOCABULARY = (
    "the quiet river turns north past old mills where a clockmaker counts gears and measures"
    " time in brass while students argue about prime numbers under lamps of amber glass seven"
    " bridges cross the town each holding a story of trade salt wool iron bread and letters"
    " carried by night"
)
_WORDS = tuple(_VOCABULARY.split())
DEFAULT_MODEL = "mock-model"
"""What ``/models`` lists when the config names no models."""
_encode = msgspec.json.encode


class BadRequest(Exception):
    """A request the mock refuses as OpenAI would, before any fault or budget applies."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Ask(NamedTuple):
    """A generation request, read and checked."""

    model: str
    prompt: str
    stream: bool
    include_usage: bool
    """Streamed with ``stream_options.include_usage``: a usage chunk comes last."""
    limit: int | None
    """``max_completion_tokens`` or ``max_tokens``."""
    n: int
    schema: dict[str, Any] | None
    """The JSON schema a ``response_format`` asks for (``{}`` for any JSON object)."""


def read_body(raw: bytes, *, models: list[str]) -> tuple[dict[str, Any], str]:
    """A request's JSON object and its model, or :class:`BadRequest` as OpenAI words it."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise BadRequest(400, "We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise BadRequest(400, "The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest(400, "You must provide a model parameter.")
    if models and model not in models:
        raise BadRequest(404, f"The model `{model}` does not exist.", "model_not_found")
    return body, model


def read_request(raw: bytes, *, chat: bool, models: list[str]) -> Ask:
    """The request in ``raw``, or :class:`BadRequest` worded like OpenAI's refusal of it
    (``models``: those served; empty accepts any)."""
    body, model = read_body(raw, models=models)
    prompt = _prompt_text(body, chat)
    if prompt is None:
        what = "'messages' must be a non-empty list" if chat else "'prompt' is required"
        raise BadRequest(400, what)
    stream = bool(body.get("stream"))
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise BadRequest(400, "max_tokens must be a positive integer.")
    n = body.get("n", 1)
    if not isinstance(n, int) or not 1 <= n <= 128:
        raise BadRequest(400, "n must be an integer between 1 and 128.")
    try:
        schema = requested_schema(body.get("response_format"))
    except ValueError as exc:
        raise BadRequest(400, str(exc)) from None
    return Ask(model, prompt, stream, include_usage, limit, n, schema)


def _prompt_text(body: dict[str, Any], chat: bool) -> str | None:
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                return None
            content = message.get("content")
            if isinstance(content, list):  # content parts
                content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(str(content or ""))
        return "\n".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = " ".join(str(p) for p in prompt)
    return prompt if isinstance(prompt, str) else None


def _generate(model: str, prompt: str, seed: int, index: int, words: int) -> str:
    digest = hashlib.blake2b(
        f"{seed}\0{model}\0{index}\0{prompt}".encode(), digest_size=32
    ).digest()
    n = len(_WORDS)
    return " ".join(_WORDS[(digest[i % 32] + i * 7) % n] for i in range(words))


class Reply(NamedTuple):
    """One generation reply, computed before anything is sent: its tokens are its cost."""

    id: str
    model: str
    chat: bool
    texts: list[str]
    finish: str
    prompt_tokens: int
    steps: int
    """Tokens (words) per choice, at most; the choices are generated side by side."""
    invalid: bool = False
    """A structured reply made invalid on purpose."""

    @property
    def completion_tokens(self) -> int:
        return self.steps * len(self.texts)

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }

    def body(self) -> bytes:
        """The whole reply as one JSON body (``stream: false``)."""
        choices: list[dict[str, Any]] = []
        for index, text in enumerate(self.texts):
            if self.chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": self.finish,
                    }
                )
            else:
                choices.append(
                    {"index": index, "text": text, "logprobs": None, "finish_reason": self.finish}
                )
        reply = {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }
        return _encode(reply)


class Replies:
    """Makes the replies of one server: numbered ids, and the draws that spoil structured
    replies on their own random stream, so asking for JSON does not shift the other faults."""

    def __init__(self, config: MockConfig) -> None:
        self._config = config
        self._invalid_rng = random.Random(f"{config.seed}/invalid_json")
        self._ids = 0

    def make(self, ask: Ask, *, chat: bool) -> Reply:
        """The reply to ``ask``: plain words, or JSON fitting its schema."""
        cfg = self._config
        invalid = False
        if ask.schema is None:
            limit = ask.limit
            words = cfg.output_tokens if limit is None else min(cfg.output_tokens, limit)
            finish = "length" if limit is not None and limit < cfg.output_tokens else "stop"
            texts = [
                _generate(ask.model, ask.prompt, cfg.seed, index, words) for index in range(ask.n)
            ]
        else:
            texts, finish, invalid = self._structured(ask, ask.schema)
            words = max(len(text.split(" ")) for text in texts)
        self._ids += 1
        return Reply(
            id=f"{'chatcmpl' if chat else 'cmpl'}-mock{self._ids:012d}",
            model=ask.model,
            chat=chat,
            texts=texts,
            finish=finish,
            prompt_tokens=max(1, len(ask.prompt.split())),
            steps=words,
            invalid=invalid,
        )

    def _structured(self, ask: Ask, schema: dict[str, Any]) -> tuple[list[str], str, bool]:
        """JSON texts fitting ``schema`` (a token is a space-separated piece), the finish
        reason, and whether one was made invalid."""
        cfg = self._config
        texts: list[str] = []
        finish, invalid = "stop", False
        for index in range(ask.n):
            rng = random.Random(f"{cfg.seed}\0{ask.model}\0{index}\0{ask.prompt}")
            value = sample_json(schema, rng, _WORDS)
            text = _encode(value).decode()
            if cfg.invalid_json and self._invalid_rng.random() < cfg.invalid_json:
                text, cut = break_json(value, rng)
                invalid = True
                finish = "length" if cut else finish
            pieces = text.split(" ")
            if ask.limit is not None and ask.limit < len(pieces):
                text, finish = " ".join(pieces[: ask.limit]), "length"
            texts.append(text)
        return texts, finish, invalid
