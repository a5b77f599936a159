"""Ledger reports: spend, savings, exits, latency and errors over a time window.

Every function takes an engine, a window start (``since``: ``'7d'``, ``'24h'``, ``'30m'``, an
ISO date or datetime, or a datetime) and a grouping (``by``: day, model, cascade or key) and
returns a :class:`Report`: column names, a list of dict rows, and notes. Queries are
SQLAlchemy Core and run unchanged on SQLite and PostgreSQL; percentiles are computed in
Python from the window's values (linear interpolation, as ``percentile_cont``).

Unknown costs are never shown as zero: every report lists the models that had a call without
a known price in the window (``unpriced_models``) and marks their rows ``unpriced``.

Spend reads ``ledger_daily`` (kept when detail rows are pruned) when the window starts on a
UTC midnight; otherwise, and for every other report, it reads the detail tables.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, and_, case, exists, func, select

from proxy.ledger.schema import calls_table, daily_table, requests_table

GROUPINGS = ("day", "model", "cascade", "key")
UNPRICED = "unpriced"
NONE_LABEL = "(none)"

_REQ = requests_table.c
_CALL = calls_table.c
_DAY = daily_table.c


class ReportError(ValueError):
    """A bad report name, window or grouping."""


@dataclass
class Report:
    name: str
    since: dt.datetime
    by: str
    columns: list[str]
    rows: list[dict[str, Any]]
    unpriced_models: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = "detail"

    def to_dict(self) -> dict[str, Any]:
        return {
            "report": self.name,
            "since": self.since.isoformat(),
            "by": self.by,
            "source": self.source,
            "columns": self.columns,
            "rows": self.rows,
            "unpriced_models": self.unpriced_models,
            "notes": self.notes,
        }


# --------------------------------------------------------------------------- inputs

_RELATIVE = re.compile(r"^\s*(\d+)\s*([dhm])\s*$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def parse_since(since: str | dt.datetime | dt.date | None, now: dt.datetime | None = None):
    """The window start as an aware UTC datetime. ``None`` means the last 7 days."""
    now = now or dt.datetime.now(dt.UTC)
    if since is None:
        since = "7d"
    if isinstance(since, dt.datetime):
        return since.astimezone(dt.UTC) if since.tzinfo else since.replace(tzinfo=dt.UTC)
    if isinstance(since, dt.date):
        return dt.datetime(since.year, since.month, since.day, tzinfo=dt.UTC)
    m = _RELATIVE.match(str(since))
    if m:
        return now - dt.timedelta(**{_UNITS[m.group(2)]: int(m.group(1))})
    text = str(since).strip()
    try:
        if len(text) == 10:
            d = dt.date.fromisoformat(text)
            return dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ReportError(
            f"--since {since!r} is neither a duration (7d, 24h, 30m) nor an ISO date"
        ) from None
    return when.astimezone(dt.UTC) if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _check_by(by: str | None, default: str) -> str:
    by = by or default
    if by not in GROUPINGS:
        raise ReportError(f"--by {by!r} is not one of {', '.join(GROUPINGS)}")
    return by


def _req_group(by: str):
    return {
        "day": _REQ.day,
        "model": _REQ.chosen_model,
        "cascade": _REQ.cascade,
        "key": _REQ.api_key,
    }[by]


def _call_group(by: str):
    return {"day": _REQ.day, "model": _CALL.model, "cascade": _REQ.cascade, "key": _REQ.api_key}[by]


def _label(value: Any) -> str:
    if value is None or value == "":
        return NONE_LABEL
    return value.isoformat() if isinstance(value, dt.date) else str(value)


def _calls_in_window():
    return calls_table.join(requests_table, _CALL.request_id == _REQ.request_id)


def _unpriced_models(conn, since: dt.datetime) -> list[str]:
    q = select(_CALL.model).where(_CALL.ts >= since, _CALL.cost_usd.is_(None)).distinct()
    return sorted(r[0] for r in conn.execute(q))


def _round(x: float | None, digits: int = 10) -> float | None:
    return None if x is None else round(float(x), digits)


def _add(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _flag(unpriced_count: int) -> str:
    return UNPRICED if unpriced_count else ""


def _unpriced_note(models: list[str]) -> list[str]:
    if not models:
        return []
    return [
        f"unpriced: {', '.join(models)} had calls with no known price; their costs are "
        "left out of the sums, which are therefore lower bounds"
    ]


# --------------------------------------------------------------------------- spend

SPEND_COLUMNS = [
    "group",
    "requests",
    "calls",
    "tokens_in",
    "tokens_out",
    "cost_usd",
    "unpriced_calls",
    "flag",
]


def spend(engine: Engine, since=None, by: str | None = None) -> Report:
    """Requests, calls, tokens and cost per group. A request counts under the model whose
    answer was returned; a call under the model it called (so totals add up)."""
    start = parse_since(since)
    by = _check_by(by, "model")
    acc: dict[Any, dict[str, Any]] = defaultdict(
        lambda: {
            "requests": 0,
            "calls": 0,
            "tokens_in": 0,
            "tokens_out": 0,
            "cost_usd": None,
            "unpriced_calls": 0,
        }
    )
    use_daily = start == start.replace(hour=0, minute=0, second=0, microsecond=0)
    with engine.connect() as conn:
        if use_daily:
            key = {
                "day": _DAY.day,
                "model": _DAY.model,
                "cascade": _DAY.cascade,
                "key": _DAY.api_key,
            }[by]
            q = (
                select(
                    key,
                    func.sum(_DAY.requests),
                    func.sum(_DAY.calls),
                    func.sum(_DAY.tokens_in),
                    func.sum(_DAY.tokens_out),
                    func.sum(_DAY.cost_usd),
                    func.sum(_DAY.unpriced_calls),
                )
                .where(_DAY.day >= start.date())
                .group_by(key)
            )
            for g, n_req, n_calls, t_in, t_out, cost, unpriced in conn.execute(q):
                a = acc[_label(g)]
                a["requests"] += int(n_req or 0)
                a["calls"] += int(n_calls or 0)
                a["tokens_in"] += int(t_in or 0)
                a["tokens_out"] += int(t_out or 0)
                a["cost_usd"] = _add(a["cost_usd"], cost)
                a["unpriced_calls"] += int(unpriced or 0)
            uq = (
                select(_DAY.model)
                .where(_DAY.day >= start.date(), _DAY.unpriced_calls > 0)
                .distinct()
            )
            unpriced = sorted(r[0] for r in conn.execute(uq))
        else:
            rg = _req_group(by)
            for g, n in conn.execute(select(rg, func.count()).where(_REQ.ts >= start).group_by(rg)):
                acc[_label(g)]["requests"] += int(n)
            cg = _call_group(by)
            q = (
                select(
                    cg,
                    func.count(),
                    func.sum(_CALL.tokens_in),
                    func.sum(_CALL.tokens_out),
                    func.sum(_CALL.cost_usd),
                    func.sum(case((_CALL.cost_usd.is_(None), 1), else_=0)),
                )
                .select_from(_calls_in_window())
                .where(_REQ.ts >= start)
                .group_by(cg)
            )
            for g, n_calls, t_in, t_out, cost, n_unpriced in conn.execute(q):
                a = acc[_label(g)]
                a["calls"] += int(n_calls)
                a["tokens_in"] += int(t_in or 0)
                a["tokens_out"] += int(t_out or 0)
                a["cost_usd"] = _add(a["cost_usd"], cost)
                a["unpriced_calls"] += int(n_unpriced or 0)
            # Requests recorded without call rows carry their own tokens and cost.
            no_calls = ~exists().where(_CALL.request_id == _REQ.request_id)
            q = (
                select(
                    rg, func.sum(_REQ.tokens_in), func.sum(_REQ.tokens_out), func.sum(_REQ.cost_usd)
                )
                .where(_REQ.ts >= start, no_calls)
                .group_by(rg)
            )
            for g, t_in, t_out, cost in conn.execute(q):
                a = acc[_label(g)]
                a["tokens_in"] += int(t_in or 0)
                a["tokens_out"] += int(t_out or 0)
                a["cost_usd"] = _add(a["cost_usd"], cost)
            unpriced = _unpriced_models(conn, start)
    rows = []
    for g in sorted(acc):
        a = acc[g]
        rows.append(
            {
                "group": g,
                **a,
                "cost_usd": _round(a["cost_usd"]),
                "flag": _flag(a["unpriced_calls"]),
            }
        )
    return Report(
        "spend",
        start,
        by,
        SPEND_COLUMNS,
        rows,
        unpriced,
        _unpriced_note(unpriced),
        "ledger_daily" if use_daily else "detail",
    )


# --------------------------------------------------------------------------- savings

SAVINGS_COLUMNS = [
    "group",
    "requests",
    "compared",
    "cost_usd",
    "reference_cost_usd",
    "saved_usd",
    "saved_fraction",
    "no_reference",
    "unpriced_requests",
    "flag",
]


def savings(engine: Engine, since=None, by: str | None = None) -> Report:
    """Actual cost against the reference model's cost, over requests where both are known."""
    start = parse_since(since)
    by = _check_by(by, "cascade")
    rg = _req_group(by)
    both = and_(_REQ.cost_usd.is_not(None), _REQ.reference_cost_usd.is_not(None))
    q = (
        select(
            rg,
            func.count(),
            func.sum(case((both, 1), else_=0)),
            func.sum(case((both, _REQ.cost_usd), else_=None)),
            func.sum(case((both, _REQ.reference_cost_usd), else_=None)),
            func.sum(case((_REQ.reference_cost_usd.is_(None), 1), else_=0)),
            func.sum(case((_REQ.cost_usd.is_(None), 1), else_=0)),
        )
        .where(_REQ.ts >= start)
        .group_by(rg)
    )
    rows = []
    total_noref = 0
    with engine.connect() as conn:
        result = sorted(conn.execute(q).all(), key=lambda r: _label(r[0]))
        unpriced = _unpriced_models(conn, start)
    for g, n, compared, cost, ref, noref, n_unpriced in result:
        cost = float(cost or 0.0) if compared else None
        ref = float(ref or 0.0) if compared else None
        saved = None if ref is None else ref - cost
        total_noref += int(noref or 0)
        rows.append(
            {
                "group": _label(g),
                "requests": int(n),
                "compared": int(compared or 0),
                "cost_usd": _round(cost),
                "reference_cost_usd": _round(ref),
                "saved_usd": _round(saved),
                "saved_fraction": _round(saved / ref, 6) if saved is not None and ref else None,
                "no_reference": int(noref or 0),
                "unpriced_requests": int(n_unpriced or 0),
                "flag": _flag(int(n_unpriced or 0)),
            }
        )
    notes = _unpriced_note(unpriced)
    if total_noref:
        notes.append(
            f"{total_noref} request(s) had no reference price and are left out of the comparison"
        )
    return Report("savings", start, by, SAVINGS_COLUMNS, rows, unpriced, notes)


