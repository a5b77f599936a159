"""Prometheus metrics: requests, calls per model, cost, latency, decision overhead, escalations."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from proxy.engine.cascade import CascadeRun
from upstreams.base import CallResult

REQUESTS = Counter("cascade_requests_total", "Cascade requests", ["cascade", "status"])
CALLS = Counter("cascade_upstream_calls_total", "Upstream calls", ["model", "outcome"])
UPSTREAM_ERRORS = Counter(
    "cascade_upstream_errors_total", "Failed upstream calls", ["model", "kind"]
)
COST = Counter("cascade_cost_usd_total", "Spend on upstream calls (priced calls only)", ["model"])
ESCALATIONS = Counter(
    "cascade_escalations_total", "Cascade requests that called more than one model", ["cascade"]
)
CLIENT_DISCONNECTS = Counter("cascade_client_disconnects_total", "Clients gone before the answer")
CALL_LATENCY = Histogram(
    "cascade_upstream_latency_seconds",
    "Upstream call latency",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
OVERHEAD = Histogram(
    "cascade_decision_overhead_seconds",
    "Time the proxy spends deciding per request (upstream waits excluded)",
    ["cascade"],
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2),
)


_children: dict[tuple, Any] = {}


def _child(metric: Counter | Histogram, *labels: str) -> Any:
    """`metric.labels(*labels)`, remembered: prometheus-client validates and locks on every
    `labels` call, and these run several times per request."""
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def record_call(model: str, result: CallResult) -> None:
    ok = result.ok
    _child(CALLS, model, "ok" if ok else "error").inc()
    _child(CALL_LATENCY, model).observe(result.latency_ms / 1000.0)
    if result.cost_usd is not None:
        _child(COST, model).inc(result.cost_usd)
    if not ok:
        _child(UPSTREAM_ERRORS, model, result.error or "unknown").inc()


def record_run(run: CascadeRun, status: int) -> None:
    """A cascade request, once the client has its answer or error; `status` is the HTTP
    status the client got (200; 400 refused, or a prompt no trace recorded; 499 client gone;
    502 every model failed; 504 timed out). A request refused before any call adds to the
    request count only."""
    _child(REQUESTS, run.cascade, str(status)).inc()
    if not run.calls:
        return
    _child(OVERHEAD, run.cascade).observe(run.overhead_ms / 1000.0)
    if len(run.calls) > 1:
        _child(ESCALATIONS, run.cascade).inc()
    for call in run.model_calls:
        record_call(call.model, call.result)


def exposition() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
