"""The HTTP face of cascade: OpenAI-compatible endpoints over the cascade engine.

`POST /v1/chat/completions` takes a cascade name (the engine decides, then answers, as JSON or
as SSE) or a configured model name (passthrough; streams live). Errors are OpenAI error
objects. A client that disconnects cancels the upstream calls in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from policies.artifact import ArtifactError, parse_artifact
from proxy.config import Config
from proxy.engine.cascade import POLICIES, CascadeEngine, CascadeRun, NodeCall, OverrideError
from proxy.engine.exploration import TraceAppender, judge_row, trace_row
from proxy.engine.recording import LedgerEntry
from proxy.engine.reload import (
    RELOAD_SIGNAL_ENV,
    SIGNAL_POLL_S,
    PolicyFiles,
    ReloadError,
    ReloadSignal,
)
from proxy.engine.reload import describe as describe_reload
from proxy.http import announce, metrics
from proxy.http.errors import ApiError, error_responses
from proxy.http.request_checks import (
    COUNT_PARAMS,
    MAX_N,
    NUMBER_PARAMS,
    ROLES,
    authenticate,
    authenticate_admin,
    parse_overrides,
    read_json,
    validate,
)
from proxy.ledger.writer import LedgerWriter
from upstreams.base import Backend, CallResult, StreamChunk
from upstreams.common import FORWARDED_PARAMS
from upstreams.jsonbytes import dumps
from upstreams.settings import ModelConfig

_INTERNAL_ERROR = ApiError(500, "internal error in the proxy", code="internal_error")
_NUMBER = {"type": ["number", "null"]}
_COUNT = {"type": ["integer", "null"], "minimum": 1}
# The request body as the handler validates it (documentation only: the handler parses the
# raw JSON itself, so this costs nothing per request). Other OpenAI fields are accepted.
CHAT_REQUEST_SCHEMA: dict = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": {
        "model": {"type": "string", "minLength": 1, "description": "a cascade or a model"},
        "messages": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["role"],
                "properties": {
                    "role": {"enum": sorted(ROLES)},
                    "content": {
                        "anyOf": [
                            {"type": "string"},
                            {"type": "null"},
                            {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["type"],
                                    "properties": {
                                        "type": {"type": "string"},
                                        "text": {"type": "string"},
                                    },
                                },
                            },
                        ]
                    },
                },
            },
        },
        "stream": {"type": "boolean"},
        "stream_options": {
            "type": ["object", "null"],
            "properties": {"include_usage": {"type": ["boolean", "null"]}},
        },
        **dict.fromkeys(NUMBER_PARAMS, _NUMBER),
        **dict.fromkeys(COUNT_PARAMS, _COUNT),
        "n": {**_COUNT, "maximum": MAX_N},
        "cascade": {
            "type": ["object", "null"],
            "additionalProperties": False,
            "properties": {
                "policy": {"enum": list(POLICIES)},
                "max_cost_usd": {"type": ["number", "null"], "minimum": 0},
                "lambda": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
            },
        },
    },
}
_CHAT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": CHAT_REQUEST_SCHEMA}},
    }
}
_SSE_EVENT = {  # each event of a stream (OpenAPI 3.1: `schema` describes one event)
    "type": "object",
    "required": ["data"],
    "properties": {"data": {"type": "string", "description": "a chunk as JSON, or [DONE]"}},
}
_CHAT_RESPONSES: dict[int | str, dict] = {
    200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}}},
    **error_responses(400, 401, 404, 413, 502),
}
_REPORT_OPENAPI = {
    "parameters": [
        {"name": "since", "in": "query", "schema": {"type": "string"}},
        {"name": "by", "in": "query", "schema": {"type": "string"}},
    ]
}


CHAT_PATH = "/v1/chat/completions"
# A client that hangs up is noticed from this long after its request arrived: answers that come
# sooner (most, on a fast upstream) never pay for a task watching the connection.
WATCH_DISCONNECT_AFTER_S = 0.05


class CascadeApp(FastAPI):
    """FastAPI for every route but the hot one: `POST /v1/chat/completions` is dispatched
    straight to its handler, past FastAPI's routing, dependency and middleware layers (a
    third of the proxy's CPU per request when measured). It still appears in the OpenAPI
    schema, and its errors are the same OpenAI error objects."""

    chat_handler: Callable[[Request], Awaitable[Response]] | None = None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if (
            self.chat_handler is None
            or scope["type"] != "http"
            or scope["path"] != CHAT_PATH
            or scope["method"] != "POST"
        ):
            await super().__call__(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await self.chat_handler(request)
        except ApiError as exc:
            response = _error_response(request, exc, self.state.proxy.secrets)
        except Exception:
            logging.getLogger("cascade").exception("internal error serving POST %s", CHAT_PATH)
            response = _INTERNAL_ERROR.response()
        await response(scope, receive, send)


def _error_response(request: Request, exc: ApiError, secrets: frozenset[str]) -> Response:
    """`exc` as an OpenAI error object, under the request's id once it has one, with every
    secret an upstream may have echoed into it masked."""
    request_id = getattr(request.state, "request_id", None)
    return exc.response({"x-request-id": request_id} if request_id else None, secrets)


class FastJSONResponse(JSONResponse):
    """A 200 JSON response encoded by orjson (a tenth of the stdlib's time; NaN becomes
    null), its header list built directly (the handler's headers are ASCII, lower-case)."""

    def __init__(self, content: Any, headers: dict[str, str]) -> None:
        self.status_code = 200
        self.background = None
        self.body = dumps(content)
        self.raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]


