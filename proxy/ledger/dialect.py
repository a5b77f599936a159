"""The ledger's database dialect: how records become rows, and rows a statement.

The writer hands a batch of :class:`RequestRecord` to :func:`write_records`, which writes it
in one transaction: the requests (``INSERT ... ON CONFLICT (request_id) DO NOTHING RETURNING
request_id``), the calls of the requests that were actually inserted, and the daily rollups
of those same requests (``INSERT ... ON CONFLICT DO UPDATE``). So writing a request twice
changes nothing: the ledger is idempotent by ``request_id``.

SQLAlchemy Core spent most of the writer's CPU on per-row parameter processing, so rows are
tuples built here once, field by field, and bound on the raw DBAPI cursor exactly as
SQLAlchemy would bind them (timestamps included; tests/test_ledger_fastpath.py compares every
stored column with the Core path). Errors are sorted into two kinds the writer treats
differently: the database is not usable now (an outage: spool and retry) or it refuses this
content (:class:`_Poison`: isolate the record, reject it).
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from proxy.ledger.records import RequestRecord
from proxy.ledger.schema import calls_table, daily_table, requests_table

# Rows per multi-row INSERT ... RETURNING (pages of 32, 16, ... 1 rows: see _page_sizes). A
# fixed set of pages bounds the distinct statement texts: with one text per batch size,
# sqlite3's cache of 128 prepared statements (psycopg prepares repeated ones too) kept growing
# the proxy's RSS, by ~35 MB in the first minutes of a soak.
INSERT_PAGE_ROWS = 32

_DAILY_KEY = ("day", "cascade", "model", "api_key")
_DAILY_COUNTS = (
    "requests",
    "requests_failed",
    "unpriced_requests",
    "calls",
    "calls_failed",
    "unpriced_calls",
    "tokens_in",
    "tokens_out",
    "reference_unpriced",
)
_DAILY_COSTS = ("cost_usd", "reference_cost_usd")


class _Poison(Exception):
    """A record the database refuses for its content (wraps the original error)."""


def _is_outage(exc: BaseException) -> bool:
    """True when ``exc`` means "the database is not usable now", not "this record is bad"."""
    if isinstance(exc, IntegrityError | DataError):
        return False
    return isinstance(exc, DBAPIError | DisconnectionError | PoolTimeoutError | OSError)


def _string_lengths(table) -> dict[str, int]:
    return {
        c.name: c.type.length
        for c in table.columns
        if getattr(c.type, "length", None) and c.name != "request_id"
    }


_REQ_LEN = _string_lengths(requests_table)
_CALL_LEN = _string_lengths(calls_table)
_DAILY_CASCADE_LEN = daily_table.c.cascade.type.length
_DAILY_MODEL_LEN = daily_table.c.model.type.length


# The columns the row builders below fill, in the order of their tuples (which is the order
# of the statements' column lists).
# fmt: off
_REQ_COLS = (
    "request_id", "ts", "day", "api_key", "cascade", "model_requested", "policy_hash",
    "status", "chosen_model", "n_calls", "tokens_in", "tokens_out", "cost_usd",
    "reference_cost_usd", "latency_ms", "overhead_ms", "stream", "error",
)
_CALL_COLS = (
    "request_id", "call_order", "ts", "node", "model", "backend", "status", "http_status",
    "tokens_in", "tokens_out", "cost_usd", "latency_ms", "ttft_ms", "confidence", "p_correct",
    "agreement", "decision", "error", "samples", "vote_share", "lp_mean", "lp_min", "lp_q05",
    "lp_q25",
)
# fmt: on
_DAILY_COLS = _DAILY_KEY + _DAILY_COUNTS + _DAILY_COSTS


def _check_columns() -> None:
    """Fail at import, not by writing shifted values, if a migration changed the columns."""
    for table, cols in (
        (requests_table, _REQ_COLS),
        (calls_table, _CALL_COLS),
        (daily_table, _DAILY_COLS),
    ):
        if sorted(cols) != sorted(c.name for c in table.columns if c.name != "id"):
            raise RuntimeError(f"ledger writer: its {table.name} columns differ from the schema")


_check_columns()


def _clean(value: Any, limit: int | None) -> Any:
    """Strings fit for any backend: no NUL (PostgreSQL refuses it), clipped to the column."""
    if isinstance(value, str):
        value = value.replace("\x00", "\ufffd")
        if limit is not None and len(value) > limit:
            value = value[:limit]
    return value


def _add_cost(a: float | None, b: float | None) -> float | None:
    """Sum where unknown (None) is not zero: None only when both are unknown."""
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _stamp_pg(ts: float) -> tuple[dt.datetime, dt.date]:
    """``(ts, day)`` bound as SQLAlchemy binds them to PostgreSQL: aware UTC, a date."""
    when = dt.datetime.fromtimestamp(float(ts), dt.UTC)
    return when, when.date()


_SECOND_TEXT: dict[int, str] = {}  # epoch second -> "YYYY-MM-DD HH:MM:SS" (UTC)


def _stamp_sqlite(ts: float) -> tuple[str, str]:
    """``(ts, day)`` as SQLAlchemy's SQLite DateTime and Date store them: naive UTC text,
    ``YYYY-MM-DD HH:MM:SS.ffffff`` and ``YYYY-MM-DD``.

    ``isoformat`` cost more than the rest of a row, so the text of the whole second is
    cached: a batch's records share a few seconds. ``fromtimestamp`` rounds the fraction to
    microseconds; when that leaves a non-zero microsecond, no carry happened and the whole
    second is ``floor(ts)``; otherwise (rare) the text is made in full.
    """
    ts = float(ts)
    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    us = when.microsecond
    if not us:
        text = when.isoformat(" ", "microseconds")
        return text[:26], text[:10]
    second = math.floor(ts)
    head = _SECOND_TEXT.get(second)
    if head is None:
        if len(_SECOND_TEXT) >= 4096:
            _SECOND_TEXT.clear()
        head = _SECOND_TEXT[second] = when.isoformat(" ", "seconds")[:19]
    return f"{head}.{us:06d}", head[:10]


def _request_values(r: RequestRecord, rid: str, when: Any, day: Any) -> tuple:
    """The ``ledger_requests`` row of ``r`` in ``_REQ_COLS`` order. Each field is converted
    once, by hand: this runs per record (bools stay bools: sqlite3 binds them as 0/1)."""
    lim = _REQ_LEN
    return (
        rid,
        when,
        day,
        _clean(r.api_key, lim["api_key"]),
        _clean(r.cascade, lim["cascade"]),
        _clean(r.model_requested or "", lim["model_requested"]),
        _clean(r.policy_hash, lim["policy_hash"]),
        int(r.status),
        _clean(r.chosen_model, lim["chosen_model"]),
        int(r.n_calls if r.n_calls is not None else len(r.calls)),
        int(r.tokens_in or 0),
        int(r.tokens_out or 0),
        None if r.cost_usd is None else float(r.cost_usd),
        None if r.reference_cost_usd is None else float(r.reference_cost_usd),
        float(r.latency_ms or 0.0),
        float(r.overhead_ms or 0.0),
        bool(r.stream),
        _clean(r.error, None),
    )


def _call_values(r: RequestRecord, rid: str, when: Any) -> list[tuple]:
    """The ``ledger_calls`` rows of ``r`` in ``_CALL_COLS`` order (see _request_values)."""
    lim = _CALL_LEN
    return [
        (
            rid,
            int(c.order),
            when,
            None if c.node is None else int(c.node),
            _clean(c.model or "", lim["model"]),
            _clean(c.backend, lim["backend"]),
            _clean(c.status or "unknown", lim["status"]),
            None if c.http_status is None else int(c.http_status),
            None if c.tokens_in is None else int(c.tokens_in),
            None if c.tokens_out is None else int(c.tokens_out),
            None if c.cost_usd is None else float(c.cost_usd),
            None if c.latency_ms is None else float(c.latency_ms),
            None if c.ttft_ms is None else float(c.ttft_ms),
            None if c.confidence is None else float(c.confidence),
            None if c.p_correct is None else float(c.p_correct),
            None if c.agreement is None else bool(c.agreement),
            _clean(c.decision, lim["decision"]),
            _clean(c.error, None),
            None if c.samples is None else int(c.samples),
            None if c.vote_share is None else float(c.vote_share),
            None if c.lp_mean is None else float(c.lp_mean),
            None if c.lp_min is None else float(c.lp_min),
            None if c.lp_q05 is None else float(c.lp_q05),
            None if c.lp_q25 is None else float(c.lp_q25),
        )
        for c in r.calls
    ]


def _rollup_values(records: Iterable[tuple[RequestRecord, Any]]) -> list[tuple]:
    """The ``ledger_daily`` increments of ``(record, day)`` pairs, as ``_DAILY_COLS`` tuples
    sorted by key (concurrent writers then lock rows in the same order).

    Each request counts once under the model whose answer was returned (``''`` if none);
    each call counts once under the model it called. A request recorded without its calls
    contributes its own tokens and cost under its row.
    """
    # acc[key]: the nine _DAILY_COUNTS, then cost_usd and reference_cost_usd
    acc: dict[tuple, list[Any]] = {}
    for r, day in records:
        cascade = _clean(r.cascade or "", _DAILY_CASCADE_LEN)
        key = r.api_key or ""
        k = (day, cascade, _clean(r.chosen_model or "", _DAILY_MODEL_LEN), key)
        top = acc.get(k)
        if top is None:
            top = acc[k] = [0, 0, 0, 0, 0, 0, 0, 0, 0, None, None]
        top[0] += 1
        top[1] += int(int(r.status) >= 400)
        top[2] += int(r.cost_usd is None)
        top[10] = _add_cost(top[10], r.reference_cost_usd)
        top[8] += int(r.reference_cost_usd is None)
        if not r.calls:
            top[6] += int(r.tokens_in or 0)
            top[7] += int(r.tokens_out or 0)
            top[9] = _add_cost(top[9], r.cost_usd)
        for c in r.calls:
            k = (day, cascade, _clean(c.model or "", _DAILY_MODEL_LEN), key)
            cr = acc.get(k)
            if cr is None:
                cr = acc[k] = [0, 0, 0, 0, 0, 0, 0, 0, 0, None, None]
            cr[3] += 1
            cr[4] += int(c.status != "ok")
            cr[5] += int(c.cost_usd is None)
            cr[6] += int(c.tokens_in or 0)
            cr[7] += int(c.tokens_out or 0)
            cr[9] = _add_cost(cr[9], c.cost_usd)
    return [(*k, *acc[k]) for k in sorted(acc)]


def _page_sizes(n: int, page: int = INSERT_PAGE_ROWS) -> Iterator[int]:
    """Split ``n`` rows into pages of ``page`` rows, then of halves of it down to 1: a fixed
    set of sizes, so a fixed set of statement texts however big a batch is."""
    while n > 0:
        while page > n:
            page //= 2
        yield page
        n -= page


_PAGE_SIZES = sorted({n for k in range(1, 2 * INSERT_PAGE_ROWS) for n in _page_sizes(k)})


def _insert_sql(table: str, cols: tuple[str, ...], rows: int, mark: Callable[[int], str]) -> str:
    """``INSERT INTO table (cols) VALUES (...), ...`` for ``rows`` rows; ``mark(i)`` is the
    placeholder of the i-th parameter (from 1)."""
    width = len(cols)
    values = ", ".join(
        "(" + ", ".join(mark(i * width + j + 1) for j in range(width)) + ")" for i in range(rows)
    )
    names = ", ".join(f'"{c}"' if c == "cascade" else c for c in cols)  # a keyword in SQLite
    return f"INSERT INTO {table} ({names}) VALUES {values}"


def _daily_upsert_tail() -> str:
    """The rollup upsert: counts add up; costs add up where unknown (NULL) is not zero."""
    t = daily_table.name
    sets = [f"{c} = {t}.{c} + excluded.{c}" for c in _DAILY_COUNTS]
    sets += [
        f"{c} = CASE WHEN {t}.{c} IS NULL THEN excluded.{c} WHEN excluded.{c} IS NULL "
        f"THEN {t}.{c} ELSE {t}.{c} + excluded.{c} END"
        for c in _DAILY_COSTS
    ]
    key = ", ".join('"cascade"' if c == "cascade" else c for c in _DAILY_KEY)
    return f" ON CONFLICT ({key}) DO UPDATE SET " + ", ".join(sets)


class _Backend:
    """One dialect's statement texts and timestamp encoding, run on the raw DBAPI cursor.

    SQLAlchemy Core spent most of the writer's CPU on per-row parameter processing; rows
    here are tuples built once and bound exactly as SQLAlchemy binds them (checked by
    tests/test_ledger_fastpath.py). Each statement is a multi-row INSERT in pages of
    :data:`_PAGE_SIZES` rows: a fixed set of texts. On PostgreSQL the texts use native
    ``$n`` placeholders through psycopg's ``RawCursor``, which skips parsing the query
    (psycopg does not cache that for texts this long, and it cost more than the rows).
    """

    def __init__(self, name: str) -> None:
        if name not in ("sqlite", "postgresql"):
            raise ValueError(f"ledger supports sqlite and postgresql, not {name}")
        self.name = name
        self.stamp = _stamp_sqlite if name == "sqlite" else _stamp_pg
        self.raw_cursor: Any = None
        mark: Callable[[int], str] = lambda i: "?"  # noqa: E731
        if name == "postgresql":
            import psycopg

            self.raw_cursor = getattr(psycopg, "RawCursor", None)  # psycopg >= 3.2
            mark = (lambda i: f"${i}") if self.raw_cursor else (lambda i: "%s")

        def pages(table: str, cols: tuple[str, ...], tail: str) -> dict[int, str]:
            return {n: _insert_sql(table, cols, n, mark) + tail for n in _PAGE_SIZES}

        self.requests_sql = pages(
            requests_table.name,
            _REQ_COLS,
            " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
        )
        self.calls_sql = pages(
            calls_table.name, _CALL_COLS, " ON CONFLICT (request_id, call_order) DO NOTHING"
        )
        self.daily_sql = pages(daily_table.name, _DAILY_COLS, _daily_upsert_tail())

    def cursor(self, driver_connection: Any) -> Any:
        if self.raw_cursor is not None:
            return self.raw_cursor(driver_connection)
        return driver_connection.cursor()

    def insert_requests(self, cur: Any, rows: list[tuple]) -> set[str]:
        """Insert ``rows``, skipping request ids already present; the ids inserted."""
        got: set[str] = set()
        for sql, params in _paged(self.requests_sql, rows):
            cur.execute(sql, params)
            got.update(row[0] for row in cur.fetchall())
        return got

    def insert_calls(self, cur: Any, rows: list[tuple]) -> None:
        for sql, params in _paged(self.calls_sql, rows):
            cur.execute(sql, params)

    def upsert_daily(self, cur: Any, rows: list[tuple]) -> None:
        for sql, params in _paged(self.daily_sql, rows):
            cur.execute(sql, params)


def _paged(texts: dict[int, str], rows: list[tuple]) -> Iterator[tuple[str, list[Any]]]:
    """(statement, flat parameters) for each page of ``rows``."""
    i = 0
    for n in _page_sizes(len(rows)):
        yield texts[n], list(chain.from_iterable(rows[i : i + n]))
        i += n


def _dbapi_error(conn: Connection, cur: Any, exc: Exception) -> DBAPIError:
    """``exc`` from the raw driver wrapped as SQLAlchemy would wrap it (``IntegrityError``,
    ``OperationalError``, ...), the connection invalidated if it is lost."""
    dialect = conn.dialect
    lost = dialect.is_disconnect(exc, conn.connection.dbapi_connection, cur)
    if lost:
        conn.invalidate(exc)
    return DBAPIError.instance(
        None,
        None,
        exc,
        dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=lost,
        dialect=dialect,
    )


def write_records(
    engine: Engine, sql: _Backend, records: list[RequestRecord]
) -> tuple[int, int, int]:
    """One transaction: new requests, their calls, their rollups.

    Returns (requests inserted, calls inserted, requests already present). Raises
    :class:`_Poison` when the database refuses the content; an outage (see
    :func:`_is_outage`) is raised as SQLAlchemy raises it.
    """
    unique: dict[str, RequestRecord] = {}
    for r in records:  # keyed as stored, so that RETURNING's ids match
        unique.setdefault(_clean(str(r.request_id), None), r)
    try:
        req_rows = []
        for rid, r in unique.items():
            when, day = sql.stamp(r.ts)
            req_rows.append(_request_values(r, rid, when, day))
    except Exception as exc:
        raise _Poison(str(exc)) from exc
    try:
        with engine.begin() as conn:
            cur = sql.cursor(conn.connection.driver_connection)
            try:
                inserted = sql.insert_requests(cur, req_rows)
                # a request's calls and rollups go in only with the request itself
                fresh = [
                    (r, row)
                    for (rid, r), row in zip(unique.items(), req_rows, strict=True)
                    if rid in inserted
                ]
                call_rows = [c for r, row in fresh for c in _call_values(r, row[0], row[1])]
                if call_rows:
                    sql.insert_calls(cur, call_rows)
                daily = _rollup_values((r, row[2]) for r, row in fresh)
                if daily:
                    sql.upsert_daily(cur, daily)
            except conn.dialect.loaded_dbapi.Error as exc:
                raise _dbapi_error(conn, cur, exc) from exc
            finally:
                cur.close()
    except (IntegrityError, DataError) as exc:
        raise _Poison(str(exc)) from exc
    except Exception as exc:
        if _is_outage(exc):
            raise
        raise _Poison(str(exc)) from exc
    return len(fresh), len(call_rows), len(records) - len(fresh)
