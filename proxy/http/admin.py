"""Every route but the chat one: the models, health, the ledger's reports, policy reload and
Prometheus metrics. Each reads the process's state from `app.state.proxy`."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from proxy.engine.reload import SIGNAL_POLL_S
from proxy.engine.reload import describe as describe_reload
from proxy.http import metrics
from proxy.http.contract import authenticate, authenticate_admin
from proxy.http.errors import ApiError, error_responses
from proxy.http.state import ProxyState, ledger_status

router = APIRouter()

_REPORT_OPENAPI = {
    "parameters": [
        {"name": "since", "in": "query", "schema": {"type": "string"}},
        {"name": "by", "in": "query", "schema": {"type": "string"}},
    ]
}


def _state(request: Request) -> ProxyState:
    return request.app.state.proxy


@router.get("/v1/models", responses=error_responses(401))
async def list_models(request: Request) -> Response:
    state = _state(request)
    authenticate(request, state.client_keys, state.admin_key, state.key_check)
    now = int(time.time())
    data = [
        {"id": name, "object": "model", "created": now, "owned_by": "cascade"}
        for name in state.engines
    ] + [
        {"id": name, "object": "model", "created": now, "owned_by": cfg.backend}
        for name, cfg in state.config.models.items()
    ]
    return JSONResponse({"object": "list", "data": data})


@router.get("/health")
async def health(request: Request) -> Response:
    """200 while the process serves; `degraded`, with the reasons, when an upstream does not
    answer or the ledger is not writing straight to its database."""
    state = _state(request)
    names = list(state.backends)
    checks = await asyncio.gather(
        *(asyncio.wait_for(state.backends[n].health(), 2.0) for n in names),
        return_exceptions=True,
    )
    upstreams = {n: ok is True for n, ok in zip(names, checks, strict=True)}
    database = ledger_status(state)
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
            **({"keys": state.keys.status()} if state.keys is not None else {}),
            "cascades": {
                n: {"policy_hash": e.policy_hash, "nodes": e.nodes}
                for n, e in state.engines.items()
            },
        }
    )


@router.get(
    "/v1/cascade/reports/{name}",
    openapi_extra=_REPORT_OPENAPI,
    responses=error_responses(400, 401, 403, 404),
)
async def ledger_report(request: Request, name: str) -> Response:
    """The figures of `cascade report NAME` (admin key)."""
    from proxy.ledger.reports import REPORTS, run_report

    state = _state(request)
    authenticate_admin(request, state.client_keys, state.admin_key)
    if name not in REPORTS:
        raise ApiError(
            404, f"Unknown report {name!r}; one of {', '.join(REPORTS)}", code="not_found"
        )
    since = request.query_params.get("since", "7d")
    by = request.query_params.get("by") or None
    try:
        report = await asyncio.to_thread(run_report, state.reports_engine(), name, since, by)
    except OverflowError:  # since=99999999d, or an ISO date at the edge of time
        raise ApiError(
            400, f"--since {since!r} is out of range", code="invalid_report_option"
        ) from None
    return JSONResponse(report.to_dict())


@router.post("/admin/reload", responses=error_responses(400, 401, 403))
async def reload_policies(request: Request) -> Response:
    """Re-read every cascade's policy artifact; all or nothing, no request dropped."""
    state = _state(request)
    authenticate_admin(request, state.client_keys, state.admin_key)
    if state.policy_files is None:
        return JSONResponse({"reloaded": {}})
    done = await asyncio.to_thread(state.policy_files.reload)  # a ReloadError is a 400
    logging.getLogger("cascade.reload").info(
        "policy reloaded (POST /admin/reload): %s", describe_reload(done)
    )
    reply: dict[str, Any] = {"reloaded": done}
    if state.reload_signal is not None:
        state.reload_signal.bump()  # the other workers follow within SIGNAL_POLL_S
        reply["other_workers"] = f"reload within {SIGNAL_POLL_S:g} s"
    return JSONResponse(reply)


@router.get("/metrics", response_class=PlainTextResponse)
async def prometheus_metrics() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
