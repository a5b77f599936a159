"""The ledger writer: batched, off the request path, and lossless across database outages.

The proxy calls :meth:`LedgerWriter.submit` from the event loop; that only puts the record
on a thread-safe queue. A background thread owns the database connection and, every
``flush_interval_s`` or ``batch_size`` records, writes one batch in one transaction: the
requests (``INSERT ... ON CONFLICT (request_id) DO NOTHING RETURNING request_id``), the calls
of the requests that were actually inserted, and the daily rollups of those same requests
(``INSERT ... ON CONFLICT DO UPDATE``). So writing a request twice changes nothing: the ledger
is idempotent by ``request_id``.

If a batch fails because the database is unreachable, it is appended to the spool file
(JSON lines, fsync'd) and every later batch goes there too, in order, until a replay
succeeds. Every ``retry_interval_s`` the thread replays the spool in order, one committed
transaction per chunk, and only after the last commit replaces the spool by an empty file
(atomic rename). A process that dies mid-replay replays again at the next start; requests
already committed are skipped by ``request_id``, so every request lands exactly once.

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
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, case
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DataError, DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from proxy.ledger.db import make_engine, safe_url
from proxy.ledger.records import RequestRecord
from proxy.ledger.schema import calls_table, daily_table, requests_table

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: one writer per spool path, unchecked
    fcntl = None

log = logging.getLogger("cascade.ledger")
MAX_SPOOL_SLOTS = 256
# Rows per multi-row INSERT ... RETURNING. A fixed page bounds the distinct statement texts:
# with one text per batch size, sqlite3's cache of 128 prepared statements (psycopg prepares
# repeated ones too) kept growing the proxy's RSS, by ~35 MB in the first minutes of a soak.
INSERT_PAGE_ROWS = 32

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


def _when(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(float(ts), dt.UTC)


def _request_row(r: RequestRecord) -> dict[str, Any]:
    when = _when(r.ts)
    lim = _REQ_LEN.get
    return {  # only strings need _clean; each field is converted once, by hand (hot loop)
        "request_id": _clean(str(r.request_id), None),
        "ts": when,
        "day": when.date(),
        "api_key": _clean(r.api_key, lim("api_key")),
        "cascade": _clean(r.cascade, lim("cascade")),
        "model_requested": _clean(r.model_requested or "", lim("model_requested")),
        "policy_hash": _clean(r.policy_hash, lim("policy_hash")),
        "status": int(r.status),
        "chosen_model": _clean(r.chosen_model, lim("chosen_model")),
        "n_calls": int(r.n_calls if r.n_calls is not None else len(r.calls)),
        "tokens_in": int(r.tokens_in or 0),
        "tokens_out": int(r.tokens_out or 0),
        "cost_usd": _float(r.cost_usd),
        "reference_cost_usd": _float(r.reference_cost_usd),
        "latency_ms": float(r.latency_ms or 0.0),
        "overhead_ms": float(r.overhead_ms or 0.0),
        "stream": bool(r.stream),
        "error": _clean(r.error, lim("error")),
    }


def _call_rows(r: RequestRecord) -> list[dict[str, Any]]:
    when = _when(r.ts)
    request_id = _clean(str(r.request_id), None)
    lim = _CALL_LEN.get
    return [
        {
            "request_id": request_id,
            "call_order": int(c.order),
            "ts": when,
            "node": None if c.node is None else int(c.node),
            "model": _clean(c.model or "", lim("model")),
            "backend": _clean(c.backend, lim("backend")),
            "status": _clean(c.status or "unknown", lim("status")),
            "http_status": None if c.http_status is None else int(c.http_status),
            "tokens_in": None if c.tokens_in is None else int(c.tokens_in),
            "tokens_out": None if c.tokens_out is None else int(c.tokens_out),
            "cost_usd": _float(c.cost_usd),
            "latency_ms": _float(c.latency_ms),
            "ttft_ms": _float(c.ttft_ms),
            "confidence": _float(c.confidence),
            "p_correct": _float(c.p_correct),
            "agreement": None if c.agreement is None else bool(c.agreement),
            "decision": _clean(c.decision, lim("decision")),
            "error": _clean(c.error, lim("error")),
        }
        for c in r.calls
    ]


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def rollup_rows(records: Iterable[RequestRecord]) -> list[dict[str, Any]]:
    """The ``ledger_daily`` increments for ``records`` (see :mod:`proxy.ledger.schema`).

    Each request counts once under the model whose answer was returned (``''`` if none);
    each call counts once under the model it called. A request recorded without its calls
    contributes its own tokens and cost under its row.
    """
    acc: dict[tuple, dict[str, Any]] = {}

    def row(day: dt.date, cascade: str | None, model: str | None, key: str | None):
        k = (
            day,
            _clean(cascade or "", daily_table.c.cascade.type.length),
            _clean(model or "", daily_table.c.model.type.length),
            key or "",
        )
        if k not in acc:
            acc[k] = dict(zip(_DAILY_KEY, k, strict=True))
            acc[k].update(dict.fromkeys(_DAILY_COUNTS, 0))
            acc[k].update(dict.fromkeys(_DAILY_COSTS))
        return acc[k]

    for r in records:
        day = _when(r.ts).date()
        top = row(day, r.cascade, r.chosen_model, r.api_key)
        top["requests"] += 1
        top["requests_failed"] += int(int(r.status) >= 400)
        top["unpriced_requests"] += int(r.cost_usd is None)
        top["reference_cost_usd"] = _add_cost(top["reference_cost_usd"], r.reference_cost_usd)
        top["reference_unpriced"] += int(r.reference_cost_usd is None)
        if not r.calls:
            top["tokens_in"] += int(r.tokens_in or 0)
            top["tokens_out"] += int(r.tokens_out or 0)
            top["cost_usd"] = _add_cost(top["cost_usd"], r.cost_usd)
        for c in r.calls:
            cr = row(day, r.cascade, c.model, r.api_key)
            cr["calls"] += 1
            cr["calls_failed"] += int(c.status != "ok")
            cr["unpriced_calls"] += int(c.cost_usd is None)
            cr["tokens_in"] += int(c.tokens_in or 0)
            cr["tokens_out"] += int(c.tokens_out or 0)
            cr["cost_usd"] = _add_cost(cr["cost_usd"], c.cost_usd)
    return [acc[k] for k in sorted(acc)]  # a fixed order: concurrent writers lock alike


class LedgerWriter:
    """Batched, non-blocking, outage-proof writer of :class:`RequestRecord` to the ledger.

    ``url`` is a SQLAlchemy URL (``sqlite:///...`` or ``postgresql://...``) whose schema
    is current (see :func:`proxy.ledger.db.check_schema`); ``spool_path`` is the local
    append-only file used while the database is unreachable.
    """

    def __init__(
        self,
        url: str,
        spool_path: str | os.PathLike[str],
        batch_size: int = 256,
        flush_interval_s: float = 0.25,
        retry_interval_s: float = 2.0,
    ) -> None:
        self.url = url
        self.base_spool_path = Path(spool_path)
        self.spool_path = self.base_spool_path  # this writer's slot, chosen by start()
        self.rejected_path = self.spool_path.with_name(self.spool_path.name + ".rejected")
        self._slot_fd: int | None = None
        self.batch_size = max(1, int(batch_size))
        self.flush_interval_s = max(0.0, float(flush_interval_s))
        self.retry_interval_s = max(0.05, float(retry_interval_s))

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
        self._insert = None

        self._inflight: list[RequestRecord] = []
        self._held: list[RequestRecord] = []  # neither written nor spooled (spool I/O failed)
        self._next_retry = 0.0
        self._connected: bool | None = None

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
        :meth:`aclose`. If the thread is stuck (a hung database), what it holds and what is
        still queued go to a side spool file that the next start merges into the spool.
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
        if not stuck and self._engine is not None:
            self._engine.dispose()
        if not stuck:  # a stuck thread may still write the spool: keep the slot until exit
            self._release_slot()

    async def aclose(self, timeout: float = 10.0) -> None:
        """:meth:`close` without blocking the event loop."""
        await asyncio.to_thread(self.close, timeout)

    def stats(self) -> dict[str, Any]:
        """Counters: ``written`` (requests inserted directly), ``calls_written``,
        ``spooled`` (requests appended to the spool), ``replayed`` (requests inserted from
        the spool), ``duplicates`` (already in the ledger), ``rejected``, ``pending`` (not
        yet written, spooled or rejected), ``spool_backlog`` (records in the spool),
        ``failures`` (failed database attempts), ``connected``, ``last_error``."""
        with self._stats_lock:
            return {
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
            }

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

    def _run(self) -> None:
        try:
            self._engine = make_engine(self.url, insertmanyvalues_page_size=INSERT_PAGE_ROWS)
            name = self._engine.dialect.name
            if name == "postgresql":
                self._insert = postgresql.insert
            elif name == "sqlite":
                self._insert = sqlite.insert
            else:
                raise ValueError(f"ledger supports sqlite and postgresql, not {name}")
            self._recover_spool()
        except Exception as exc:
            log.exception("ledger: writer could not start; records will be spooled")
            self._note_failure(exc)
        while True:
            try:
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
        # Shutting down: one last replay if the database is known to be there.
        try:
            if (self._spool_backlog or self._held) and self._connected:
                self._maybe_replay(force=True)
        except Exception:
            log.exception("ledger: final replay failed; the spool is kept")

    def _collect(self) -> list[RequestRecord]:
        batch: list[RequestRecord] = []
        stopping = self._stop.is_set()
        try:
            if stopping:
                first = self._queue.get_nowait()
            else:
                first = self._queue.get(timeout=max(self.flush_interval_s, 0.01))
        except queue.Empty:
            return batch
        if first is not _WAKE:
            batch.append(first)
        if not stopping and first is not _WAKE and self._queue.qsize() < self.batch_size:
            # let the batch fill while this thread sleeps: waiting on the queue instead
            # would wake it (and take the GIL from the event loop) for every record
            self._hurry.wait(self.flush_interval_s)
        self._hurry.clear()
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _WAKE:
                batch.append(item)
        return batch

    def _done(self, n: int) -> None:
        with self._idle:
            self._pending = max(0, self._pending - n)
            if self._pending == 0:
                self._idle.notify_all()

    def _handle(self, batch: list[RequestRecord]) -> None:
        """Write ``batch`` to the database, or to the spool if the ledger is in outage."""
        if self._spool_backlog or self._held or self._engine is None:
            self._spool(batch)  # keep the order: the spool must be replayed first
            return
        try:
            new, calls, dups = self._write(batch)
        except _Poison:
            self._write_each(batch, replay=False)
            return
        except Exception as exc:
            if not _is_outage(exc):
                raise
            self._note_failure(exc)
            self._spool(batch)
            return
        self._note_ok()
        with self._stats_lock:
            self._written += new
            self._calls_written += calls
            self._duplicates += dups

    def _write_each(self, records: list[RequestRecord], *, replay: bool) -> None:
        """Write records one by one to isolate the ones the database refuses."""
        for i, record in enumerate(records):
            try:
                new, calls, dups = self._write([record])
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
        assert self._engine is not None and self._insert is not None
        unique: dict[str, RequestRecord] = {}
        for r in records:
            unique.setdefault(str(r.request_id), r)
        try:
            req_rows = [_request_row(r) for r in unique.values()]
        except Exception as exc:
            raise _Poison(str(exc)) from exc
        ins = self._insert
        try:
            with self._engine.begin() as conn:
                stmt = (
                    ins(requests_table)
                    .on_conflict_do_nothing(index_elements=["request_id"])
                    .returning(requests_table.c.request_id)
                )
                inserted = set(conn.execute(stmt, req_rows).scalars().all())
                fresh = [r for rid, r in unique.items() if rid in inserted]
                call_rows = [row for r in fresh for row in _call_rows(r)]
                if call_rows:
                    conn.execute(
                        ins(calls_table).on_conflict_do_nothing(
                            index_elements=["request_id", "call_order"]
                        ),
                        call_rows,
                    )
                daily = rollup_rows(fresh)
                if daily:
                    up = ins(daily_table)
                    ex = up.excluded
                    t = daily_table.c
                    set_ = {c: t[c] + ex[c] for c in _DAILY_COUNTS}
                    for c in _DAILY_COSTS:
                        set_[c] = case(
                            (t[c].is_(None), ex[c]),
                            (ex[c].is_(None), t[c]),
                            else_=t[c] + ex[c],
                        )
                    conn.execute(
                        up.on_conflict_do_update(index_elements=_DAILY_KEY, set_=set_), daily
                    )
        except (IntegrityError, DataError) as exc:
            raise _Poison(str(exc)) from exc
        except Exception as exc:
            if _is_outage(exc):
                raise
            raise _Poison(str(exc)) from exc
        return len(fresh), len(call_rows), len(records) - len(fresh)

    # ------------------------------------------------------------------ outage handling

    def _note_failure(self, exc: BaseException) -> None:
        was = self._connected
        self._connected = False
        self._next_retry = time.monotonic() + self.retry_interval_s
        msg = f"{type(exc).__name__}: {getattr(exc, 'orig', None) or exc}".strip()
        with self._stats_lock:
            self._failures += 1
            self._last_error = msg[:500]
        if was is not False:
            log.warning(
                "ledger: database %s unavailable (%s); spooling to %s",
                safe_url(self.url),
                msg[:200],
                self.spool_path,
            )

    def _note_ok(self) -> None:
        if self._connected is False:
            log.warning("ledger: database %s is back", safe_url(self.url))
        self._connected = True

    def _maybe_replay(self, force: bool = False) -> None:
        if not (self._spool_backlog or self._held) or self._engine is None:
            return
        if not force and time.monotonic() < self._next_retry:
            return
        if self._held:  # the spool could not be written: try again, keeping the order
            held, self._held = self._held, []
            self._spool(held)
            if self._held:
                self._next_retry = time.monotonic() + self.retry_interval_s
                return
        try:
            self._replay()
        except Exception as exc:
            if not _is_outage(exc):
                log.exception("ledger: spool replay failed")
            self._note_failure(exc)
            return
        self._note_ok()

    def _replay(self) -> None:
        """Replay the spool in order, one transaction per chunk, then empty it atomically."""
        with self._spool_lock:
            if not self.spool_path.exists():
                with self._stats_lock:
                    self._spool_backlog = 0
                return
            total = 0
            for chunk in self._read_spool():
                total += len(chunk)
                try:
                    new, calls, dups = self._write(chunk)
                except _Poison:
                    self._write_each(chunk, replay=True)
                    continue
                with self._stats_lock:
                    self._replayed += new
                    self._calls_written += calls
                    self._duplicates += dups
            self._truncate_spool()
            with self._stats_lock:
                self._spool_backlog = 0
        if total:
            log.warning("ledger: replayed %d spooled records into the database", total)

    def _read_spool(self) -> Iterator[list[RequestRecord]]:
        chunk: list[RequestRecord] = []
        with open(self.spool_path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                text = raw.strip()
                if not text:
                    continue
                try:
                    chunk.append(RequestRecord.from_dict(json.loads(text)))
                except Exception as exc:
                    if not raw.endswith(b"\n"):
                        log.warning("ledger: dropping a torn last line of %s", self.spool_path)
                        continue
                    self._reject_raw(text.decode("utf-8", "replace"), exc, lineno)
                    continue
                if len(chunk) >= self.batch_size:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

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

    def _reject_raw(self, text: str, exc: BaseException, lineno: int) -> None:
        try:
            line = {"error": f"unreadable spool line {lineno}: {exc}", "raw": text}
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
