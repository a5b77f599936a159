"""Ledger reports: spend, savings, exits, latency and errors over a time window.

Every function takes an engine, a window start (``since``: ``'7d'``, ``'24h'``, ``'30m'``, an
ISO date or datetime, or a datetime) and a grouping (``by``: day, model, cascade or key) and
returns a :class:`Report`: column names, a list of dict rows, and notes. Queries are
SQLAlchemy Core and run on SQLite and PostgreSQL; latency percentiles are computed by
PostgreSQL (``percentile_cont``) or, on SQLite, in Python with the same linear interpolation.

Unknown costs are never shown as zero: every report lists the models that had a call without
a known price in the window (``unpriced_models``) and marks their rows ``unpriced``.

Speed at volume (``benchmarks/ledger_reports.py``: 1M requests, 3M calls): whole UTC days are
read from ``ledger_daily`` wherever the rollups hold the figure (spend, and the list of
unpriced models), so only the window's first, partial day touches the detail tables; the
rollups are also what survives ``cascade db prune``. Calls are filtered on their own ``ts``
(the writer stores the request's time on each call) so a join with the requests never scans
more than the window's calls.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    Connection,
    Date,
    Engine,
    and_,
    case,
    exists,
    func,
    literal,
    or_,
    select,
    text,
)
from sqlalchemy.dialects import postgresql

from policies.errors import InvalidInput
from proxy.ledger.schema import calls_table, daily_table, requests_table

GROUPINGS = ("day", "model", "cascade", "key")
UNPRICED = "unpriced"
NONE_LABEL = "(none)"

_REQ = requests_table.c
_CALL = calls_table.c
_DAY = daily_table.c


class ReportError(InvalidInput):
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


def _in_window(col, lo: dt.datetime, hi: dt.datetime | None = None):
    return col >= lo if hi is None else and_(col >= lo, col < hi)


def _calls_of_window(lo: dt.datetime, hi: dt.datetime | None = None):
    """Calls joined to their requests, both bounded by the window: a call's ``ts`` is its
    request's, and bounding it too lets the database read only the window's calls."""
    return and_(_in_window(_REQ.ts, lo, hi), _in_window(_CALL.ts, lo, hi))


def _first_midnight(start: dt.datetime) -> dt.datetime:
    """``start`` if it is a UTC midnight, else the next one: where whole days begin."""
    midnight = start.replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight if midnight == start else midnight + dt.timedelta(days=1)


@contextmanager
def _connect(engine: Engine) -> Iterator[Connection]:
    """A read connection. On PostgreSQL, for this transaction only: no JIT (compiling costs
    more than these sub-second queries take) and enough work_mem for the window's hashes and
    sorts to stay in memory."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SET LOCAL jit = off"))
            conn.execute(text("SET LOCAL work_mem = '32MB'"))
        yield conn


def _unpriced_models(conn: Connection, since: dt.datetime) -> list[str]:
    """Models with a call of unknown cost since ``since``: the rollups for whole days, the
    detail rows for the partial first day (the same answer as the detail rows alone)."""
    midnight = _first_midnight(since)
    daily = select(_DAY.model).where(_DAY.day >= midnight.date(), _DAY.unpriced_calls > 0)
    found = {r[0] for r in conn.execute(daily.distinct())}
    if since < midnight:
        q = select(_CALL.model).where(
            _in_window(_CALL.ts, since, midnight), _CALL.cost_usd.is_(None)
        )
        found.update(r[0] for r in conn.execute(q.distinct()))
    return sorted(found)


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


# By model a request and a call count under different models, and the columns say so: the
# request under the model whose answer was returned, the call under the model it called.
SPEND_BY_MODEL = {"requests": "requests_answered", "calls": "calls_made"}
SPEND_BY_MODEL_COLUMNS = [SPEND_BY_MODEL.get(c, c) for c in SPEND_COLUMNS]
SPEND_BY_MODEL_NOTE = (
    "by model: requests_answered counts each request under the model whose answer was "
    "returned ((none): no answer); calls_made, tokens and cost count each call under the "
    "model it called"
)


