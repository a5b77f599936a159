"""Retention: ``cascade db prune --before DATE`` deletes old detail rows and keeps the rollups.

Detail rows (``ledger_requests`` and their ``ledger_calls``) grow by one plus a few rows per
request; ``ledger_daily`` grows by a few rows per day. Pruning the detail tables bounds the
ledger's size while spend by day, model, cascade and key stays answerable from the rollups,
which are never touched here.

Deletion runs in batches, each its own short transaction, so a prune of millions of rows
never holds one giant transaction (locks, WAL, replication lag) and can be interrupted and
run again: every finished batch stays done. Each batch picks request ids (oldest first),
deletes their calls, then the requests themselves; the ids are read once per batch so a
record replayed from the writer's spool meanwhile cannot slip in between the two deletes.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine, bindparam, delete, func, select

from policies.errors import InvalidInput
from proxy.ledger.schema import calls_table, requests_table

DEFAULT_BATCH_SIZE = 5000
# SQLite before 3.32 allows 999 bound parameters per statement; stay under it everywhere.
_IN_CHUNK = 900

_REQ = requests_table.c
_CALL = calls_table.c
_RELATIVE_DAYS = re.compile(r"^\s*(\d+)\s*d\s*$")


class RetentionError(InvalidInput):
    """A bad ``--before`` or ``--batch-size``."""


@dataclass(frozen=True)
class PruneResult:
    """What a prune removed (or, on a dry run, would remove)."""

    before: dt.datetime
    requests: int
    calls: int
    batches: int
    dry_run: bool = False

    @property
    def rows(self) -> int:
        return self.requests + self.calls


def parse_before(text: str | dt.date | dt.datetime, now: dt.datetime | None = None) -> dt.datetime:
    """The cut-off as an aware UTC datetime: an ISO date (its UTC midnight), an ISO datetime
    (UTC unless it says otherwise) or ``Nd`` (N days before now, for cron jobs).

    A cut-off in the future is refused: it would delete requests still being served.
    """
    now = now or dt.datetime.now(dt.UTC)
    if isinstance(text, dt.datetime):
        when = text
    elif isinstance(text, dt.date):
        when = dt.datetime(text.year, text.month, text.day)
    else:
        raw = str(text).strip()
        m = _RELATIVE_DAYS.match(raw)
        if m:
            try:
                when = now - dt.timedelta(days=int(m.group(1)))
            except OverflowError:
                raise RetentionError(f"--before {text!r} is out of range") from None
        else:
            try:
                if len(raw) == 10:
                    d = dt.date.fromisoformat(raw)
                    when = dt.datetime(d.year, d.month, d.day)
                else:
                    when = dt.datetime.fromisoformat(raw)
            except ValueError:
                raise RetentionError(
                    f"--before {text!r} is not a date: give an ISO date (2025-03-01), an ISO "
                    "datetime (2025-03-01T12:00:00+00:00) or a number of days (90d)"
                ) from None
    when = when.astimezone(dt.UTC) if when.tzinfo else when.replace(tzinfo=dt.UTC)
    if when > now:
        raise RetentionError(
            f"--before {when.isoformat()} is in the future; it would delete requests that "
            "are still being written"
        )
    return when


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + _IN_CHUNK] for i in range(0, len(ids), _IN_CHUNK)]


def count_prunable(engine: Engine, before: dt.datetime) -> tuple[int, int]:
    """(requests, calls) older than ``before``: what :func:`prune` would remove."""
    with engine.connect() as conn:
        n_req = conn.execute(select(func.count()).where(_REQ.ts < before)).scalar_one()
        n_calls = conn.execute(
            select(func.count())
            .select_from(calls_table.join(requests_table, _CALL.request_id == _REQ.request_id))
            .where(_REQ.ts < before)
        ).scalar_one()
    return int(n_req), int(n_calls)


def prune(
    engine: Engine,
    before: dt.datetime,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> PruneResult:
    """Delete requests whose ``ts`` is before ``before`` and their calls, ``batch_size``
    requests per transaction; ``ledger_daily`` is left as it is.

    ``progress(requests, calls)`` is called after each committed batch with the running
    totals. Returns what was removed (with ``dry_run``, what would be, deleting nothing).
    """
    if batch_size < 1:
        raise RetentionError(f"--batch-size must be at least 1, not {batch_size}")
    if before.tzinfo is None:
        raise RetentionError("the cut-off must be timezone-aware")
    if dry_run:
        n_req, n_calls = count_prunable(engine, before)
        return PruneResult(before, n_req, n_calls, 0, dry_run=True)

    pick = (
        select(_REQ.request_id)
        .where(_REQ.ts < before)
        .order_by(_REQ.ts, _REQ.id)
        .limit(bindparam("n"))
    )
    del_calls = delete(calls_table).where(_CALL.request_id.in_(bindparam("ids", expanding=True)))
    del_reqs = delete(requests_table).where(_REQ.request_id.in_(bindparam("ids", expanding=True)))
    n_req = n_calls = batches = 0
    while True:
        with engine.begin() as conn:
            ids = list(conn.execute(pick, {"n": batch_size}).scalars())
            if not ids:
                break
            for chunk in _chunks(ids):
                n_calls += conn.execute(del_calls, {"ids": chunk}).rowcount
                n_req += conn.execute(del_reqs, {"ids": chunk}).rowcount
        batches += 1
        if progress is not None:
            progress(n_req, n_calls)
        if len(ids) < batch_size:
            break
    return PruneResult(before, n_req, n_calls, batches)
