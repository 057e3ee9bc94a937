"""The mock's failures: the error bodies of OpenAI and vLLM, and the faults injected at random.

One draw per generation request picks at most one fault, in this order: ``drop`` (close the
connection), ``hang`` (wait ``hang_seconds``, then answer), ``429`` (with ``retry-after`` and
``retry-after-ms``), then, once the request holds a running slot and its latency has passed,
``500``, ``503`` (vLLM's flat error shape, so clients meet both) and ``malformed`` (a 200
whose body is empty, truncated or not JSON). The server performs the drop and the hang; the
rest are replies made here.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Literal

import msgspec
from aiohttp import web

from asyncgen.mock.config import MockConfig

__all__ = ["Fault", "fault_reply", "openai_error", "pick_fault", "set_retry_after", "vllm_error"]

Fault = Literal["drop", "hang", "429", "500", "503", "malformed"]
_ORDER: tuple[Fault, ...] = ("drop", "hang", "429", "500", "503", "malformed")
_encode = msgspec.json.encode


def pick_fault(config: MockConfig, draw: float) -> Fault | None:
    """The fault a uniform ``draw`` in [0, 1) lands on, each taking its probability's share
    of the interval in turn; None for a request that goes well."""
    shares = (
        config.drop,
        config.hang,
        config.fail_429,
        config.fail_500,
        config.fail_503,
        config.malformed,
    )
    for fault, share in zip(_ORDER, shares, strict=True):
        if draw < share:
            return fault
        draw -= share
    return None


def openai_error(status: int, message: str, kind: str, code: str | None) -> web.Response:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.Response(status=status, body=_encode(body), content_type="application/json")


def vllm_error(status: int, message: str, kind: str) -> web.Response:
    """vLLM's flat error object, so clients are exercised on both shapes."""
    body = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return web.Response(status=status, body=_encode(body), content_type="application/json")


def set_retry_after(response: web.StreamResponse, ms: int) -> None:
    """Announce a delay both ways: ``retry-after-ms`` exactly, ``retry-after`` rounded up."""
    response.headers["retry-after-ms"] = str(ms)
    response.headers["retry-after"] = str(max(1, math.ceil(ms / 1000)))


def fault_reply(
    fault: Literal["429", "500", "503", "malformed"],
    config: MockConfig,
    body_of: Callable[[], bytes],
    rng: random.Random,
    headers: dict[str, str],
) -> web.Response:
    """The reply of an injected failure (``rng`` picks the malformed body, cut from what
    ``body_of`` gives), with ``headers``."""
    if fault == "429":
        response = openai_error(
            429, "Rate limit reached for requests (mock).", "requests", "rate_limit_exceeded"
        )
        set_retry_after(response, round(config.retry_after * 1000))
    elif fault == "500":
        response = openai_error(
            500, "The server had an error while processing your request.", "server_error", None
        )
    elif fault == "503":
        response = vllm_error(
            503, "The engine is overloaded; try again later.", "ServiceUnavailableError"
        )
        if config.retry_after_503:
            set_retry_after(response, round(config.retry_after * 1000))
    else:
        full = body_of()
        variants = (b"", full[: len(full) // 2], b"<html>Bad Gateway</html>", b"{}")
        broken = variants[rng.randrange(len(variants))]
        return web.Response(
            status=200, body=broken, content_type="application/json", headers=headers
        )
    response.headers.update(headers)
    return response