@dataclass
class ProxyState:
    """Everything the handlers need, built once at startup."""

    config: Config
    backends: dict[str, Backend]
    engines: dict[str, CascadeEngine]
    reference_prices: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    client_keys: set[str] = field(default_factory=set)
    key_names: dict[str, str] = field(default_factory=dict)  # key -> name, for the ledger
    admin_key: str | None = None
    ledger: LedgerWriter | None = None
    secrets: frozenset[str] = frozenset()  # keys never to echo in an error body
    policy_files: PolicyFiles | None = None  # reloaded on POST /admin/reload or file change
    reload_signal: ReloadSignal | None = None  # shared by `serve --workers N`: reload them all
    explorers: dict[str, TraceAppender] = field(default_factory=dict)  # cascade -> traces
    background: set[asyncio.Task] = field(default_factory=set)  # judge runs, awaited at exit


def load_policy(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"policy artifact {p} does not exist (create one with `cascade fit`)")
    return parse_artifact(p.read_text(), str(p))


def model_price(name: str, cfg: ModelConfig) -> tuple[float, float] | None:
    """USD per input and output token of a configured model; None if unknown."""
    if cfg.price_in_per_mtok is not None and cfg.price_out_per_mtok is not None:
        return cfg.price_in_per_mtok / 1e6, cfg.price_out_per_mtok / 1e6
    from upstreams.pricing import PricingError, lookup_price

    try:
        _, p_in, p_out = lookup_price(cfg.model or name)
    except PricingError:
        return None
    return p_in, p_out


def build_state(config: Config) -> ProxyState:
    """Backends for every model and an engine per cascade (policy artifacts loaded)."""
    from upstreams.factory import make_backend

    if any(
        c.price_in_per_mtok is None or c.price_out_per_mtok is None for c in config.models.values()
    ):
        from upstreams.pricing import warm_up

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
            name,
            cascade.nodes,
            backends,
            cascade.reference,
            artifact=artifact,
            transitions=cascade.transitions,
        )
        prices[name] = model_price(cascade.reference, config.models[cascade.reference])
    explorers = {
        name: TraceAppender(cascade.explore_out or f"explore-{name}.jsonl")
        for name, cascade in config.cascades.items()
        if cascade.explore_rate > 0
    }
    policy_paths = {name: cascade.policy for name, cascade in config.cascades.items()}
    upstream_keys = {os.environ.get(m.api_key_env) for m in config.models.values() if m.api_key_env}
    shared_signal = os.environ.get(RELOAD_SIGNAL_ENV)  # set for the workers of `serve --workers`
    admin_key = config.admin_key()
    return ProxyState(
        config=config,
        backends=backends,
        engines=engines,
        reference_prices=prices,
        client_keys=config.client_keys(),
        key_names={k: name for k, name in config.key_names().items() if name},
        admin_key=admin_key,
        ledger=make_ledger(config),
        secrets=frozenset(k for k in {*upstream_keys, *config.client_keys(), admin_key} if k),
        policy_files=PolicyFiles.of(engines, policy_paths),
        reload_signal=ReloadSignal(shared_signal) if shared_signal else None,
        explorers=explorers,
    )


