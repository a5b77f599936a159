"""A ledger database that hangs instead of refusing, and one that is down when the proxy starts.

Real parts throughout: PostgreSQL on 127.0.0.1:5432 (each test creates and drops its own
database), a TCP relay process in front of it that a test freezes with SIGSTOP (the kernel
still accepts and holds its connections: a database that hangs, not one that refuses), the
fake upstream and `cascade serve` processes, killed with SIGKILL where the test says so.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from proxy.ledger import LedgerWriter, upgrade
from tests.serving import CASCADE, fake_upstream, start_proxy, stop, wait_ready, write_config
from tests.tcp_relay import Relay, tcp_relay
from tests.test_ledger import _assert_ledger_holds_exactly, _wait, load

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
PG_PORT = 5432
FLUSH_S = 0.25  # the writer's default flush interval, as the proxy runs it


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fake_upstream("small") as up:
        yield up.url


@pytest.fixture
def pg() -> Iterator[str]:
    """A fresh PostgreSQL database's name; dropped afterwards."""
    name = f"cascade_outage_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def relay() -> Iterator[Relay]:
    with tcp_relay(PG_PORT) as running:
        yield running


def _direct(name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{PG_PORT}/{name}"


def _via(relay: Relay, name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:{relay.port}/{name}"


def _ledger_ids(name: str) -> list[str]:
    with psycopg.connect(_direct(name), connect_timeout=5) as db:
        return [r[0] for r in db.execute("SELECT request_id FROM ledger_requests")]


def _allow_connections(name: str, allow: bool) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {str(allow).lower()}')
        if not allow:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )


def _feed(writer: LedgerWriter, records: list, rate: float) -> None:
    """Submit `records` at about `rate` per second (as requests would arrive)."""
    start = time.monotonic()
    for i, record in enumerate(records):
        writer.submit(record)
        time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))


# --------------------------------------------------------------------------- the writer


