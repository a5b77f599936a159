"""Report queries at volume: 1M requests and 3M calls in PostgreSQL, each report timed.

Creates its own database on the PostgreSQL server (default 127.0.0.1:5432, user postgres),
applies the ledger migrations (what `cascade db upgrade` runs), loads a synthetic but
realistic ledger with COPY, builds its daily rollups the way the writer would, checks that
rollups and detail rows agree, then times every report (spend, savings, exits, latency,
errors) grouped by each of day, model, cascade and key, over the default window (--since 7d)
and, for information, any further windows asked for, then the dashboard's page (/ui).
Target: each report under 0.5 s over the default window. The database is dropped at the end
(unless --keep).

The ledger spans --days days up to now: a diurnal load over five cascades (three nodes each,
parallel tiers make up to five calls) plus pass-through requests, 40 API keys with a skewed
share, 8 models of which one self-hosted model has no price (cost NULL), ~3% failed calls,
~1% failed requests, ~0.5% refused requests without calls, ~8% answers recalled from an
earlier call, and exactly --calls-per-request calls per request on average.

Run from the repository root:
  .venv/bin/python benchmarks/ledger_reports.py [--requests 1000000] [--days 90]
      [--since 7d --since 30d] [--reps 5] [--dsn "host=127.0.0.1 user=postgres"] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import common
import numpy as np
import psycopg

from proxy.ledger.db import make_engine, upgrade
from proxy.ledger.records import key_id
from proxy.ledger.reports import GROUPINGS, REPORTS, run_report

TARGET_S = 0.5
SEED = 4
POLICY = "sha256:" + "ab" * 32

# (price in, price out) per million tokens; None: a self-hosted model with no price
MODELS: dict[str, tuple[float, float] | None] = {
    "llama-3.2-1b": (0.02, 0.02),
    "llama-3.1-8b": (0.05, 0.08),
    "qwen-2.5-7b": None,
    "qwen-2.5-32b": (0.30, 0.40),
    "llama-3.1-70b": (0.60, 0.80),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "claude-3.5-sonnet": (3.00, 15.00),
}
MEDIAN_LATENCY_MS = {
    "llama-3.2-1b": 120,
    "llama-3.1-8b": 220,
    "qwen-2.5-7b": 200,
    "qwen-2.5-32b": 600,
    "llama-3.1-70b": 900,
    "gpt-4o-mini": 700,
    "gpt-4o": 1500,
    "claude-3.5-sonnet": 1800,
}
# Five call slots per cascade, cheapest first (a parallel tier fills two or three slots);
# the last slot's model is the cascade's reference.
CASCADES: dict[str, list[str]] = {
    "support": ["llama-3.1-8b", "llama-3.1-70b", "llama-3.1-70b", "gpt-4o-mini", "gpt-4o"],
    "code": ["qwen-2.5-7b", "qwen-2.5-32b", "qwen-2.5-32b", "gpt-4o", "claude-3.5-sonnet"],
    "math": ["llama-3.2-1b", "llama-3.1-8b", "qwen-2.5-32b", "llama-3.1-70b", "gpt-4o"],
    "extract": ["llama-3.2-1b", "llama-3.1-8b", "llama-3.1-8b", "gpt-4o-mini", "gpt-4o"],
    "triage": ["qwen-2.5-7b", "llama-3.1-8b", "llama-3.1-70b", "gpt-4o", "claude-3.5-sonnet"],
}
CASCADE_SHARE = [0.35, 0.25, 0.15, 0.10, 0.10]  # the rest (5%) are pass-through requests
FAILURES = ["timeout", "http_500", "http_429", "malformed", "connection"]

REQ_COLUMNS = (
    "request_id, ts, day, api_key, cascade, model_requested, policy_hash, status, "
    "chosen_model, n_calls, tokens_in, tokens_out, cost_usd, reference_cost_usd, "
    "latency_ms, overhead_ms, stream, error"
)
CALL_COLUMNS = (
    "request_id, call_order, ts, node, model, backend, status, http_status, tokens_in, "
    "tokens_out, cost_usd, latency_ms, ttft_ms, confidence, p_correct, agreement, decision, "
    "error"
)

ROLLUP_SQL = """
INSERT INTO ledger_daily (day, cascade, model, api_key, requests, requests_failed,
    unpriced_requests, calls, calls_failed, unpriced_calls, tokens_in, tokens_out, cost_usd,
    reference_cost_usd, reference_unpriced)
