"""Retention: `cascade db prune --before DATE` on SQLite and PostgreSQL.

Old request and call rows go, newer ones stay, the daily rollups are untouched, reports over
the retained window give the same figures as before, each batch is its own transaction, and a
bad date changes nothing.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from cli.main import app
from proxy.ledger import LedgerWriter, make_engine, upgrade
from proxy.ledger.reports import GROUPINGS, REPORTS, run_report
from proxy.ledger.retention import RetentionError, count_prunable, parse_before, prune
from proxy.ledger.schema import LedgerCall, LedgerRequest
from tests.test_ledger import daily_rows, load, pg_db  # noqa: F401
from tests.test_reports import records

CASCADE = Path(sys.executable).with_name("cascade")
CUTOFF = "2025-03-02"  # D1 (2025-03-01) is before it, D2 (2025-03-02 23:59:59) after
OLD = {"R1", "R2", "R3", "R4", "R7", "R8"}  # the requests made on D1
NEW = {"R5", "R6"}
OLD_CALLS = 8  # R1 2, R2 1, R3 2, R4 1, R7 0, R8 2


def _write(url: str, tmp_path: Path, recs) -> None:
    upgrade(url)
    writer = LedgerWriter(url, tmp_path / "spool.jsonl", flush_interval_s=0.05).start()
    for r in recs:
        writer.submit(r)
    assert writer.flush(30.0)
    writer.close()
    assert writer.stats()["written"] == len(recs)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_db")[1]


@pytest.fixture
def filled(url: str, tmp_path: Path) -> str:
    _write(url, tmp_path, records())
    return url


def detail(url: str) -> tuple[set[str], list[tuple[str, int]]]:
    """The request ids and (request id, call order) pairs left in the detail tables."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ids = set(conn.execute(select(LedgerRequest.request_id)).scalars())
            calls = sorted(
                (r, int(o))
                for r, o in conn.execute(select(LedgerCall.request_id, LedgerCall.call_order))
            )
    finally:
        engine.dispose()
    return ids, calls


def all_reports(url: str, since: str) -> dict[tuple[str, str], dict]:
    engine = make_engine(url)
    try:
        return {
            (name, by): run_report(engine, name, since, by).to_dict()
            for name in REPORTS
            for by in GROUPINGS
        }
    finally:
        engine.dispose()


def cli(*args: str):
    return CliRunner().invoke(app, ["db", "prune", *args])


# --------------------------------------------------------------------------- the cut-off


def test_parse_before():
    now = dt.datetime(2025, 6, 1, 12, tzinfo=dt.UTC)
    assert parse_before("2025-03-02", now) == dt.datetime(2025, 3, 2, tzinfo=dt.UTC)
    assert parse_before("2025-03-02T06:30:00+02:00", now) == dt.datetime(
        2025, 3, 2, 4, 30, tzinfo=dt.UTC
    )
    assert parse_before("2025-03-02T06:30:00", now).tzinfo == dt.UTC
    assert parse_before("90d", now) == now - dt.timedelta(days=90)
    assert parse_before(dt.date(2025, 1, 1), now) == dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    for bad in ("yesterday", "2025-13-01", "", "7x", "2025/03/02"):
        with pytest.raises(RetentionError, match="is not a date"):
            parse_before(bad, now)
    with pytest.raises(RetentionError, match="in the future"):
        parse_before("2025-06-02", now)
    with pytest.raises(RetentionError, match="out of range"):
        parse_before("99999999d", now)


# --------------------------------------------------------------------------- prune


