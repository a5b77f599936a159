"""The HTTP face of cascade: OpenAI-compatible endpoints over the cascade engine.

`POST /v1/chat/completions` takes a cascade name (the engine decides, then answers, as JSON or
as SSE) or a configured model name (passthrough; streams live). Errors are OpenAI error
objects. A client that disconnects cancels the upstream calls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response, StreamingResponse

from policies.artifact import ArtifactError, parse_artifact
from proxy import metrics
from proxy.backends.base import Backend, CallResult, StreamChunk
from proxy.backends.common import FORWARDED_PARAMS
from proxy.config import Config, ModelConfig
from proxy.engine import CascadeEngine, CascadeRun, OverrideError, Overrides
from proxy.errors import ApiError
from proxy.ledger.writer import LedgerWriter
from proxy.recording import LedgerEntry

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})


@dataclass
class ProxyState:
    """Everything the handlers need, built once at startup."""

    config: Config
    backends: dict[str, Backend]
    engines: dict[str, CascadeEngine]
    reference_prices: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    client_keys: set[str] = field(default_factory=set)
    admin_key: str | None = None
    ledger: LedgerWriter | None = None


def load_policy(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"policy artifact {p} does not exist (create one with `cascade fit`)")
    return parse_artifact(p.read_text(), str(p))


def model_price(name: str, cfg: ModelConfig) -> tuple[float, float] | None:
    """USD per input and output token of a configured model; None if unknown."""
    if cfg.price_in_per_mtok is not None and cfg.price_out_per_mtok is not None:
        return cfg.price_in_per_mtok / 1e6, cfg.price_out_per_mtok / 1e6
    from proxy.backends.pricing import PricingError, lookup_price

    try:
        _, p_in, p_out = lookup_price(cfg.model or name)
    except PricingError:
        return None
    return p_in, p_out


def build_state(config: Config) -> ProxyState:
    """Backends for every model and an engine per cascade (policy artifacts loaded)."""
    from proxy.backends.factory import make_backend

    if any(
        c.price_in_per_mtok is None or c.price_out_per_mtok is None for c in config.models.values()
    ):
        from proxy.backends.pricing import warm_up

        warm_up()  # litellm's price map and tokenizer now, not on the first request
    for name, cfg in config.models.items():
        if cfg.gpu_hourly_usd is None and model_price(name, cfg) is None:
            print(
                f"warning: model {name!r} has no known price (set price_in_per_mtok/"
                "price_out_per_mtok or gpu_hourly_usd): its cost is ledgered as NULL and "
                "flagged in every report",
                file=sys.stderr,
            )
    backends = {name: make_backend(name, cfg) for name, cfg in config.models.items()}
    engines = {}
    prices = {}
    for name, cascade in config.cascades.items():
        artifact = load_policy(cascade.policy) if cascade.policy else None
        engines[name] = CascadeEngine(
            name, cascade.nodes, backends, cascade.reference, artifact=artifact
        )
        prices[name] = model_price(cascade.reference, config.models[cascade.reference])
    return ProxyState(
        config=config,
        backends=backends,
        engines=engines,
        reference_prices=prices,
        client_keys=config.client_keys(),
        admin_key=config.admin_key(),
        ledger=make_ledger(config.database_url),
    )


def make_ledger(url: str) -> LedgerWriter:
    """The ledger writer, after checking the database schema is current (else it says which
    command to run). Records spool beside a SQLite file, or in the working directory."""
    from proxy.ledger.db import check_schema

    check_schema(url)
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        spool = Path(url.removeprefix("sqlite:///")).with_suffix(".spool.jsonl")
    else:
        spool = Path("cascade-ledger.spool.jsonl")
    return LedgerWriter(url, spool)


def create_app(state: ProxyState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.ledger is not None:
            state.ledger.start()
        yield
        await asyncio.gather(*(b.aclose() for b in state.backends.values()))
        if state.ledger is not None:  # SIGTERM ends here too: flush every record
            await asyncio.to_thread(state.ledger.close)
        for engine in reports_engine:
            engine.dispose()

    app = FastAPI(
        title="cascade", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.state.proxy = state
    max_body = state.config.server.max_body_bytes

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        request_id = getattr(request.state, "request_id", None)
        return exc.response({"x-request-id": request_id} if request_id else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = "not_found" if exc.status_code == 404 else None
        return ApiError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        return ApiError(400, str(exc.errors()[:3]), code="invalid_request").response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        return ApiError(500, "internal error in the proxy", code="internal_error").response()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        request_id = request.state.request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        key = _authenticate(request, state)
        body = await _read_json(request, max_body)
        model, messages, stream, include_usage = _validate(body)
        params = {k: v for k, v in body.items() if k in FORWARDED_PARAMS}
        entry = LedgerEntry(state, request_id, key, model, stream)
        if model in state.engines:
            overrides = _overrides(body.get("cascade"))
            engine = state.engines[model]
            run = engine.new_run()
            try:
                await _until_disconnect(request, engine.run(messages, params, overrides, run))
            except OverrideError as exc:
                raise ApiError(
                    400, str(exc), param=exc.param, code="invalid_cascade_override"
                ) from None
            except ApiError as exc:  # the client hung up: keep what was spent
                entry.cascade_done(run, exc.status, exc.code)
                raise
            if not run.calls:
                raise ApiError(
                    400,
                    f"cascade.max_cost_usd={overrides.max_cost_usd} is below the expected "
                    "cost of every model of the cascade",
                    param="cascade.max_cost_usd",
                    code="budget_too_small",
                )
            if run.answer is None:
                metrics.record_run(run, status=502)
                error = _all_failed(run)
                entry.cascade_done(run, error.status, error.code)
                raise error
            metrics.record_run(run, status=200)
            entry.cascade_done(run, 200, None)
            payload = _completion(request_id, run.answer.result, run, state)
            headers = _headers(request_id, run)
            if stream:
                return _stream_text(request_id, payload, include_usage, headers)
            return JSONResponse(payload, headers=headers)
        if model in state.backends:
            backend = state.backends[model]
            if stream:
                return _stream_live(
                    request_id, model, backend, messages, params, include_usage, entry
                )
            try:
                result = await _until_disconnect(request, backend.complete(messages, params))
            except ApiError as exc:  # the client hung up while the call was in flight
                gone = CallResult(model=model, text=None, error="client_disconnected")
                entry.call_done(model, gone, exc.status, exc.code)
                raise
            metrics.record_call(model, result)
            if not result.ok:
                error = _call_failed(model, result)
                entry.call_done(model, result, error.status, error.code)
                raise error
            entry.call_done(model, result, 200, None)
            headers = {"x-request-id": request_id, "x-cascade-model": model}
            if result.cost_usd is not None:
                headers["x-cascade-cost-usd"] = f"{result.cost_usd:.8f}"
            return JSONResponse(_completion(request_id, result, None, state), headers=headers)
        raise ApiError(
            404,
            f"The model '{model}' does not exist: use a cascade "
            f"({', '.join(sorted(state.engines)) or 'none'}) or a configured model "
            f"({', '.join(sorted(state.backends))})",
            param="model",
            code="model_not_found",
        )

    @app.get("/v1/models")
    async def list_models(request: Request) -> Response:
        _authenticate(request, state)
        now = int(time.time())
        data = [
            {"id": name, "object": "model", "created": now, "owned_by": "cascade"}
            for name in state.engines
        ] + [
            {"id": name, "object": "model", "created": now, "owned_by": cfg.backend}
            for name, cfg in state.config.models.items()
        ]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/health")
    async def health() -> Response:
        names = list(state.backends)
        checks = await asyncio.gather(
            *(asyncio.wait_for(state.backends[n].health(), 2.0) for n in names),
            return_exceptions=True,
        )
        upstreams = {n: ok is True for n, ok in zip(names, checks, strict=True)}
        status = "ok" if all(upstreams.values()) else "degraded"
        return JSONResponse(
            {
                "status": status,
                "upstreams": upstreams,
                "database": _ledger_status(state),
                "cascades": {
                    n: {"policy_hash": e.policy_hash, "nodes": e.nodes}
                    for n, e in state.engines.items()
                },
            }
        )

    reports_engine: list[Any] = []  # made on first use, then shared

    @app.get("/v1/cascade/reports/{name}")
    async def ledger_report(request: Request, name: str) -> Response:
        from proxy.ledger.reports import REPORTS, ReportError, run_report

        _authenticate_admin(request, state)
        if name not in REPORTS:
            raise ApiError(
                404, f"Unknown report {name!r}; one of {', '.join(REPORTS)}", code="not_found"
            )
        if not reports_engine:
            from proxy.ledger.db import make_engine

            reports_engine.append(make_engine(state.config.database_url))
        since = request.query_params.get("since", "7d")
        by = request.query_params.get("by") or None
        try:
            report = await asyncio.to_thread(run_report, reports_engine[0], name, since, by)
        except ReportError as exc:
            raise ApiError(400, str(exc), code="invalid_report_option") from None
        return JSONResponse(report.to_dict())

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app


def _ledger_status(state: ProxyState) -> dict:
    if state.ledger is None:
        return {"status": "off"}
    stats = state.ledger.stats()
    return {
        "status": "unreachable (records spool to disk)"
        if stats.get("connected") is False
        else "ok",
        "written": stats.get("written"),
        "pending": stats.get("pending"),
        "spooled": stats.get("spool_backlog"),
    }


# ---------------------------------------------------------------- request checks


def _authenticate(request: Request, state: ProxyState) -> str | None:
    """The client's API key (None when the proxy requires none); 401 when it is wrong."""
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not state.client_keys:
        return key or None
    if not key:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
        )
    if key not in state.client_keys and key != state.admin_key:
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
    return key