SELECT day, cascade, model, api_key, sum(requests), sum(requests_failed),
    sum(unpriced_requests), sum(calls), sum(calls_failed), sum(unpriced_calls), sum(tokens_in),
    sum(tokens_out), sum(cost_usd), sum(reference_cost_usd), sum(reference_unpriced)
FROM (
    SELECT day, coalesce(cascade, '') AS cascade, coalesce(chosen_model, '') AS model,
        coalesce(api_key, '') AS api_key, 1 AS requests, (status >= 400)::int AS requests_failed,
        (cost_usd IS NULL)::int AS unpriced_requests, 0 AS calls, 0 AS calls_failed,
        0 AS unpriced_calls,
        CASE WHEN n_calls = 0 THEN tokens_in ELSE 0 END AS tokens_in,
        CASE WHEN n_calls = 0 THEN tokens_out ELSE 0 END AS tokens_out,
        CASE WHEN n_calls = 0 THEN cost_usd END AS cost_usd,
        reference_cost_usd, (reference_cost_usd IS NULL)::int AS reference_unpriced
    FROM ledger_requests
    UNION ALL
    SELECT r.day, coalesce(r.cascade, ''), c.model, coalesce(r.api_key, ''), 0, 0, 0, 1,
        (c.status <> 'ok')::int, (c.cost_usd IS NULL)::int, coalesce(c.tokens_in, 0),
        coalesce(c.tokens_out, 0), c.cost_usd, NULL, 0
    FROM ledger_calls c JOIN ledger_requests r ON r.request_id = c.request_id
) AS x
GROUP BY day, cascade, model, api_key
"""


# --------------------------------------------------------------------------- data


class Ledger:
    """Column arrays for every request and call, drawn with a fixed seed."""

    def __init__(self, n: int, calls_per_request: float, days: int, now: dt.datetime) -> None:
        rng = np.random.default_rng(SEED)
        self.n = n
        # timestamps: uniform days, a diurnal curve within the day; ids follow time
        day_offset = rng.integers(0, days, n)
        hour = rng.choice(24, n, p=_diurnal())
        secs = day_offset * 86400 + hour * 3600 + rng.integers(0, 3600, n)
        start = now.timestamp() - days * 86400
        self.ts = np.sort(start + secs + rng.random(n))
        self.ts = np.minimum(self.ts, now.timestamp() - 1.0)

        n_casc = len(CASCADES)
        kind = rng.choice(n_casc + 1, n, p=[*CASCADE_SHARE, 0.05])  # n_casc: pass-through
        self.kind = kind
        keys = [key_id(f"sk-team-{i:02d}") for i in range(40)]
        weights = 1.0 / np.arange(1, 41) ** 1.1
        self.key = rng.choice(40, n, p=weights / weights.sum())
        self.keys = keys

        # calls per request: 1..5 in cascades, 1 for pass-through, 0 for refused requests
        ncalls = rng.choice([1, 2, 3, 4, 5], n, p=[0.22, 0.15, 0.2, 0.15, 0.28])
        ncalls[kind == n_casc] = 1
        refused = rng.random(n) < 0.005
        ncalls[refused] = 0
        ncalls = _hit_total(ncalls, round(n * calls_per_request), kind != n_casc, rng)
        self.ncalls = ncalls
        self.refused = ncalls == 0
        self.failed = (rng.random(n) < 0.01) & ~self.refused  # every call of it fails
        total = int(ncalls.sum())
        self.n_calls_total = total

        # calls, flattened; call j belongs to request owner[j]
        owner = np.repeat(np.arange(n), ncalls)
        first = np.cumsum(ncalls) - ncalls
        order = np.arange(total) - np.repeat(first, ncalls)
        self.owner, self.order = owner, order
        passthrough_model = rng.integers(0, len(MODELS), n)
        names = list(MODELS)
        slots = np.array([[names.index(m) for m in CASCADES[c]] for c in CASCADES])
        okind = kind[owner]
        model = np.where(
            okind == n_casc,
            passthrough_model[owner],
            slots[np.minimum(okind, n_casc - 1), order],
        )
        self.model = model
        self.names = names
        last = order == ncalls[owner] - 1
        status = np.zeros(total, dtype=np.int64)  # 0 ok, else 1 + index in FAILURES
        random_fail = (rng.random(total) < 0.03) & ~last
        status[random_fail] = 1 + rng.integers(0, len(FAILURES), int(random_fail.sum()))
        all_fail = self.failed[owner]
        status[all_fail] = 1 + rng.integers(0, len(FAILURES), int(all_fail.sum()))
        self.status = status
        ok = status == 0
        self.tin = rng.integers(60, 1500, n)[owner]  # a request's prompt, sent to each model
        tout = np.maximum(1, rng.lognormal(4.5, 0.9, total).astype(np.int64))
        self.tout = np.where(ok, tout, 0)
        pin = np.array([(MODELS[m] or (np.nan, np.nan))[0] for m in names])[model]
        pout = np.array([(MODELS[m] or (np.nan, np.nan))[1] for m in names])[model]
        cost = (self.tin * pin + self.tout * pout) / 1e6
        cost[~ok & ~np.isnan(cost)] = 0.0  # a failed call is billed nothing...
        cost[status == 1] = np.nan  # ...except a timeout: the upstream may have charged
        self.cost = cost  # NaN: unknown
        med = np.array([MEDIAN_LATENCY_MS[m] for m in names], dtype=float)[model]
        self.lat = med * rng.lognormal(0.0, 0.45, total)
        self.lat[status == 1] = 30000.0
        self.ttft = self.lat * rng.uniform(0.1, 0.35, total)
        self.conf = -rng.exponential(0.6, total)
        self.p = 1.0 / (1.0 + np.exp(-(3.0 + 2.5 * self.conf)))

        # per request: the answer returned (recall: ~8% from an earlier successful call)
        chosen = np.full(n, -1)
        last_idx = first + ncalls - 1
        has = ~self.refused & ~self.failed
        chosen[has] = model[last_idx[has]]
        recall = has & (ncalls >= 2) & (rng.random(n) < 0.08)
        earlier = first + (rng.random(n) * np.maximum(ncalls - 1, 1)).astype(np.int64)
        recall &= ok[np.minimum(earlier, total - 1)]
        chosen[recall] = model[earlier[recall]]
        self.chosen = chosen
        self.status_http = np.where(self.refused, 400, np.where(self.failed, 502, 200))
        sums = np.bincount(owner, weights=np.nan_to_num(cost), minlength=n)
        unknown = np.bincount(owner, weights=np.isnan(cost), minlength=n) > 0
        self.req_cost = np.where(unknown, np.nan, sums)
        self.req_tin = np.bincount(owner, weights=self.tin, minlength=n).astype(np.int64)
        self.req_tout = np.bincount(owner, weights=self.tout, minlength=n).astype(np.int64)
        self.req_lat = np.bincount(owner, weights=self.lat, minlength=n) + rng.uniform(1, 4, n)
        self.overhead = rng.gamma(2.0, 0.4, n)
        self.req_lat[self.refused] = self.overhead[self.refused]
        ref = np.array([names.index(CASCADES[c][-1]) for c in CASCADES] + [0], dtype=np.int64)[kind]
        ref_in = np.array([(MODELS[m] or (np.nan, np.nan))[0] for m in names])[ref]
        ref_out = np.array([(MODELS[m] or (np.nan, np.nan))[1] for m in names])[ref]
        typical_out = 110.0
        ref_cost = (self.req_tin / np.maximum(ncalls, 1) * ref_in + typical_out * ref_out) / 1e6
        ref_cost[kind == n_casc] = np.nan  # a pass-through has no reference
        self.ref_cost = ref_cost
        self.rid = [f"chatcmpl-{uuid.UUID(int=int(x)).hex[:24]}" for x in _ids(rng, n)]

    # --------------------------------------------------------------------- COPY text

    def request_lines(self) -> Iterator[str]:
        cascades = [*CASCADES, None]
        days = {}
        n_casc = len(CASCADES)
        for i in range(self.n):
            ts = float(self.ts[i])
            when = dt.datetime.fromtimestamp(ts, dt.UTC)
            d = days.get(int(ts // 86400))
            if d is None:
                d = days[int(ts // 86400)] = when.date().isoformat()
            k = int(self.kind[i])
            casc = cascades[k]
            chosen = int(self.chosen[i])
            status = int(self.status_http[i])
            requested = casc if k < n_casc else (self.names[chosen] if chosen >= 0 else "gpt-4o")
            yield (
                "\t".join(
                    (
                        self.rid[i],
                        when.isoformat(),
                        d,
                        self.keys[int(self.key[i])],
                        casc or "\\N",
                        requested,
                        POLICY if casc else "\\N",
                        str(status),
                        self.names[chosen] if chosen >= 0 else "\\N",
                        str(int(self.ncalls[i])),
                        str(int(self.req_tin[i])),
                        str(int(self.req_tout[i])),
                        _num(self.req_cost[i], 0.0 if status == 400 else None),
                        _num(self.ref_cost[i]),
                        f"{self.req_lat[i]:.3f}",
                        f"{self.overhead[i]:.3f}",
                        "f",
                        "\\N"
                        if status == 200
                        else ("invalid_request" if status == 400 else "upstream_failed"),
                    )
                )
                + "\n"
            )

    def call_lines(self) -> Iterator[str]:
        n_casc = len(CASCADES)
        stamps: dict[int, str] = {}
        for j in range(self.n_calls_total):
            i = int(self.owner[j])
            ts = stamps.get(i)
            if ts is None:
                stamps.clear()
                ts = stamps[i] = dt.datetime.fromtimestamp(float(self.ts[i]), dt.UTC).isoformat()
            o = int(self.order[j])
            m = self.names[int(self.model[j])]
            st = int(self.status[j])
            ok = st == 0
            last = o == int(self.ncalls[i]) - 1
            passthrough = int(self.kind[i]) == n_casc
            if passthrough:
                decision = "\\N"
            elif last:
                decision = "stop"
            else:
                nxt = CASCADES[list(CASCADES)[int(self.kind[i])]][o + 1]
                decision = f"continue:{nxt}"
            yield (
                "\t".join(
                    (
                        self.rid[i],
                        str(o),
                        ts,
                        "\\N" if passthrough else str(o),
                        m,
                        "openai" if MODELS[m] is None or "llama" in m or "qwen" in m else "litellm",
                        "ok" if ok else FAILURES[st - 1],
                        "200" if ok else ("\\N" if st in (1, 5) else ("500" if st == 2 else "429")),
                        str(int(self.tin[j])) if ok or st != 5 else "\\N",
                        str(int(self.tout[j])) if ok else "\\N",
                        _num(self.cost[j]),
                        f"{self.lat[j]:.3f}",
                        f"{self.ttft[j]:.3f}" if ok else "\\N",
                        f"{self.conf[j]:.5f}" if ok else "\\N",
                        f"{self.p[j]:.5f}" if ok else "\\N",
                        "\\N" if o == 0 or not ok else ("t" if self.conf[j] > -0.5 else "f"),
                        decision,
                        "\\N" if ok else f"{FAILURES[st - 1]} from upstream",
                    )
                )
                + "\n"
            )


def _diurnal() -> np.ndarray:
    h = np.arange(24)
    w = 1.0 + 0.8 * np.sin((h - 9) / 24 * 2 * np.pi)
    return w / w.sum()


def _hit_total(ncalls: np.ndarray, total: int, adjustable: np.ndarray, rng) -> np.ndarray:
    """Nudge cascade requests' call counts by one until they sum to ``total`` exactly."""
    ncalls = ncalls.copy()
    diff = total - int(ncalls.sum())
    if diff > 0:
        pool = np.flatnonzero(adjustable & (ncalls >= 1) & (ncalls < 5))
        ncalls[rng.choice(pool, diff, replace=False)] += 1
    elif diff < 0:
        pool = np.flatnonzero(adjustable & (ncalls > 1))
        ncalls[rng.choice(pool, -diff, replace=False)] -= 1
    assert int(ncalls.sum()) == total
    return ncalls


