"""The ledger: migrations on SQLite and PostgreSQL, schema checks, the batched writer, rollups,
idempotency, and no loss across a real PostgreSQL outage.

PostgreSQL must run on 127.0.0.1:5432 with trust auth (each test creates and drops its own
database); if it does not, the tests fail and say how to start it.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session

from proxy.ledger import (
    CallRecord,
    DatabaseUnavailable,
    LedgerWriter,
    RequestRecord,
    SchemaError,
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    key_id,
    make_engine,
    upgrade,
)
from proxy.ledger import db as ledger_db
from proxy.ledger.schema import Base, LedgerCall, LedgerDaily, LedgerRequest

PG_DSN = "host=127.0.0.1 port=5432 user=postgres dbname=test"
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
REPO = Path(__file__).resolve().parents[1]
LEDGER_TABLES = {"ledger_requests", "ledger_calls", "ledger_daily"}
D1 = dt.datetime(2025, 3, 1, 10, 0, tzinfo=dt.UTC)
D2 = dt.datetime(2025, 3, 2, 23, 59, 59, tzinfo=dt.UTC)


# --------------------------------------------------------------------------- fixtures


def _admin() -> psycopg.Connection:
    try:
        return psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable on 127.0.0.1:5432 ({exc}); start it with: {PG_START}"
        )


@pytest.fixture
def pg_db() -> Iterator[tuple[str, str]]:
    """A fresh PostgreSQL database: (name, url); dropped afterwards."""
    name = f"cascade_ledger_{uuid.uuid4().hex[:12]}"
    with _admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name, f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with _admin() as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_db")[1]


def _writer(url: str, tmp_path: Path, **kw) -> LedgerWriter:
    kw.setdefault("flush_interval_s", 0.05)
    kw.setdefault("retry_interval_s", 0.3)
    return LedgerWriter(url, tmp_path / "spool" / "ledger.jsonl", **kw)


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- records


def call(order, model, cost, tin=10, tout=5, status="ok", decision="stop", **kw) -> CallRecord:
    return CallRecord(
        order=order,
        model=model,
        backend=kw.get("backend", "fake"),
        status=status,
        http_status=200 if status == "ok" else None,
        tokens_in=tin,
        tokens_out=tout,
        cost_usd=cost,
        latency_ms=12.5,
        ttft_ms=kw.get("ttft_ms"),
        confidence=0.7,
        p_correct=0.6,
        agreement=kw.get("agreement"),
        decision=decision,
        error=None if status == "ok" else f"{status} from upstream",
        node=order,
    )


def request(rid, when, key, cascade, chosen, calls, *, status=200, cost="sum", ref=0.01):
    if cost == "sum":
        costs = [c.cost_usd for c in calls]
        cost = None if any(c is None for c in costs) else sum(costs)
    return RequestRecord(
        request_id=rid,
        ts=when.timestamp() if isinstance(when, dt.datetime) else when,
        api_key=key,
        cascade=cascade,
        model_requested="auto",
        policy_hash="sha256:abc",
        status=status,
        chosen_model=chosen,
        n_calls=len(calls),
        tokens_in=sum(c.tokens_in or 0 for c in calls),
        tokens_out=sum(c.tokens_out or 0 for c in calls),
        cost_usd=cost,
        reference_cost_usd=ref,
        latency_ms=100.0,
        overhead_ms=1.5,
        error=None if status < 400 else "upstream failed",
        calls=calls,
    )


def bare(rid, when, key, cascade, chosen, status, *, tokens, cost) -> RequestRecord:
    """A request recorded without call rows."""
    return RequestRecord(
        request_id=rid,
        ts=when.timestamp(),
        api_key=key,
        cascade=cascade,
        model_requested="auto",
        policy_hash=None,
        status=status,
        chosen_model=chosen,
        n_calls=0,
        tokens_in=tokens[0],
        tokens_out=tokens[1],
        cost_usd=cost,
        reference_cost_usd=None,
        latency_ms=5.0,
        overhead_ms=0.5,
        error=None if status < 400 else "invalid request",
    )


def known_set() -> list[RequestRecord]:
    """Seven requests whose rollups are worked out by hand in test_rollups_hand_computed."""
    return [
        request(
            "R1",
            D1,
            "sk-alice",
            "math",
            "big",
            [
                call(0, "small", 0.001, 100, 20, decision="continue:big"),
                call(1, "big", 0.006, 100, 50),
            ],
            ref=0.010,
        ),
        request(
            "R2", D1, "sk-alice", "math", "small", [call(0, "small", 0.0008, 80, 30)], ref=0.012
        ),
        request(
            "R3",
            D1,
            "sk-alice",
            "math",
            "big",
            [
                call(0, "small", None, 50, 10, decision="continue:big"),
                call(1, "big", 0.004, 50, 40),
            ],
            ref=None,
        ),
        request(
            "R4",
            D1,
            "sk-bob",
            "math",
            None,
            [call(0, "small", None, None, None, status="timeout", decision=None)],
            status=502,
            ref=0.01,
        ),
        request("R5", D2, "sk-bob", "code", "small", [call(0, "small", 0.0001, 10, 10)], ref=0.02),
        # R6: no cascade (a pass-through), recorded without its calls.
        bare("R6", D2, "sk-bob", None, "big", 200, tokens=(7, 8), cost=0.003),
        # R7: refused before any upstream call, so it cost a known zero.
        bare("R7", D1, "sk-alice", "math", None, 400, tokens=(0, 0), cost=0.0),
    ]


def daily_rows(url: str) -> dict[tuple, dict]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(LedgerDaily)).mappings().all()
    finally:
        engine.dispose()
    out = {}
    for r in rows:
        r = dict(r)
        r.pop("id")
        out[(r.pop("day"), r.pop("cascade"), r.pop("model"), r.pop("api_key"))] = r
    return out


def count(url: str, model) -> tuple[int, int]:
    """(rows, distinct request ids) of a ledger table."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(func.count(), func.count(model.request_id.distinct()))).one()
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- records