def make_ledger(config: Config) -> LedgerWriter:
    """The ledger writer, after checking the database schema is current: an outdated one
    raises SchemaError, which says the command to run. A database that cannot be reached
    does not stop the proxy: records spool, and the writer checks the schema, then replays
    them, once it is back. Records spool beside a SQLite file, or in the working directory."""
    from proxy.ledger.db import DatabaseUnavailable, check_schema

    url = config.database_url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        spool = Path(url.removeprefix("sqlite:///")).with_suffix(".spool.jsonl")
    else:
        spool = Path("cascade-ledger.spool.jsonl")
    writer = LedgerWriter(
        url,
        spool,
        write_timeout_s=config.ledger.write_timeout_s,
        max_pending=config.ledger.max_pending,
        check_schema=True,
    )
    try:
        check_schema(url)
    except DatabaseUnavailable as exc:
        print(
            f"warning: {exc}\nwarning: serving anyway: ledger records spool to {spool} and "
            "go to the database once it is back (its schema is checked then)",
            file=sys.stderr,
        )
        writer.mark_unavailable(str(exc.__cause__ or exc))
    return writer


def create_app_from_env() -> FastAPI:
    """The app of one `cascade serve --workers N` worker (uvicorn's factory, run in each
    worker process): state cannot cross processes, so every worker loads $CASCADE_CONFIG
    itself and owns its backends and its ledger writer (its own spool slot)."""
    from proxy.config import load_config

    return create_app(build_state(load_config()))


