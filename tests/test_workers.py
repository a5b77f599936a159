"""Several proxies, one ledger: `cascade serve --workers N` and instances sharing PostgreSQL.

Real processes throughout: the fake upstream, `cascade serve`, SQLite files and a real
PostgreSQL database (created and dropped here). Every request a client sent must be in the
ledger exactly once, with its calls and its daily rollup, whichever worker or instance served
it and whether or not the database was reachable at the time.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from proxy.ledger import LedgerWriter
from proxy.ledger.db import upgrade
from tests.serving import fake_upstream, start_proxy, stop, write_config
from tests.test_ledger import _assert_ledger_holds_exactly, _wait, load

PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
DEAD_PG = "postgresql://postgres@127.0.0.1:1/ledger?connect_timeout=2"


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fake_upstream("small") as up:
        yield up.url


def _config(folder: Path, upstream: str) -> Path:
    """A one-model cascade `qa` and the model itself (passthrough) over the upstream."""
    config = {
        "models": {
            "small": {
                "backend": "openai",
                "base_url": f"{upstream}/v1",
                "price_in_per_mtok": 0.1,
                "price_out_per_mtok": 0.2,
            }
        },
        "cascades": {"qa": {"nodes": ["small"], "reference": "small"}},
    }
    return write_config(folder, config)


class Serve:
    """One `cascade serve` process (its working folder holds the SQLite spool files)."""

    def __init__(self, config: Path, url: str, folder: Path, workers: int) -> None:
        self.folder = folder
        self.log = open(folder / "serve.log", "wb")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "CASCADE_DATABASE_URL": url}
        started = start_proxy(
            config, env, workers=workers, cwd=folder, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.url, self.proc = started.url, started.proc

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, (self.folder / "serve.log").read_text()
            try:
                return httpx.get(self.url + "/health", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                return False

        _wait(up, 60, f"cascade serve on {self.url}")

    def workers(self) -> list[int]:
        """The pids of the uvicorn worker processes (children running spawn_main)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == self.proc.pid and b"spawn_main" in cmdline:
                out.append(int(entry.name))
        return out

    def stop(self) -> bool:
        """SIGTERM, as a process manager would: every worker flushes its ledger writer. True
        if it exited cleanly (uvicorn re-raises the signal after a graceful shutdown, so a
        single process ends "killed by SIGTERM"; a supervisor of workers exits 0)."""
        code = stop(self.proc, 30)
        self.log.close()
        return code in (0, -signal.SIGTERM)


def _send(urls: list[str], n: int, start: int = 0) -> list[str]:
    """`n` requests spread over `urls`, 16 at a time, alternately to the cascade and to the
    model itself (passthrough); their request ids, all answered 200."""
    limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
    with httpx.Client(timeout=30.0, limits=limits) as client:

        def ask(i: int) -> tuple[int, str]:
            body = {
                "model": "qa" if i % 2 == 0 else "small",
                "messages": [{"role": "user", "content": f"question {i}"}],
            }
            reply = client.post(urls[i % len(urls)] + "/v1/chat/completions", json=body)
            return reply.status_code, reply.headers.get("x-request-id", "")

        with ThreadPoolExecutor(16) as pool:
            got = list(pool.map(ask, range(start, start + n)))
    assert [status for status, _ in got] == [200] * n
    ids = [rid for _, rid in got]
    assert len(set(ids)) == n and all(ids)
    return ids


