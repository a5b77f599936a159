"""What the dashboard at /ui reads beyond `cascade report`'s reports: spend and reference cost
per UTC day and cascade or key (the daily rollups, the same sums `report spend` reads), and
the last requests with their calls (the cascade trace)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, func, select

from proxy.ledger.schema import calls_table, daily_table, requests_table

_DAY = daily_table.c
_REQ = requests_table.c
_CALL = calls_table.c


@dataclass
class Series:
    """Per day and group: known cost and the reference model's cost (USD)."""

    days: list[dt.date]
    cost: dict[str, list[float]]
    reference: dict[str, list[float]]


def daily_series(engine: Engine, first_day: dt.date, last_day: dt.date, by: str) -> Series:
    group = {"cascade": _DAY.cascade, "key": _DAY.api_key}[by]
    q = (
        select(_DAY.day, group, func.sum(_DAY.cost_usd), func.sum(_DAY.reference_cost_usd))
        .where(_DAY.day >= first_day)
        .group_by(_DAY.day, group)
    )
    days = [first_day + dt.timedelta(days=i) for i in range((last_day - first_day).days + 1)]
    index = {d: i for i, d in enumerate(days)}
    cost: dict[str, list[float]] = {}
    reference: dict[str, list[float]] = {}
    with engine.connect() as conn:
        for day, g, c, r in conn.execute(q):
            if day not in index:
                continue
            name = g or "(none)"
            cost.setdefault(name, [0.0] * len(days))[index[day]] += float(c or 0.0)
            reference.setdefault(name, [0.0] * len(days))[index[day]] += float(r or 0.0)
    return Series(days, cost, reference)


def recent_requests(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    """The last `limit` requests, newest first, each with its calls in order and the
    confidence signals each call recorded (votes of a sampled node, token-logprob summary)."""
    cols = [
        _REQ.request_id, _REQ.ts, _REQ.api_key, _REQ.cascade, _REQ.model_requested,
        _REQ.status, _REQ.chosen_model, _REQ.cost_usd, _REQ.reference_cost_usd,
        _REQ.latency_ms, _REQ.error,
    ]  # fmt: skip
    with engine.connect() as conn:
        rows = [
            r._asdict() for r in conn.execute(select(*cols).order_by(_REQ.ts.desc()).limit(limit))
        ]
        ids = [r["request_id"] for r in rows]
        calls: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        if ids:
            q = (
                select(
                    _CALL.request_id,
                    _CALL.call_order,
                    _CALL.model,
                    _CALL.status,
                    _CALL.confidence,
                    _CALL.p_correct,
                    _CALL.decision,
                    _CALL.cost_usd,
                    _CALL.latency_ms,
                    _CALL.samples,
                    _CALL.vote_share,
                    _CALL.agreement,
                    _CALL.lp_mean,
                    _CALL.lp_min,
                    _CALL.lp_q05,
                    _CALL.lp_q25,
                )
                .where(_CALL.request_id.in_(ids))
                .order_by(_CALL.request_id, _CALL.call_order)
            )
            for c in conn.execute(q):
                calls[c.request_id].append(c._asdict())
    for r in rows:
        r["calls"] = calls[r["request_id"]]
    return rows
