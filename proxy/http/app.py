"""The app factory: the routes (proxy/http/chat.py, proxy/http/admin.py), the one set of error
handlers (proxy/http/errors.py), and what runs at start and at shutdown.

`POST /v1/chat/completions` takes a cascade name (the engine decides, then answers, as JSON
or as SSE) or a configured model name (passthrough; streams live). Errors are OpenAI error
objects. A client that disconnects cancels the upstream calls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI
from starlette.requests import Request

from proxy.http import admin, announce, errors, ui
from proxy.http.chat import CHAT_PATH, chat_completions
from proxy.http.contract import chat_request_schema
from proxy.http.errors import error_responses
from proxy.http.state import ProxyState, build_state

_SSE_EVENT = {  # each event of a stream (OpenAPI 3.1: `schema` describes one event)
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a chunk as JSON, or [DONE]"}},
}


class CascadeApp(FastAPI):
    """FastAPI, with one shortcut: `POST /v1/chat/completions` goes straight to its handler,
    past FastAPI's routing and dependency layers (a third of the proxy's CPU per request
    when measured). The shortcut calls the route's own handler and renders its errors with
    the app's one error handler, so the answer is the one the full stack would give. It is
    taken only while the app has no middleware of its own: add one and the chat route goes
    through the full stack like every other."""

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if (
            scope["type"] != "http"
            or scope["path"] != CHAT_PATH
            or scope["method"] != "POST"
            or self.user_middleware
        ):
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self  # as Starlette sets it: the handler reads app.state through it
        request = Request(scope, receive)
        try:
            response = await chat_completions(request)
        except Exception as exc:
            response = errors.render(request, exc, self.state.proxy.secrets)
        await response(scope, receive, send)


def create_app(state: ProxyState) -> FastAPI:
    """The app serving `state`: started (ledger writer, policy watchers) and stopped (judge
    runs awaited, upstream pools closed, the ledger flushed) by its lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.ledger is not None:
            state.ledger.start()
        if state.keys is not None:  # read in the background; the first read awaited, bounded
            state.keys.start()
            await asyncio.to_thread(state.keys.wait_tried, 10.0)
        watch_s = state.config.server.policy_watch_s
        watchers = []
        files = state.policy_files
        if files is not None and files.paths:
            if watch_s > 0:
                watchers.append(asyncio.create_task(files.watch(watch_s)))
            if state.reload_signal is not None:
                watchers.append(asyncio.create_task(state.reload_signal.follow(files)))
        # Start-up's objects (modules, the policy, the config: most of the heap) are kept for
        # good: frozen, the collector's full passes stop walking them (12% of the CPU per
        # request, measured at concurrency 32).
        gc.collect()
        gc.freeze()
        announce.started(state)
        yield
        for watcher in watchers:
            watcher.cancel()
        if state.explorer is not None:  # judge calls in flight: let them land in the ledger
            await state.explorer.drain()
        await asyncio.gather(*(b.aclose() for b in state.backends.values()))
        if state.ledger is not None:  # SIGTERM ends here too: flush every record
            await asyncio.to_thread(state.ledger.close)
        if state.keys is not None:
            await asyncio.to_thread(state.keys.stop)
        if state.reports is not None:
            state.reports.dispose()
        announce.stopped(state)

    app = CascadeApp(
        title="cascade", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.state.proxy = state
    errors.install(app, state.secrets)
    app.add_api_route(
        CHAT_PATH,
        chat_completions,
        methods=["POST"],
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": chat_request_schema()}},
            }
        },
        responses={
            200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}},
            **error_responses(400, 401, 404, 413, 502),
        },
    )
    app.include_router(admin.router)
    app.include_router(ui.router)
    return app


def create_app_from_env() -> FastAPI:
    """The app of one `cascade serve --workers N` worker (uvicorn's factory, run in each
    worker process): state cannot cross processes, so every worker loads $CASCADE_CONFIG
    itself and owns its backends and its ledger writer (its own spool slot)."""
    from proxy.config import load_config

    return create_app(build_state(load_config()))
