"""The ledger writer: batched, off the request path, and lossless across database outages.

The proxy calls :meth:`LedgerWriter.submit` from the event loop; that only puts the record
on a thread-safe queue. A background thread owns the database connection and, every
``flush_interval_s`` or ``batch_size`` records, writes one batch in one transaction: the
requests (``INSERT ... ON CONFLICT (request_id) DO NOTHING RETURNING request_id``), the calls
of the requests that were actually inserted, and the daily rollups of those same requests
(``INSERT ... ON CONFLICT DO UPDATE``). So writing a request twice changes nothing: the ledger
is idempotent by ``request_id``.

Every database call (a batch, a replay chunk, a schema check) runs in a helper thread and
must answer within ``write_timeout_s`` (2 s): a database that hangs (a frozen host, a
stalled network) is an outage exactly as one that refuses is. The helper thread of a call
past its deadline is abandoned with its connection (never reused; the pool's other
connections are dropped too) and the next call gets a new one. The abandoned call is not
cancelled: if it commits later, the replay of its batch finds its requests already there.

If a batch fails because the database is unusable, it is appended to the spool file
(JSON lines, fsync'd) and every later batch goes there too, in order, until a replay
succeeds; one warning says when an outage starts and one when it ends. Every
``retry_interval_s`` the thread replays the spool in order, one committed transaction per
chunk, in slices of about a flush interval (between them it spools what arrived), and once
all of it is in replaces the spool by an empty file (atomic rename). A process that dies
mid-replay replays again at the next start; requests already committed are skipped by
``request_id``, so every request lands exactly once.

What waits in memory is bounded: at most ``max_pending`` records, and none longer than a
flush interval plus the deadline (a flush interval while records go to the spool anyway);
the rest goes to the spool at once. So a SIGKILL loses what a flush interval holds, with
the database up or down. With ``check_schema`` (as the proxy runs it) the writer checks the
ledger schema before its first write and after every outage, and writes nothing to a
database whose schema is not current (records stay in the spool, an error says to run
``cascade db upgrade``).

A record the database refuses for its own content (an integrity or data error) is isolated
from its batch and appended to ``<spool>.rejected`` with the error, so it can neither block
the spool nor be lost silently.

:meth:`close` (call it from the server's shutdown, which uvicorn runs on SIGTERM) writes
what is queued to the database or the spool and stops the thread. It is also registered
with :mod:`atexit` as a safety net.

Several writers may share one spool path (uvicorn workers, or instances started in the same
folder): each claims a spool *slot* at :meth:`start`, an exclusive ``flock`` held until
:meth:`close` or process exit: slot 0 is the given path, slot k is ``<stem>-k<suffix>`` beside
it. Two writers therefore never append to, replay or truncate the same file, and a writer
restarted after a crash gets a free slot back (usually its own). At start a writer also
adopts the spool of any slot no live writer holds (a worker that died and was not replaced,
or a run with more workers than now), so no spooled record is stranded.
"""

from __future__ import annotations

import asyncio
import atexit
import datetime as dt
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DataError, DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from proxy.ledger.db import (
    SchemaError,
    make_engine,
    normalize_url,
    read_revision,
    redact,
    safe_url,
    verify_revision,
)
from proxy.ledger.records import RequestRecord
from proxy.ledger.schema import calls_table, daily_table, requests_table

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one writer per spool path, unchecked
    fcntl = None

log = logging.getLogger("cascade.ledger")
MAX_SPOOL_SLOTS = 256
# Rows per multi-row INSERT ... RETURNING (pages of 32, 16, ... 1 rows: see _page_sizes). A
# fixed set of pages bounds the distinct statement texts: with one text per batch size,
# sqlite3's cache of 128 prepared statements (psycopg prepares repeated ones too) kept growing
# the proxy's RSS, by ~35 MB in the first minutes of a soak.
INSERT_PAGE_ROWS = 32

# The writer's bounds (see LedgerWriter): a database call slower than the deadline is an
# outage; records beyond the count wait in the spool, not in memory.
DEFAULT_WRITE_TIMEOUT_S = 2.0
DEFAULT_MAX_PENDING = 20_000
MAX_ABANDONED = 4  # hung database threads still alive: no new attempt until fewer
WAIT_SLICE_S = 0.05  # how often the writer checks its queue while a call runs
MIN_REPLAY_SLICE_S = 0.05  # a replay runs at least this long between two looks at the queue
FINAL_REPLAY_S = 5.0  # at close, replay at most this long; the rest waits for the next start