# --------------------------------------------------------------------------- exits

EXITS_COLUMNS = ["group", "kind", "value", "requests", "share", "flag"]


def exits(engine: Engine, since=None, by: str | None = None) -> Report:
    """Where queries stop, per group (default: cascade): the distribution of the number of
    calls and of the returned model, and the recall rate (share of answered requests whose
    returned model is not the last one called)."""
    start = parse_since(since)
    by = _check_by(by, "cascade")
    rg = _req_group(by)
    last = (
        select(_CALL.request_id.label("rid"), func.max(_CALL.call_order).label("last_order"))
        .where(_CALL.ts >= start)
        .group_by(_CALL.request_id)
        .subquery()
    )
    last_call = calls_table.alias("last_call")
    recall_q = (
        select(
            rg,
            func.count(),
            func.sum(case((last_call.c.model != _REQ.chosen_model, 1), else_=0)),
        )
        .select_from(
            requests_table.join(last, last.c.rid == _REQ.request_id).join(
                last_call,
                and_(
                    last_call.c.request_id == last.c.rid,
                    last_call.c.call_order == last.c.last_order,
                ),
            )
        )
        .where(_REQ.ts >= start, _REQ.chosen_model.is_not(None))
        .group_by(rg)
    )
    with engine.connect() as conn:
        totals = dict(
            (_label(g), int(n))
            for g, n in conn.execute(select(rg, func.count()).where(_REQ.ts >= start).group_by(rg))
        )
        ncalls = conn.execute(
            select(rg, _REQ.n_calls, func.count())
            .where(_REQ.ts >= start)
            .group_by(rg, _REQ.n_calls)
        ).all()
        chosen = conn.execute(
            select(rg, _REQ.chosen_model, func.count())
            .where(_REQ.ts >= start)
            .group_by(rg, _REQ.chosen_model)
        ).all()
        recall = conn.execute(recall_q).all()
        unpriced = _unpriced_models(conn, start)
    rows: list[dict[str, Any]] = []
    for g, n, count in ncalls:
        g = _label(g)
        rows.append(_exit_row(g, "n_calls", str(n), count, totals[g], ""))
    for g, model, count in chosen:
        g = _label(g)
        flag = UNPRICED if model in unpriced else ""
        rows.append(_exit_row(g, "chosen_model", _label(model), count, totals[g], flag))
    for g, answered, recalled in recall:
        rows.append(_exit_row(_label(g), "recalled", "yes", int(recalled or 0), int(answered), ""))
    order = {"n_calls": 0, "chosen_model": 1, "recalled": 2}
    rows.sort(key=lambda r: (r["group"], order[r["kind"]], r["value"]))
    notes = _unpriced_note(unpriced)
    notes.append(
        "recalled: share of answered requests (with call rows) whose returned model is not "
        "the last model called"
    )
    return Report("exits", start, by, EXITS_COLUMNS, rows, unpriced, notes)