def test_a_frozen_database_is_an_outage_records_spool_and_memory_stays_bounded(
    pg, relay, tmp_path, caplog
):
    """The writer's batch hangs on a frozen database: at the deadline (3 s here) the database
    counts as down, the batch and every later record go to the spool, and no record waits
    in memory for much more than a flush interval meanwhile, though every retry hangs for
    the deadline too. One warning says the outage started and one that it ended, and the
    replay lands every record exactly once."""
    caplog.set_level(logging.WARNING, logger="cascade.ledger")
    upgrade(_direct(pg))
    records = load(900)
    spool = tmp_path / "spool" / "ledger.jsonl"
    w = LedgerWriter(
        _via(relay, pg), spool, flush_interval_s=0.1, retry_interval_s=0.5, write_timeout_s=3.0
    ).start()
    try:
        _feed(w, records[:100], 200)
        _wait(lambda: w.stats()["written"] == 100, 15, "the first records in the database")

        relay.freeze()
        rate, frozen_s = 100.0, 8.0
        feeder = threading.Thread(target=_feed, args=(w, records[100:900], rate))
        t0 = time.monotonic()
        feeder.start()
        _wait(lambda: w.stats()["degraded"], 8, "the outage to be declared")
        declared_s = time.monotonic() - t0
        samples = []
        while time.monotonic() - t0 < frozen_s:
            st = w.stats()
            samples.append((st["pending"], st["spooled"]))
            time.sleep(0.02)
        during = w.stats()
        relay.thaw()
        feeder.join()
        _wait(lambda: not w.stats()["degraded"], 20, "the database back and the spool replayed")
        w.flush(10)
        after = w.stats()
    finally:
        relay.thaw()
        w.close()

    # declared at the 3 s deadline (plus the batch's flush interval), not at a TCP timeout
    assert 2.9 < declared_s < 6.0, declared_s
    assert during["connected"] is False and during["outage_s"] > 3.0
    assert "write_timeout_s=3 s" in during["reason"] and str(spool) in during["reason"]
    assert during["spool_backlog"] >= (frozen_s - 1.5) * rate  # spooled as they came
    # in memory after the outage began: about a flush interval of records (10 at 100/s),
    # through the retries that hang 3 s each (without the bound, each would hold ~300);
    # the margin is for a busy machine, where appending to the spool can take a while
    worst = max(pending for pending, _ in samples[len(samples) // 3 :])
    assert worst <= 1.0 * rate, samples
    assert during["failures"] >= 2  # the retries hung too: each an abandoned attempt
    messages = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("unavailable" in m for m in messages) == 1, messages
    assert sum("is back" in m for m in messages) == 1, messages
    assert after["pending"] == 0 and after["spool_backlog"] == 0 and after["rejected"] == 0
    _assert_ledger_holds_exactly(_direct(pg), records)


def test_a_write_abandoned_at_the_deadline_commits_late_and_its_replay_adds_nothing(
    pg, relay, tmp_path
):
    """The abandoned batch is not cancelled: its transaction commits once the database
    wakes up. Its copy in the spool is replayed after that and adds nothing: no request,
    call or rollup counts twice (the replay is idempotent by request_id, and a request's
    rollups go in only with the request itself)."""
    upgrade(_direct(pg))
    records = load(120)
    spool = tmp_path / "spool" / "ledger.jsonl"
    w = LedgerWriter(
        _via(relay, pg), spool, flush_interval_s=0.1, retry_interval_s=6.0, write_timeout_s=1.0
    ).start()
    try:
        _feed(w, records[:40], 400)
        _wait(lambda: w.stats()["written"] == 40, 15, "the first records in the database")
        relay.freeze()
        _feed(w, records[40:80], 400)  # one batch or two, whose write hangs
        _wait(lambda: w.stats()["degraded"], 8, "the outage to be declared")
        _wait(lambda: w.stats()["pending"] == 0, 5, "the abandoned batch in the spool")
        assert w.stats()["spooled"] == 40 and w.stats()["written"] == 40
        relay.thaw()  # the next retry is about 6 s away: the abandoned write goes first
        _wait(lambda: len(_ledger_ids(pg)) > 40, 5, "the abandoned batch's late commit")
        late = len(_ledger_ids(pg)) - 40
        _feed(w, records[80:], 400)
        _wait(lambda: not w.stats()["degraded"], 20, "the replay")
        w.flush(10)
        st = w.stats()
    finally:
        relay.thaw()
        w.close()
    assert late >= 1
    assert st["duplicates"] == late and st["replayed"] == 80 - late
    _assert_ledger_holds_exactly(_direct(pg), records)


def test_records_beyond_max_pending_wait_in_the_spool_not_in_memory(pg, relay, tmp_path):
    """A write that hangs within its deadline (here a long one) still holds no more than
    `max_pending` records in memory: the rest goes to the spool meanwhile."""
    upgrade(_direct(pg))
    records = load(500)
    spool = tmp_path / "spool" / "ledger.jsonl"
    w = LedgerWriter(
        _via(relay, pg),
        spool,
        flush_interval_s=0.05,
        retry_interval_s=0.3,
        write_timeout_s=30.0,
        max_pending=50,
    ).start()
    try:
        _feed(w, records[:10], 500)
        _wait(lambda: w.stats()["written"] == 10, 15, "the first records in the database")
        relay.freeze()
        _feed(w, records[10:], 2000)
        _wait(lambda: w.stats()["pending"] <= 50 + w.batch_size, 3, "the excess spooled")
        st = w.stats()
        assert st["spooled"] >= 490 - 50 - w.batch_size and st["connected"] is True
        assert not st["outage_s"]  # no deadline passed: a slow write, not (yet) an outage
        relay.thaw()
        _wait(lambda: w.stats()["spool_backlog"] == 0, 20, "the replay")
        w.flush(10)
    finally:
        relay.thaw()
        w.close()
    _assert_ledger_holds_exactly(_direct(pg), records)


# --------------------------------------------------------------------------- the proxy


class Load:
    """Chat requests at a steady rate from a thread; the request ids the client got a 200
    for (an answered request must be in the ledger)."""

    def __init__(self, url: str, rate: float) -> None:
        self.url, self.rate = url, rate
        self.answered: list[str] = []
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Load:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        body = {"model": "small", "messages": [{"role": "user", "content": "question"}]}
        with httpx.Client(timeout=5.0) as client:
            start, i = time.monotonic(), 0
            while not self._stop.is_set():
                i += 1
                try:
                    r = client.post(self.url + "/v1/chat/completions", json=body)
                except httpx.HTTPError:
                    self.failed += 1
                else:
                    if r.status_code == 200:
                        self.answered.append(r.headers["x-request-id"])
                    else:
                        self.failed += 1
                time.sleep(max(0.0, start + i / self.rate - time.monotonic()))


def test_sigkill_while_the_database_hangs_loses_no_more_than_with_it_up(
    upstream, pg, relay, tmp_path
):
    """Issue 15, item 1: `cascade serve` on PostgreSQL through a relay that freezes for 8 s
    under 50 requests/s, then SIGKILL. The proxy answers throughout; /health says degraded
    and why; the restarted proxy replays the spool; of the answered requests, no more are
    missing from the ledger than a SIGKILL loses with the database up (the records of the
    last flush interval, about 13 at this rate; the bound allows for a busy machine)."""
    rate, frozen_s = 50.0, 8.0
    upgrade(_direct(pg))
    config = write_config(
        tmp_path,
        {
            "models": {
                "small": {
                    "backend": "openai",
                    "base_url": f"{upstream}/v1",
                    "price_in_per_mtok": 0.1,
                    "price_out_per_mtok": 0.2,
                }
            }
        },
    )
    env = {**os.environ, "CASCADE_DATABASE_URL": _via(relay, pg)}
    log = tmp_path / "serve.log"
    proxy = start_proxy(config, env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    load = None
    try:
        wait_ready(f"{proxy.url}/health", proxy.proc, 60)
        load = Load(proxy.url, rate).start()
        time.sleep(3.0)
        relay.freeze()
        time.sleep(frozen_s)
        health = httpx.get(f"{proxy.url}/health", timeout=5.0).json()
        answered_while_frozen = len(load.answered)
        proxy.proc.send_signal(signal.SIGKILL)
        proxy.proc.wait(10)
        load.stop()
    finally:
        if load is not None:
            load.stop()
        relay.thaw()
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait()
    spool = tmp_path / "cascade-ledger.spool.jsonl"
    spooled = len(spool.read_text().splitlines()) if spool.exists() else 0

    again = start_proxy(config, env, cwd=tmp_path, stdout=tmp_path / "serve2.log")
    try:
        wait_ready(f"{again.url}/health", again.proc, 60)
        _wait(lambda: not spool.exists() or spool.stat().st_size == 0, 30, "the spool's replay")
        time.sleep(1.0)  # the last chunk's rows visible to a new connection
    finally:
        assert stop(again.proc, 30) in (0, -signal.SIGTERM)
    ids = _ledger_ids(pg)
    answered = set(load.answered)
    lost = answered - set(ids)
    bound = math.ceil(rate * (FLUSH_S + 0.75))
    print(
        f"answered {len(answered)}, spooled at the kill {spooled}, in the ledger {len(ids)}, "
        f"lost {len(lost)} (bound {bound})"
    )
    assert len(answered) >= 0.7 * rate * (3.0 + frozen_s)  # the proxy kept answering
    assert answered_while_frozen > rate * 3.0
    assert len(lost) <= bound, (len(lost), log.read_text()[-3000:])
    assert len(ids) == len(set(ids))  # and nothing twice
    assert health["status"] == "degraded", health
    assert health["database"]["status"] == "degraded"
    reason = health["database"]["reason"]  # the last failure: a deadline or connect timeout
    assert reason.startswith("database unavailable for") and "timeout" in reason, reason
    assert any(r.startswith("ledger: database unavailable") for r in health["reasons"])
    assert spooled >= rate * (frozen_s - 4.0)
    warnings = [line for line in log.read_text().splitlines() if "unavailable" in line]
    assert len(warnings) == 1, warnings


# --------------------------------------------------------------------------- item 2


def _passthrough_config(folder: Path, upstream: str) -> Path:
    return write_config(
        folder,
        {
            "models": {
                "small": {
                    "backend": "openai",
                    "base_url": f"{upstream}/v1",
                    "price_in_per_mtok": 0.1,
                    "price_out_per_mtok": 0.2,
                }
            }
        },
    )


def _ask(url: str, n: int) -> list[str]:
    ids = []
    with httpx.Client(timeout=10.0) as client:
        for i in range(n):
            body = {"model": "small", "messages": [{"role": "user", "content": f"q{i}"}]}
            r = client.post(url + "/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-request-id"])
    return ids


def test_serve_starts_while_the_database_is_down_and_replays_when_it_returns(
    upstream, pg, tmp_path
):
    """Issue 15, item 2: a restart during an outage serves (it used to exit 2 and stay
    down); requests spool; once the database accepts connections, they are replayed."""
    upgrade(_direct(pg))
    _allow_connections(pg, False)
    env = {**os.environ, "CASCADE_DATABASE_URL": _direct(pg)}
    log = tmp_path / "serve.log"
    proxy = start_proxy(
        _passthrough_config(tmp_path, upstream),
        env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(f"{proxy.url}/health", proxy.proc, 60)
        ids = _ask(proxy.url, 20)
        spool = tmp_path / "cascade-ledger.spool.jsonl"
        _wait(
            lambda: spool.exists() and len(spool.read_text().splitlines()) == 20,
            10,
            "the spool",
        )
        health = httpx.get(f"{proxy.url}/health", timeout=5.0).json()
        assert health["status"] == "degraded"
        assert "not currently accepting connections" in health["database"]["reason"]
        _allow_connections(pg, True)
        _wait(lambda: sorted(_ledger_ids(pg)) == sorted(ids), 20, "the replay")
        ids += _ask(proxy.url, 5)
        _wait(lambda: not httpx.get(f"{proxy.url}/health").json()["reasons"], 10, "health ok")
    finally:
        code = stop(proxy.proc, 30)
    assert code in (0, -signal.SIGTERM), log.read_text()
    assert sorted(_ledger_ids(pg)) == sorted(ids)
    text = log.read_text()
    assert "serving anyway" in text and "is unreachable" in text


def test_serve_refuses_a_reachable_database_with_an_outdated_schema(upstream, pg, tmp_path):
    env = {**os.environ, "CASCADE_DATABASE_URL": _direct(pg)}
    done = subprocess.run(
        [str(CASCADE), "serve", "--config", str(_passthrough_config(tmp_path, upstream))],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "has no ledger schema; run `cascade db upgrade`" in done.stderr


def test_a_database_back_with_an_outdated_schema_gets_nothing_until_upgraded(
    upstream, pg, tmp_path
):
    """Down at start, back without the ledger schema: the proxy writes nothing to it (no
    record is refused or lost), says why in /health and in an error naming `cascade db
    upgrade`, and replays the spool once the schema is current."""
    _allow_connections(pg, False)
    env = {**os.environ, "CASCADE_DATABASE_URL": _direct(pg)}
    log = tmp_path / "serve.log"
    proxy = start_proxy(
        _passthrough_config(tmp_path, upstream),
        env,
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_ready(f"{proxy.url}/health", proxy.proc, 60)
        ids = _ask(proxy.url, 10)
        _allow_connections(pg, True)

        def says_upgrade() -> bool:
            reason = httpx.get(f"{proxy.url}/health").json()["database"]["reason"] or ""
            return "cascade db upgrade" in reason

        _wait(says_upgrade, 15, "the schema problem in /health")
        ids += _ask(proxy.url, 5)
        time.sleep(1.0)
        with psycopg.connect(_direct(pg), connect_timeout=5) as db:
            tables = db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            assert not list(tables)  # nothing written to a database without the schema
        assert "run `cascade db upgrade`" in log.read_text()
        assert not (tmp_path / "cascade-ledger.spool.jsonl.rejected").exists()
        upgrade(_direct(pg))
        _wait(lambda: sorted(_ledger_ids(pg)) == sorted(ids), 20, "the replay after upgrade")
    finally:
        code = stop(proxy.proc, 30)
    assert code in (0, -signal.SIGTERM), log.read_text()
