"""An OpenAI/vLLM-compatible mock server with latency, load, rate limits and fault injection.

Routes (under ``/v1`` like OpenAI and ``vllm serve``): ``POST /chat/completions``,
``POST /completions``, ``GET /models``; plus ``GET /health`` (vLLM) and, for tests and
benchmarks, ``GET /mock/stats`` and ``POST /mock/reset``.

Replies are deterministic: the text is derived from a hash of the model, the prompt and the
seed, ``usage`` counts whitespace-separated words, and a reply is cut at ``max_tokens`` with
``finish_reason="length"``. ``stream: true`` answers with server-sent events like OpenAI and
vLLM: a role chunk (chat), one chunk per word, a ``finish_reason`` chunk, a usage chunk when
``stream_options.include_usage`` is set, then ``data: [DONE]``. A request with a
``response_format`` of type ``json_schema`` or ``json_object`` gets JSON that fits it (see
``asyncgen.mock.jsonreply``); ``invalid_json`` makes a share of those replies invalid.

A generation request goes through, in order:

1. the rate budgets (``rpm_limit``, ``tpm_limit``; see ``asyncgen.mock.budget``): a request
   that does not fit is refused with OpenAI's 429 and ``retry-after-ms``; replies carry
   ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` unless ``ratelimit_headers`` is
   off;
2. the faults, drawn per request: dropped connection, hang, 429 with ``retry-after`` /
   ``retry-after-ms``, then (after the latency) 500, 503, malformed 200;
3. the running slots (``max_running``): requests beyond it wait in FIFO order, like vLLM's
   waiting queue;
4. generation: ``latency`` to the first token, then ``token_latency`` per token, slowed by
   ``load_slowdown`` for each other request generating at the same time. A stream may be cut
   (``stream_cut``) or stall for ``hang_seconds`` (``stream_stall``) part-way.

Use it as an async context manager (``async with MockServer(MockConfig(...)) as server``) or
as ``asyncgen mock-server``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import math
import os
import random
import signal
import sys
import time
from collections import Counter
from types import TracebackType
from typing import Any, NamedTuple

import msgspec
from aiohttp import web

from asyncgen.mock.budget import RateBudgets, RunningSlots
from asyncgen.mock.jsonreply import break_json, requested_schema, sample_json

__all__ = ["MockConfig", "MockServer", "MockStats", "add_arguments", "main_from_args"]

_PROBABILITIES = (
    "fail_429",
    "fail_500",
    "fail_503",
    "drop",
    "hang",
    "malformed",
    "stream_cut",
    "stream_stall",
    "invalid_json",
)
_NON_NEGATIVE = (
    "latency",
    "latency_jitter",
    "retry_after",
    "hang_seconds",
    "token_latency",
    "load_slowdown",
)


class MockConfig(msgspec.Struct, kw_only=True):
    """How the mock behaves. Probabilities are per generation request, in [0, 1]."""

    latency: float = 0.0
    """Seconds before a reply (or a stream's first token), on average."""
    latency_jitter: float = 0.0
    """Latency is drawn uniformly from ``latency ± latency_jitter`` (never below 0)."""
    seed: int = 0
    output_tokens: int = 32
    """Words in a reply that is not cut short by ``max_tokens``."""
    models: list[str] = msgspec.field(default_factory=list)
    """Models served; when empty, any model name is accepted (``/models`` lists ``mock-model``)."""
    api_key: str | None = None
    """When set, requests must carry ``Authorization: Bearer <api_key>``."""
    fail_429: float = 0.0
    retry_after: float = 1.0
    """Seconds announced by a 429 in ``retry-after-ms`` (and rounded up in ``retry-after``)."""
    fail_500: float = 0.0
    fail_503: float = 0.0
    drop: float = 0.0
    """Close the connection without a reply."""
    hang: float = 0.0
    """Wait ``hang_seconds`` before replying."""
    hang_seconds: float = 3600.0
    malformed: float = 0.0
    """Reply 200 with an empty, truncated or non-JSON body."""
    rpm_limit: float | None = None
    """Requests per minute admitted (a leaky bucket); beyond it, 429 ``rate_limit_exceeded``."""
    tpm_limit: float | None = None
    """Tokens (prompt + completion) per minute admitted, like ``rpm_limit``."""
    limit_burst: float = 1.0
    """Seconds of budget each bucket holds (at least one request, and any one request's tokens)."""
    ratelimit_headers: bool = True
    """Announce the budgets in ``x-ratelimit-*`` headers (off: a gateway that hides them)."""
    max_running: int | None = None
    """At most this many requests generate at once; the rest wait in FIFO order."""
    token_latency: float = 0.0
    """Seconds per output token, after ``latency``."""
    load_slowdown: float = 0.0
    """Per-token time grows by this fraction for each other request generating at once."""
    stream_comments: bool = False
    """Streams also carry SSE comments and blank lines, and split events across writes."""
    stream_cut: float = 0.0
    """Close a stream abruptly after some content (no finish chunk, no ``[DONE]``)."""
    stream_stall: float = 0.0
    """Pause a stream for ``hang_seconds`` after some content, then finish it."""
    invalid_json: float = 0.0
    """Share of structured replies (``response_format`` JSON) that are invalid: cut short
    (``finish_reason`` "length") or missing a field."""

    def __post_init__(self) -> None:
        for name in _PROBABILITIES:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in _NON_NEGATIVE:
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative")
        if self.output_tokens < 1:
            raise ValueError("output_tokens must be at least 1")
        for name in ("rpm_limit", "tpm_limit"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value}")
        if not 0 < self.limit_burst < math.inf:
            raise ValueError(
                f"limit_burst must be a positive number of seconds, got {self.limit_burst}"
            )
        if self.max_running is not None and self.max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {self.max_running}")


class MockStats(msgspec.Struct, frozen=True):
    """What the server saw: generation ``requests``, their outcomes, hits per route, the tokens
    of complete replies, refusals by the rate budgets, and the most requests generating at once.

    Outcomes: ``ok``, ``hang``, ``rate_limited`` (the budgets), the injected ``drop``, ``429``,
    ``500``, ``503``, ``malformed``, ``stream_cut``, ``stream_stalled``; ``disconnected`` (the
    client left mid-stream); and the client's errors ``400``, ``401``, ``404``."""

    requests: int
    by_outcome: dict[str, int]
    by_route: dict[str, int]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0
    max_running_seen: int = 0
    invalid_json: int = 0
    """Complete structured replies that were made invalid on purpose."""


_VOCABULARY = (
    "the quiet river turns north past old mills where a clockmaker counts gears and measures"
    " time in brass while students argue about prime numbers under lamps of amber glass seven"
    " bridges cross the town each holding a story of trade salt wool iron bread and letters"
    " carried by night"
)
_WORDS = tuple(_VOCABULARY.split())
_DEFAULT_MODEL = "mock-model"
_encode = msgspec.json.encode
_decode = msgspec.json.decode


def _error(status: int, message: str, kind: str, code: str | None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(status=status, body=_encode(body), content_type="application/json")


def _vllm_error(status: int, message: str, kind: str) -> web.Response:
    """vLLM's flat error object, so clients are exercised on both shapes."""
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.Response(status=status, body=_encode(body), content_type="application/json")


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


def _retry_after(response: web.StreamResponse, ms: int) -> None:
    response.headers["retry-after-ms"] = str(ms)
    response.headers["retry-after"] = str(max(1, math.ceil(ms / 1000)))


class _Reply(NamedTuple):
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

    def choice(
        self, index: int, text: str, *, role: bool = False, finish: str | None = None
    ) -> dict[str, Any]:
        """A chunk's choice: the role (chat only), a piece of text, or the finish reason."""
        if not self.chat:
            return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
        delta = (
            {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        )
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    def event(
        self,
        created: int,
        choices: list[dict[str, Any]],
        include_usage: bool,
        usage: dict[str, int] | None = None,
    ) -> bytes:
        chunk: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": self.model,
            "choices": choices,
        }
        if include_usage:  # OpenAI sends "usage": null on every chunk but the last
            chunk["usage"] = usage
        return b"data: " + _encode(chunk) + b"\n\n"


_DONE = b"data: [DONE]\n\n"


class _EventWriter:
    """Writes SSE events; given an rng, it also writes keep-alive comments and blank lines,
    and splits events across writes, so client parsers are exercised."""

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


class MockServer:
    """The mock on ``host:port`` (port 0 picks a free one) for the life of the context."""

    def __init__(
        self, config: MockConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = cfg = config or MockConfig()
        self.host = host
        self._requested_port = port
        self.port = 0
        self._rng = random.Random(cfg.seed)
        # Its own stream of draws, so asking for JSON does not shift the other faults.
        self._invalid_rng = random.Random(f"{cfg.seed}/invalid_json")
        self._invalid_json = 0
        self._requests = 0
        self._outcomes: Counter[str] = Counter()
        self._routes: Counter[str] = Counter()
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._rate_limited = 0
        self._budgets: RateBudgets | None = None
        if cfg.rpm_limit is not None or cfg.tpm_limit is not None:
            self._budgets = RateBudgets(cfg.rpm_limit, cfg.tpm_limit, cfg.limit_burst)
        self._slots = RunningSlots(cfg.max_running)
        self._runner: web.AppRunner | None = None
        self._ids = 0

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the mock server is not running")
        return f"http://{self.host}:{self.port}/v1"

    def stats(self) -> MockStats:
        return MockStats(
            self._requests,
            dict(self._outcomes),
            dict(self._routes),
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            rate_limited=self._rate_limited,
            max_running_seen=self._slots.peak,
            invalid_json=self._invalid_json,
        )

    def reset_stats(self) -> None:
        """Zero the counters and empty the rate budgets' buckets."""
        self._requests = 0
        self._outcomes.clear()
        self._routes.clear()
        self._prompt_tokens = self._completion_tokens = self._rate_limited = 0
        self._invalid_json = 0
        self._slots.reset_peak()
        if self._budgets is not None:
            self._budgets.clear()

    def __repr__(self) -> str:
        state = f"at {self.base_url}" if self.port else "stopped"
        slots = self._slots
        return (
            f"<MockServer {state} requests={self._requests} running={slots.running} "
            f"waiting={slots.waiting}>"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/mock/stats", self._stats)
        app.router.add_post("/mock/reset", self._reset)
        # Hung handlers are cancelled at shutdown instead of holding it for hang_seconds.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._requested_port, backlog=4096)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    async def aclose(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- handlers ----------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        return key is None or request.headers.get("Authorization") == f"Bearer {key}"

    def _unauthorized(self) -> web.Response:
        # Unlike OpenAI, which echoes a masked key, say nothing about the key that was sent.
        return _error(
            401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
        )

    async def _health(self, request: web.Request) -> web.Response:
        self._routes["/health"] += 1
        return web.Response(status=200)

    async def _stats(self, request: web.Request) -> web.Response:
        return web.Response(body=_encode(self.stats()), content_type="application/json")

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset_stats()
        return web.Response(body=b"{}", content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        self._routes["/v1/models"] += 1
        if not self._authorized(request):
            return self._unauthorized()
        created = int(time.time())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "asyncgen-mock"}
            for m in (self.config.models or [_DEFAULT_MODEL])
        ]
        return web.Response(
            body=_encode({"object": "list", "data": data}), content_type="application/json"
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=False)

    async def _generation(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        route = request.path
        self._routes[route] += 1
        self._requests += 1
        outcome, response = await self._answer(request, chat)
        self._outcomes[outcome] += 1
        return response

    async def _answer(self, request: web.Request, chat: bool) -> tuple[str, web.StreamResponse]:
        cfg = self.config
        if not self._authorized(request):
            return "401", self._unauthorized()
        raw = await request.read()
        try:
            body = _decode(raw)
        except msgspec.DecodeError:
            return "400", _error(
                400,
                "We could not parse the JSON body of your request.",
                "invalid_request_error",
                None,
            )
        if not isinstance(body, dict):
            return "400", _error(
                400, "The request body must be a JSON object.", "invalid_request_error", None
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return "400", _error(
                400, "You must provide a model parameter.", "invalid_request_error", None
            )
        if cfg.models and model not in cfg.models:
            return "404", _error(
                404,
                f"The model `{model}` does not exist.",
                "invalid_request_error",
                "model_not_found",
            )
        prompt = _prompt_text(body, chat)
        if prompt is None:
            what = "'messages' must be a non-empty list" if chat else "'prompt' is required"
            return "400", _error(400, what, "invalid_request_error", None)
        stream = bool(body.get("stream"))
        options = body.get("stream_options")
        include_usage = (
            stream and isinstance(options, dict) and options.get("include_usage") is True
        )
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            return "400", _error(
                400, "max_tokens must be a positive integer.", "invalid_request_error", None
            )
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= 128:
            return "400", _error(
                400, "n must be an integer between 1 and 128.", "invalid_request_error", None
            )
        try:
            schema = requested_schema(body.get("response_format"))
        except ValueError as exc:
            return "400", _error(400, str(exc), "invalid_request_error", None)
        reply = self._reply(model, prompt, chat, limit, n, schema)

        headers: dict[str, str] = {}
        if self._budgets is not None:
            now = asyncio.get_running_loop().time()
            verdict = self._budgets.admit(reply.prompt_tokens + reply.completion_tokens, now)
            if cfg.ratelimit_headers:
                headers = verdict.headers
            if not verdict.admitted:
                self._rate_limited += 1
                response = _error(429, verdict.message, verdict.kind, "rate_limit_exceeded")
                _retry_after(response, math.ceil(verdict.wait * 1000))
                response.headers.update(headers)
                return "rate_limited", response

        rng = self._rng
        draw = rng.random()
        if draw < cfg.drop:
            await self._sleep_latency()
            if request.transport is not None:
                request.transport.abort()
            return "drop", web.Response(status=500)
        draw -= cfg.drop
        if draw < cfg.hang:
            await asyncio.sleep(cfg.hang_seconds)
            if stream:
                outcome, streamed = await self._stream(request, reply, headers, include_usage)
                return ("hang" if outcome == "ok" else outcome), streamed
            self._count(reply)
            return "hang", self._json(reply, headers)
        draw -= cfg.hang
        if draw < cfg.fail_429:
            response = _error(
                429, "Rate limit reached for requests (mock).", "requests", "rate_limit_exceeded"
            )
            _retry_after(response, round(cfg.retry_after * 1000))
            response.headers.update(headers)
            return "429", response
        draw -= cfg.fail_429
        async with self._slots.hold():
            await self._sleep_latency()
            if draw < cfg.fail_500:
                response = _error(
                    500,
                    "The server had an error while processing your request.",
                    "server_error",
                    None,
                )
                response.headers.update(headers)
                return "500", response
            draw -= cfg.fail_500
            if draw < cfg.fail_503:
                response = _vllm_error(
                    503, "The engine is overloaded; try again later.", "ServiceUnavailableError"
                )
                response.headers.update(headers)
                return "503", response
            draw -= cfg.fail_503
            if draw < cfg.malformed:
                full = reply.body()
                variants = (b"", full[: len(full) // 2], b"<html>Bad Gateway</html>", b"{}")
                broken = variants[rng.randrange(len(variants))]
                return "malformed", web.Response(
                    status=200, body=broken, content_type="application/json", headers=headers
                )
            if stream:
                return await self._stream(request, reply, headers, include_usage)
            await self._decode(reply.steps)
        self._count(reply)
        return "ok", self._json(reply, headers)

    def _reply(
        self,
        model: str,
        prompt: str,
        chat: bool,
        limit: int | None,
        n: int,
        schema: dict[str, Any] | None = None,
    ) -> _Reply:
        cfg = self.config
        invalid = False
        if schema is None:
            words = cfg.output_tokens if limit is None else min(cfg.output_tokens, limit)
            finish = "length" if limit is not None and limit < cfg.output_tokens else "stop"
            texts = [_generate(model, prompt, cfg.seed, index, words) for index in range(n)]
        else:
            texts, finish, invalid = self._structured(model, prompt, limit, n, schema)
            words = max(len(text.split(" ")) for text in texts)
        self._ids += 1
        return _Reply(
            id=f"{'chatcmpl' if chat else 'cmpl'}-mock{self._ids:012d}",
            model=model,
            chat=chat,
            texts=texts,
            finish=finish,
            prompt_tokens=max(1, len(prompt.split())),
            steps=words,
            invalid=invalid,
        )

    def _structured(
        self, model: str, prompt: str, limit: int | None, n: int, schema: dict[str, Any]
    ) -> tuple[list[str], str, bool]:
        """JSON texts fitting ``schema`` (a token is a space-separated piece), the finish
        reason, and whether one was made invalid."""
        cfg = self.config
        texts: list[str] = []
        finish, invalid = "stop", False
        for index in range(n):
            rng = random.Random(f"{cfg.seed}\0{model}\0{index}\0{prompt}")
            value = sample_json(schema, rng, _WORDS)
            text = _encode(value).decode()
            if cfg.invalid_json and self._invalid_rng.random() < cfg.invalid_json:
                text, cut = break_json(value, rng)
                invalid = True
                finish = "length" if cut else finish
            pieces = text.split(" ")
            if limit is not None and limit < len(pieces):
                text, finish = " ".join(pieces[:limit]), "length"
            texts.append(text)
        return texts, finish, invalid

    def _json(self, reply: _Reply, headers: dict[str, str]) -> web.Response:
        return web.Response(body=reply.body(), content_type="application/json", headers=headers)

    def _count(self, reply: _Reply) -> None:
        self._prompt_tokens += reply.prompt_tokens
        self._completion_tokens += reply.completion_tokens
        self._invalid_json += reply.invalid

    async def _sleep_latency(self) -> None:
        cfg = self.config
        delay = cfg.latency
        if cfg.latency_jitter:
            delay = max(0.0, delay + self._rng.uniform(-cfg.latency_jitter, cfg.latency_jitter))
        if delay:
            await asyncio.sleep(delay)

    def _token_time(self) -> float:
        """Seconds per token now: decode slows as the batch of generating requests grows."""
        cfg = self.config
        return cfg.token_latency * (1.0 + cfg.load_slowdown * max(0, self._slots.running - 1))

    async def _decode(self, steps: int) -> None:
        cfg = self.config
        if not cfg.token_latency:
            return
        if not cfg.load_slowdown:
            await asyncio.sleep(steps * cfg.token_latency)
            return
        for _ in range(steps):  # token by token, since the batch changes as we go
            await asyncio.sleep(self._token_time())

    async def _stream(
        self, request: web.Request, reply: _Reply, headers: dict[str, str], include_usage: bool
    ) -> tuple[str, web.StreamResponse]:
        """Send ``reply`` as server-sent events, one chunk per token, maybe cut or stalled."""
        cfg = self.config
        # Cut points and comments come from the reply's own rng, so they do not shift the
        # fault draws of other requests.
        local = random.Random(f"{cfg.seed}/{reply.id}")
        cut_at = stall_at = 0
        if cfg.stream_cut or cfg.stream_stall:
            draw = self._rng.random()
            if draw < cfg.stream_cut:
                cut_at = local.randint(1, reply.steps)
            elif draw - cfg.stream_cut < cfg.stream_stall:
                stall_at = local.randint(1, reply.steps)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        writer = _EventWriter(response, local if cfg.stream_comments else None)
        created = int(time.time())
        words = [text.split(" ") for text in reply.texts]
        try:
            await response.prepare(request)
            if reply.chat:
                for index in range(len(words)):
                    choice = reply.choice(index, "", role=True)
                    await writer.send(reply.event(created, [choice], include_usage))
            for step in range(reply.steps):
                if step and cfg.token_latency:
                    await asyncio.sleep(self._token_time())
                for index, choice_words in enumerate(words):
                    if step >= len(choice_words):  # a shorter structured reply is done
                        continue
                    piece = choice_words[step] if step == 0 else " " + choice_words[step]
                    choice = reply.choice(index, piece)
                    await writer.send(reply.event(created, [choice], include_usage))
                if step + 1 == cut_at:
                    if request.transport is not None:
                        request.transport.abort()
                    return "stream_cut", response
                if step + 1 == stall_at:
                    await asyncio.sleep(cfg.hang_seconds)
            for index in range(len(words)):
                choice = reply.choice(index, "", finish=reply.finish)
                await writer.send(reply.event(created, [choice], include_usage))
            if include_usage:
                await writer.send(reply.event(created, [], include_usage, reply.usage()))
            await writer.send(_DONE)
        except ConnectionError:  # the client went away
            return "disconnected", response
        self._count(reply)
        return ("stream_stalled" if stall_at else "ok"), response


# -- command line ----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``asyncgen mock-server`` flags."""
    d = MockConfig()
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    add("--port", type=int, default=8000, help="port; 0 picks a free one (default: %(default)s)")
    add("--latency", type=float, default=d.latency, help="mean seconds per reply (default: 0)")
    add(
        "--latency-jitter",
        type=float,
        default=d.latency_jitter,
        help="latency varies uniformly by ± this many seconds (default: 0)",
    )
    add("--seed", type=int, default=d.seed, help="seed for replies and faults (default: 0)")
    add(
        "--output-tokens",
        type=int,
        default=d.output_tokens,
        help="words per reply unless max_tokens cuts it (default: %(default)s)",
    )
    add(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="serve only this model (repeatable); default: accept any model name",
    )
    add(
        "--api-key-env",
        metavar="VAR",
        help="require the API key held in this environment variable (default: no auth)",
    )
    add(
        "--fail-429",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of 429 Too Many Requests",
    )
    add(
        "--retry-after",
        type=float,
        default=d.retry_after,
        metavar="SECONDS",
        help="delay announced by 429s (default: %(default)s)",
    )
    add("--fail-500", type=float, default=0.0, metavar="P", help="probability of a 500")
    add("--fail-503", type=float, default=0.0, metavar="P", help="probability of a 503")
    add(
        "--drop",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of closing the connection without a reply",
    )
    add("--hang", type=float, default=0.0, metavar="P", help="probability of hanging")
    add(
        "--hang-seconds",
        type=float,
        default=d.hang_seconds,
        help="how long a hang lasts (default: %(default)s)",
    )
    add(
        "--malformed",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of a 200 with an empty, truncated or non-JSON body",
    )
    add(
        "--rpm-limit",
        type=float,
        metavar="N",
        help="admit at most N requests per minute (a leaky bucket); beyond it, 429 with "
        "retry-after-ms (default: no limit)",
    )
    add(
        "--tpm-limit",
        type=float,
        metavar="N",
        help="admit at most N tokens (prompt + completion) per minute (default: no limit)",
    )
    add(
        "--limit-burst",
        type=float,
        default=d.limit_burst,
        metavar="SECONDS",
        help="seconds of budget the rate buckets hold (default: %(default)s)",
    )
    add(
        "--no-ratelimit-headers",
        dest="ratelimit_headers",
        action="store_false",
        help="do not announce the budgets in x-ratelimit-* headers",
    )
    add(
        "--max-running",
        type=int,
        metavar="N",
        help="at most N requests generate at once; the rest wait in FIFO order (default: no limit)",
    )
    add(
        "--token-latency",
        type=float,
        default=d.token_latency,
        metavar="SECONDS",
        help="seconds per output token, after --latency (default: 0)",
    )
    add(
        "--load-slowdown",
        type=float,
        default=d.load_slowdown,
        metavar="F",
        help="per-token time grows by F for each other request generating at once (default: 0)",
    )
    add(
        "--stream-comments",
        action="store_true",
        help="streams also carry SSE comments and blank lines, and split events across writes",
    )
    add(
        "--stream-cut",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of closing a stream abruptly part-way (no [DONE])",
    )
    add(
        "--stream-stall",
        type=float,
        default=0.0,
        metavar="P",
        help="probability of a stream pausing for --hang-seconds part-way",
    )
    add(
        "--invalid-json",
        type=float,
        default=0.0,
        metavar="RATE",
        help="share of structured replies (response_format json_schema / json_object) that "
        "are invalid: cut short or missing a field (default: 0)",
    )


def config_from_args(args: argparse.Namespace) -> MockConfig:
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise ValueError(f"--api-key-env: environment variable {args.api_key_env} is not set")
    return MockConfig(
        latency=args.latency,
        latency_jitter=args.latency_jitter,
        seed=args.seed,
        output_tokens=args.output_tokens,
        models=args.models or [],
        api_key=api_key,
        fail_429=args.fail_429,
        retry_after=args.retry_after,
        fail_500=args.fail_500,
        fail_503=args.fail_503,
        drop=args.drop,
        hang=args.hang,
        hang_seconds=args.hang_seconds,
        malformed=args.malformed,
        rpm_limit=args.rpm_limit,
        tpm_limit=args.tpm_limit,
        limit_burst=args.limit_burst,
        ratelimit_headers=args.ratelimit_headers,
        max_running=args.max_running,
        token_latency=args.token_latency,
        load_slowdown=args.load_slowdown,
        stream_comments=args.stream_comments,
        stream_cut=args.stream_cut,
        stream_stall=args.stream_stall,
        invalid_json=args.invalid_json,
    )


async def serve(config: MockConfig, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with MockServer(config, host=host, port=port) as server:
        print(f"asyncgen mock server listening on {server.base_url}", flush=True)
        await stop.wait()
        stats = server.stats()
        print(
            f"asyncgen mock server: {stats.requests} requests, outcomes {stats.by_outcome}",
            file=sys.stderr,
            flush=True,
        )


def main_from_args(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"asyncgen mock-server: error: {exc}", file=sys.stderr)
        return 2
    import uvloop

    try:
        uvloop.run(serve(config, args.host, args.port))
    except OSError as exc:
        print(
            f"asyncgen mock-server: error: cannot listen on {args.host}:{args.port}: {exc}",
            file=sys.stderr,
        )
        return 2
    return 0
