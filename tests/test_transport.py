"""The aiohttp transport: errors mapped to asyncgen's, and secrets kept out of messages."""

from __future__ import annotations

import pytest

from asyncgen.core.errors import ConfigError, ConnectError
from asyncgen.core.redact import redact_url
from asyncgen.engine.transport import AiohttpTransport
from asyncgen.mock.server import MockConfig, MockServer


async def test_key_in_url_userinfo_never_shows() -> None:
    async with MockServer() as server:
        port = server.port
    url = f"http://user:sk-SECRET-9@127.0.0.1:{port}/v1"
    with pytest.raises(ConfigError, match="credentials and an API key") as both:
        AiohttpTransport(url, api_key="sk-K")
    assert "sk-SECRET-9" not in str(both.value)
    transport = AiohttpTransport(url)
    try:
        with pytest.raises(ConnectError) as info:
            await transport.post("/chat/completions", b"{}")
    finally:
        await transport.aclose()
    for text in (str(info.value), repr(transport), transport.base_url):
        assert "sk-SECRET-9" not in text, text
    assert f"***@127.0.0.1:{port}/v1/chat/completions" in str(info.value)


async def test_round_trip_and_bearer_key() -> None:
    async with MockServer(MockConfig(api_key="sk-right")) as server:
        good = AiohttpTransport(server.base_url, api_key="sk-right")
        bad = AiohttpTransport(server.base_url, api_key="sk-wrong")
        try:
            assert (await good.get("/models")).status == 200
            assert (await bad.get("/models")).status == 401
        finally:
            await good.aclose()
            await bad.aclose()


def test_base_url_must_be_http() -> None:
    with pytest.raises(ConfigError, match="must start with http"):
        AiohttpTransport("localhost:8000/v1")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1"),
        ("https://u:sk-1@h.example/v1", "https://***@h.example/v1"),
        ("https://sk-2@h.example/v1", "https://***@h.example/v1"),
        ("https://h.example/v1?api-key=sk-3", "https://h.example/v1?***"),
        ("https://u:p@h.example:9/v1?key=sk-4&x=1", "https://***@h.example:9/v1?***"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