def _ids(rng, n: int) -> list[int]:
    hi = rng.integers(0, 2**63, n, dtype=np.int64).tolist()
    lo = rng.integers(0, 2**63, n, dtype=np.int64).tolist()
    return [(a << 64) | b for a, b in zip(hi, lo, strict=True)]


def _num(x: float, nan_as: float | None = None) -> str:
    if np.isnan(x):
        return "\\N" if nan_as is None else repr(nan_as)
    return repr(float(x))


def copy_lines(conn: psycopg.Connection, table: str, columns: str, lines) -> None:
    with conn.cursor().copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
        block: list[str] = []
        for line in lines:
            block.append(line)
            if len(block) >= 20000:
                copy.write("".join(block))
                block.clear()
        if block:
            copy.write("".join(block))


# --------------------------------------------------------------------------- run


def memory_gb() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024**2:.0f} GB"
    except OSError:
        pass
    return "unknown"


def load(dsn: str, args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    ledger = Ledger(args.requests, args.calls_per_request, args.days, dt.datetime.now(dt.UTC))
    t1 = time.perf_counter()
    print(
        f"  generated {ledger.n:,} requests and {ledger.n_calls_total:,} calls in {t1 - t0:.1f} s"
    )
    with psycopg.connect(dsn) as conn:
        # the load only: skip the per-row foreign-key triggers (the ids are consistent by
        # construction); every index the migrations made is maintained as rows arrive
        conn.execute("SET session_replication_role = replica")
        copy_lines(conn, "ledger_requests", REQ_COLUMNS, ledger.request_lines())
        t2 = time.perf_counter()
        print(f"  COPY ledger_requests: {t2 - t1:.1f} s")
        copy_lines(conn, "ledger_calls", CALL_COLUMNS, ledger.call_lines())
        t3 = time.perf_counter()
        print(f"  COPY ledger_calls: {t3 - t2:.1f} s")
        conn.execute("SET session_replication_role = origin")
        conn.execute(ROLLUP_SQL)
        conn.commit()
        t4 = time.perf_counter()
        print(f"  rollups into ledger_daily: {t4 - t3:.1f} s")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) ledger_requests, ledger_calls, ledger_daily")
    print(f"  VACUUM ANALYZE: {time.perf_counter() - t4:.1f} s")


