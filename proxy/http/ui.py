"""The dashboard at `/ui`: one server-rendered HTML page, its charts inline SVG drawn here,
no script and nothing fetched from anywhere. It reads the ledger through the report queries
of `cascade report` (proxy/ledger/reports.py) over whole UTC days, so its figures are the
report's, plus the daily series and the last requests' traces (proxy/ledger/dashboard.py).

Access: the admin key as a bearer token, or a session cookie set by entering the admin key
at /ui/login (an HMAC of the admin key: it lapses when the key changes).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import html
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from proxy.http.contract import read_body, request_header
from proxy.http.state import ProxyState

router = APIRouter(include_in_schema=False)
COOKIE = "cascade_ui"
STYLE = (Path(__file__).parent / "static" / "ui.css").read_text()
LOGPROB_PARTS = ("mean", "min", "q05", "q25")  # ledger_calls.lp_* (migration 0004)
PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563")
MAX_DAYS = 90
QUERY_THREADS = 4  # within the engine's pool of 5 connections
# a page rendered in the last PAGE_TTL_S seconds is served again: viewers who reload, or
# several at once, cost the ledger one set of queries (about a second at 1M requests)
PAGE_TTL_S = 5.0
_recent_pages: dict[int, tuple[float, str]] = {}


def _session(admin_key: str) -> str:
    return hmac.new(admin_key.encode(), b"cascade-ui-session", hashlib.sha256).hexdigest()


def _authorized(request: Request, state: ProxyState) -> bool:
    admin = state.admin_key
    if not admin:
        return False
    header = request_header(request, b"authorization")
    if header.lower().startswith("bearer ") and hmac.compare_digest(header[7:].strip(), admin):
        return True
    cookie = request.cookies.get(COOKIE, "")
    return bool(cookie) and hmac.compare_digest(cookie, _session(admin))


def _page(title: str, body: str, status: int = 200) -> HTMLResponse:
    doc = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f'<title>{html.escape(title)}</title><link rel="icon" href="data:,">'
        f"<style>{STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return HTMLResponse(doc, status_code=status, headers={"cache-control": "no-store"})


def _login(message: str = "", status: int = 401) -> HTMLResponse:
    note = f'<p class="error">{html.escape(message)}</p>' if message else ""
    return _page(
        "cascade: sign in",
        '<main class="login"><h1>cascade</h1><p>Enter the admin key to see the ledger.</p>'
        f'{note}<form method="post" action="/ui/login"><input type="password" name="key" '
        'autocomplete="current-password" placeholder="admin key" autofocus>'
        "<button>Sign in</button></form></main>",
        status,
    )


@router.post("/ui/login")
async def login(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    body = await read_body(request, 8192)
    key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0]
    admin = state.admin_key
    if not admin:
        return _login("This proxy has no admin key (server.admin_key_env): /ui is off.", 403)
    if not hmac.compare_digest(key, admin):
        return _login("That is not the admin key.")
    reply = RedirectResponse("/ui", status_code=303)
    reply.set_cookie(COOKIE, _session(admin), httponly=True, samesite="strict", path="/ui")
    return reply


@router.get("/ui/logout")
async def logout() -> Response:
    reply = RedirectResponse("/ui", status_code=303)
    reply.delete_cookie(COOKIE, path="/ui")
    return reply


@router.get("/ui")
async def dashboard(request: Request) -> Response:
    state: ProxyState = request.app.state.proxy
    if not _authorized(request, state):
        return _login()
    try:
        days = int(request.query_params.get("days", "7"))
    except ValueError:
        days = 7
    days = min(max(days, 1), MAX_DAYS)
    cached = _recent_pages.get(days)
    if cached is not None and time.monotonic() - cached[0] < PAGE_TTL_S:
        return _page("cascade dashboard", cached[1])
    data = await asyncio.to_thread(gather, state.reports_engine(), days)
    body = render(data, days)
    _recent_pages[days] = (time.monotonic(), body)
    return _page("cascade dashboard", body)


# ------------------------------------------------------------------ data


def gather(engine: Any, days: int, now: dt.datetime | None = None) -> dict[str, Any]:
    """Everything the page shows, over the last `days` whole UTC days (today included)."""
    from proxy.ledger import dashboard, keys, reports

    now = now or dt.datetime.now(dt.UTC)
    last = now.date()
    first = last - dt.timedelta(days=days - 1)
    since = first.isoformat()
    out: dict[str, Any] = {"first": first, "last": last, "now": now}
    jobs = {  # independent queries: run side by side, each on its own connection
        "spend_cascade": (reports.spend, engine, since, "cascade"),
        "spend_key": (reports.spend, engine, since, "key"),
        "savings": (reports.savings, engine, since, "cascade"),
        "exits": (reports.exits, engine, since, "cascade"),
        "latency": (reports.latency, engine, since, "model"),
        "errors": (reports.errors, engine, since, "model"),
        "by_cascade": (dashboard.daily_series, engine, first, last, "cascade"),
        "by_key": (dashboard.daily_series, engine, first, last, "key"),
        "recent": (dashboard.recent_requests, engine, 20),
    }
    with ThreadPoolExecutor(QUERY_THREADS) as pool:
        futures = {name: pool.submit(fn, *args) for name, (fn, *args) in jobs.items()}
        out.update({name: f.result() for name, f in futures.items()})
    stored = keys.list_keys(engine)
    budgeted = [k for k in stored if k.budget_usd is not None and k.period]
    start = min((keys.period_start(k.period, now) for k in budgeted), default=now)  # type: ignore[arg-type]
    spent = keys.spend_since(engine, [k.name for k in budgeted], start.date())
    out["budgets"] = [
        {
            "name": k.name,
            "budget": k.budget_usd,
            "period": k.period,
            "spent": sum(
                c
                for (n, day), c in spent.items()
                if n == k.name and day >= keys.period_start(k.period, now).date()  # type: ignore[arg-type]
            ),
            "resets": keys.period_end(k.period, now),  # type: ignore[arg-type]
            "state": "revoked" if k.revoked_at else ("active" if k.usable(now) else "expired"),
        }
        for k in budgeted
    ]
    return out


# ------------------------------------------------------------------ rendering


def _usd(x: float | None) -> str:
    return "n/a" if x is None else f"${x:,.6f}" if abs(x) < 1 else f"${x:,.2f}"


def _cell(value: Any) -> str:
    if value is None:
        return '<td class="na">n/a</td>'
    if isinstance(value, float):
        return f'<td class="num">{value:.6g}</td>'
    if isinstance(value, int):
        return f'<td class="num">{value}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def _table(report: Any, columns: list[str] | None = None, rows: list[dict] | None = None) -> str:
    columns = columns or report.columns
    rows = report.rows if rows is None else rows
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c)) for c in columns) + "</tr>" for r in rows)
    if not rows:
        body = f'<tr><td colspan="{len(columns)}" class="na">no requests in the window</td></tr>'
    notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in report.notes) if report else ""
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{notes}"


def line_chart(title: str, days: list[dt.date], series: dict[str, list[float]]) -> str:
    """An inline SVG line chart of USD per day, one line per series, with its legend."""
    width, height, left, bottom, top, right = 560, 220, 64, 28, 24, 12
    plot_w, plot_h = width - left - right, height - top - bottom
    top_value = max((v for vals in series.values() for v in vals), default=0.0) or 1.0
    n = max(len(days) - 1, 1)

    def xy(i: int, v: float) -> tuple[float, float]:
        return left + plot_w * i / n, top + plot_h * (1 - v / top_value)

    parts = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{html.escape(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text x="{left}" y="14" class="title">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{top + plot_h}" x2="{width - right}" y2="{top + plot_h}" '
        'class="axis"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" class="axis"/>',
        f'<text x="{left - 4}" y="{top + 4}" class="tick" text-anchor="end">'
        f"{html.escape(_usd(top_value))}</text>",
        f'<text x="{left - 4}" y="{top + plot_h}" class="tick" text-anchor="end">$0</text>',
    ]
    for i, day in enumerate(days):
        if len(days) <= 10 or i % max(len(days) // 7, 1) == 0 or i == len(days) - 1:
            x, _ = xy(i, 0)
            parts.append(
                f'<text x="{x:.1f}" y="{height - 8}" class="tick" text-anchor="middle">'
                f"{day:%m-%d}</text>"
            )
    for k, (name, values) in enumerate(sorted(series.items())):
        color = PALETTE[k % len(PALETTE)]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(i, v) for i, v in enumerate(values)))
        parts.append(f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"/>')
        for i, v in enumerate(values):
            x, y = xy(i, v)
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}">'
                f"<title>{html.escape(name)} {days[i]}: {html.escape(_usd(v))}</title></circle>"
            )
        ly = top + 12 * k
        parts.append(
            f'<rect x="{width - right - 130}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
            f'<text x="{width - right - 116}" y="{ly + 1}" class="tick">'
            f"{html.escape(name[:18])}</text>"
        )
    if not series:
        parts.append(
            f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" class="tick" '
            'text-anchor="middle">no requests in the window</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _signal(x: float) -> str:
    """A logprob or share in three significant digits: -0.41, -7.25, -0.00123 (a floor value
    such as -9999 in full, not as 1e+04); -0.0 shows as 0."""
    return f"{x + 0.0:.0f}" if abs(x) >= 1000 else f"{x + 0.0:.3g}"


def _signals(c: dict[str, Any]) -> str:
    """A call's confidence signals beyond its confidence: the answer's token-logprob summary
    (the text calibrator's features; none when the upstream sent no logprobs) and a sampled
    node's votes, one short line each, so a trace shows what the policy read."""
    lines: list[str] = []
    if c["lp_mean"] is not None:
        lines.append(
            "logprobs: "
            + " · ".join(
                f"{k} {_signal(c[f'lp_{k}'])}" for k in LOGPROB_PARTS if c[f"lp_{k}"] is not None
            )
        )
    votes: list[str] = []
    if c["samples"] is not None:
        votes.append(f"{c['samples']} samples")
    if c["vote_share"] is not None:
        votes.append(f"share {_signal(c['vote_share'])}")
    if c["agreement"] is not None:
        votes.append("agrees with its tier" if c["agreement"] else "differs from its tier")
    if votes:
        lines.append("votes: " + " · ".join(votes))
    if not lines:
        return '<td class="na">n/a</td>'
    return '<td class="signals">' + "".join(f"<div>{html.escape(x)}</div>" for x in lines) + "</td>"


def _trace(r: dict[str, Any]) -> str:
    rows = "".join(
        "<tr>"
        + _cell(c["call_order"])
        + _cell(c["model"])
        + _cell(c["status"])
        + _cell(c["confidence"])
        + _cell(c["p_correct"])
        + _cell(c["decision"])
        + f'<td class="num">{html.escape(_usd(c["cost_usd"]))}</td>'
        + _cell(None if c["latency_ms"] is None else round(c["latency_ms"], 1))
        + _signals(c)
        + "</tr>"
        for c in r["calls"]
    )
    rid = html.escape(r["request_id"])
    return (
        f'<details class="request" id="req-{rid}"><summary><code>{rid}</code> '
        f"{r['ts']:%Y-%m-%d %H:%M:%S} · {html.escape(r['cascade'] or r['model_requested'])} · "
        f"key {html.escape(r['api_key'] or '-')} · {r['status']} · answer from "
        f"<b>{html.escape(r['chosen_model'] or 'none')}</b> · {html.escape(_usd(r['cost_usd']))}"
        f" (reference {html.escape(_usd(r['reference_cost_usd']))}) · "
        f"{r['latency_ms']:.0f} ms</summary>"
        "<table><thead><tr><th>#</th><th>model</th><th>status</th><th>confidence</th>"
        "<th>p_correct</th><th>decision</th><th>cost</th><th>latency_ms</th><th>signals</th>"
        "</tr></thead>"
        f"<tbody>{rows}</tbody></table></details>"
    )


def render(data: dict[str, Any], days: int) -> str:
    spend_rows = data["spend_cascade"].rows
    total = None
    for row in spend_rows:
        if row["cost_usd"] is not None:
            total = (total or 0.0) + row["cost_usd"]
    sav = data["savings"].rows
    reference = sum(r["reference_cost_usd"] or 0.0 for r in sav)
    saved = sum(r["saved_usd"] or 0.0 for r in sav)
    requests = sum(r["requests"] for r in spend_rows)
    unpriced = data["spend_cascade"].unpriced_models
    flag = (
        f'<p class="warn">Models without a known price (their calls count 0): '
        f"{html.escape(', '.join(unpriced))}</p>"
        if unpriced
        else ""
    )
    bc, bk = data["by_cascade"], data["by_key"]
    saved_series = {
        name: [r - c for r, c in zip(bc.reference[name], bc.cost[name], strict=True)]
        for name in bc.cost
    }
    budgets = (
        "".join(
            f"<tr><td>{html.escape(b['name'])}</td><td>{b['state']}</td>"
            f'<td class="num">{html.escape(_usd(b["spent"]))}</td>'
            f'<td class="num">{html.escape(_usd(b["budget"]))}</td><td>{b["period"]}</td>'
            f'<td><meter min="0" max="1" value="{min(b["spent"] / b["budget"], 1):.4f}"></meter> '
            f"{100 * b['spent'] / b['budget']:.1f}%</td>"
            f"<td>{b['resets']:%Y-%m-%d %H:%M} UTC</td></tr>"
            for b in data["budgets"]
        )
        or '<tr><td colspan="7" class="na">no key has a budget</td></tr>'
    )
    windows = " ".join(
        f'<a href="/ui?days={d}"{" class=on" if d == days else ""}>{d} d</a>'
        for d in (1, 7, 30, 90)
    )
    return f"""
<header><h1>cascade</h1><nav>{windows} <a href="/ui/logout">sign out</a></nav></header>
<main>
<p class="window">{data["first"]} to {data["last"]} (UTC, whole days; the same figures as
<code>cascade report ... --since {data["first"]}</code>), read {data["now"]:%H:%M:%S} UTC</p>
{flag}
<section class="totals">
<div><span>spend</span><b id="total-spend">{html.escape(_usd(total))}</b></div>
<div><span>reference model would have cost</span>
<b id="total-reference">{html.escape(_usd(reference))}</b></div>
<div><span>saved</span><b id="total-saved">{html.escape(_usd(saved))}</b></div>
<div><span>requests</span><b id="total-requests">{requests}</b></div>
</section>
<section class="charts">
{line_chart("Spend per day, by cascade (USD)", bc.days, bc.cost)}
{line_chart("Saved against the reference, by cascade (USD)", bc.days, saved_series)}
{line_chart("Spend per day, by key (USD)", bk.days, bk.cost)}
</section>
<h2>Savings by cascade</h2>{_table(data["savings"])}
<h2>Spend by key</h2>{_table(data["spend_key"])}
<h2>Budgets</h2>
<table id="budgets"><thead><tr><th>key</th><th>state</th><th>spent</th><th>budget</th>
<th>period</th><th>used</th><th>resets</th></tr></thead><tbody>{budgets}</tbody></table>
<h2>Where queries stop (recall)</h2>{_table(data["exits"])}
<h2>Latency per model</h2>{_table(data["latency"])}
<h2>Errors per model</h2>{_table(data["errors"])}
<h2>Last requests</h2>
<div id="recent">{"".join(_trace(r) for r in data["recent"]) or '<p class="na">none yet</p>'}</div>
</main>"""