def create_app(state: ProxyState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if state.ledger is not None:
            state.ledger.start()
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
        if state.background:  # judge calls in flight: let them land in the ledger
            await asyncio.wait(state.background, timeout=30.0)
        await asyncio.gather(*(b.aclose() for b in state.backends.values()))
        if state.ledger is not None:  # SIGTERM ends here too: flush every record
            await asyncio.to_thread(state.ledger.close)
        for engine in reports_engine:
            engine.dispose()
        announce.stopped(state)

    app = CascadeApp(
        title="cascade", version="0.1.0", docs_url=None, redoc_url=None, lifespan=lifespan
    )
    app.state.proxy = state
    max_body = state.config.server.max_body_bytes
    deadline_s = state.config.server.request_timeout_s

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return _error_response(request, exc, state.secrets)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return ApiError(exc.status_code, str(exc.detail), code=code).response(exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> Response:
        where = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
        return ApiError(400, where, code="invalid_request").response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        return _INTERNAL_ERROR.response()

    @app.post(CHAT_PATH, openapi_extra=_CHAT_OPENAPI, responses=_CHAT_RESPONSES)
    async def chat_completions(request: Request) -> Response:
        # 96 random bits from the (per-process seeded) Mersenne twister: no syscall per request
        request_id = request.state.request_id = f"chatcmpl-{random.getrandbits(96):024x}"
        key = authenticate(request, state.client_keys, state.admin_key)
        body = await read_json(request, max_body)
        model, messages, stream, include_usage = validate(body)
        params = {k: v for k, v in body.items() if k in FORWARDED_PARAMS}
        overrides = parse_overrides(body.get("cascade"))  # checked for every model, as documented
        n = body.get("n")  # validated: None or a positive integer
        entry = LedgerEntry(state, request_id, key, model, stream)
        if model in state.engines:
            if n is not None and n > 1:
                metrics.record_request(model, 400)
                raise ApiError(
                    400,
                    f"'{model}' is a cascade: it returns one decided answer, so n must be 1 "
                    f"(not {n}); ask a model by name for n choices",
                    param="n",
                    code="n_not_supported",
                )
            engine = state.engines[model]
            run = engine.new_run()
            rate = state.config.cascades[model].explore_rate
            explore = rate > 0 and random.random() < rate
            try:
                await _until_disconnect(
                    request,
                    engine.run(messages, params, overrides, run, explore=explore),
                    deadline_s,
                )
            except OverrideError as exc:
                metrics.record_request(model, 400)
                raise ApiError(
                    400, str(exc), param=exc.param, code="invalid_cascade_override"
                ) from None
            except ApiError as exc:  # hung up or timed out: keep what was spent
                metrics.record_run(run, status=exc.status)
                entry.cascade_done(run, exc.status, exc.code)
                raise
            if not run.calls:
                metrics.record_request(model, 400)
                raise ApiError(
                    400,
                    f"cascade.max_cost_usd={overrides.max_cost_usd} is below the expected "
                    "cost of every model of the cascade",
                    param="cascade.max_cost_usd",
                    code="budget_too_small",
                )
            if run.answer is None:
                error = _all_failed(run)  # a 502, or a 400 for a prompt no trace recorded
                metrics.record_run(run, status=error.status)
                entry.cascade_done(run, error.status, error.code)
                raise error
            metrics.record_run(run, status=200)
            entry.cascade_done(run, 200, None)
            if run.explored_all:
                await _write_trace(state, request_id, key, model, messages, run)
            payload = _completion(request_id, run.answer.result, run, state)
            headers = _headers(request_id, run)
            if stream:
                return _stream_text(request_id, payload, include_usage, headers)
            return FastJSONResponse(payload, headers=headers)
        if model in state.backends:
            backend = state.backends[model]
            if n is not None and n > 1:
                params["n"] = _choices_count(model, n, stream, state.config.models[model])
            if stream:
                return _stream_live(
                    request_id, model, backend, messages, params, include_usage, entry, deadline_s
                )
            try:
                result = await _until_disconnect(
                    request, backend.complete(messages, params), deadline_s
                )
            except ApiError as exc:  # the client hung up, or the deadline passed, mid-call
                gone = CallResult(model=model, text=None, error=exc.code)
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
            return FastJSONResponse(_completion(request_id, result, None, state), headers=headers)
        raise ApiError(
            404,
            f"The model '{model}' does not exist: use a cascade "
            f"({', '.join(sorted(state.engines)) or 'none'}) or a configured model "
            f"({', '.join(sorted(state.backends))})",
            param="model",
            code="model_not_found",
        )

    app.chat_handler = chat_completions

    @app.get("/v1/models", responses=error_responses(401))
    async def list_models(request: Request) -> Response:
        authenticate(request, state.client_keys, state.admin_key)
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
        database = _ledger_status(state)
        reasons = [f"upstream {n} does not answer" for n, ok in upstreams.items() if not ok]
        if database["status"] == "degraded":
            reasons.append(f"ledger: {database['reason']}")
        return JSONResponse(
            {
                "status": "degraded" if reasons else "ok",
                "reasons": reasons,
                "worker_pid": os.getpid(),
                "upstreams": upstreams,
                "database": database,
                "cascades": {
                    n: {"policy_hash": e.policy_hash, "nodes": e.nodes}
                    for n, e in state.engines.items()
                },
            }
        )

    reports_engine: list[Any] = []  # made on first use, then shared

    @app.get(
        "/v1/cascade/reports/{name}",
        openapi_extra=_REPORT_OPENAPI,
        responses=error_responses(400, 401, 403, 404),
    )
    async def ledger_report(request: Request, name: str) -> Response:
        from proxy.ledger.reports import REPORTS, ReportError, run_report

        authenticate_admin(request, state.client_keys, state.admin_key)
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
        except OverflowError:  # since=99999999d, or an ISO date at the edge of time
            raise ApiError(
                400, f"--since {since!r} is out of range", code="invalid_report_option"
            ) from None
        return JSONResponse(report.to_dict())

    @app.post("/admin/reload", responses=error_responses(400, 401, 403))
    async def reload_policies(request: Request) -> Response:
        """Re-read every cascade's policy artifact; all or nothing, no request dropped."""
        authenticate_admin(request, state.client_keys, state.admin_key)
        if state.policy_files is None:
            return JSONResponse({"reloaded": {}})
        try:
            done = await asyncio.to_thread(state.policy_files.reload)
        except ReloadError as exc:
            raise ApiError(400, str(exc), code="reload_failed") from None
        logging.getLogger("cascade.reload").info(
            "policy reloaded (POST /admin/reload): %s", describe_reload(done)
        )
        if state.reload_signal is None:
            return JSONResponse({"reloaded": done})
        state.reload_signal.bump()  # the other workers follow within SIGNAL_POLL_S
        return JSONResponse(
            {"reloaded": done, "other_workers": f"reload within {SIGNAL_POLL_S:g} s"}
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    return app


async def _write_trace(
    state: ProxyState,
    request_id: str,
    key: str | None,
    cascade: str,
    messages: list[dict],
    run: CascadeRun,
) -> None:
    """Append an explored request to its cascade's trace file. Agreement labels are written
    at once (off the event loop); an LLM judge runs in the background after the response,
    each of its calls ledgered as a request of its own. Failures are logged, never the
    client's problem."""
    appender = state.explorers.get(cascade)
    config = state.config.cascades[cascade]
    row = trace_row(request_id, cascade, messages, run, config.reference)
    if appender is None or row is None:
        return
    if config.explore_grader.startswith("judge:"):
        judge = config.explore_grader.removeprefix("judge:")
        task = asyncio.create_task(_judge_and_write(state, appender, row, messages, judge, key))
        state.background.add(task)
        task.add_done_callback(state.background.discard)
        return
    await _append(appender, row)


async def _judge_and_write(
    state: ProxyState,
    appender: TraceAppender,
    row: dict,
    messages: list[dict],
    judge: str,
    key: str | None,
) -> None:
    results = await judge_row(row, messages, judge, state.backends[judge])
    for i, result in enumerate(results):
        entry = LedgerEntry(state, f"{row['id']}-judge-{i}", key, f"judge:{judge}", False)
        entry.call_done(judge, result, 200 if result.ok else 502, result.error)
    if row["label"] is not None:
        await _append(appender, row)


async def _append(appender: TraceAppender, row: dict) -> None:
    try:
        await asyncio.to_thread(appender.append, row)
    except OSError as exc:
        logging.getLogger("cascade.explore").warning(
            "cannot write the explored trace to %s: %s", appender.path, exc
        )


def _choices_count(model: str, n: int, stream: bool, cfg: ModelConfig) -> int:
    """`n` for a passthrough call, or why not: a stream relays one choice, and a replayed
    model has one recorded answer per prompt."""
    why = None
    if stream:
        why = "streaming returns one choice: ask without stream for n choices"
    elif cfg.backend == "replay":
        why = f"'{model}' replays recorded traces, which hold one answer per prompt"
    if why is not None:
        message = f"n={n} is not supported here: {why}"
        raise ApiError(400, message, param="n", code="n_not_supported")
    return n


def _ledger_status(state: ProxyState) -> dict:
    """The ledger's part of /health: `degraded`, with the reason, while records are not
    going straight to the database (it is down or too slow, its schema is outdated, or the
    spool is being replayed)."""
    if state.ledger is None:
        return {"status": "off"}
    stats = state.ledger.stats()
    return {
        "status": "degraded" if stats["degraded"] else "ok",
        "reason": stats["reason"],
        "outage_s": stats["outage_s"],
        "written": stats["written"],
        "pending": stats["pending"],
        "spooled": stats["spool_backlog"],
    }


async def _until_disconnect(
    request: Request, work: Awaitable[Any], deadline_s: float | None = None
) -> Any:
    """Await `work` in this task; if the client disconnects first, or `deadline_s` (the
    server's request_timeout_s) passes, cancel it and its upstream calls: no client waits
    forever. A quick answer costs one timer; see _Watch for the rest."""
    task = asyncio.current_task()
    assert task is not None
    watch = _Watch(request, task, deadline_s)
    try:
        return await work
    except asyncio.CancelledError:
        if watch.why is None:
            raise
        task.uncancel()
        if watch.why == "gone":
            metrics.CLIENT_DISCONNECTS.inc()
            raise ApiError(499, "client disconnected", code="client_disconnected") from None
        raise ApiError(
            504,
            f"no answer within the proxy's request timeout ({deadline_s:g} s)",
            code="request_timeout",
        ) from None
    finally:
        watch.close()


class _Watch:
    """Cancels a request's task when its client hangs up or its deadline passes.

    The connection is watched (a task reading the ASGI channel) only from
    WATCH_DISCONNECT_AFTER_S on, and the deadline is armed then too: most answers on a fast
    upstream come sooner and pay for one timer. A client gone earlier is noticed then."""

    __slots__ = ("deadline_at", "loop", "request", "task", "timer", "watcher", "why")

    def __init__(self, request: Request, task: asyncio.Task, deadline_s: float | None) -> None:
        self.request, self.task = request, task
        self.loop = asyncio.get_running_loop()
        now = self.loop.time()
        self.deadline_at = None if deadline_s is None else now + deadline_s
        self.why: str | None = None  # "gone" or "deadline", once the task was cancelled
        self.watcher: asyncio.Task | None = None
        first = (
            WATCH_DISCONNECT_AFTER_S
            if deadline_s is None
            else min(WATCH_DISCONNECT_AFTER_S, deadline_s)
        )
        self.timer = self.loop.call_at(now + first, self._start)

    def _start(self) -> None:
        self.watcher = self.loop.create_task(_disconnected(self.request))
        self.watcher.add_done_callback(self._hung_up)
        if self.deadline_at is not None:
            self.timer = self.loop.call_at(self.deadline_at, self._stop, "deadline")

    def _hung_up(self, watcher: asyncio.Task) -> None:
        if not watcher.cancelled() and watcher.exception() is None:
            self._stop("gone")

    def _stop(self, why: str) -> None:
        if self.why is None:
            self.why = why
            self.task.cancel()

    def close(self) -> None:
        self.timer.cancel()
        if self.watcher is not None:
            self.watcher.cancel()


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
        "choices": (run is None and result.extra.get("choices"))  # a passthrough's n > 1
        or [
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
    tokens_in = max((c.result.tokens_in or 0 for c in run.model_calls), default=0)
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
                **({"members": [_member(m) for m in c.members]} if c.members else {}),
            }
            for c in run.calls
        ],
        "answer_from": run.answer.model if run.answer else None,
        "answer_is_last": any(run.answer is m for m in run.calls[-1].model_calls())
        if run.answer
        else None,
        "reason": run.reason,
        "cost_usd": run.cost_usd,
        "reference_model": state.engines[run.cascade].reference,
        "reference_cost_usd": reference_cost,
        "overhead_ms": round(run.overhead_ms, 3),
    }


def _member(call: NodeCall) -> dict:
    """One model of a tier node, as listed under that node in the `cascade` object."""
    return {
        "model": call.model,
        "status": "ok" if call.result.ok else call.result.error,
        "latency_ms": round(call.result.latency_ms, 3),
        "cost_usd": call.result.cost_usd,
        "confidence": call.confidence,
        "answer": call.extracted,
    }


def _headers(request_id: str, run: CascadeRun) -> dict[str, str]:
    cost = run.cost_usd
    return {
        "x-request-id": request_id,
        "x-cascade-model": run.answer.model if run.answer else "",
        "x-cascade-cost-usd": "unknown" if cost is None else f"{cost:.8f}",
        "x-cascade-calls": str(len(run.model_calls)),
        "x-cascade-overhead-ms": f"{run.overhead_ms:.3f}",
    }


def _sse(data: dict | str) -> bytes:
    text = data.encode() if isinstance(data, str) else dumps(data)
    return b"data: " + text + b"\n\n"


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
    idle_s: float,
) -> StreamingResponse:
    """Passthrough streaming: upstream deltas as they arrive; an upstream failure after the
    stream started ends it with an error event (the status line is already sent).

    The server's request_timeout_s (`idle_s`) bounds every silence of the upstream, the
    wait for its first delta included: a stream that sends nothing for that long ends with
    a `request_timeout` error event, ledgered as a 504. A stream that keeps sending runs on
    (a long answer is not cut; the model's own timeout_s still bounds it)."""

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
        started = time.perf_counter()
        chunks = backend.stream(messages, params)
        try:
            while True:
                try:
                    async with asyncio.timeout(idle_s):  # a silence, not the whole stream
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:  # the upstream call was cancelled (and released)
                    silent = ApiError(
                        504,
                        f"Model '{model}' sent nothing for {idle_s:g} s (the proxy's "
                        "request timeout); the stream is ended",
                        code="request_timeout",
                    )
                    timed_out = CallResult(
                        model=model,
                        text=None,
                        error="request_timeout",
                        error_detail=f"{model}: {silent.message}",
                        latency_ms=(time.perf_counter() - started) * 1000.0,
                    )
                    metrics.record_call(model, timed_out)
                    entry.call_done(model, timed_out, silent.status, silent.code)
                    yield _sse(silent.to_json(entry.state.secrets))
                    yield _sse("[DONE]")
                    return
                if chunk.done is not None:
                    done = chunk.done
                    break
                if chunk.delta:
                    yield _sse(_chunk(request_id, model, {"content": chunk.delta}))
        finally:
            await chunks.aclose()
        if done is None or not done.ok:
            if done is not None:
                metrics.record_call(model, done)
                failure = _call_failed(model, done)
                entry.call_done(model, done, failure.status, failure.code)
                yield _sse(failure.to_json(entry.state.secrets))
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
        extra={"attempts": [_attempt(c.model, c.result) for c in run.model_calls]},
    )


def _call_failed(model: str, result: CallResult) -> ApiError:
    return ApiError(
        502,
        f"Model '{model}' failed: {result.error}",
        code="upstream_failed",
        extra={"attempts": [_attempt(model, result)]},
    )