def test_records_round_trip_and_never_hold_the_key():
    rec = known_set()[0]
    assert rec.api_key == key_id("sk-alice") and len(rec.api_key) == 16
    line = json.dumps(rec.to_dict())
    assert "sk-alice" not in line
    back = RequestRecord.from_dict(json.loads(line))
    assert back == rec  # the key id is not hashed a second time
    assert back.calls[0] == rec.calls[0] and back.calls[1].cost_usd == 0.006
    with pytest.raises(ValueError, match="missing 'model'"):
        CallRecord.from_dict({"order": 0})


# --------------------------------------------------------------------------- migrations


def test_migrations_up_and_down(db_url):
    head = head_revision()
    assert current_revision(db_url) is None
    assert upgrade(db_url) == head
    engine = make_engine(db_url)
    try:
        insp = inspect(engine)
        assert set(insp.get_table_names()) >= LEDGER_TABLES
        indexed = {tuple(ix["column_names"]) for ix in insp.get_indexes("ledger_requests")}
        assert {("ts",), ("cascade", "ts"), ("chosen_model", "ts"), ("api_key", "ts")} <= indexed
        assert ("model", "ts") in {
            tuple(ix["column_names"]) for ix in insp.get_indexes("ledger_calls")
        }
        with engine.connect() as conn:  # the migrations build exactly the models' schema
            ctx = MigrationContext.configure(
                conn, opts={"compare_type": True, "version_table": ledger_db.VERSION_TABLE}
            )
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()

    assert downgrade(db_url, "base") is None
    engine = make_engine(db_url)
    try:
        assert not LEDGER_TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert upgrade(db_url) == head  # and up again
    assert check_schema(db_url) == head


REAL_HEAD = "0002"  # the repository's head; the tests add a revision on top of it


def _migrations_with_a_second_revision(tmp_path: Path) -> Path:
    root = tmp_path / "migrations"
    shutil.copytree(REPO / "migrations", root, ignore=shutil.ignore_patterns("__pycache__"))
    (root / "versions" / "9999_note.py").write_text(
        textwrap.dedent(
            """
            import sqlalchemy as sa
            from alembic import op

            revision = "9999"
            down_revision = "REAL_HEAD"
            branch_labels = None
            depends_on = None


            def upgrade():
                with op.batch_alter_table("ledger_requests") as batch:
                    batch.add_column(sa.Column("note", sa.Text(), nullable=True))


            def downgrade():
                with op.batch_alter_table("ledger_requests") as batch:
                    batch.drop_column("note")
            """
        ).replace("REAL_HEAD", REAL_HEAD)
    )
    return root