def _exit_row(group: str, kind: str, value: str, count: int, total: int, flag: str) -> dict:
    return {
        "group": group,
        "kind": kind,
        "value": value,
        "requests": int(count),
        "share": _round(count / total, 6) if total else None,
        "flag": flag,
    }


# --------------------------------------------------------------------------- latency

LATENCY_COLUMNS = ["scope", "group", "n", "p50_ms", "p95_ms", "p99_ms", "mean_ms", "flag"]


def percentile(values: list[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) with linear interpolation (PostgreSQL's percentile_cont)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _latency_row(scope: str, group: str, values: list[float], flag: str) -> dict:
    return {
        "scope": scope,
        "group": group,
        "n": len(values),
        "p50_ms": _round(percentile(values, 0.5), 3),
        "p95_ms": _round(percentile(values, 0.95), 3),
        "p99_ms": _round(percentile(values, 0.99), 3),
        "mean_ms": _round(sum(values) / len(values), 3) if values else None,
        "flag": flag,
    }


def latency(engine: Engine, since=None, by: str | None = None) -> Report:
    """p50/p95/p99 of request latency overall, then per group: per model from the calls'
    latency (``by=model``), else of request latency per day, cascade or key."""
    start = parse_since(since)
    by = _check_by(by, "model")
    groups: dict[str, list[float]] = defaultdict(list)
    with engine.connect() as conn:
        overall = [
            float(v) for (v,) in conn.execute(select(_REQ.latency_ms).where(_REQ.ts >= start))
        ]
        if by == "model":
            q = select(_CALL.model, _CALL.latency_ms).where(
                _CALL.ts >= start, _CALL.latency_ms.is_not(None)
            )
            scope = "call"
        else:
            rg = _req_group(by)
            q = select(rg, _REQ.latency_ms).where(_REQ.ts >= start)
            scope = "request"
        for g, v in conn.execute(q):
            groups[_label(g)].append(float(v))
        unpriced = _unpriced_models(conn, start)
    rows = [_latency_row("request", "(all)", overall, "")]
    for g in sorted(groups):
        flag = UNPRICED if by == "model" and g in unpriced else ""
        rows.append(_latency_row(scope, g, groups[g], flag))
    return Report("latency", start, by, LATENCY_COLUMNS, rows, unpriced, _unpriced_note(unpriced))


# --------------------------------------------------------------------------- errors

ERRORS_COLUMNS = ["scope", "group", "total", "failed", "failure_rate", "breakdown", "flag"]


def _breakdown(counter: Iterable[tuple[Any, int]]) -> str:
    return ", ".join(f"{k}:{n}" for k, n in sorted(counter, key=lambda kv: (-kv[1], str(kv[0]))))


def errors(engine: Engine, since=None, by: str | None = None) -> Report:
    """Call failure rates per group (``status != 'ok'``; by model: the model called) and
    request HTTP statuses per group (by model: the model returned)."""
    start = parse_since(since)
    by = _check_by(by, "model")
    cg = _call_group(by)
    rg = _req_group(by)
    call_counts: dict[str, Counter] = defaultdict(Counter)
    req_counts: dict[str, Counter] = defaultdict(Counter)
    with engine.connect() as conn:
        q = (
            select(cg, _CALL.status, func.count())
            .select_from(_calls_in_window())
            .where(_REQ.ts >= start)
            .group_by(cg, _CALL.status)
        )
        for g, status, n in conn.execute(q):
            call_counts[_label(g)][status] += int(n)
        q = select(rg, _REQ.status, func.count()).where(_REQ.ts >= start).group_by(rg, _REQ.status)
        for g, status, n in conn.execute(q):
            req_counts[_label(g)][int(status)] += int(n)
        unpriced = _unpriced_models(conn, start)
    rows = []
    for g in sorted(call_counts):
        c = call_counts[g]
        total = sum(c.values())
        failed = total - c.get("ok", 0)
        flag = UNPRICED if by == "model" and g in unpriced else ""
        rows.append(_error_row("call", g, total, failed, c, flag))
    for g in sorted(req_counts):
        c = req_counts[g]
        total = sum(c.values())
        failed = sum(n for s, n in c.items() if s >= 400)
        flag = UNPRICED if by == "model" and g in unpriced else ""
        rows.append(_error_row("request", g, total, failed, c, flag))
    return Report("errors", start, by, ERRORS_COLUMNS, rows, unpriced, _unpriced_note(unpriced))


def _error_row(scope: str, group: str, total: int, failed: int, c: Counter, flag: str) -> dict:
    return {
        "scope": scope,
        "group": group,
        "total": total,
        "failed": failed,
        "failure_rate": _round(failed / total, 6) if total else None,
        "breakdown": _breakdown(c.items()),
        "flag": flag,
    }


REPORTS: dict[str, Callable[..., Report]] = {
    "spend": spend,
    "savings": savings,
    "exits": exits,
    "latency": latency,
    "errors": errors,
}


def run_report(engine: Engine, name: str, since=None, by: str | None = None) -> Report:
    if name not in REPORTS:
        raise ReportError(f"unknown report {name!r}; one of {', '.join(REPORTS)}")
    return REPORTS[name](engine, since, by)
