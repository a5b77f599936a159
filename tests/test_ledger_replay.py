"""The spool replay finishes what it starts: once every spooled record is in the database,
the spool is emptied, even when the replay's time slice ran out on its last chunk.

Real parts: PostgreSQL on 127.0.0.1:5432 (the test creates and drops its own database), with
a statement trigger that makes each insert into ``ledger_requests`` take 0.2 s, so that one
chunk outlasts the replay's slice (at least ``MIN_REPLAY_SLICE_S``, 0.05 s) for certain.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from proxy.ledger import LedgerWriter, upgrade
from proxy.ledger.spool import encode
from tests.test_ledger import _assert_ledger_holds_exactly, _wait, load

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
SLOW_INSERTS = """
CREATE FUNCTION cascade_test_slow_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(0.2);
    RETURN NULL;
END $$;
CREATE TRIGGER cascade_test_slow_insert BEFORE INSERT ON ledger_requests
    FOR EACH STATEMENT EXECUTE FUNCTION cascade_test_slow_insert();
"""


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database with the ledger schema and slow inserts; dropped after."""
    name = f"cascade_replay_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        upgrade(url)
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as db:
            db.execute(SLOW_INSERTS)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_replay_whose_slice_ends_on_its_last_chunk_still_empties_the_spool(pg_url, tmp_path):
    """A spool left by an earlier run, one chunk long, replayed into a slow database: the
    chunk takes longer than the slice, which used to end the slice with the backlog at zero
    and leave the spool full (nothing asked for a replay any more), so the next start
    replayed all of it again. Now the spool is emptied while the writer runs, and a writer
    started next finds nothing to replay."""
    records = load(10)
    spool = tmp_path / "spool" / "ledger.jsonl"
    spool.parent.mkdir()
    spool.write_bytes(encode(records))

    w = LedgerWriter(pg_url, spool, flush_interval_s=0.01, write_timeout_s=10.0).start()
    try:
        _wait(lambda: w.stats()["replayed"] == len(records), 20, "the spool's replay")
        _wait(lambda: spool.stat().st_size == 0, 10, "the replayed spool to be emptied")
        st = w.stats()
        assert (st["spool_backlog"], st["duplicates"], st["rejected"]) == (0, 0, 0)
    finally:
        w.close()
    _assert_ledger_holds_exactly(pg_url, records)

    # the next start: its first write comes after its look at the spool, which is empty
    fresh = load(1, start=len(records))
    again = LedgerWriter(pg_url, spool, flush_interval_s=0.01, write_timeout_s=10.0).start()
    try:
        again.submit(fresh[0])
        assert again.flush(20.0)
        st = again.stats()
        assert (st["written"], st["replayed"], st["duplicates"]) == (1, 0, 0)
    finally:
        again.close()
    _assert_ledger_holds_exactly(pg_url, records + fresh)