_WAKE = object()
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
    "agreement", "decision", "error",
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


class WriteTimeout(TimeoutError):
    """The database did not answer a write (or a connection, or a schema check) within the
    writer's ``write_timeout_s``: an outage, as a refused connection is."""


class _Job:
    """One piece of database work handed to a :class:`_DbThread`."""

    __slots__ = ("args", "done", "error", "fn", "result")

    def __init__(self, fn: Callable[..., Any], args: tuple) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class _DbThread:
    """A daemon thread that runs the writer's database work, one job at a time.

    The writer waits for a job at most ``write_timeout_s``. A thread whose job overran is
    abandoned: it ends when its job does (a frozen peer holds it until the connection times
    out or the peer wakes up), and the next job gets a new thread. So a hung connection
    neither holds the writer nor serves another batch."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.abandoned = False
        self.thread = threading.Thread(target=self._loop, name="cascade-ledger-db", daemon=True)
        self.thread.start()

    def run(self, fn: Callable[..., Any], *args: Any) -> _Job:
        job = _Job(fn, args)
        self._jobs.put(job)
        return job

    def stop(self) -> None:
        """End the thread once its current job, if any, is done."""
        self._jobs.put(None)

    def abandon(self) -> None:
        self.abandoned = True
        self.stop()

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job.result = job.fn(*job.args)
            except BaseException as exc:  # handed to the writer, which decides
                job.error = exc
            finally:
                job.done.set()
            if self.abandoned:
                return


class LedgerWriter:
    """Batched, non-blocking, outage-proof writer of :class:`RequestRecord` to the ledger.

    ``url`` is a SQLAlchemy URL (``sqlite:///...`` or ``postgresql://...``); ``spool_path``
    is the local append-only file used while the database is unusable. Every database call
    must answer within ``write_timeout_s`` or the database counts as down. At most
    ``max_pending`` records wait in memory (more go to the spool), and none for longer than
    about ``flush_interval_s + write_timeout_s``. With ``check_schema``, the writer checks
    the database's ledger schema before its first write and whenever the database comes back
    from an outage; while it is not current, records stay in the spool.
    """

    def __init__(
        self,
        url: str,
        spool_path: str | os.PathLike[str],
        batch_size: int = 256,
        flush_interval_s: float = 0.25,
        retry_interval_s: float = 2.0,
        write_timeout_s: float = DEFAULT_WRITE_TIMEOUT_S,
        max_pending: int = DEFAULT_MAX_PENDING,
        check_schema: bool = False,
    ) -> None:
        self.url = url
        self.base_spool_path = Path(spool_path)
        self.spool_path = self.base_spool_path  # this writer's slot, chosen by start()
        self.rejected_path = self.spool_path.with_name(self.spool_path.name + ".rejected")
        self._slot_fd: int | None = None
        self.batch_size = max(1, int(batch_size))
        self.flush_interval_s = max(0.0, float(flush_interval_s))
        self.retry_interval_s = max(0.05, float(retry_interval_s))
        self.write_timeout_s = max(0.05, float(write_timeout_s))
        self.max_pending = max(1, int(max_pending))
        # what may wait in memory while a write runs; while records go to the spool anyway,
        # they wait no longer than a flush interval (see _relieve)
        self.max_age_s = self.flush_interval_s + self.write_timeout_s
        self.check_schema = check_schema

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()
        self._spool_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self._idle = threading.Condition(self._stats_lock)
        self._stop = threading.Event()
        self._hurry = threading.Event()  # flush() and close(): write the batch now
        self._thread: threading.Thread | None = None
        self._closed = False
        self._engine: Engine | None = None
        self._backend: _Backend | None = None
        self._db_thread: _DbThread | None = None
        self._abandoned: list[_DbThread] = []  # overran their deadline, maybe still running
        self._engine_stale = False  # a connection was abandoned: drop the pool's others

        self._inflight: list[RequestRecord] = []
        self._held: list[RequestRecord] = []  # neither written nor spooled (spool I/O failed)
        self._drained_at = time.monotonic()  # the queue was last seen empty then
        self._next_retry = 0.0
        self._connected: bool | None = None
        self._schema_ok = not check_schema
        self._schema_error: str | None = None
        self._outage_since: float | None = None  # monotonic start of the current outage
        self._outage_replayed = 0  # self._replayed when it started
        self._replay_offset = 0  # bytes of the spool already in the database
        self._rejected_upto = 0  # spool bytes whose unreadable lines were already rejected

        self._pending = 0
        self._written = 0
        self._calls_written = 0
        self._duplicates = 0
        self._spooled = 0
        self._replayed = 0
        self._rejected = 0
        self._failures = 0
        self._spool_backlog = 0
        self._last_error: str | None = None

    # ------------------------------------------------------------------ caller side

    def start(self) -> LedgerWriter:
        """Start the background thread (idempotent). Returns ``self``."""
        with self._submit_lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return self
            self._claim_slot()
            self._thread = threading.Thread(
                target=self._run, name="cascade-ledger-writer", daemon=True
            )
            self._thread.start()
        atexit.register(self._atexit)
        return self

    def submit(self, record: RequestRecord) -> None:
        """Queue ``record`` for writing. Never blocks on I/O and never raises."""
        try:
            if not isinstance(record, RequestRecord):
                raise TypeError(f"expected a RequestRecord, got {type(record).__name__}")
            with self._submit_lock:
                if not self._closed:
                    self._queue.put(record)
                    with self._stats_lock:
                        self._pending += 1
                    return
            # Closed: nothing will drain the queue any more, so keep it on disk.
            self._spool_from_caller([record])
        except Exception:
            log.exception("ledger: could not accept a record")

    def flush(self, timeout: float = 5.0) -> bool:
        """Block the calling thread until every submitted record was written, spooled or
        rejected (not for the event loop). True if that happened within ``timeout``."""
        deadline = time.monotonic() + timeout
        self._hurry.set()
        self._queue.put(_WAKE)
        with self._idle:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write everything queued (to the database, else the spool) and stop the thread.

        Blocks the calling thread for at most about ``timeout`` seconds; from async code use
        :meth:`aclose`. If the thread is stuck, what it holds and what is still queued go to
        a side spool file that the next start merges into the spool.
        """
        with self._submit_lock:
            if self._closed:
                return
            self._closed = True
        atexit.unregister(self._atexit)
        self._stop.set()
        self._hurry.set()
        self._queue.put(_WAKE)
        thread = self._thread
        if thread is not None:
            thread.join(max(0.0, timeout))
        stuck = thread is not None and thread.is_alive()
        leftovers = list(self._inflight) + list(self._held) if stuck else list(self._held)
        leftovers += self._drain()
        if leftovers:
            if stuck:
                log.error(
                    "ledger: writer thread did not stop within %.1fs; saving %d records to "
                    "a side spool",
                    timeout,
                    len(leftovers),
                )
            self._spool_from_caller(leftovers, side=stuck)
            with self._idle:
                self._pending = 0
                self._idle.notify_all()
        if not stuck:
            if self._db_thread is not None:
                self._db_thread.stop()
            if self._engine is not None:
                self._engine.dispose()
            self._release_slot()  # a stuck thread may still write the spool: keep the slot

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close, timeout)

    def stats(self) -> dict[str, Any]:
        """Counters: ``written`` (requests inserted directly), ``calls_written``,
        ``spooled`` (requests appended to the spool), ``replayed`` (requests inserted from
        the spool), ``duplicates`` (already in the ledger), ``rejected``, ``pending`` (in
        memory: not yet written, spooled or rejected), ``spool_backlog`` (records in the
        spool not yet in the database), ``failures`` (failed database attempts),
        ``connected`` (the last attempt worked; None before any), ``last_error``; and what
        a health check needs: ``degraded`` and its ``reason`` (None when all is well),
        ``outage_s`` (how long the database has been unusable, None when it is not)."""
        now = time.monotonic()
        with self._stats_lock:
            since = self._outage_since
            out = {
                "written": self._written,
                "calls_written": self._calls_written,
                "spooled": self._spooled,
                "replayed": self._replayed,
                "duplicates": self._duplicates,
                "rejected": self._rejected,
                "pending": self._pending,
                "spool_backlog": self._spool_backlog,
                "failures": self._failures,
                "connected": self._connected,
                "last_error": self._last_error,
                "running": self._thread is not None and self._thread.is_alive(),
                "outage_s": None if since is None else round(now - since, 3),
            }
        out["reason"] = self._reason(out)
        out["degraded"] = out["reason"] is not None
        return out

    def _reason(self, st: dict[str, Any]) -> str | None:
        """Why the ledger is not writing straight to the database, for /health."""
        if self._thread is not None and not st["running"] and not self._closed:
            return "the ledger writer thread is not running; records are not being saved"
        if self._schema_error is not None:
            return f"{self._schema_error}; records spool to {self.spool_path}"
        if st["outage_s"] is not None:
            return (
                f"database unavailable for {st['outage_s']:.0f} s ({st['last_error']}); "
                f"records spool to {self.spool_path} and are replayed when it is back"
            )
        if self._held:
            return f"cannot write the spool {self.spool_path}: {len(self._held)} records held"
        if st["spool_backlog"]:
            return f"replaying {st['spool_backlog']} spooled records into the database"
        return None

    def mark_unavailable(self, reason: str) -> None:
        """Start in outage: the caller found the database unreachable (and said so), so
        records spool from the first one and health checks say why, until it answers."""
        with self._stats_lock:
            self._connected = False
            self._last_error = redact(reason, self.url)[:500]
            if self._outage_since is None:
                self._outage_since = time.monotonic()

    def _atexit(self) -> None:
        self.close(timeout=5.0)

    def _claim_slot(self) -> None:
        """Take the first spool slot no live writer holds (see the module docstring)."""
        if self._slot_fd is not None or fcntl is None:
            return
        try:
            self.base_spool_path.parent.mkdir(parents=True, exist_ok=True)
            for slot in range(MAX_SPOOL_SLOTS):
                path = _slot_path(self.base_spool_path, slot)
                fd = _try_lock(path)
                if fd is not None:
                    self._slot_fd = fd
                    self.spool_path = path
                    self.rejected_path = path.with_name(path.name + ".rejected")
                    return
            log.error("ledger: every spool slot of %s is taken", self.base_spool_path)
        except OSError:
            log.exception("ledger: cannot lock a spool slot beside %s", self.base_spool_path)

    def _release_slot(self) -> None:
        fd, self._slot_fd = self._slot_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock

    def _adopt_orphans(self) -> None:
        """Move the spools of slots no live writer holds into this writer's spool."""
        if self._slot_fd is None:
            return
        base = self.base_spool_path
        slot_name = re.compile(rf"{re.escape(base.stem)}-[0-9]+{re.escape(base.suffix)}")
        others = [base, *(p for p in base.parent.iterdir() if slot_name.fullmatch(p.name))]
        for other in others:
            if other == self.spool_path:
                continue
            sides = sorted(other.parent.glob(other.name + ".side-*"))
            if not other.exists() and not sides:
                continue
            fd = _try_lock(other)
            if fd is None:
                continue  # a live writer owns it
            try:
                for path in [*sides, other]:
                    if path.exists():
                        data = path.read_bytes()
                        if data.strip():
                            _append(self.spool_path, data if data.endswith(b"\n") else data + b"\n")
                            log.warning("ledger: adopted the orphaned spool %s", path)
                        path.unlink()  # a crash before this: replayed twice, landing once
                _fsync_dir(self.spool_path.parent)
            finally:
                os.close(fd)

    def _drain(self) -> list[RequestRecord]:
        out = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return out
            if item is not _WAKE:
                out.append(item)

    # ------------------------------------------------------------------ writer thread

    def _make_engine(self) -> Engine:
        """The writer's engine. On PostgreSQL its connections give up on their own too: a
        connect timeout of twice the write deadline (so the deadline, not the driver, ends a
        hung connect, and an abandoned one ends soon after), TCP keepalives and a TCP user
        timeout (a peer that stops acknowledging), unless the URL sets them."""
        url = normalize_url(self.url)
        if url.get_backend_name() != "postgresql":
            return make_engine(url)
        wanted = {
            "connect_timeout": max(2, math.ceil(2 * self.write_timeout_s)),
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 30_000,
        }
        given = {k: v for k, v in wanted.items() if k not in url.query}
        return make_engine(url, connect_args=given)

    def _run(self) -> None:
        try:
            self._engine = self._make_engine()
            self._backend = _Backend(self._engine.dialect.name)
            self._recover_spool()
        except Exception as exc:
            log.exception("ledger: writer could not start; records will be spooled")
            self._note_failure(exc)
        try:
            self._maybe_replay(force=True)  # know at once whether the database is there
        except Exception:
            log.exception("ledger: unexpected error in the writer thread")
        while True:
            try:
                self._relieve()
                batch = self._collect()
                if batch:
                    self._inflight = batch
                    self._handle(batch)
                    self._inflight = []
                    self._done(len(batch))
                elif self._stop.is_set():
                    break
                self._maybe_replay()
            except Exception:
                log.exception("ledger: unexpected error in the writer thread")
                if self._inflight:
                    self._spool(self._inflight)
                    self._done(len(self._inflight))
                    self._inflight = []
                time.sleep(0.05)
        # Shutting down: replay a while longer if the database is known to be there; what
        # is left stays in the spool for the next start.
        try:
            stop_at = time.monotonic() + FINAL_REPLAY_S
            while self._needs_replay() and self._connected and time.monotonic() < stop_at:
                if not self._maybe_replay(force=True):
                    break
        except Exception:
            log.exception("ledger: final replay failed; the spool is kept")

    def _collect(self) -> list[RequestRecord]:
        batch: list[RequestRecord] = []
        # a replay to continue, or the end of the run: take what is queued, wait for nothing
        eager = self._stop.is_set() or (
            self._needs_replay() and self._connected and time.monotonic() >= self._next_retry
        )
        try:
            if eager:
                first = self._queue.get_nowait()
            else:
                first = self._queue.get(timeout=max(self.flush_interval_s, 0.01))
        except queue.Empty:
            self._drained_at = time.monotonic()
            return batch
        if first is not _WAKE:
            batch.append(first)
        if not eager and first is not _WAKE and self._queue.qsize() < self.batch_size:
            # let the batch fill while this thread sleeps: waiting on the queue instead
            # would wake it (and take the GIL from the event loop) for every record
            self._hurry.wait(self.flush_interval_s)
        self._hurry.clear()
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                self._drained_at = time.monotonic()
                break
            if item is not _WAKE:
                batch.append(item)
        return batch

    def _relieve(self) -> None:
        """Spool what waits in memory beyond its bounds: more than ``max_pending`` records,
        or any record queued for longer than ``max_age_s`` (a flush interval while records
        go to the spool anyway). So a hung write, or a replay, never holds more than that in
        a process that may be killed."""
        waiting = self._queue.qsize()
        if not waiting:
            return
        limit = self.flush_interval_s if self._must_spool() else self.max_age_s
        if waiting <= self.max_pending and time.monotonic() - self._drained_at <= limit:
            return
        records = self._drain()
        self._drained_at = time.monotonic()
        if records:
            self._spool(records)
            self._done(len(records))

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending = max(0, self._pending - n)
            if self._pending == 0:
                self._idle.notify_all()

    def _must_spool(self) -> bool:
        """True while records cannot go straight to the database: an outage, a schema not
        (yet) known to be current, or a spool still to replay (it goes first)."""
        return bool(
            self._spool_backlog
            or self._held
            or self._engine is None
            or self._outage_since is not None
            or not self._schema_ok
        )

    def _needs_replay(self) -> bool:
        return self._must_spool() and self._engine is not None

    def _db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the database thread, waited for at most ``write_timeout_s``.

        Past that, the thread is abandoned (with its connection) and :class:`WriteTimeout`
        raised. While waiting, what is queued is kept within its bounds (``_relieve``)."""
        worker = self._db_thread
        if worker is None:
            self._abandoned = [t for t in self._abandoned if t.thread.is_alive()]
            if len(self._abandoned) >= MAX_ABANDONED:
                raise WriteTimeout(f"{len(self._abandoned)} earlier database calls are still hung")
            worker = self._db_thread = _DbThread()
        if self._engine_stale:  # the pool's idle connections may lead to the same hung peer
            self._engine_stale = False
            job = worker.run(self._fresh_call, fn, args)
        else:
            job = worker.run(fn, *args)
        deadline = time.monotonic() + self.write_timeout_s
        while not job.done.wait(max(0.0, min(WAIT_SLICE_S, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                worker.abandon()
                self._abandoned.append(worker)
                self._db_thread = None
                self._engine_stale = True
                raise WriteTimeout(f"no answer within write_timeout_s={self.write_timeout_s:g} s")
            self._relieve()
        if job.error is not None:
            raise job.error
        return job.result

    def _fresh_call(self, fn: Callable[..., Any], args: tuple) -> Any:
        assert self._engine is not None
        self._engine.dispose()  # connections checked out (the hung one) are left alone
        return fn(*args)

    def _handle(self, batch: list[RequestRecord]) -> None:
        """Write ``batch`` to the database, or to the spool if the ledger is in outage."""
        if self._must_spool():
            self._spool(batch)  # keep the order: the spool must be replayed first
            return
        try:
            new, calls, dups = self._db(self._write, batch)
        except _Poison:
            self._write_each(batch, replay=False)
            return
        except Exception as exc:
            if not _is_outage(exc):
                raise
            # the batch may still commit if its write was only late: its replay then
            # finds its requests there and adds nothing (idempotent by request_id)
            self._note_failure(exc)
            self._spool(batch)
            return
        self._connected = True
        with self._stats_lock:
            self._written += new
            self._calls_written += calls
            self._duplicates += dups

    def _write_each(self, records: list[RequestRecord], *, replay: bool) -> None:
        """Write records one by one to isolate the ones the database refuses."""
        for i, record in enumerate(records):
            try:
                new, calls, dups = self._db(self._write, [record])
            except _Poison as exc:
                self._reject(record, exc.__cause__ or exc)
                continue
            except Exception as exc:
                if not _is_outage(exc) or replay:
                    raise
                self._note_failure(exc)
                self._spool(records[i:])
                return
            with self._stats_lock:
                if replay:
                    self._replayed += new
                else:
                    self._written += new
                self._calls_written += calls
                self._duplicates += dups

    def _write(self, records: list[RequestRecord]) -> tuple[int, int, int]:
        """One transaction: new requests, their calls, their rollups.

        Returns (requests inserted, calls inserted, requests already present). Raises
        :class:`_Poison` when the database refuses the content.
        """
        assert self._engine is not None
        sql = self._backend
        if sql is None:  # an engine set by hand (tests, benchmarks)
            sql = self._backend = _Backend(self._engine.dialect.name)
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
            with self._engine.begin() as conn:
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

    def _read_schema(self) -> str:
        """The database's ledger revision if it is current; :class:`SchemaError` if not."""
        assert self._engine is not None
        with self._engine.connect() as conn:
            current = read_revision(conn)
        return verify_revision(current, self.url)

    def _ping(self) -> None:
        assert self._engine is not None
        with self._engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    # ------------------------------------------------------------------ outage handling

    def _note_failure(self, exc: BaseException) -> None:
        """The database failed (refused, dropped, or did not answer in time): spool from now
        on and try again in ``retry_interval_s``. One warning when an outage starts."""
        self._connected = False
        self._next_retry = time.monotonic() + self.retry_interval_s
        if isinstance(exc, WriteTimeout):
            msg = str(exc)
        else:
            msg = f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}".strip()
        msg = redact(msg, self.url)[:500]
        with self._stats_lock:
            self._failures += 1
            self._last_error = msg
            starting = self._outage_since is None
            if starting:
                self._outage_since = time.monotonic()
        if self.check_schema:
            self._schema_ok = False  # checked again when the database is back
        if starting:
            log.warning(
                "ledger: database %s unavailable (%s); spooling to %s until it answers again",
                safe_url(self.url),
                msg[:200],
                self.spool_path,
            )
        else:
            log.debug("ledger: database still unavailable: %s", msg[:200])

    def _note_schema_error(self, exc: SchemaError) -> None:
        """The database answers but its ledger schema is not this version's: write nothing
        to it, keep spooling, check again in ``retry_interval_s``."""
        self._connected = True
        self._next_retry = time.monotonic() + self.retry_interval_s
        msg = str(exc)
        first = msg != self._schema_error
        with self._stats_lock:
            self._schema_error = msg
            if self._outage_since is None:
                self._outage_since = time.monotonic()
        if first:
            log.error(
                "ledger: %s; records stay in %s and are written once the schema is current",
                msg,
                self.spool_path,
            )

    def _note_ok(self) -> None:
        """A database call worked: the end of an outage, if there was one (one warning)."""
        self._connected = True
        if self._outage_since is None:
            return
        with self._stats_lock:
            took = time.monotonic() - self._outage_since
            self._outage_since = None
            self._schema_error = None
            backlog = self._spool_backlog
        log.warning(
            "ledger: database %s is back after %.1f s; replaying %d spooled records",
            safe_url(self.url),
            took,
            backlog,
        )

    def _maybe_replay(self, force: bool = False) -> bool:
        """If a retry is due: check the schema (when it must be), then replay a slice of the
        spool. False when nothing was due or the database failed."""
        if not self._needs_replay():
            return False
        if not force and time.monotonic() < self._next_retry:
            return False
        if self._held:  # the spool could not be written: try again, keeping the order
            held, self._held = self._held, []
            self._spool(held)
            if self._held:
                self._next_retry = time.monotonic() + self.retry_interval_s
                return False
        try:
            if not self._schema_ok:
                self._db(self._read_schema)
                self._schema_ok = True
                self._schema_error = None
            elif self._outage_since is not None:
                self._db(self._ping)
            self._note_ok()
            self._replay_slice()
        except SchemaError as exc:
            self._note_schema_error(exc)
            return False
        except Exception as exc:
            if not _is_outage(exc):
                log.exception("ledger: spool replay failed")
            self._note_failure(exc)
            return False
        return True

    def _replay_slice(self) -> bool:
        """Replay the spool from where the last slice stopped, in order, one committed
        transaction per chunk, for about a flush interval (new records are spooled in
        between, so none waits in memory meanwhile). True once all of it is in the database
        and the spool was emptied (atomically). A process that dies mid-replay replays the
        whole spool at its next start: requests already there are skipped by request_id."""
        stop_at = time.monotonic() + max(self.flush_interval_s, MIN_REPLAY_SLICE_S)
        while True:
            with self._spool_lock:
                if not self.spool_path.exists():
                    self._replay_offset = self._rejected_upto = 0
                    with self._stats_lock:
                        self._spool_backlog = 0
                    return True
                chunk, end, lines = self._read_chunk()
                if not lines:  # everything up to the end is in: nothing was appended since
                    self._truncate_spool()
                    self._replay_offset = self._rejected_upto = 0
                    with self._stats_lock:
                        replayed = self._replayed
                        self._spool_backlog = 0
                    if replayed:
                        log.info("ledger: the spool %s is replayed", self.spool_path)
                    return True
            if chunk:
                try:
                    new, calls, dups = self._db(self._write, chunk)
                except _Poison:
                    self._write_each(chunk, replay=True)
                else:
                    with self._stats_lock:
                        self._replayed += new
                        self._calls_written += calls
                        self._duplicates += dups
            self._replay_offset = end
            with self._stats_lock:
                self._spool_backlog = max(0, self._spool_backlog - lines)
            if time.monotonic() >= stop_at:
                return False

    def _read_chunk(self) -> tuple[list[RequestRecord], int, int]:
        """Up to ``batch_size`` records of the spool from the replay offset: (records, the
        offset after them, spool lines read). A line that does not parse is rejected once
        (a torn last line, left by a crash mid-append, is dropped with a warning)."""
        records: list[RequestRecord] = []
        offset = self._replay_offset
        lines = 0
        with open(self.spool_path, "rb") as fh:
            fh.seek(offset)
            for raw in fh:
                start, offset = offset, offset + len(raw)
                text = raw.strip()
                if not text:
                    continue
                lines += 1
                try:
                    records.append(RequestRecord.from_dict(json.loads(text)))
                except Exception as exc:
                    if start >= self._rejected_upto:
                        self._rejected_upto = offset
                        if raw.endswith(b"\n"):
                            self._reject_raw(text.decode("utf-8", "replace"), exc, start)
                        else:
                            log.warning("ledger: dropping a torn last line of %s", self.spool_path)
                    continue
                if len(records) >= self.batch_size:
                    break
        return records, offset, lines

    def _truncate_spool(self) -> None:
        tmp = self.spool_path.with_name(self.spool_path.name + ".tmp")
        with open(tmp, "wb") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.spool_path)
        _fsync_dir(self.spool_path.parent)

    def _recover_spool(self) -> None:
        """At start: merge side spools left by a stuck close, count the backlog."""
        self.spool_path.parent.mkdir(parents=True, exist_ok=True)
        with self._spool_lock:
            self._adopt_orphans()
            for side in sorted(self.spool_path.parent.glob(self.spool_path.name + ".side-*")):
                data = side.read_bytes()
                if data:
                    _append(self.spool_path, data if data.endswith(b"\n") else data + b"\n")
                side.unlink()
                _fsync_dir(self.spool_path.parent)
            count = 0
            if self.spool_path.exists():
                with open(self.spool_path, "rb") as fh:
                    count = sum(1 for line in fh if line.strip())
        with self._stats_lock:
            self._spool_backlog = count
        if count:
            log.warning("ledger: %d records waiting in %s; replaying", count, self.spool_path)

    def _spool(self, records: list[RequestRecord]) -> None:
        """Append ``records`` to the spool (the writer thread's path)."""
        if not records:
            return
        data = _encode(records)
        try:
            with self._spool_lock:
                _append(self.spool_path, data)
        except Exception:
            log.exception("ledger: cannot write the spool %s; holding records", self.spool_path)
            self._held.extend(records)
            return
        with self._stats_lock:
            self._spooled += len(records)
            self._spool_backlog += len(records)

    def _spool_from_caller(self, records: list[RequestRecord], side: bool = False) -> None:
        """Save records after the thread stopped (or is stuck): to the spool, else a side
        spool that the next start merges. Duplicates are harmless (idempotent replay)."""
        data = _encode(records)
        try:
            if not side and self._spool_lock.acquire(timeout=1.0):
                try:
                    _append(self.spool_path, data)
                finally:
                    self._spool_lock.release()
            else:
                name = f"{self.spool_path.name}.side-{os.getpid()}-{time.time_ns()}"
                _append(self.spool_path.with_name(name), data)
            with self._stats_lock:
                self._spooled += len(records)
                self._spool_backlog += len(records)
        except Exception:
            log.exception("ledger: lost %d records: cannot write the spool", len(records))

    def _reject(self, record: RequestRecord, exc: BaseException) -> None:
        try:
            line = {"error": str(exc)[:2000], "record": record.to_dict()}
            _append(self.rejected_path, (json.dumps(line, default=str) + "\n").encode())
        except Exception:
            log.exception("ledger: cannot write %s", self.rejected_path)
        with self._stats_lock:
            self._rejected += 1
        log.error("ledger: record %s refused by the database: %s", record.request_id, exc)

    def _reject_raw(self, text: str, exc: BaseException, at_byte: int) -> None:
        try:
            line = {"error": f"unreadable spool line at byte {at_byte}: {exc}", "raw": text}
            _append(self.rejected_path, (json.dumps(line) + "\n").encode())
        except Exception:
            log.exception("ledger: cannot write %s", self.rejected_path)
        with self._stats_lock:
            self._rejected += 1


def _encode(records: list[RequestRecord]) -> bytes:
    return "".join(
        json.dumps(r.to_dict(), separators=(",", ":"), default=str) + "\n" for r in records
    ).encode("utf-8")


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` durably; start on a fresh line if a crash tore the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as fh:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    data = b"\n" + data
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _slot_path(base: Path, slot: int) -> Path:
    """The spool file of `slot`: `base` itself for slot 0, else `<stem>-<slot><suffix>`."""
    return base if slot == 0 else base.with_name(f"{base.stem}-{slot}{base.suffix}")


def _try_lock(spool: Path) -> int | None:
    """An fd holding the exclusive flock of `spool`'s lock file, or None if another holds it.

    The lock file is never deleted: deleting it could let two writers lock two different
    files of the same name."""
    fd = os.open(spool.with_name(spool.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
