"""The ledger writer: batched, off the request path, and lossless across database outages.

The proxy calls :meth:`LedgerWriter.submit` from the event loop; that only puts the record
on a thread-safe queue. A background thread owns the database connection and, every
``flush_interval_s`` or ``batch_size`` records, writes one batch in one transaction
(:func:`proxy.ledger.dialect.write_records`: the requests, the calls of the requests that
were actually inserted, their daily rollups), so writing a request twice changes nothing:
the ledger is idempotent by ``request_id``.

Every database call (a batch, a replay chunk, a schema check) must answer within
``write_timeout_s`` (2 s; :mod:`proxy.ledger.deadline`): a database that hangs is an outage
exactly as one that refuses is.

If a batch fails because the database is unusable, it is appended to the spool file
(:mod:`proxy.ledger.spool`: JSON lines, fsync'd) and every later batch goes there too, in
order, until a replay succeeds; one warning says when an outage starts and one when it ends.
Every ``retry_interval_s`` the thread replays the spool in order, one committed transaction
per chunk, in slices of about a flush interval (between them it spools what arrived), and
once all of it is in replaces the spool by an empty file (atomic rename). A process that
dies mid-replay replays again at the next start; requests already committed are skipped by
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
folder): each claims a spool *slot* at :meth:`start` and holds it until :meth:`close` or
process exit, and adopts at start the spools no live writer holds (see
:mod:`proxy.ledger.spool`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from proxy.ledger.db import (
    SchemaError,
    make_engine,
    normalize_url,
    read_revision,
    redact,
    safe_url,
    verify_revision,
)
from proxy.ledger.deadline import DeadlineRunner, WriteTimeout
from proxy.ledger.dialect import _Backend, _is_outage, _Poison, write_records
from proxy.ledger.records import RequestRecord
from proxy.ledger.spool import Spool, encode

log = logging.getLogger("cascade.ledger")
# The writer's bounds (see LedgerWriter): a database call slower than the deadline is an
# outage; records beyond the count wait in the spool, not in memory.
DEFAULT_WRITE_TIMEOUT_S = 2.0
DEFAULT_MAX_PENDING = 20_000
MIN_REPLAY_SLICE_S = 0.05  # a replay runs at least this long between two looks at the queue
FINAL_REPLAY_S = 5.0  # at close, replay at most this long; the rest waits for the next start

_WAKE = object()


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
        self._spool_file = Spool(Path(spool_path))  # this writer's slot, chosen by start()
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
        self._stats_lock = threading.Lock()
        self._idle = threading.Condition(self._stats_lock)
        self._stop = threading.Event()
        self._hurry = threading.Event()  # flush() and close(): write the batch now
        self._thread: threading.Thread | None = None
        self._closed = False
        self._engine: Engine | None = None
        self._backend: _Backend | None = None
        self._deadline = DeadlineRunner(
            self.write_timeout_s, self._drop_idle_connections, self._relieve
        )

        self._inflight: list[RequestRecord] = []
        self._held: list[RequestRecord] = []  # neither written nor spooled (spool I/O failed)
        self._drained_at = time.monotonic()  # the queue was last seen empty then
        self._next_retry = 0.0
        self._connected: bool | None = None
        self._schema_ok = not check_schema
        self._schema_error: str | None = None
        self._outage_since: float | None = None  # monotonic start of the current outage

        self._pending = 0
        self._written = 0
        self._calls_written = 0
        # told of every record submitted (the key cache counts spend not yet in the database)
        self.on_submit: Callable[[RequestRecord], None] | None = None
        self._duplicates = 0
        self._spooled = 0
        self._replayed = 0
        self._rejected = 0
        self._failures = 0
        self._spool_backlog = 0
        self._last_error: str | None = None

    @property
    def base_spool_path(self) -> Path:
        """The spool path given: slot 0 (see :mod:`proxy.ledger.spool`)."""
        return self._spool_file.base_path

    @property
    def spool_path(self) -> Path:
        """This writer's spool file: the slot it claimed at :meth:`start`."""
        return self._spool_file.path

    @property
    def rejected_path(self) -> Path:
        """Where records the database refused, and unreadable spool lines, are kept."""
        return self._spool_file.rejected_path

    # ------------------------------------------------------------------ caller side

    def start(self) -> LedgerWriter:
        """Start the background thread (idempotent). Returns ``self``."""
        with self._submit_lock:
            if self._closed or (self._thread is not None and self._thread.is_alive()):
                return self
            self._spool_file.claim_slot()
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
            if self.on_submit is not None:
                self.on_submit(record)
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
            self._deadline.stop()
            if self._engine is not None:
                self._engine.dispose()
            # (a stuck thread may still write the spool: it keeps the slot)
            self._spool_file.release_slot()

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
        """``fn(*args)`` in the database thread, waited for at most ``write_timeout_s``
        (:class:`WriteTimeout` past that). While waiting, what is queued is kept within its
        bounds (``_relieve``)."""
        return self._deadline.call(fn, *args)

    def _drop_idle_connections(self) -> None:
        """After an abandoned call: the pool's idle connections may lead to the same hung
        peer."""
        assert self._engine is not None
        self._engine.dispose()  # connections checked out (the hung one) are left alone

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
        return write_records(self._engine, sql, records)

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
        spool = self._spool_file
        stop_at = time.monotonic() + max(self.flush_interval_s, MIN_REPLAY_SLICE_S)
        while True:
            with spool.lock:
                if not spool.exists():
                    spool.rewind()
                    with self._stats_lock:
                        self._spool_backlog = 0
                    return True
                chunk, end, lines, unreadable = spool.read_chunk(self.batch_size)
                if unreadable:
                    with self._stats_lock:
                        self._rejected += unreadable
                if not lines:  # everything up to the end is in: nothing was appended since
                    spool.truncate()
                    with self._stats_lock:
                        replayed = self._replayed
                        self._spool_backlog = 0
                    if replayed:
                        log.info("ledger: the spool %s is replayed", spool.path)
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
            spool.replay_offset = end
            with self._stats_lock:
                self._spool_backlog = backlog = max(0, self._spool_backlog - lines)
            # with no backlog left nothing asks for another slice: empty the spool now, or
            # the next start would replay all of it again
            if backlog and time.monotonic() >= stop_at:
                return False

    def _recover_spool(self) -> None:
        """At start: adopt orphaned spools, merge side spools left by a stuck close, count
        the backlog."""
        count = self._spool_file.recover()
        with self._stats_lock:
            self._spool_backlog = count
        if count:
            log.warning("ledger: %d records waiting in %s; replaying", count, self.spool_path)

    def _spool(self, records: list[RequestRecord]) -> None:
        """Append ``records`` to the spool (the writer thread's path)."""
        if not records:
            return
        data = encode(records)
        try:
            self._spool_file.append(data)
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
        data = encode(records)
        try:
            self._spool_file.append_from_caller(data, side)
            with self._stats_lock:
                self._spooled += len(records)
                self._spool_backlog += len(records)
        except Exception:
            log.exception("ledger: lost %d records: cannot write the spool", len(records))

    def _reject(self, record: RequestRecord, exc: BaseException) -> None:
        self._spool_file.reject(record, exc)
        with self._stats_lock:
            self._rejected += 1
        log.error("ledger: record %s refused by the database: %s", record.request_id, exc)
