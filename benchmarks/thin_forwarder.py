"""The thinnest useful proxy, as a yardstick: Starlette + one pooled aiohttp session, no parsing.

It forwards the request body to the upstream's chat-completions URL and returns the
upstream's bytes and status: what any Python proxy on this stack must at least spend. Run:
`python benchmarks/thin_forwarder.py --upstream http://127.0.0.1:PORT --port 8090`.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


def build(upstream: str) -> Starlette:
    """The forwarder over `upstream` (its root URL, without /v1)."""
    url = upstream.rstrip("/") + "/v1/chat/completions"
    pool: dict[str, aiohttp.ClientSession] = {}

    async def chat(request: Request) -> Response:
        headers = {"Content-Type": "application/json"}
        async with pool["s"].post(url, data=await request.body(), headers=headers) as resp:
            raw = await resp.read()
        return Response(raw, status_code=resp.status, media_type="application/json")

    async def health(_: Request) -> Response:
        return Response(b"", status_code=200)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        pool["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        yield
        await pool["s"].close()

    routes = [Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)]
    return Starlette(routes=routes, lifespan=lifespan)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    app = build(args.upstream)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