def check_rollups(url: str) -> None:
    """The rollups built here must hold what the detail rows hold (spend reads whole days
    from them): spend's two halves, over the whole ledger, by each grouping."""
    from collections import defaultdict

    from proxy.ledger.reports import _connect, _spend_daily, _spend_detail

    engine = make_engine(url)
    lo = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
    hi = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)
    cols = ("requests", "calls", "tokens_in", "tokens_out", "unpriced_calls")
    try:
        for by in GROUPINGS:
            daily: dict = defaultdict(lambda: dict.fromkeys(cols, 0) | {"cost_usd": None})
            detail: dict = defaultdict(lambda: dict.fromkeys(cols, 0) | {"cost_usd": None})
            with _connect(engine) as conn:
                _spend_daily(conn, lo.date(), by, daily)
                _spend_detail(conn, lo, hi, by, detail)
            assert daily.keys() == detail.keys(), by
            for g, row in daily.items():
                for col in cols:
                    assert row[col] == detail[g][col], (by, g, col, row[col], detail[g][col])
                assert abs((row["cost_usd"] or 0) - (detail[g]["cost_usd"] or 0)) < 1e-6, (by, g)
    finally:
        engine.dispose()
    print("  check: ledger_daily holds the detail rows' sums, by each grouping")


def time_reports(url: str, windows: list[str], reps: int) -> list[dict]:
    engine = make_engine(url)
    results = []
    try:
        for since in windows:
            for name in REPORTS:
                for by in GROUPINGS:
                    times = []
                    for _ in range(reps + 1):
                        t = time.perf_counter()
                        rep = run_report(engine, name, since, by)
                        times.append(time.perf_counter() - t)
                    results.append(
                        {
                            "since": since,
                            "report": name,
                            "by": by + (" (default)" if by == _default_by(name) else ""),
                            "rows": len(rep.rows),
                            "source": rep.source,
                            "first": times[0],
                            "median": statistics.median(times[1:]),
                            "max": max(times[1:]),
                        }
                    )
    finally:
        engine.dispose()
    return results