def _locked(spool: Path) -> bool:
    """Whether a live writer holds the spool slot `spool` (its flock is taken)."""
    fd = os.open(spool.with_name(spool.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _check_ledger(rows: list[tuple], calls: int, daily: int, ids: list[str]) -> None:
    """rows: (request_id, n_calls) of every ledgered request; calls: ledger_calls rows;
    daily: requests counted by ledger_daily. Each sent request lands exactly once."""
    assert len(rows) == len(ids)
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert calls == sum(r[1] for r in rows) == len(ids)  # one call each
    assert daily == len(ids)


# --------------------------------------------------------------------------- spool slots


def test_writers_sharing_a_spool_path_get_their_own_slot_and_orphans_are_adopted(tmp_path):
    base = tmp_path / "spool" / "ledger.jsonl"
    records = load(60)
    a = LedgerWriter(DEAD_PG, base, flush_interval_s=0.05).start()
    b = LedgerWriter(DEAD_PG, base, flush_interval_s=0.05).start()
    assert a.spool_path == base and b.spool_path == tmp_path / "spool" / "ledger-1.jsonl"
    for r in records[:20]:
        a.submit(r)
    for r in records[20:35]:
        b.submit(r)
    _wait(lambda: a.stats()["pending"] == b.stats()["pending"] == 0, 15, "both to spool")
    a.close()
    assert len(base.read_text().splitlines()) == 20
    assert len(b.spool_path.read_text().splitlines()) == 15

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    c = LedgerWriter(url, base, flush_interval_s=0.05, retry_interval_s=0.2).start()
    assert c.spool_path == base  # the slot `a` freed
    for r in records[35:50]:
        c.submit(r)
    _wait(lambda: _settled(c), 15, "c's replay")
    _assert_ledger_holds_exactly(url, records[:20] + records[35:50])
    assert b.stats()["running"] and _locked(b.spool_path)  # b is alive: c left its spool
    assert len(b.spool_path.read_text().splitlines()) == 15
    b.close()
    c.close()
    assert not _locked(base) and not _locked(b.spool_path)

    d = LedgerWriter(url, base, flush_interval_s=0.05, retry_interval_s=0.2).start()
    for r in records[50:]:
        d.submit(r)
    _wait(lambda: _settled(d), 15, "the adopted spool's replay")
    d.close()
    assert not (tmp_path / "spool" / "ledger-1.jsonl").exists()
    _assert_ledger_holds_exactly(url, records)


def _settled(writer: LedgerWriter) -> bool:
    st = writer.stats()
    return st["pending"] == 0 and st["spool_backlog"] == 0 and st["connected"] is True


# --------------------------------------------------------------------------- workers


def test_serve_with_two_workers_ledgers_every_request_exactly_once(upstream, tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    serve = Serve(_config(tmp_path, upstream), url, tmp_path, workers=2)
    try:
        serve.wait_ready()
        spools = [tmp_path / "ledger.spool.jsonl", tmp_path / "ledger.spool-1.jsonl"]
        _wait(lambda: all(map(_locked, spools)), 30, "a spool slot per worker")
        workers = serve.workers()
        assert len(workers) == 2 and serve.proc.pid not in workers
        ids = _send([serve.url], 200)
    finally:
        clean = serve.stop()
    assert clean, (tmp_path / "serve.log").read_text()
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = db.execute("SELECT request_id, n_calls FROM ledger_requests").fetchall()
        calls = db.execute("SELECT COUNT(*) FROM ledger_calls").fetchone()[0]
        daily = db.execute("SELECT SUM(requests) FROM ledger_daily").fetchone()[0]
    _check_ledger(rows, calls, daily, ids)


# --------------------------------------------------------------------------- instances


@pytest.fixture
def pg_url() -> Iterator[tuple[str, str]]:
    name = f"cascade_workers_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name, f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_ledger(url: str) -> tuple[list[tuple], int, int]:
    with psycopg.connect(url, connect_timeout=5) as db:
        rows = db.execute("SELECT request_id, n_calls FROM ledger_requests").fetchall()
        calls = db.execute("SELECT COUNT(*) FROM ledger_calls").fetchone()[0]
        daily = db.execute("SELECT COALESCE(SUM(requests), 0) FROM ledger_daily").fetchone()[0]
    return rows, calls, int(daily)


def test_two_instances_on_one_postgres_ledger_everything_once_across_an_outage(
    upstream, pg_url, tmp_path
):
    name, url = pg_url
    upgrade(url)
    folders = [tmp_path / "a", tmp_path / "b"]  # one spool folder per instance
    for folder in folders:
        folder.mkdir()
    config = _config(tmp_path, upstream)
    instances = [Serve(config, url, folders[0], 1), Serve(config, url, folders[1], 2)]
    try:
        for serve in instances:
            serve.wait_ready()
        urls = [s.url for s in instances]
        ids = _send(urls, 120)
        _wait(lambda: len(_pg_ledger(url)[0]) == 120, 20, "the first 120 requests")

        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (name,),
            )
        ids += _send(urls, 120, start=120)  # answered while the ledger spools
        _wait(lambda: _spooled(folders) == 120, 20, "the outage's requests in the spools")
        assert {p.parent for p in _spools(folders) if p.stat().st_size} == set(folders)

        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        ids += _send(urls, 60, start=240)
        _wait(lambda: len(_pg_ledger(url)[0]) == 300, 30, "the spools' replay")
    finally:
        clean = [serve.stop() for serve in instances]
    assert clean == [True, True]
    _check_ledger(*_pg_ledger(url), ids)
    assert _spools(folders) and _spooled(folders) == 0


def _spools(folders: list[Path]) -> list[Path]:
    """The spool files of the instances (cascade-ledger.spool.jsonl, -1, ... per folder)."""
    return [p for f in folders for p in f.glob("cascade-ledger.spool*.jsonl")]


def _spooled(folders: list[Path]) -> int:
    return sum(len(p.read_text().splitlines()) for p in _spools(folders))