def test_check_schema_empty_behind_current_and_ahead(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    with pytest.raises(SchemaError, match=r"does not exist; run `cascade db upgrade`"):
        check_schema(url)
    assert not (tmp_path / "ledger.db").exists()  # checking creates no file
    (tmp_path / "ledger.db").touch()
    with pytest.raises(SchemaError, match=r"no ledger schema; run `cascade db upgrade`"):
        check_schema(url)

    monkeypatch.setattr(ledger_db, "MIGRATIONS_DIR", _migrations_with_a_second_revision(tmp_path))
    assert head_revision() == "9999"
    assert upgrade(url, REAL_HEAD) == REAL_HEAD
    w = _writer(url, tmp_path).start()
    w.submit(known_set()[0])
    w.close()
    with pytest.raises(
        SchemaError, match=rf"at revision {REAL_HEAD} .* needs 9999; run `cascade db upgrade`"
    ):
        check_schema(url)
    assert upgrade(url) == "9999"
    assert check_schema(url) == "9999"
    # Batch mode rebuilds ledger_requests on SQLite; the calls that reference it survive.
    assert downgrade(url, REAL_HEAD) == REAL_HEAD
    assert count(url, LedgerCall) == (2, 1)
    assert count(url, LedgerRequest) == (1, 1)

    monkeypatch.undo()
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE {ledger_db.VERSION_TABLE} SET version_num = 'ffff'"))
    engine.dispose()
    with pytest.raises(SchemaError, match="does not know") as info:
        check_schema(url)
    assert "cascade db upgrade" not in str(info.value)


def test_check_schema_postgres_and_unreachable(pg_db):
    _, url = pg_db
    with pytest.raises(SchemaError, match=r"run `cascade db upgrade`") as info:
        check_schema(url)
    assert f"ledger database {url} has no ledger schema" in str(info.value)  # as written
    upgrade(url)
    assert check_schema(url) == head_revision()
    with pytest.raises(DatabaseUnavailable, match="unreachable"):
        check_schema("postgresql://postgres@127.0.0.1:1/nothing?connect_timeout=2")


# --------------------------------------------------------------------------- writer


def test_rollups_hand_computed(db_url, tmp_path):
    upgrade(db_url)
    recs = {r.request_id: r for r in known_set()}
    w = _writer(db_url, tmp_path).start()
    for rid in ("R3", "R4"):
        w.submit(recs[rid])
    assert w.flush(10)
    for rid in ("R1", "R2", "R5", "R6", "R7", "R3"):  # R3 again: already in the ledger
        w.submit(recs[rid])
    w.close()
    st = w.stats()
    assert (st["written"], st["duplicates"], st["spooled"], st["rejected"]) == (7, 1, 0, 0)

    a, b = key_id("sk-alice"), key_id("sk-bob")
    d1, d2 = D1.date(), D2.date()
    counts = ["requests", "requests_failed", "unpriced_requests", "calls", "calls_failed"]
    counts += ["unpriced_calls", "tokens_in", "tokens_out", "reference_unpriced"]
    zero = dict.fromkeys(counts, 0)

    def row(**kw):
        return {**zero, "cost_usd": None, "reference_cost_usd": None, **kw}

    expected = {
        # R1 and R3 answered by big; their big calls. R3's cost and reference are unknown.
        (d1, "math", "big", a): row(
            requests=2, unpriced_requests=1, reference_cost_usd=0.010, reference_unpriced=1,
            calls=2, tokens_in=150, tokens_out=90, cost_usd=0.010,
        ),
        # R2 answered by small; the small calls of R1, R2 and R3 (R3's unpriced).
        (d1, "math", "small", a): row(
            requests=1, reference_cost_usd=0.012, calls=3, unpriced_calls=1,
            tokens_in=230, tokens_out=60, cost_usd=0.0018,
        ),
        # R7: refused before any call; it cost a known zero.
        (d1, "math", "", a): row(
            requests=1, requests_failed=1, reference_unpriced=1, cost_usd=0.0,
        ),
        # R4: its only call timed out, unpriced; no answer.
        (d1, "math", "", b): row(
            requests=1, requests_failed=1, unpriced_requests=1, reference_cost_usd=0.01,
        ),
        (d1, "math", "small", b): row(calls=1, calls_failed=1, unpriced_calls=1),
        (d2, "code", "small", b): row(
            requests=1, reference_cost_usd=0.02, calls=1, tokens_in=10, tokens_out=10,
            cost_usd=0.0001,
        ),
        # R6: no cascade, recorded without its calls.
        (d2, "", "big", b): row(
            requests=1, reference_unpriced=1, tokens_in=7, tokens_out=8, cost_usd=0.003,
        ),
    }  # fmt: skip
    got = daily_rows(db_url)
    assert set(got) == set(expected)
    for key, want in expected.items():
        have = got[key]
        for col, value in want.items():
            if value is None:
                assert have[col] is None, (key, col, have[col])  # unknown stays NULL, never 0
            else:
                assert have[col] == pytest.approx(value, abs=1e-12), (key, col, have[col])

    engine = make_engine(db_url)
    try:
        with Session(engine) as session:
            r3 = session.scalars(
                select(LedgerRequest).where(LedgerRequest.request_id == "R3")
            ).one()
            assert r3.cost_usd is None and r3.reference_cost_usd is None
            assert r3.ts == D1 and r3.ts.utcoffset() == dt.timedelta(0)
            assert r3.day == d1 and r3.api_key == a and r3.policy_hash == "sha256:abc"
            calls = session.scalars(
                select(LedgerCall)
                .where(LedgerCall.request_id == "R3")
                .order_by(LedgerCall.call_order)
            ).all()
            assert [(c.model, c.cost_usd, c.decision, c.ts) for c in calls] == [
                ("small", None, "continue:big", D1),
                ("big", 0.004, "stop", D1),
            ]
            assert session.scalar(select(func.count()).select_from(LedgerCall)) == 7
    finally:
        engine.dispose()


def test_duplicate_request_id_lands_once(db_url, tmp_path):
    upgrade(db_url)
    rec = known_set()[0]
    w = _writer(db_url, tmp_path).start()
    w.submit(rec)
    w.submit(rec)  # same batch
    assert w.flush(10)
    w.submit(RequestRecord.from_dict(rec.to_dict()))  # a later batch
    w.close()
    assert count(db_url, LedgerRequest) == (1, 1)
    assert count(db_url, LedgerCall) == (2, 1)
    rows = daily_rows(db_url)
    assert sum(r["requests"] for r in rows.values()) == 1
    assert sum(r["calls"] for r in rows.values()) == 2
    assert sum(r["cost_usd"] for r in rows.values()) == pytest.approx(0.007)
    assert w.stats()["written"] == 1 and w.stats()["duplicates"] == 2


def load(n: int, start: int = 0) -> list[RequestRecord]:
    """A synthetic load: 1-3 calls per request, some unpriced, some failing, two days."""
    out = []
    for i in range(start, start + n):
        calls = [
            call(k, f"m{k}", None if (i + k) % 11 == 0 else 0.0001 * (k + 1), 10 + i % 7, 5 + k)
            for k in range(1 + i % 3)
        ]
        when = (D1 if i % 2 else D2) + dt.timedelta(seconds=i)
        out.append(
            request(f"load-{i:05d}", when, f"sk-{i % 3}", f"c{i % 2}", calls[-1].model, calls)
        )
    return out


def _totals(records: list[RequestRecord]) -> dict[str, float]:
    calls = [c for r in records for c in r.calls]
    return {
        "requests": len(records),
        "calls": len(calls),
        "tokens_in": sum(c.tokens_in for c in calls),
        "unpriced_calls": sum(c.cost_usd is None for c in calls),
        "cost_usd": sum(c.cost_usd for c in calls if c.cost_usd is not None),
    }


def _assert_ledger_holds_exactly(url: str, records: list[RequestRecord]) -> None:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            ids = conn.execute(select(LedgerRequest.request_id)).scalars().all()
            pairs = conn.execute(select(LedgerCall.request_id, LedgerCall.call_order)).all()
    finally:
        engine.dispose()
    assert len(ids) == len(set(ids)) == len(records)
    assert set(ids) == {r.request_id for r in records}
    want_pairs = {(r.request_id, c.order) for r in records for c in r.calls}
    assert len(pairs) == len(want_pairs) and set(map(tuple, pairs)) == want_pairs
    rows = daily_rows(url).values()
    for col, value in _totals(records).items():
        assert sum((r[col] or 0) for r in rows) == pytest.approx(value), col


def test_replay_after_a_crash_mid_replay_is_exactly_once(tmp_path):
    """The spool still holds records a dead process had already committed: none lands twice."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    first, second = load(40), load(30, start=40)
    w = _writer(url, tmp_path).start()
    for r in first:
        w.submit(r)
    w.close()
    spool = tmp_path / "spool" / "ledger.jsonl"
    lines = [json.dumps(r.to_dict()) + "\n" for r in first[10:] + second]
    spool.write_text("".join(lines) + '{"request_id": "torn-by-a-cra')  # died mid-append

    w = _writer(url, tmp_path, batch_size=16).start()
    assert w.stats()["running"]
    _wait(lambda: w.stats()["replayed"] == 30, 10, "the spool replay")
    w.close()
    st = w.stats()
    assert (st["replayed"], st["duplicates"], st["spool_backlog"]) == (30, 30, 0)
    assert spool.stat().st_size == 0
    _assert_ledger_holds_exactly(url, first + second)


def test_close_spools_when_the_database_is_unreachable_and_next_start_replays(tmp_path):
    dead = "postgresql://postgres@127.0.0.1:1/ledger?connect_timeout=2"
    records = load(25)
    w = _writer(dead, tmp_path).start()
    for r in records:
        w.submit(r)
    w.close(timeout=10)
    st = w.stats()
    assert st["spooled"] == 25 and st["written"] == 0 and st["failures"] >= 1
    assert "Operational" in (st["last_error"] or "")
    spool = tmp_path / "spool" / "ledger.jsonl"
    assert len(spool.read_text().splitlines()) == 25
    w.submit(load(1, start=25)[0])  # after close: straight to the spool, not lost
    assert len(spool.read_text().splitlines()) == 26

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    w2 = _writer(url, tmp_path).start()
    _wait(lambda: w2.stats()["replayed"] == 26, 10, "the replay")
    w2.close()
    _assert_ledger_holds_exactly(url, load(26))


def test_process_exit_without_close_flushes(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.test_ledger import load
        from proxy.ledger import LedgerWriter
        w = LedgerWriter({url!r}, {str(tmp_path / "spool.jsonl")!r}, flush_interval_s=5.0)
        w.start()
        for r in load(50):
            w.submit(r)
        sys.exit(0)  # no close(): the atexit hook must write the queue
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    _assert_ledger_holds_exactly(url, load(50))


# --------------------------------------------------------------------------- the outage


def test_postgres_outage_mid_load_loses_nothing_and_duplicates_nothing(pg_db, tmp_path):
    name, url = pg_db
    upgrade(url)
    records = load(900)
    phase1, phase2, phase3 = records[:300], records[300:600], records[600:]
    w = _writer(url, tmp_path, batch_size=50).start()

    def feed(batch: list[RequestRecord]) -> None:
        for i, r in enumerate(batch):
            w.submit(r)
            if i % 25 == 0:
                time.sleep(0.005)

    feed(phase1)
    _wait(lambda: w.stats()["written"] == 300, 15, "phase 1 in the database")

    with _admin() as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        psycopg.connect(f"host=127.0.0.1 user=postgres dbname={name}", connect_timeout=5)

    feed(phase2)
    feed(phase1[:20])  # retried requests: already in the ledger, spooled again
    _wait(lambda: w.stats()["pending"] == 0, 15, "phase 2 to be spooled")
    st = w.stats()
    assert st["spooled"] == 320 and st["spool_backlog"] == 320 and st["failures"] >= 1
    spool = tmp_path / "spool" / "ledger.jsonl"
    assert len(spool.read_text().splitlines()) == 320
    time.sleep(0.7)  # a couple of failed reconnects
    assert w.stats()["failures"] >= 2 and w.stats()["replayed"] == 0

    with _admin() as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    feed(phase3)
    _wait(
        lambda: w.stats()["pending"] == 0 and w.stats()["spool_backlog"] == 0,
        20,
        "the spool replay and phase 3",
    )
    w.close()
    st = w.stats()
    assert st["replayed"] >= 300 and st["written"] + st["replayed"] == 900
    assert st["duplicates"] == 20 and st["rejected"] == 0 and st["connected"] is True
    assert spool.stat().st_size == 0
    _assert_ledger_holds_exactly(url, records)