def prune_at_volume(url: str, dsn: str, before: str, batch_size: int) -> None:
    """What `cascade db prune` costs at volume, and proof that it keeps the rollups."""
    from proxy.ledger.retention import parse_before, prune

    with psycopg.connect(dsn) as conn:
        rollups_before = conn.execute("SELECT count(*), sum(requests) FROM ledger_daily").fetchone()
    engine = make_engine(url)
    batches = [0.0]
    last = [time.perf_counter()]

    def tick(_r: int, _c: int) -> None:
        now = time.perf_counter()
        batches[0] = max(batches[0], now - last[0])
        last[0] = now

    try:
        t = time.perf_counter()
        result = prune(engine, parse_before(before), batch_size=batch_size, progress=tick)
        took = time.perf_counter() - t
    finally:
        engine.dispose()
    with psycopg.connect(dsn) as conn:
        rollups_after = conn.execute("SELECT count(*), sum(requests) FROM ledger_daily").fetchone()
    assert rollups_after == rollups_before, (rollups_before, rollups_after)
    print(
        f"  prune --before {before}: removed {result.requests:,} requests and {result.calls:,} "
        f"calls in {result.batches} transactions of {batch_size} requests, {took:.1f} s "
        f"(longest transaction {batches[0]:.2f} s); ledger_daily unchanged "
        f"({rollups_after[0]:,} rows, {int(rollups_after[1]):,} requests)"
    )