def _authenticate_admin(request: Request, state: ProxyState) -> None:
    """Admin endpoints: 401 without a valid key, 403 with a key that is not the admin key."""
    header = request.headers.get("authorization", "")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not key:
        raise ApiError(
            401, "Missing API key: send 'Authorization: Bearer <admin key>'", code="missing_api_key"
        )
    if state.admin_key is not None and key == state.admin_key:
        return
    if key in state.client_keys:
        raise ApiError(403, "This endpoint needs the admin key", code="admin_key_required")
    raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


async def _read_json(request: Request, max_body: int) -> dict:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_body:
        raise _too_large(max_body)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_body:
            raise _too_large(max_body)
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, f"The request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    return body


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {limit} bytes", code="request_too_large")


def _validate(body: dict) -> tuple[str, list[dict], bool, bool]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required and must be a string", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400, "'messages' is required and must be a non-empty array", param="messages"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}] must be an object with a role in {sorted(ROLES)}",
                param=f"messages[{i}]",
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ApiError(
                400,
                f"messages[{i}].content must be a string or an array of parts",
                param=f"messages[{i}].content",
            )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ApiError(400, f"'{key}' must be a number", param=key)
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ApiError(400, f"'{key}' must be a positive integer", param=key)
    return model, messages, stream, bool(options.get("include_usage"))


