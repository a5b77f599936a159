"""The HTTP layer's shape: the chat route's shortcut answers as the full stack does (one set
of error handlers), steps aside for middleware, and the request contract is the schema."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from proxy.config import parse_config
from proxy.http.app import create_app
from proxy.http.contract import chat_request_schema
from proxy.http.state import build_state
from tests.shipped import GSM8K_TEST


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    folder: Path = tmp_path_factory.mktemp("app")
    recorded = {"backend": "replay", "model": "gpt-4-1106-preview", "traces": [str(GSM8K_TEST)],
                "price_in_per_mtok": 10.0, "price_out_per_mtok": 30.0}  # fmt: skip
    config = parse_config(
        {
            "models": {"gpt4": recorded},
            "cascades": {"solo": {"nodes": ["gpt4"], "reference": "gpt4"}},
            "database_url": f"sqlite:///{folder / 'ledger.db'}",
        }
    )
    from proxy.ledger.db import upgrade

    upgrade(config.database_url)
    return build_state(config)


def _post(app, body: bytes) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.post("/v1/chat/completions", content=body)

    return asyncio.run(go())


class _Stamp:
    """A pure ASGI middleware marking every response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        async def stamped(message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-stamp", b"1")]
            await send(message)

        await self.app(scope, receive, stamped)


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"model": "solo"}', b'{"model": "nope", "messages": [{"role": "user"}]}'],
)
def test_the_shortcut_answers_as_the_full_stack(state, body: bytes) -> None:
    fast = create_app(state)
    full = create_app(state)
    full.add_middleware(_Stamp)  # with a middleware the chat route takes the full stack
    a, b = _post(fast, body), _post(full, body)
    assert (a.status_code, a.json()) == (b.status_code, b.json())
    assert a.status_code in (400, 404) and a.json()["error"]["code"]
    assert "x-stamp" not in a.headers and b.headers["x-stamp"] == "1"


def test_the_contract_is_the_documented_request_body(state) -> None:
    async def go() -> dict:
        transport = httpx.ASGITransport(app=create_app(state))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.get("/openapi.json")).json()

    spec = asyncio.run(go())
    body = spec["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert body["content"]["application/json"]["schema"] == chat_request_schema()
