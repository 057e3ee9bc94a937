"""An OpenAI/vLLM-compatible mock server with latency, load, rate limits and fault injection.

Routes (under ``/v1`` like OpenAI and ``vllm serve``): ``POST /chat/completions``,
``POST /completions``, ``POST /embeddings`` (see :mod:`asyncgen.mock.embeddings`),
``GET /models``, the Batch API's ``/files`` and ``/batches`` (see
:mod:`asyncgen.mock.batches`); plus ``GET /health`` (vLLM) and, for tests and
benchmarks, ``GET /mock/stats`` (the :meth:`MockServer.statistics`) and ``POST /mock/reset``.

A generation request goes through, in order:

0. whole-server modes: ``broken`` answers 500 on every route (``/models`` and ``/health``
   too), ``quota_exhausted`` refuses every generation as OpenAI refuses an account without
   credits (429 ``insufficient_quota``);
1. reading and checking (400, 401, 404 like OpenAI), then its reply is made, deterministic
   for the model, prompt and seed (see :mod:`asyncgen.mock.completions`): its tokens are its
   cost;
2. the rate budgets (``rpm_limit``, ``tpm_limit``; see :mod:`asyncgen.mock.budget`): a request
   that does not fit is refused with OpenAI's 429 and ``retry-after-ms``; replies carry
   ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` unless ``ratelimit_headers`` is
   off;
3. the faults, drawn per request (see :mod:`asyncgen.mock.faults`): dropped connection, hang,
   429, then (after the latency) 500, 503, malformed 200;
4. the running slots (``max_running``): requests beyond it wait in FIFO order, like vLLM's
   waiting queue (beyond ``max_waiting`` more, a bare 503 at once);
5. generation: ``latency`` to the first token, then ``token_latency`` per token, slowed by
   ``load_slowdown`` for each other request generating at the same time; ``stream: true``
   answers with server-sent events, perhaps cut or stalled (see :mod:`asyncgen.mock.stream`).

Use it as an async context manager (``async with MockServer(MockConfig(...)) as server``) or
as ``asyncgen mock-server``. It imports nothing of asyncgen but the core, so it stays an
independent oracle for the client it tests.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from types import TracebackType

import msgspec
from aiohttp import web

from asyncgen.mock.batches import BatchApi
from asyncgen.mock.budget import RateBudgets, RunningSlots
from asyncgen.mock.completions import (
    DEFAULT_MODEL,
    Ask,
    BadRequest,
    Replies,
    Reply,
    read_request,
)
from asyncgen.mock.config import MockConfig
from asyncgen.mock.embeddings import embeddings_reply, read_embed
from asyncgen.mock.faults import fault_reply, openai_error, pick_fault, set_retry_after, vllm_error
from asyncgen.mock.stream import COMPLETE, send_stream

__all__ = ["MockConfig", "MockServer", "MockStats"]

_encode = msgspec.json.encode


class MockStats(msgspec.Struct, frozen=True):
    """An immutable snapshot of what the server saw: generation ``requests``, their outcomes,
    hits per route, the tokens of complete replies, refusals by the rate budgets, and the most
    requests generating at once.

    Outcomes: ``ok``, ``hang``, ``rate_limited`` (the budgets), ``shed`` (the waiting queue
    was full), ``quota`` (``quota_exhausted``), the injected ``drop``, ``429``, ``500``,
    ``503``, ``malformed``, ``stream_cut``, ``stream_stalled``; ``disconnected`` (the client
    left mid-stream); and the client's errors ``400``, ``401``, ``404``."""

    requests: int
    by_outcome: dict[str, int]
    by_route: dict[str, int]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rate_limited: int = 0
    max_running_seen: int = 0
    invalid_json: int = 0
    """Complete structured replies that were made invalid on purpose."""
    batches_created: int = 0
    """Batch API: batches created (never reset: they are the server's state)."""
    batch_most_submissions: int = 0
    """Batch API: the most created batches any one custom_id was in."""


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
        self._replies = Replies(cfg)
        self._requests = 0
        self._outcomes: Counter[str] = Counter()
        self._routes: Counter[str] = Counter()
        self._prompt_tokens = self._completion_tokens = 0
        self._rate_limited = self._invalid_json = 0
        self._budgets: RateBudgets | None = None
        if cfg.rpm_limit is not None or cfg.tpm_limit is not None:
            self._budgets = RateBudgets(cfg.rpm_limit, cfg.tpm_limit, cfg.limit_burst)
        self._slots = RunningSlots(cfg.max_running)
        self.batches = BatchApi(
            cfg, self._replies, self._authorized, self._unauthorized, self._rng.random
        )
        """The Batch API's files and batches (see :mod:`asyncgen.mock.batches`)."""
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        if not self.port:
            raise RuntimeError("the mock server is not running")
        return f"http://{self.host}:{self.port}/v1"

    def statistics(self) -> MockStats:
        """What the server has seen since it started or was last reset."""
        return MockStats(
            self._requests,
            dict(self._outcomes),
            dict(self._routes),
            prompt_tokens=self._prompt_tokens,
            completion_tokens=self._completion_tokens,
            rate_limited=self._rate_limited,
            max_running_seen=self._slots.peak,
            invalid_json=self._invalid_json,
            batches_created=len(self.batches.created),
            batch_most_submissions=max(self.batches.submitted.values(), default=0),
        )

    def reset_statistics(self) -> None:
        """Zero the counters and empty the rate budgets' buckets."""
        self._requests = 0
        self._outcomes.clear()
        self._routes.clear()
        self._prompt_tokens = self._completion_tokens = 0
        self._rate_limited = self._invalid_json = 0
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

    @web.middleware
    async def _broken(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self.config.broken or request.path.startswith("/mock/"):
            return await handler(request)
        self._routes[request.path] += 1
        if request.path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
            self._requests += 1
            self._outcomes["500"] += 1
        return openai_error(
            500, "The server had an error while processing your request.", "server_error", None
        )

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[self._broken])
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/mock/stats", self._statistics)
        app.router.add_post("/mock/reset", self._reset)
        self.batches.add_routes(app)
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

    # -- routes ------------------------------------------------------------------------------

    def _authorized(self, request: web.Request) -> bool:
        key = self.config.api_key
        return key is None or request.headers.get("Authorization") == f"Bearer {key}"

    def _unauthorized(self) -> web.Response:
        # Unlike OpenAI, which echoes a masked key, say nothing about the key that was sent.
        return openai_error(
            401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key"
        )

    async def _health(self, request: web.Request) -> web.Response:
        self._routes["/health"] += 1
        return web.Response(status=200)

    async def _statistics(self, request: web.Request) -> web.Response:
        return web.Response(body=_encode(self.statistics()), content_type="application/json")

    async def _reset(self, request: web.Request) -> web.Response:
        self.reset_statistics()
        return web.Response(body=b"{}", content_type="application/json")

    async def _models(self, request: web.Request) -> web.Response:
        self._routes["/v1/models"] += 1
        if not self._authorized(request):
            return self._unauthorized()
        created = int(time.time())
        data = [
            {"id": m, "object": "model", "created": created, "owned_by": "asyncgen-mock"}
            for m in (self.config.models or [DEFAULT_MODEL])
        ]
        return web.Response(
            body=_encode({"object": "list", "data": data}), content_type="application/json"
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generation(request, chat=False)

    async def _generation(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        self._routes[request.path] += 1
        self._requests += 1
        outcome, response = await self._answer(request, chat)
        self._outcomes[outcome] += 1
        return response

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        self._routes[request.path] += 1
        self._requests += 1
        outcome, response = await self._embed(request)
        self._outcomes[outcome] += 1
        return response

    async def _embed(self, request: web.Request) -> tuple[str, web.StreamResponse]:
        """An embeddings request through the same checks, budgets, faults and slots as a
        generation (no decode time: the latency is the whole of it)."""
        cfg = self.config
        turned_away = self._turn_away(request)
        if turned_away is not None:
            return turned_away
        try:
            ask = read_embed(await request.read(), models=cfg.models)
        except BadRequest as exc:
            refusal = openai_error(exc.status, str(exc), "invalid_request_error", exc.code)
            return str(exc.status), refusal
        leave_out = None
        if len(ask.texts) > 1 and self._rng.random() < cfg.embed_partial:
            leave_out = self._rng.randrange(len(ask.texts))
        body, tokens = embeddings_reply(ask, leave_out=leave_out)
        headers, refused = self._admit(tokens)
        if refused is not None:
            return "rate_limited", refused
        fault = pick_fault(cfg, self._rng.random())
        if fault == "drop":
            return "drop", await self._drop(request)
        if fault == "hang":
            await asyncio.sleep(cfg.hang_seconds)
        elif fault is not None:
            return fault, fault_reply(fault, cfg, lambda: body, self._rng, headers)
        async with self._slots.hold():
            await self._sleep_latency()
        self._prompt_tokens += tokens
        reply = web.Response(body=body, content_type="application/json", headers=headers)
        return ("hang" if fault == "hang" else "ok"), reply

    def _turn_away(self, request: web.Request) -> tuple[str, web.StreamResponse] | None:
        """What every request meets before its body is read: the key, then the quota."""
        if not self._authorized(request):
            return "401", self._unauthorized()
        if self.config.quota_exhausted:
            return "quota", openai_error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            )
        return None

    def _admit(self, tokens: int) -> tuple[dict[str, str], web.Response | None]:
        """The rate budgets' verdict on a request costing ``tokens``: the headers to send,
        and OpenAI's 429 if it does not fit."""
        if self._budgets is None:
            return {}, None
        verdict = self._budgets.admit(tokens, asyncio.get_running_loop().time())
        headers = verdict.headers if self.config.ratelimit_headers else {}
        if verdict.admitted:
            return headers, None
        self._rate_limited += 1
        refusal = openai_error(429, verdict.message, verdict.kind, "rate_limit_exceeded")
        set_retry_after(refusal, math.ceil(verdict.wait * 1000))
        refusal.headers.update(headers)
        return headers, refusal

    async def _drop(self, request: web.Request) -> web.Response:
        """The ``drop`` fault: the connection closes after the latency, with no reply."""
        await self._sleep_latency()
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)

    # -- one generation request --------------------------------------------------------------

    async def _answer(self, request: web.Request, chat: bool) -> tuple[str, web.StreamResponse]:
        """The outcome of one generation request (a :class:`MockStats` key) and its reply."""
        cfg = self.config
        turned_away = self._turn_away(request)
        if turned_away is not None:
            return turned_away
        try:
            ask = read_request(await request.read(), chat=chat, models=cfg.models)
        except BadRequest as exc:
            refusal = openai_error(exc.status, str(exc), "invalid_request_error", exc.code)
            return str(exc.status), refusal
        reply = self._replies.make(ask, chat=chat)

        output = reply.completion_tokens
        if cfg.charge_max_tokens and ask.limit is not None:
            output = max(output, ask.limit)
        headers, refused = self._admit(reply.prompt_tokens + output)
        if refused is not None:
            return "rate_limited", refused

        fault = pick_fault(cfg, self._rng.random())
        if fault == "drop":
            return "drop", await self._drop(request)
        if fault == "hang":
            await asyncio.sleep(cfg.hang_seconds)
            outcome, response = await self._send(request, ask, reply, headers)
            return ("hang" if outcome == "ok" else outcome), response
        if fault == "429":
            return fault, fault_reply(fault, cfg, reply.body, self._rng, headers)
        if cfg.max_waiting is not None and self._slots.full(cfg.max_waiting):
            return "shed", vllm_error(503, "The server is overloaded.", "ServiceUnavailableError")
        async with self._slots.hold():
            await self._sleep_latency()
            if fault is not None:
                return fault, fault_reply(fault, cfg, reply.body, self._rng, headers)
            if not ask.stream:
                await self._decode(reply.steps)
            return await self._send(request, ask, reply, headers)

    async def _send(
        self,
        request: web.Request,
        ask: Ask,
        reply: Reply,
        headers: dict[str, str],
    ) -> tuple[str, web.StreamResponse]:
        """Send ``reply``, streamed or whole as ``ask`` asked, and count its tokens once it is
        complete."""
        if ask.stream:
            outcome, response = await send_stream(
                request,
                reply,
                config=self.config,
                rng=self._rng,
                token_time=self._token_time,
                headers=headers,
                include_usage=ask.include_usage,
            )
        else:
            body = reply.body()
            outcome = "ok"
            response = web.Response(body=body, content_type="application/json", headers=headers)
        if outcome in COMPLETE:
            self._prompt_tokens += reply.prompt_tokens
            self._completion_tokens += reply.completion_tokens
            self._invalid_json += reply.invalid
        return outcome, response

    # -- timing ------------------------------------------------------------------------------

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
