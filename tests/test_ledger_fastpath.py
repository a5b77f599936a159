"""The ledger writer's raw-DBAPI fast path stores exactly what SQLAlchemy Core stored.

The writer binds prebuilt tuples on the driver's cursor instead of going through SQLAlchemy
Core (which cost most of its CPU). Reports read the ledger back through SQLAlchemy, so every
stored value must stay what Core stored: these tests write the same batches through a frozen
copy of the former Core path and through :meth:`LedgerWriter._write` into two databases,
and compare every column of every row, storage types included, on SQLite and PostgreSQL
(which must run on 127.0.0.1:5432 with trust auth; each test creates and drops its databases).
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, case
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, IntegrityError, OperationalError
from sqlalchemy.types import TypeDecorator

from proxy.ledger import CallRecord, RequestRecord, make_engine, upgrade
from proxy.ledger import dialect as D
from proxy.ledger import writer as W
from proxy.ledger.schema import calls_table, daily_table, requests_table

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
TABLES = ("ledger_requests", "ledger_calls", "ledger_daily")
NUL = "\x00"

# --------------------------------------------------------------------------- the Core path
# A frozen copy of the writer before the fast path: the reference for what must be stored.


def _ref_clean(value: Any, limit: int | None) -> Any:
    if isinstance(value, str):
        value = value.replace("\x00", "\ufffd")
        if limit is not None and len(value) > limit:
            value = value[:limit]
    return value


def _ref_lengths(table) -> dict[str, int]:
    return {
        c.name: c.type.length
        for c in table.columns
        if getattr(c.type, "length", None) and c.name != "request_id"
    }


_REQ_LEN = _ref_lengths(requests_table)
_CALL_LEN = _ref_lengths(calls_table)


def _ref_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _ref_add(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _ref_when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(float(ts), dt.UTC)


def _ref_request_row(r: RequestRecord) -> dict[str, Any]:
    when = _ref_when(r.ts)
    lim = _REQ_LEN.get
    return {
        "request_id": _ref_clean(str(r.request_id), None),
        "ts": when,
        "day": when.date(),
        "api_key": _ref_clean(r.api_key, lim("api_key")),
        "cascade": _ref_clean(r.cascade, lim("cascade")),
        "model_requested": _ref_clean(r.model_requested or "", lim("model_requested")),
        "policy_hash": _ref_clean(r.policy_hash, lim("policy_hash")),
        "status": int(r.status),
        "chosen_model": _ref_clean(r.chosen_model, lim("chosen_model")),
        "n_calls": int(r.n_calls if r.n_calls is not None else len(r.calls)),
        "tokens_in": int(r.tokens_in or 0),
        "tokens_out": int(r.tokens_out or 0),
        "cost_usd": _ref_float(r.cost_usd),
        "reference_cost_usd": _ref_float(r.reference_cost_usd),
        "latency_ms": float(r.latency_ms or 0.0),
        "overhead_ms": float(r.overhead_ms or 0.0),
        "stream": bool(r.stream),
        "error": _ref_clean(r.error, lim("error")),
    }


def _ref_call_rows(r: RequestRecord) -> list[dict[str, Any]]:
    when = _ref_when(r.ts)
    request_id = _ref_clean(str(r.request_id), None)
    lim = _CALL_LEN.get
    return [
        {
            "request_id": request_id,
            "call_order": int(c.order),
            "ts": when,
            "node": None if c.node is None else int(c.node),
            "model": _ref_clean(c.model or "", lim("model")),
            "backend": _ref_clean(c.backend, lim("backend")),
            "status": _ref_clean(c.status or "unknown", lim("status")),
            "http_status": None if c.http_status is None else int(c.http_status),
            "tokens_in": None if c.tokens_in is None else int(c.tokens_in),
            "tokens_out": None if c.tokens_out is None else int(c.tokens_out),
            "cost_usd": _ref_float(c.cost_usd),
            "latency_ms": _ref_float(c.latency_ms),
            "ttft_ms": _ref_float(c.ttft_ms),
            "confidence": _ref_float(c.confidence),
            "p_correct": _ref_float(c.p_correct),
            "agreement": None if c.agreement is None else bool(c.agreement),
            "decision": _ref_clean(c.decision, lim("decision")),
            "error": _ref_clean(c.error, lim("error")),
            "samples": None if c.samples is None else int(c.samples),
            "vote_share": _ref_float(c.vote_share),
            "lp_mean": _ref_float(c.lp_mean),
            "lp_min": _ref_float(c.lp_min),
            "lp_q05": _ref_float(c.lp_q05),
            "lp_q25": _ref_float(c.lp_q25),
        }
        for c in r.calls
    ]


def _ref_rollup_rows(records: Iterable[RequestRecord]) -> list[dict[str, Any]]:
    acc: dict[tuple, dict[str, Any]] = {}

    def row(day: dt.date, cascade: str | None, model: str | None, key: str | None):
        k = (
            day,
            _ref_clean(cascade or "", daily_table.c.cascade.type.length),
            _ref_clean(model or "", daily_table.c.model.type.length),
            key or "",
        )
        if k not in acc:
            acc[k] = dict(zip(D._DAILY_KEY, k, strict=True))
            acc[k].update(dict.fromkeys(D._DAILY_COUNTS, 0))
            acc[k].update(dict.fromkeys(D._DAILY_COSTS))
        return acc[k]

    for r in records:
        day = _ref_when(r.ts).date()
        top = row(day, r.cascade, r.chosen_model, r.api_key)
        top["requests"] += 1
        top["requests_failed"] += int(int(r.status) >= 400)
        top["unpriced_requests"] += int(r.cost_usd is None)
        top["reference_cost_usd"] = _ref_add(top["reference_cost_usd"], r.reference_cost_usd)
        top["reference_unpriced"] += int(r.reference_cost_usd is None)
        if not r.calls:
            top["tokens_in"] += int(r.tokens_in or 0)
            top["tokens_out"] += int(r.tokens_out or 0)
            top["cost_usd"] = _ref_add(top["cost_usd"], r.cost_usd)
        for c in r.calls:
            cr = row(day, r.cascade, c.model, r.api_key)
            cr["calls"] += 1
            cr["calls_failed"] += int(c.status != "ok")
            cr["unpriced_calls"] += int(c.cost_usd is None)
            cr["tokens_in"] += int(c.tokens_in or 0)
            cr["tokens_out"] += int(c.tokens_out or 0)
            cr["cost_usd"] = _ref_add(cr["cost_usd"], c.cost_usd)
    return [acc[k] for k in sorted(acc)]


def _ref_write(engine: Engine, records: list[RequestRecord]) -> tuple[int, int, int]:
    """The former ``LedgerWriter._write`` (without its error mapping), with one fix: requests
    are keyed by their id as stored (NUL replaced), so that a NUL-bearing id's calls and
    rollups are written too (the former code never matched it with RETURNING's id)."""
    ins = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    unique: dict[str, RequestRecord] = {}
    for r in records:
        unique.setdefault(_ref_clean(str(r.request_id), None), r)
    req_rows = [_ref_request_row(r) for r in unique.values()]
    with engine.begin() as conn:
        stmt = (
            ins(requests_table)
            .on_conflict_do_nothing(index_elements=["request_id"])
            .returning(requests_table.c.request_id)
        )
        inserted = set(conn.execute(stmt, req_rows).scalars().all())
        fresh = [r for rid, r in unique.items() if rid in inserted]
        call_rows = [row for r in fresh for row in _ref_call_rows(r)]
        if call_rows:
            conn.execute(
                ins(calls_table).on_conflict_do_nothing(
                    index_elements=["request_id", "call_order"]
                ),
                call_rows,
            )
        daily = _ref_rollup_rows(fresh)
        if daily:
            up = ins(daily_table)
            ex = up.excluded
            t = daily_table.c
            set_ = {c: t[c] + ex[c] for c in D._DAILY_COUNTS}
            for c in D._DAILY_COSTS:
                set_[c] = case(
                    (t[c].is_(None), ex[c]),
                    (ex[c].is_(None), t[c]),
                    else_=t[c] + ex[c],
                )
            conn.execute(up.on_conflict_do_update(index_elements=D._DAILY_KEY, set_=set_), daily)
    return len(fresh), len(call_rows), len(records) - len(fresh)


# --------------------------------------------------------------------------- databases


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432 ({exc})")


@pytest.fixture
def pg_dbs() -> Iterator[list[str]]:
    """Two fresh PostgreSQL databases (names); dropped afterwards. Their sessions are not in
    UTC, so a timestamp bound without its zone would land at another instant."""
    names = [f"cascade_fastpath_{uuid.uuid4().hex[:12]}" for _ in range(2)]
    with _admin() as admin:
        for name in names:
            admin.execute(f'CREATE DATABASE "{name}"')
            admin.execute(f"ALTER DATABASE \"{name}\" SET timezone TO 'Asia/Kolkata'")
    try:
        yield names
    finally:
        with _admin() as admin:
            for name in names:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def two_urls(request, tmp_path: Path) -> tuple[str, str]:
    """(reference url, fast-path url) of two empty ledgers on the same backend."""
    if request.param == "sqlite":
        urls = (f"sqlite:///{tmp_path / 'core.db'}", f"sqlite:///{tmp_path / 'fast.db'}")
    else:
        names = request.getfixturevalue("pg_dbs")
        urls = tuple(f"postgresql://postgres@127.0.0.1:5432/{n}" for n in names)
    for url in urls:
        upgrade(url)
    return urls


def _writer(url: str, tmp_path: Path, **engine_kw) -> W.LedgerWriter:
    """A writer whose engine is set up as its thread would, without starting the thread."""
    w = W.LedgerWriter(url, tmp_path / "spool" / f"{uuid.uuid4().hex}.jsonl")
    w._engine = make_engine(url, **engine_kw)
    return w


def _dump(url: str) -> dict[str, list[tuple]]:
    """Every row of the ledger tables as the driver returns them, each value with its type
    (SQLite's storage class shows as int/float/str), ordered by id."""
    out: dict[str, list[tuple]] = {}
    if url.startswith("sqlite"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as conn:
            for t in TABLES:
                rows = conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall()
                out[t] = [tuple((type(v).__name__, v) for v in row) for row in rows]
        return out
    dsn = f"host=127.0.0.1 port=5432 user=postgres dbname={url.rsplit('/', 1)[1]}"
    with psycopg.connect(dsn) as conn:
        for t in TABLES:
            rows = conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall()
            out[t] = [tuple((type(v).__name__, v) for v in row) for row in rows]
    return out


# --------------------------------------------------------------------------- records


def _call(rng: random.Random, order: int, **kw: Any) -> CallRecord:
    fields = {
        "order": order,
        "model": rng.choice(["small", "big", "", None, "m" + NUL + "x", "M" * 300]),
        "backend": rng.choice(["openai", None, "b" * 200, NUL]),
        "status": rng.choice(["ok", "ok", "timeout", "http_error", None, "s" * 100]),
        "http_status": rng.choice([200, 502, None]),
        "tokens_in": rng.choice([0, 17, 10**10, None]),
        "tokens_out": rng.choice([3, None]),
        "cost_usd": rng.choice([None, 0.0, 1e-7, 0.1 + 0.2, 12.5]),
        "latency_ms": rng.choice([None, 0.5, 1234.567]),
        "ttft_ms": rng.choice([None, 3.25]),
        "confidence": rng.choice([None, -0.1, 0.999]),
        "p_correct": rng.choice([None, 0.8]),
        "agreement": rng.choice([True, False, None]),
        "decision": rng.choice(["stop", "continue:big", None, "d" * 300, "x" + NUL]),
        "error": rng.choice([None, "boom", "e" * 5000 + NUL]),
        "node": rng.choice([None, 0, 3]),
        "samples": rng.choice([None, 5]),  # a sampled node (migration 0003)
        "vote_share": rng.choice([None, 0.6]),
        # the token-logprob summary (migration 0004)
        "lp_mean": rng.choice([None, -0.41, -1e-300]),
        "lp_min": rng.choice([None, -7.25, 0.0]),
        "lp_q05": rng.choice([None, -2.4]),
        "lp_q25": rng.choice([None, -0.6, -(0.1 + 0.2)]),
    }
    fields.update(kw)
    return CallRecord(**fields)


def _request(rng: random.Random, rid: str, ts: float, **kw: Any) -> RequestRecord:
    calls = [_call(rng, i) for i in range(rng.choice([0, 1, 1, 2, 3]))]
    fields = {
        "request_id": rid,
        "ts": ts,
        "api_key": rng.choice(["sk-a", "sk-b", None]),
        "cascade": rng.choice(["math", "code", None, "c" * 200, "ca" + NUL + "s"]),
        "model_requested": rng.choice(["auto", "", None, "r" * 300]),
        "policy_hash": rng.choice(["sha256:abc", None, "p" * 200]),
        "status": rng.choice([200, 200, 400, 502]),
        "chosen_model": rng.choice(["small", "big", None, "", "C" * 300]),
        "n_calls": rng.choice([len(calls), None]),
        "tokens_in": rng.choice([0, 120, None]),
        "tokens_out": rng.choice([7, None]),
        "cost_usd": rng.choice([None, 0.0, 0.003, 1 / 3]),
        "reference_cost_usd": rng.choice([None, 0.01, 2.5e-6]),
        "latency_ms": rng.choice([100.0, None, 0]),
        "overhead_ms": rng.choice([1.5, None]),
        "error": rng.choice([None, "upstream failed", "x" * 10000, "nul" + NUL]),
        "stream": rng.choice([True, False]),
        "calls": calls,
    }
    fields.update(kw)
    api_key = fields.pop("api_key")
    record = RequestRecord(api_key=None, **fields)
    record.api_key = api_key  # as from a spool line: kept verbatim, possibly odd
    return record


def _batches(rng: random.Random) -> list[list[RequestRecord]]:
    """Batches over several days, of sizes that use every page size, with duplicates in a
    batch and across batches, and timestamps on and near whole seconds."""
    base = dt.datetime(2025, 3, 1, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    stamps = [base, base + 0.5, base + 0.9999996, base + 1e-6, base + 86400 * 3 + 0.25]
    n = 0

    def fresh(k: int) -> list[RequestRecord]:
        nonlocal n
        out = []
        for _ in range(k):
            n += 1
            ts = rng.choice(stamps) if n % 7 == 0 else base + rng.uniform(0, 3 * 86400)
            rid = f"chatcmpl-{n:06d}" if n % 11 else f"chatcmpl-{n:06d}" + NUL
            out.append(_request(rng, rid, ts))
        return out

    b1 = fresh(100)
    b2 = fresh(37)
    b2.insert(5, _request(rng, b2[0].request_id, base))  # a duplicate within the batch
    b2.append(b1[3])  # one already written by the previous batch
    b2.append(_request(rng, b1[10].request_id, base))  # another record, same request id
    b3 = fresh(1)
    b4 = fresh(63)
    b4.append(_request(rng, "chatcmpl-nocalls", base, calls=[], n_calls=None))
    b4.append(_request(rng, "chatcmpl-int-ts", int(base), stream=1, status="503"))
    b4.append(_request(rng, "chatcmpl-keyless", base, api_key=None, cascade=None))
    b5 = b1[:40] + fresh(2)  # mostly duplicates across batches
    return [b1, b2, b3, b4, b5, fresh(256), fresh(300)]


# --------------------------------------------------------------------------- tests


def _write_both_and_compare(core_url: str, fast_url: str, tmp_path: Path) -> None:
    """Write the same batches through both paths; assert equal results and tables."""
    core = make_engine(core_url)
    fast = _writer(fast_url, tmp_path)
    try:
        for batch in _batches(random.Random(20250301)):
            assert fast._write(batch) == _ref_write(core, batch)
    finally:
        core.dispose()
        fast._engine.dispose()
    want, got = _dump(core_url), _dump(fast_url)
    assert len(want["ledger_requests"]) > 700 and len(want["ledger_calls"]) > 900
    assert len(want["ledger_daily"]) > 20
    for table in TABLES:
        assert len(got[table]) == len(want[table]), table
        for g, w in zip(got[table], want[table], strict=True):
            assert g == w, table


def test_fast_path_stores_what_core_stored(two_urls, tmp_path):
    _write_both_and_compare(*two_urls, tmp_path)


def test_postgres_without_raw_cursor_stores_the_same(pg_dbs, tmp_path, monkeypatch):
    """psycopg before 3.2 has no RawCursor: the writer falls back to %s placeholders."""
    monkeypatch.delattr(psycopg, "RawCursor")
    assert D._Backend("postgresql").raw_cursor is None
    urls = [f"postgresql://postgres@127.0.0.1:5432/{n}" for n in pg_dbs]
    for url in urls:
        upgrade(url)
    _write_both_and_compare(*urls, tmp_path)


def test_sqlite_timestamps_match_sqlalchemy():
    """The cached-second SQLite timestamp text equals SQLAlchemy's, rounding included."""
    dialect = sqlite.dialect()
    ts_type = requests_table.c.ts.type
    assert isinstance(ts_type, TypeDecorator)
    bind_ts = ts_type.dialect_impl(dialect).bind_processor(dialect)
    bind_day = requests_table.c.day.type.dialect_impl(dialect).bind_processor(dialect)
    rng = random.Random(7)
    stamps = [0, 0.5, 1e-7, -1e-7, 0.9999995, 0.9999994, -0.5, -1.0000005, 1700000000]
    for _ in range(20000):
        whole = rng.randint(-(10**9), 3 * 10**9)
        stamps.append(whole + rng.choice([0.0, 5e-7, 0.9999995, 1 - 1e-7, rng.random()]))
        stamps.append(rng.uniform(-2e9, 4e9))
    D._SECOND_TEXT.clear()
    for ts in stamps + stamps:  # the second pass reads the cache
        when = dt.datetime.fromtimestamp(float(ts), dt.UTC)
        assert D._stamp_sqlite(ts) == (bind_ts(when), bind_day(when.date())), ts


def test_statement_texts_are_few_and_fixed():
    for name in ("sqlite", "postgresql"):
        backend = D._Backend(name)
        texts = {*backend.requests_sql.values(), *backend.calls_sql.values()}
        texts |= set(backend.daily_sql.values())
        assert len(texts) == 3 * len(D._PAGE_SIZES) <= 3 * 6
    sizes = [list(D._page_sizes(n)) for n in range(1, 600)]
    assert all(sum(s) == n for n, s in enumerate(sizes, 1))
    assert {x for s in sizes for x in s} == set(D._PAGE_SIZES)


def test_refused_record_is_poison_and_isolated(two_urls, tmp_path):
    """An over-long api key fits ledger_requests (clipped) but not PostgreSQL's
    ledger_daily: the batch fails as poison and only that record is rejected."""
    url = two_urls[1]
    w = _writer(url, tmp_path)
    rng = random.Random(3)
    good = [_request(rng, f"ok-{i}", 1.7e9) for i in range(5)]
    bad = _request(rng, "bad", 1.7e9, api_key="k" * 100)
    try:
        if url.startswith("sqlite"):  # no lengths enforced: SQLite stores it, like before
            assert w._write([*good, bad])[0] == 6
            return
        with pytest.raises(D._Poison) as info:
            w._write([*good, bad])
        assert isinstance(info.value.__cause__, DataError)
        w._write_each([*good, bad], replay=False)
        st = w.stats()
        assert (st["written"], st["rejected"]) == (5, 1)
        assert '"bad"' in w.rejected_path.read_text()
    finally:
        w._engine.dispose()


def test_sqlite_integrity_error_is_poison(tmp_path):
    """A constraint the database enforces (here a trigger) makes the batch poison."""
    url = f"sqlite:///{tmp_path / 'l.db'}"
    upgrade(url)
    with sqlite3.connect(tmp_path / "l.db") as conn:
        conn.execute(
            "CREATE TRIGGER no_r2 BEFORE INSERT ON ledger_requests "
            "WHEN NEW.request_id = 'r2' BEGIN SELECT RAISE(ABORT, 'no r2'); END"
        )
    w = _writer(url, tmp_path)
    rng = random.Random(5)
    try:
        assert w._write([_request(rng, "r1", 1.7e9)])[0] == 1
        with pytest.raises(D._Poison) as info:
            w._write([_request(rng, "r2", 1.7e9)])
        assert isinstance(info.value.__cause__, IntegrityError)
    finally:
        w._engine.dispose()


def test_sqlite_locked_database_is_an_outage(tmp_path):
    """A locked database is "not usable now": raised for the spool, not poison."""
    path = tmp_path / "l.db"
    upgrade(f"sqlite:///{path}")
    w = _writer(f"sqlite:///{path}", tmp_path, connect_args={"timeout": 0.05})
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(OperationalError) as info:
            w._write([_request(random.Random(1), "r1", 1.7e9)])
        assert D._is_outage(info.value)
        blocker.execute("ROLLBACK")
        assert w._write([_request(random.Random(1), "r1", 1.7e9)])[0] == 1
    finally:
        blocker.close()
        w._engine.dispose()


def test_postgres_lost_connection_is_an_outage_then_recovers(pg_dbs, tmp_path):
    """A connection killed under the writer: an outage error, the connection is
    invalidated, and the next batch gets a new one."""
    url = f"postgresql://postgres@127.0.0.1:5432/{pg_dbs[0]}"
    upgrade(url)
    w = _writer(url, tmp_path, pool_pre_ping=False)
    rng = random.Random(2)
    try:
        assert w._write([_request(rng, "r1", 1.7e9)])[0] == 1
        with _admin() as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (pg_dbs[0],),
            )
        with pytest.raises(OperationalError) as info:
            w._write([_request(rng, "r2", 1.7e9)])
        assert D._is_outage(info.value) and info.value.connection_invalidated
        assert w._write([_request(rng, "r2", 1.7e9)])[0] == 1
    finally:
        w._engine.dispose()