def spend(engine: Engine, since=None, by: str | None = None) -> Report:
    """Requests, calls, tokens and cost per group. By model a request counts under the model
    whose answer was returned (`requests_answered`), a call under the model it called
    (`calls_made`), so totals add up.

    Whole UTC days come from ``ledger_daily``, which holds exactly these sums; a window that
    starts mid-day reads that first partial day from the detail rows."""
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
    midnight = _first_midnight(start)
    with _connect(engine) as conn:
        _spend_daily(conn, midnight.date(), by, acc)
        if start < midnight:
            _spend_detail(conn, start, midnight, by, acc)
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
    notes = _unpriced_note(unpriced)
    columns = SPEND_COLUMNS
    if by == "model":
        rows = [{SPEND_BY_MODEL.get(k, k): v for k, v in row.items()} for row in rows]
        columns = SPEND_BY_MODEL_COLUMNS
        notes.append(SPEND_BY_MODEL_NOTE)
    return Report(
        "spend",
        start,
        by,
        columns,
        rows,
        unpriced,
        notes,
        "ledger_daily" if start == midnight else "ledger_daily+detail",
    )


def _spend_daily(conn: Connection, first_day: dt.date, by: str, acc: dict) -> None:
    """Add the rollups of ``first_day`` and later days to ``acc``."""
    key = {"day": _DAY.day, "model": _DAY.model, "cascade": _DAY.cascade, "key": _DAY.api_key}[by]
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
        .where(_DAY.day >= first_day)
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


def _spend_detail(conn: Connection, lo: dt.datetime, hi: dt.datetime, by: str, acc: dict) -> None:
    """Add the detail rows of requests made in [lo, hi) to ``acc``."""
    rg = _req_group(by)
    in_window = _in_window(_REQ.ts, lo, hi)
    for g, n in conn.execute(select(rg, func.count()).where(in_window).group_by(rg)):
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
        .where(_calls_of_window(lo, hi))
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
        select(rg, func.sum(_REQ.tokens_in), func.sum(_REQ.tokens_out), func.sum(_REQ.cost_usd))
        .where(in_window, no_calls)
        .group_by(rg)
    )
    for g, t_in, t_out, cost in conn.execute(q):
        a = acc[_label(g)]
        a["tokens_in"] += int(t_in or 0)
        a["tokens_out"] += int(t_out or 0)
        a["cost_usd"] = _add(a["cost_usd"], cost)


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
    with _connect(engine) as conn:
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
    # Per answered request with call rows: its last call's order, and the last order at which
    # the returned model was called; the answer was recalled unless the two are the same.
    # One pass over the window's calls, without a self-join to find each last call.
    per_request = (
        select(
            rg.label("g"),
            func.max(_CALL.call_order).label("last_order"),
            func.max(case((_CALL.model == _REQ.chosen_model, _CALL.call_order))).label(
                "chosen_order"
            ),
        )
        .select_from(_calls_in_window())
        .where(_calls_of_window(start), _REQ.chosen_model.is_not(None))
        .group_by(rg, _REQ.request_id)
        .subquery()
    )
    p = per_request.c
    recalled = or_(p.chosen_order.is_(None), p.chosen_order < p.last_order)
    recall_q = select(p.g, func.count(), func.sum(case((recalled, 1), else_=0))).group_by(p.g)
    totals: Counter = Counter()
    ncalls: Counter = Counter()
    chosen: Counter = Counter()
    with _connect(engine) as conn:
        q = (
            select(rg, _REQ.n_calls, _REQ.chosen_model, func.count())
            .where(_REQ.ts >= start)
            .group_by(rg, _REQ.n_calls, _REQ.chosen_model)
        )
        for g, n, model, count in conn.execute(q):
            g = _label(g)
            totals[g] += int(count)
            ncalls[g, str(n)] += int(count)
            chosen[g, _label(model)] += int(count)
        recall = conn.execute(recall_q).all()
        unpriced = _unpriced_models(conn, start)
    rows: list[dict[str, Any]] = []
    for (g, n), count in ncalls.items():
        rows.append(_exit_row(g, "n_calls", n, count, totals[g], ""))
    for (g, model), count in chosen.items():
        flag = UNPRICED if model in unpriced else ""
        rows.append(_exit_row(g, "chosen_model", model, count, totals[g], flag))
    for g, answered, n_recalled in recall:
        rows.append(
            _exit_row(_label(g), "recalled", "yes", int(n_recalled or 0), int(answered), "")
        )
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


