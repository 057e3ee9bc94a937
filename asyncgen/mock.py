"""An OpenAI/vLLM-compatible mock server with latency and fault injection, on loopback.

Routes (under ``/v1`` like OpenAI and ``vllm serve``): ``POST /chat/completions``,
``POST /completions``, ``GET /models``; plus ``GET /health`` (vLLM) and, for tests and
benchmarks, ``GET /mock/stats`` and ``POST /mock/reset``.

Replies are deterministic: the text is derived from a hash of the model, the prompt and the
seed, ``usage`` counts whitespace-separated words, and a reply is cut at ``max_tokens`` with
``finish_reason="length"``. Faults are drawn per generation request, in this order: dropped
connection, hang, 429 with ``retry-after`` / ``retry-after-ms``, 500, 503, malformed 200.

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
from typing import Any

import msgspec
from aiohttp import web

__all__ = ["MockConfig", "MockServer", "MockStats", "add_arguments", "main_from_args"]


class MockConfig(msgspec.Struct, kw_only=True):
    """How the mock behaves. Probabilities are per generation request, in [0, 1]."""

    latency: float = 0.0
    """Seconds before a reply, on average."""
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

    def __post_init__(self) -> None:
        for name in ("fail_429", "fail_500", "fail_503", "drop", "hang", "malformed"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        for name in ("latency", "latency_jitter", "retry_after", "hang_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.output_tokens < 1:
            raise ValueError("output_tokens must be at least 1")


class MockStats(msgspec.Struct, frozen=True):
    """What the server saw: generation ``requests``, their outcomes, and hits per route."""

    requests: int
    by_outcome: dict[str, int]
    by_route: dict[str, int]


_WORDS = (
    "the",
    "quiet",
    "river",
    "turns",
    "north",
    "past",
    "old",
    "mills",
    "where",
    "a",
    "clockmaker",
    "counts",
    "gears",
    "and",
    "measures",
    "time",
    "in",
    "brass",
    "while",
    "students",
    "argue",
    "about",
    "prime",
    "numbers",
    "under",
    "lamps",
    "of",
    "amber",
    "glass",
    "seven",
    "bridges",
    "cross",
    "the",
    "town",
    "each",
    "holding",
    "a",
    "story",
    "of",
    "trade",
    "salt",
    "wool",
    "iron",
    "bread",
    "and",
    "letters",
    "carried",
    "by",
    "night",
)
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


class MockServer:
    """The mock on ``host:port`` (port 0 picks a free one) for the life of the context."""

    def __init__(
        self, config: MockConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config or MockConfig()
        self.host = host
        self._requested_port = port
        self.port = 0
        self._rng = random.Random(self.config.seed)
        self._requests = 0
        self._outcomes: Counter[str] = Counter()
        self._routes: Counter[str] = Counter()
        self._runner: web.AppRunner | None = None
        self._ids = 0

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the mock server is not running")
        return f"http://{self.host}:{self.port}/v1"

    def stats(self) -> MockStats:
        return MockStats(self._requests, dict(self._outcomes), dict(self._routes))

    def reset_stats(self) -> None:
        self._requests = 0
        self._outcomes.clear()
        self._routes.clear()

    def __repr__(self) -> str:
        state = f"at {self.base_url}" if self.port else "stopped"
        return f"<MockServer {state} requests={self._requests}>"

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
        if body.get("stream"):
            return "400", _error(
                400,
                "stream=true is not supported by the asyncgen mock.",
                "invalid_request_error",
                None,
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
            return "hang", self._completion(model, prompt, chat, limit, n)
        draw -= cfg.hang
        if draw < cfg.fail_429:
            response = _error(
                429, "Rate limit reached for requests (mock).", "requests", "rate_limit_exceeded"
            )
            response.headers["retry-after"] = str(max(1, math.ceil(cfg.retry_after)))
            response.headers["retry-after-ms"] = str(round(cfg.retry_after * 1000))
            return "429", response
        draw -= cfg.fail_429
        await self._sleep_latency()
        if draw < cfg.fail_500:
            return "500", _error(
                500, "The server had an error while processing your request.", "server_error", None
            )
        draw -= cfg.fail_500
        if draw < cfg.fail_503:
            return "503", _vllm_error(
                503, "The engine is overloaded; try again later.", "ServiceUnavailableError"
            )
        draw -= cfg.fail_503
        if draw < cfg.malformed:
            full = self._completion(model, prompt, chat, limit, n).body
            assert isinstance(full, bytes)
            variants = (b"", full[: len(full) // 2], b"<html>Bad Gateway</html>", b"{}")
            broken = variants[rng.randrange(len(variants))]
            return "malformed", web.Response(
                status=200, body=broken, content_type="application/json"
            )
        return "ok", self._completion(model, prompt, chat, limit, n)

    async def _sleep_latency(self) -> None:
        cfg = self.config
        delay = cfg.latency
        if cfg.latency_jitter:
            delay = max(0.0, delay + self._rng.uniform(-cfg.latency_jitter, cfg.latency_jitter))
        if delay:
            await asyncio.sleep(delay)

    def _completion(
        self, model: str, prompt: str, chat: bool, limit: int | None, n: int
    ) -> web.Response:
        cfg = self.config
        words = cfg.output_tokens if limit is None else min(cfg.output_tokens, limit)
        finish = "length" if limit is not None and limit < cfg.output_tokens else "stop"
        choices: list[dict[str, Any]] = []
        for index in range(n):
            text = _generate(model, prompt, cfg.seed, index, words)
            if chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                )
            else:
                choices.append(
                    {"index": index, "text": text, "logprobs": None, "finish_reason": finish}
                )
        prompt_tokens = max(1, len(prompt.split()))
        self._ids += 1
        reply = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-mock{self._ids:012d}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": words * n,
                "total_tokens": prompt_tokens + words * n,
            },
        }
        return web.Response(body=_encode(reply), content_type="application/json")


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