def _default_by(name: str) -> str:
    return {"spend": "model", "savings": "cascade", "exits": "cascade"}.get(name, "model")


def header(dsn: str, args: argparse.Namespace) -> None:
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = {
            k: conn.execute(f"SHOW {k}").fetchone()[0]
            for k in ("shared_buffers", "work_mem", "max_parallel_workers_per_gather", "jit")
        }
    print("cascade ledger report benchmark")
    print(f"  date      {common.now_utc()}")
    print(f"  machine   {common.machine()}; {memory_gb()}")
    print(f"  python    {platform.python_version()}; psycopg {psycopg.__version__}")
    print(f"  postgres  {version} ({', '.join(f'{k}={v}' for k, v in settings.items())})")
    print(
        f"  ledger    {args.requests:,} requests, {args.calls_per_request:g} calls per request, "
        f"over {args.days} days up to now"
    )


def sizes(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        for table in ("ledger_requests", "ledger_calls", "ledger_daily"):
            n, size = conn.execute(
                f"SELECT count(*), pg_size_pretty(pg_total_relation_size('{table}')) FROM {table}"
            ).fetchone()
            print(f"  {table:<16} {n:>10,} rows  {size} with indexes")


def time_dashboard(url: str, reps: int, days: int = 7) -> dict:
    """The dashboard's page (/ui) over `days` whole days: its queries and the HTML render,
    as the proxy runs them (proxy/http/ui.py), without HTTP."""
    from proxy.http.ui import gather, render

    engine = make_engine(url)
    times = []
    try:
        for _ in range(reps + 1):
            t = time.perf_counter()
            page = render(gather(engine, days), days)
            times.append(time.perf_counter() - t)
    finally:
        engine.dispose()
    return {"first": times[0], "median": statistics.median(times[1:]), "max": max(times[1:]),
            "bytes": len(page)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--calls-per-request", type=float, default=3.0)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument(
        "--since", action="append", help="Report window(s); default 7d (the CLI's default)."
    )
    parser.add_argument("--reps", type=int, default=5, help="Timed runs after the first.")
    parser.add_argument("--keep", action="store_true", help="Keep the database afterwards.")
    parser.add_argument(
        "--prune-before",
        help="After the reports, time `cascade db prune --before` this (e.g. 60d) at volume.",
    )
    parser.add_argument("--prune-batch-size", type=int, default=5000)
    args = parser.parse_args(argv)
    windows = args.since or ["7d"]

    name = f"cascade_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(args.dsn, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    params = psycopg.conninfo.conninfo_to_dict(args.dsn)
    params["dbname"] = name
    dsn = psycopg.conninfo.make_conninfo(**params)
    host, port, user = params.get("host", ""), params.get("port", "5432"), params.get("user", "")
    url = f"postgresql://{user}@{host}:{port}/{name}"
    try:
        header(dsn, args)
        print(f"  database  {name} (created; {'kept' if args.keep else 'dropped at the end'})")
        t = time.perf_counter()
        upgrade(url)
        print(f"  migrations applied (cascade db upgrade) in {time.perf_counter() - t:.1f} s")
        load(dsn, args)
        sizes(dsn)
        check_rollups(url)
        results = time_reports(url, windows, args.reps)
        ui = time_dashboard(url, args.reps)
        if args.prune_before:
            prune_at_volume(url, dsn, args.prune_before, args.prune_batch_size)
    finally:
        if not args.keep:
            with psycopg.connect(args.dsn, autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print()
    print(
        f"{'since':<6} {'report':<8} {'by':<18} {'rows':>5} {'source':<20} {'first s':>8} "
        f"{'median s':>9} {'max s':>7}  target {TARGET_S} s"
    )
    slow = 0
    for r in results:
        ok = r["median"] < TARGET_S
        slow += (not ok) and r["since"] == windows[0]
        print(
            f"{r['since']:<6} {r['report']:<8} {r['by']:<18} {r['rows']:>5} {r['source']:<20} "
            f"{r['first']:>8.3f} {r['median']:>9.3f} {r['max']:>7.3f}  {'ok' if ok else 'SLOW'}"
        )
    print(
        f"\nmedian and max of {args.reps} runs after a first one; "
        f"{'every report under the target' if not slow else f'{slow} report(s) over the target'}"
        f" over --since {windows[0]}"
    )
    print(
        f"dashboard page (/ui, 7 whole days: every query and the HTML, {ui['bytes']:,} bytes): "
        f"first {ui['first']:.3f} s, median {ui['median']:.3f} s, max {ui['max']:.3f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