def test_prune_removes_old_detail_keeps_new_rows_rollups_and_reports(filled: str):
    url = filled
    ids, calls = detail(url)
    assert ids == OLD | NEW and len(calls) == OLD_CALLS + 1  # R5 has one call, R6 none
    rollups = daily_rows(url)
    retained = all_reports(url, CUTOFF)
    # spend from a UTC midnight reads the rollups, so it covers pruned days too
    whole = {by: all_reports(url, "2025-01-01")[("spend", by)] for by in GROUPINGS}
    assert whole["model"]["source"] == "ledger_daily"

    result = cli("--before", CUTOFF, "--batch-size", "2", "--database-url", url)
    assert result.exit_code == 0, result.output
    assert "removed 14 rows: 6 requests and 8 calls" in result.output
    assert "2025-03-02T00:00:00+00:00" in result.output and "in 3 batch(es)" in result.output

    ids, calls = detail(url)
    assert ids == NEW
    assert calls == [("R5", 0)]
    assert daily_rows(url) == rollups
    assert all_reports(url, CUTOFF) == retained
    assert {by: all_reports(url, "2025-01-01")[("spend", by)] for by in GROUPINGS} == whole

    again = cli("--before", CUTOFF, "--database-url", url)  # nothing left to prune
    assert again.exit_code == 0, again.output
    assert "removed 0 rows: 0 requests and 0 calls" in again.output
    assert detail(url)[0] == NEW


def test_bad_input_exits_non_zero_and_deletes_nothing(filled: str):
    url = filled
    before = detail(url), daily_rows(url)
    for args, message in (
        (["--before", "last tuesday"], "--before 'last tuesday' is not a date"),
        (["--before", "2025-02-30"], "is not a date"),
        (["--before", "2999-01-01"], "in the future"),
        (["--before", CUTOFF, "--batch-size", "0"], "--batch-size must be at least 1"),
    ):
        result = cli(*args, "--database-url", url)
        assert result.exit_code == 2, (args, result.output)
        assert "error:" in result.output and message in result.output, result.output
    assert (detail(url), daily_rows(url)) == before

    # the real console script, as an operator would run it
    done = subprocess.run(
        [str(CASCADE), "db", "prune", "--before", "03/02/2025", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CASCADE_NO_PROGRESS": "1"},
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: --before '03/02/2025' is not a date")
    assert (detail(url), daily_rows(url)) == before


def test_dry_run_counts_and_deletes_nothing(filled: str):
    url = filled
    result = cli("--before", CUTOFF, "--dry-run", "--database-url", url)
    assert result.exit_code == 0, result.output
    assert "would remove 14 rows: 6 requests and 8 calls" in result.output
    assert detail(url)[0] == OLD | NEW


def test_each_batch_commits_on_its_own(url: str, tmp_path: Path):
    """An interrupted prune keeps the batches it finished; running it again completes it.
    A batch of 1,000 requests also exercises the split of long id lists."""
    recs = load(2400)  # alternately on D1 and D2, 1-3 calls each
    _write(url, tmp_path, recs)
    cutoff = parse_before(CUTOFF)
    old = {r.request_id for r in recs if r.ts < cutoff.timestamp()}
    old_calls = sum(len(r.calls) for r in recs if r.request_id in old)
    all_calls = sum(len(r.calls) for r in recs)
    assert len(old) == 1200 and 0 < old_calls < all_calls
    rollups = daily_rows(url)
    engine = make_engine(url)
    try:
        assert count_prunable(engine, cutoff) == (1200, old_calls)

        def interrupt(n_req: int, n_calls: int) -> None:
            raise KeyboardInterrupt  # an operator's Ctrl-C after the first batch

        with pytest.raises(KeyboardInterrupt):
            prune(engine, cutoff, batch_size=200, progress=interrupt)
        ids, _ = detail(url)
        assert len(old & ids) == 1000 and len(ids) == 2200  # the first 200 are gone for good

        seen: list[tuple[int, int]] = []
        result = prune(engine, cutoff, batch_size=1000, progress=lambda r, c: seen.append((r, c)))
        assert (result.requests, result.batches) == (1000, 1)
        assert seen == [(1000, result.calls)] and 0 < result.calls < old_calls
        assert count_prunable(engine, cutoff) == (0, 0)
        with engine.connect() as conn:
            left = conn.execute(select(func.count()).select_from(LedgerCall)).scalar_one()
        assert left == all_calls - old_calls
    finally:
        engine.dispose()
    ids, calls = detail(url)
    assert ids == {r.request_id for r in recs} - old
    assert {rid for rid, _ in calls} <= ids
    assert daily_rows(url) == rollups
