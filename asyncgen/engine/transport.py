"""The network behind one small interface, and its aiohttp implementation.

:class:`Transport` is all the engine needs: POST bytes to a path under the base URL, get the
status, headers and body back, or a :class:`~asyncgen.core.errors.TransportError`. Tests and
embedding applications can pass their own.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, NamedTuple, Protocol

import aiohttp
import msgspec

from asyncgen._version import __version__
from asyncgen.core.errors import (
    AsyncgenError,
    ConfigError,
    ConnectError,
    RequestTimeout,
    TransportError,
)
from asyncgen.core.redact import redact_url

__all__ = [
    "AiohttpTransport",
    "HttpResponse",
    "StreamReply",
    "Transport",
    "check_models",
]


class HttpResponse(NamedTuple):
    status: int
    headers: Mapping[str, str]
    body: bytes


class StreamReply(Protocol):
    """A response whose body arrives in pieces (server-sent events)."""

    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes:
        """The whole body (for error replies)."""
        ...

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""
        ...


class Transport(Protocol):
    """Send a request to an OpenAI-compatible endpoint."""

    base_url: str

    async def post(self, path: str, body: bytes) -> HttpResponse: ...

    def stream(self, path: str, body: bytes) -> AbstractAsyncContextManager[StreamReply]:
        """POST and hand over the response as soon as its headers are in."""
        ...

    async def get(self, path: str) -> HttpResponse: ...

    async def aclose(self) -> None: ...


class AiohttpTransport:
    """One pooled aiohttp session for one base URL (``.../v1``).

    Time limits are the caller's: wrap calls in ``asyncio.timeout``. The API key lives only
    in the session's default headers; it is never part of the repr.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, limit: int = 256) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"base URL must start with http:// or https://, got {base_url!r}")
        self._base = base_url.rstrip("/")
        self.base_url = redact_url(self._base)
        if self.base_url != self._base and api_key:
            raise ConfigError(
                f"the base URL {self.base_url} carries credentials and an API key is set "
                "too; HTTP allows one Authorization, so give only one of them"
            )
        self._headers = {
            "Content-Type": "application/json",
            # Replies are small JSON; compressing them costs both ends more CPU than it saves.
            # (A default header, not skip_auto_headers: that makes aiohttp copy headers on
            # every request.)
            "Accept-Encoding": "identity",
            "User-Agent": f"asyncgen/{__version__}",
        }
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self._limit, limit_per_host=self._limit, ttl_dns_cache=300
            )
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),
            )
        return self._session

    # Plain functions handing back the request's coroutine: one frame less for every
    # suspension and resumption of a request (a handful each, thousands a second).
    def post(self, path: str, body: bytes) -> Coroutine[Any, Any, HttpResponse]:
        return self._request("POST", path, body)

    def get(self, path: str) -> Coroutine[Any, Any, HttpResponse]:
        return self._request("GET", path, None)

    async def _request(self, method: str, path: str, body: bytes | None) -> HttpResponse:
        session = self._get_session()
        # try/except here rather than a context manager: this runs once per request.
        try:
            async with session.request(method, self._base + path, data=body) as resp:
                data = await resp.read()
                return HttpResponse(resp.status, resp.headers, data)
        except aiohttp.ClientError as exc:
            raise self._mapped(exc, path) from None

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: bytes) -> AsyncIterator[StreamReply]:
        session = self._get_session()
        try:
            async with session.post(self._base + path, data=body) as resp:
                yield _AiohttpStream(resp)
        except aiohttp.ClientError as exc:
            raise self._mapped(exc, path) from None

    def _mapped(self, exc: aiohttp.ClientError, path: str) -> AsyncgenError:
        """asyncgen's error for aiohttp's; messages name the URL without its userinfo."""
        url = self.base_url + path
        if isinstance(exc, aiohttp.InvalidURL):
            return ConfigError(f"invalid URL {url!r}")
        detail = str(exc).replace(self._base, self.base_url)
        return ConnectError(
            f"{type(exc).__name__} talking to {url}: {detail}",
            sent=not isinstance(exc, aiohttp.ClientConnectorError),
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def __repr__(self) -> str:
        auth = "with key" if "Authorization" in self._headers else "no key"
        return f"<AiohttpTransport {self.base_url} {auth}>"


class _AiohttpStream:
    __slots__ = ("_resp", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def read(self) -> bytes:
        return await self._resp.read()

    async def chunks(self) -> AsyncIterator[bytes]:
        async for data in self._resp.content.iter_any():
            yield data


class _ModelId(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_ModelId]


CHECK_SECONDS = 30.0
"""How long the start-up check waits for ``GET /models``."""


def _inconclusive(served: list[str]) -> bool:
    """Does a model listing fail to say what is served? Empty (some gateways list nothing),
    or with wildcard ids (LiteLLM's ``openai/*`` route any model of a provider)."""
    return not served or any("*" in m for m in served)


async def check_models(
    transport: Transport, model: str | None, *, warn: Callable[[str], None] | None = None
) -> list[str] | None:
    """The start-up check, ``GET /models``: fail fast, with a message that says what to do,
    on an unreachable endpoint, a refused key, a wrong base URL or a model the endpoint does
    not serve. Returns the served model ids in the server's order, or None when the reply
    does not list them (some gateways answer otherwise; that is not an error). A listing that
    cannot be conclusive (empty, or with wildcards) does not refuse a model it lacks: ``warn``
    is told instead."""
    url = transport.base_url
    try:
        async with asyncio.timeout(CHECK_SECONDS):
            resp = await transport.get("/models")
    except TimeoutError as exc:
        raise RequestTimeout(
            f"endpoint {url} did not answer GET /models within {CHECK_SECONDS:g}s"
        ) from exc
    except TransportError as exc:
        raise ConnectError(f"cannot reach endpoint {url}: {exc}") from exc
    if resp.status in (401, 403):
        raise ConfigError(
            f"endpoint {url} refused the API key (HTTP {resp.status}); "
            "check the variable named by --api-key-env"
        )
    if resp.status == 404:
        raise ConfigError(
            f"endpoint {url} has no /models (HTTP 404): is the base URL right? "
            "OpenAI-compatible servers answer under /v1, as in http://HOST:8000/v1 "
            "(--no-check skips this check)"
        )
    if resp.status != 200:
        return None
    try:
        listed = msgspec.json.decode(resp.body, type=_ModelList).data
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    served = list(dict.fromkeys(m.id for m in listed))
    if model is not None and model not in served:
        shown = ", ".join(served[:10]) + (", ..." if len(served) > 10 else "")
        if _inconclusive(served):
            if warn is not None:
                warn(
                    f"model {model!r} is not listed by {url} (GET /models lists "
                    f"{shown or 'nothing'}), which cannot be conclusive: going on"
                )
            return served
        raise ConfigError(
            f"model {model!r} is not served by {url}; it serves: {shown} "
            "(--no-check skips this check)"
        )
    return served