def _latency_stats(
    scope: str, group: str, n: int, qs: list[float | None], mean: float | None, flag: str
) -> dict:
    return {
        "scope": scope,
        "group": group,
        "n": int(n),
        "p50_ms": _round(qs[0], 3),
        "p95_ms": _round(qs[1], 3),
        "p99_ms": _round(qs[2], 3),
        "mean_ms": _round(mean, 3),
        "flag": flag,
    }


PERCENTILES = (0.5, 0.95, 0.99)


def _latency_sql(conn: Connection, group, value, where) -> dict[str, tuple]:
    """PostgreSQL: (n, [p50, p95, p99], mean) per group label, computed by the database
    (one ``percentile_cont`` sort per group instead of shipping every value to Python)."""
    pct = func.percentile_cont(postgresql.array([literal(q) for q in PERCENTILES]))
    stats = (func.count(value), pct.within_group(value), func.avg(value))
    if group is None:
        q = select(literal("(all)"), *stats).where(where)
    else:
        if not isinstance(group.type, Date):  # None and '' both read "(none)": one group
            group = func.coalesce(group, "")
        q = select(group, *stats).where(where).group_by(group)
    out = {}
    for g, n, qs, mean in conn.execute(q):
        out[_label(g)] = (int(n), list(qs) if qs is not None else [None] * 3, mean)
    return out


def _latency_python(conn: Connection, group, value, where) -> dict[str, tuple]:
    """SQLite (no percentile functions): the same figures from the window's values."""
    cols = [literal("(all)") if group is None else group, value]
    values: dict[str, list[float]] = defaultdict(list)
    for g, v in conn.execute(select(*cols).where(where)):
        values[_label(g)].append(float(v))
    out = {}
    for g, xs in values.items():
        out[g] = (len(xs), [percentile(xs, q) for q in PERCENTILES], sum(xs) / len(xs))
    return out


def latency(engine: Engine, since=None, by: str | None = None) -> Report:
    """p50/p95/p99 of request latency overall, then per group: per model from the calls'
    latency (``by=model``), else of request latency per day, cascade or key."""
    start = parse_since(since)
    by = _check_by(by, "model")
    with _connect(engine) as conn:
        stats = _latency_sql if conn.dialect.name == "postgresql" else _latency_python
        overall = stats(conn, None, _REQ.latency_ms, _REQ.ts >= start).get("(all)")
        if by == "model":
            where = and_(_CALL.ts >= start, _CALL.latency_ms.is_not(None))
            groups = stats(conn, _CALL.model, _CALL.latency_ms, where)
            scope = "call"
        else:
            groups = stats(conn, _req_group(by), _REQ.latency_ms, _REQ.ts >= start)
            scope = "request"
        unpriced = _unpriced_models(conn, start)
    n, qs, mean = overall if overall and overall[0] else (0, [None] * 3, None)
    rows = [_latency_stats("request", "(all)", n, qs, mean, "")]
    for g in sorted(groups):
        flag = UNPRICED if by == "model" and g in unpriced else ""
        rows.append(_latency_stats(scope, g, *groups[g], flag))
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
    with _connect(engine) as conn:
        if by == "model":  # the model called: no need for the requests
            q = select(cg, _CALL.status, func.count()).where(_CALL.ts >= start)
        else:
            q = (
                select(cg, _CALL.status, func.count())
                .select_from(_calls_in_window())
                .where(_calls_of_window(start))
            )
        q = q.group_by(cg, _CALL.status)
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