def _overrides(raw: object) -> Overrides:
    try:
        return Overrides.parse(raw)
    except OverrideError as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_cascade_override") from None


async def _until_disconnect(request: Request, work: Awaitable[Any]) -> Any:
    """Run `work`; if the client disconnects first, cancel it (and its upstream calls)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task not in done:
        task.cancel()
        metrics.CLIENT_DISCONNECTS.inc()
        raise ApiError(499, "client disconnected", code="client_disconnected")
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


# ---------------------------------------------------------------- responses


def _usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _completion(
    request_id: str, result: CallResult, run: CascadeRun | None, state: ProxyState
) -> dict:
    if run is None:
        usage = _usage(result.tokens_in or 0, result.tokens_out or 0)
    else:
        usage = _usage(*run.tokens)
    payload: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": None,
                "finish_reason": result.finish_reason or "stop",
            }
        ],
        "usage": usage,
    }
    if run is not None:
        payload["cascade"] = _cascade_object(run, result, state)
    return payload


def _cascade_object(run: CascadeRun, answer: CallResult, state: ProxyState) -> dict:
    price = state.reference_prices.get(run.cascade)
    tokens_in = max((c.result.tokens_in or 0 for c in run.calls), default=0)
    reference_cost = (
        None if price is None else tokens_in * price[0] + (answer.tokens_out or 0) * price[1]
    )
    return {
        "name": run.cascade,
        "policy_hash": run.policy_hash,
        "calls": [
            {
                "model": c.model,
                "status": "ok" if c.result.ok else c.result.error,
                "latency_ms": round(c.result.latency_ms, 3),
                "cost_usd": c.result.cost_usd,
                "confidence": c.confidence,
                "p_correct": None if c.p_correct is None else round(c.p_correct, 6),
                "decision": c.decision,
                "attempts": c.result.attempts,
            }
            for c in run.calls
        ],
        "answer_from": run.answer.model if run.answer else None,
        "answer_is_last": bool(run.answer is run.calls[-1]) if run.answer else None,
        "reason": run.reason,
        "cost_usd": run.cost_usd,
        "reference_model": state.engines[run.cascade].reference,
        "reference_cost_usd": reference_cost,
        "overhead_ms": round(run.overhead_ms, 3),
    }


def _headers(request_id: str, run: CascadeRun) -> dict[str, str]:
    cost = run.cost_usd
    return {
        "x-request-id": request_id,
        "x-cascade-model": run.answer.model if run.answer else "",
        "x-cascade-cost-usd": "unknown" if cost is None else f"{cost:.8f}",
        "x-cascade-calls": str(len(run.calls)),
        "x-cascade-overhead-ms": f"{run.overhead_ms:.3f}",
    }


def _sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return f"data: {text}\n\n".encode()


def _chunk(request_id: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _pieces(text: str, size: int = 4) -> list[str]:
    words = text.split(" ")
    return [" ".join(words[i : i + size]) + (" " if i + size < len(words) else "")
            for i in range(0, len(words), size)]  # fmt: skip


def _stream_text(
    request_id: str, payload: dict, include_usage: bool, headers: dict[str, str]
) -> StreamingResponse:
    """A decided cascade answer, sent as OpenAI chat.completion.chunk events."""
    model = payload["model"]
    text = payload["choices"][0]["message"]["content"] or ""

    async def events() -> AsyncIterator[bytes]:
        first = _chunk(request_id, model, {"role": "assistant", "content": ""})
        first["cascade"] = payload["cascade"]
        yield _sse(first)
        for piece in _pieces(text):
            yield _sse(_chunk(request_id, model, {"content": piece}))
        yield _sse(_chunk(request_id, model, {}, payload["choices"][0]["finish_reason"]))
        if include_usage:
            last = _chunk(request_id, model, {})
            last["choices"] = []
            last["usage"] = payload["usage"]
            yield _sse(last)
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _stream_live(
    request_id: str,
    model: str,
    backend: Backend,
    messages: list[dict],
    params: dict,
    include_usage: bool,
    entry: LedgerEntry,
) -> StreamingResponse:
    """Passthrough streaming: upstream deltas as they arrive; an upstream failure after the
    stream started ends it with an error event (the status line is already sent)."""

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event in _live_events():
                yield event
        finally:  # the client hung up mid-stream: still one ledger record
            if not entry.written:
                gone = CallResult(model=model, text=None, error="client_disconnected")
                entry.call_done(model, gone, 499, "client_disconnected")

    async def _live_events() -> AsyncIterator[bytes]:
        yield _sse(_chunk(request_id, model, {"role": "assistant", "content": ""}))
        done: CallResult | None = None
        chunk: StreamChunk
        async for chunk in backend.stream(messages, params):
            if chunk.done is not None:
                done = chunk.done
                break
            if chunk.delta:
                yield _sse(_chunk(request_id, model, {"content": chunk.delta}))
        if done is None or not done.ok:
            if done is not None:
                metrics.record_call(model, done)
                failure = _call_failed(model, done)
                entry.call_done(model, done, failure.status, failure.code)
                yield _sse(failure.body())
            else:
                ended = CallResult(model=model, text=None, error="stream_ended")
                entry.call_done(model, ended, 502, "stream_ended")
                yield _sse({"error": {"message": "the upstream stream ended", "code": None}})
            yield _sse("[DONE]")
            return
        metrics.record_call(model, done)
        entry.call_done(model, done, 200, None)
        yield _sse(_chunk(request_id, model, {}, done.finish_reason or "stop"))
        if include_usage:
            last = _chunk(request_id, model, {})
            last["choices"] = []
            last["usage"] = _usage(done.tokens_in or 0, done.tokens_out or 0)
            yield _sse(last)
        yield _sse("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"x-request-id": request_id, "x-cascade-model": model},
    )


def _attempt(call_model: str, result: CallResult) -> dict:
    return {
        "model": call_model,
        "error": result.error,
        "detail": result.error_detail,
        "status": result.status,
        "attempts": result.attempts,
        "latency_ms": round(result.latency_ms, 3),
    }


def _all_failed(run: CascadeRun) -> ApiError:
    if all(c.result.error == "unknown_prompt" for c in run.calls):
        return ApiError(
            400,
            f"Cascade '{run.cascade}' replays recorded traces and this prompt is not among "
            "them: send one of the recorded questions",
            param="messages",
            code="prompt_not_recorded",
        )
    return ApiError(
        502,
        f"Every model of cascade '{run.cascade}' failed ({run.reason})",
        code="upstream_failed",
        extra={"attempts": [_attempt(c.model, c.result) for c in run.calls]},
    )


def _call_failed(model: str, result: CallResult) -> ApiError:
    return ApiError(
        502,
        f"Model '{model}' failed: {result.error}",
        code="upstream_failed",
        extra={"attempts": [_attempt(model, result)]},
    )
