"""Keys in the ledger database (`cascade keys`, `server.database_keys`), end to end through
the real console script, real proxies and a real PostgreSQL: create, use, revoke, expire;
bad options refused with nothing written; rate limits across two workers; a budget under
concurrent requests from two instances, with every answered request's spend in the ledger."""

from __future__ import annotations

import datetime as dt
import sqlite3
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest

from proxy.ledger.keys import hash_secret, period_end, period_start
from tests.serving import CASCADE, db_upgrade, fake_upstream, running_proxy, write_config
from tests.test_ledger import pg_db  # noqa: F401  (the fixture)

REFRESH_S = 0.5
PRICE = 1000.0  # USD per million tokens, in and out: the fake's few tokens cost cents


def _keys(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CASCADE), "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )


def _create(env: dict, name: str, *args: str) -> str:
    done = _keys(env, "create", "--name", name, *args)
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk-cascade-") and len(secret) > 40
    return secret


def _config(folder: Path, upstream: str, **server) -> Path:
    price = {"price_in_per_mtok": PRICE, "price_out_per_mtok": PRICE}
    return write_config(
        folder,
        {
            "models": {
                "small": {"backend": "openai", "base_url": f"{upstream}/v1", **price},
                "large": {"backend": "openai", "base_url": f"{upstream}/v1", **price},
            },
            "cascades": {"qa": {"nodes": ["small"], "reference": "small"}},
            "server": {
                "database_keys": True,
                "keys_refresh_s": REFRESH_S,
                "api_keys": {"config-key": "sk-config-1"},
                **server,
            },
        },
    )


def _ask(url: str, secret: str, model: str = "qa", **body) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30.0,
    )


@pytest.fixture
def pg_env(pg_db):  # noqa: F811
    name, url = pg_db
    import os

    env = {**os.environ, "CASCADE_DATABASE_URL": url}
    db_upgrade(env)
    return env, name


def _refusal(url: str, secret: str) -> str | int:
    """The error code of a 401 for `secret`, else the status it got."""
    r = _ask(url, secret)
    return r.json()["error"]["code"] if r.status_code == 401 else r.status_code


def _until(probe, wanted, seconds: float = 30.0) -> float:
    """Seconds until `probe()` gives `wanted` (polled; the machine may be loaded)."""
    start = time.monotonic()
    while (got := probe()) != wanted:
        assert time.monotonic() - start < seconds, (got, wanted)
        time.sleep(0.1)
    return time.monotonic() - start


def _sql(dbname: str, query: str, *args) -> list[tuple]:
    with psycopg.connect(f"host=127.0.0.1 user=postgres dbname={dbname}", autocommit=True) as c:
        cur = c.execute(query, args)
        return cur.fetchall() if cur.description else []


# ------------------------------------------------------------------ the command


def test_bad_options_are_refused_and_write_nothing(tmp_path):
    import os

    db = tmp_path / "ledger.db"
    env = {**os.environ, "CASCADE_DATABASE_URL": f"sqlite:///{db}"}
    db_upgrade(env)
    _create(env, "taken")
    config = _config(tmp_path, "http://127.0.0.1:9")
    bad = [
        (["create", "--name", "bad name"], "--name 'bad name'"),
        (["create", "--name", ""], "--name ''"),
        (["create", "--name", "x" * 65], "1-64 characters"),
        (["create", "--name", "taken"], "exists already"),
        (["create", "--name", "a", "--budget-usd", "-1"], "positive number"),
        (["create", "--name", "a", "--budget-usd", "nan"], "positive number"),
        (["create", "--name", "a", "--budget-usd", "ten"], "--budget-usd"),
        (["create", "--name", "a", "--budget-usd", "1", "--period", "year"], "--period 'year'"),
        (["create", "--name", "a", "--period", "day"], "needs --budget-usd"),
        (["create", "--name", "a", "--rpm", "0"], "at least 1"),
        (["create", "--name", "a", "--rpm", "1.5"], "--rpm"),
        (["create", "--name", "a", "--cascades", "qa,,x"], "comma-separated"),
        (["create", "--name", "a", "--cascades", "nope", "--config", str(config)], "nope not in"),
        (["create", "--name", "config-key", "--config", str(config)], "a key of the config"),
        (["create", "--name", "a", "--expires", "2001-01-01"], "in the past"),
        (["create", "--name", "a", "--expires", "soon"], "neither a duration"),
        (["create", "--name", "a", "--expires", "0d"], "at least 1d"),
        (["create", "--name", "a", "--database-url", "sqlite:////nonexistent/x.db"], "does not"),
        (["create", "--name", "a", "--config", str(tmp_path / "none.yaml")], "no such config"),
        (["revoke", "ghost"], "no key named 'ghost'"),
        (["update", "ghost", "--rpm", "5"], "no key named 'ghost'"),
        (["update", "taken"], "nothing to change"),
        (["update", "taken", "--clear", "colour"], "--clear 'colour'"),
        (["update", "taken", "--clear", "rpm", "--rpm", "3"], "give one"),
        (["update", "taken", "--expires", "yesterday"], "neither a duration"),
        (["update", "taken", "--period", "year"], "--period 'year'"),
        (["update", "taken", "--budget-usd", "0"], "positive number"),
        (["update", "taken", "--rpm", "-3"], "at least 1"),
        (["update", "taken", "--cascades", ","], "comma-separated"),
        (["update", "taken", "--clear", "budget", "--period", "day"], "the period is the budget"),
        (["update", "bad name", "--rpm", "3"], "--name 'bad name'"),
        (["list", "--database-url", "sqlite:////nonexistent/x.db"], "does not"),
    ]
    before = db.read_bytes()
    for args, message in bad:
        done = _keys(env, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert message in done.stderr, (args, done.stderr)
        assert db.read_bytes() == before, args  # nothing written
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT name FROM api_keys").fetchall() == [("taken",)]


def test_create_stores_only_a_hash_and_update_and_list(tmp_path):
    import os

    db = tmp_path / "ledger.db"
    env = {**os.environ, "CASCADE_DATABASE_URL": f"sqlite:///{db}"}
    db_upgrade(env)
    secret = _create(env, "team-a", "--budget-usd", "100", "--rpm", "600", "--cascades", "qa")
    with sqlite3.connect(db) as conn:
        row = conn.execute("SELECT key_hash, budget_usd, period, rpm, cascades FROM api_keys")
        assert row.fetchall() == [(hash_secret(secret), 100.0, "month", 600, "qa")]
        assert secret.encode() not in db.read_bytes()
    done = _keys(env, "update", "team-a", "--budget-usd", "5", "--period", "day", "--clear", "rpm")
    assert done.returncode == 0, done.stderr
    listed = _keys(env, "list")
    assert listed.returncode == 0
    assert "team-a" in listed.stdout and "active" in listed.stdout and "day" in listed.stdout
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT budget_usd, period, rpm FROM api_keys").fetchall() == [
            (5.0, "day", None)
        ]


def test_periods_are_calendar_periods_in_utc():
    now = dt.datetime(2026, 12, 2, 14, 30, tzinfo=dt.UTC)  # a Wednesday
    assert period_start("day", now) == dt.datetime(2026, 12, 2, tzinfo=dt.UTC)
    assert period_start("week", now) == dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
    assert period_start("month", now) == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    assert period_end("month", now) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC)
    assert period_end("week", now) == dt.datetime(2026, 12, 7, tzinfo=dt.UTC)


# ------------------------------------------------------------------ through the proxy


def test_keys_end_to_end_create_use_revoke_expire_and_limits(pg_env, tmp_path):
    env, dbname = pg_env
    with fake_upstream("small,large") as up:
        config = _config(tmp_path, up.url)
        alice = _create(env, "alice", "--cascades", "qa")
        ratey = _create(env, "ratey", "--rpm", "3")
        with running_proxy(config, env, cwd=tmp_path, workers=2, ready_s=90) as proxy:
            # both workers have read the keys once four requests in a row are answered
            _until(lambda: [_ask(proxy.url, alice).status_code for _ in range(4)], [200] * 4)
            keys = httpx.get(f"{proxy.url}/health", timeout=10).json()["keys"]
            assert keys == {"loaded": True, "keys": 2, "error": None}
            assert _ask(proxy.url, "sk-config-1").status_code == 200  # config keys still work
            refused = _ask(proxy.url, alice, model="large")
            assert refused.status_code == 403 and refused.json()["error"]["code"] == (
                "model_not_allowed"
            )
            assert _ask(proxy.url, "sk-cascade-nope").status_code == 401
            # rpm 3 across both workers of the instance
            while True:  # six requests within one minute (the window is the clock's minute)
                minute = int(time.time() // 60)
                codes = [_ask(proxy.url, ratey) for _ in range(6)]
                if int(time.time() // 60) == minute:
                    break
                ratey = _create(env, f"ratey-{minute}", "--rpm", "3")  # a fresh key, then
                _until(lambda k=ratey: _ask(proxy.url, k).status_code, 200)
            assert [r.status_code for r in codes].count(200) <= 3, [r.status_code for r in codes]
            limited = [r for r in codes if r.status_code == 429]
            assert limited and limited[0].json()["error"]["code"] == "rate_limited"
            assert 1 <= int(limited[0].headers["retry-after"]) <= 60
            # a key made while the proxy runs works within the refresh interval (both workers)
            bob = _create(env, "bob")
            took = _until(lambda: [_ask(proxy.url, bob).status_code for _ in range(4)], [200] * 4)
            print(f"new key accepted by both workers after {took:.2f} s")
            # revoked: refused within the refresh interval
            assert _keys(env, "revoke", "bob").returncode == 0
            took = _until(
                lambda: [_refusal(proxy.url, bob) for _ in range(4)], ["revoked_api_key"] * 4
            )
            print(f"revoked key refused by both workers after {took:.2f} s")
            # expired
            _sql(
                dbname,
                "UPDATE api_keys SET expires_at = now() - interval '1 s' WHERE name = 'alice'",
            )
            # (each probe may reach either worker: wait until four in a row are refused)
            _until(lambda: [_refusal(proxy.url, alice) for _ in range(4)], ["expired_api_key"] * 4)
    names = dict(_sql(dbname, "SELECT api_key, count(*) FROM ledger_requests GROUP BY api_key"))
    # (requests made while a change was not yet read are answered and ledgered)
    assert names["alice"] >= 1 and names["config-key"] == 1 and names["bob"] >= 4
    assert 1 <= sum(n for k, n in names.items() if k.startswith("ratey")) <= 6


def test_budget_holds_under_concurrent_requests_from_two_instances(pg_env, tmp_path):
    """A key near its budget, 40 concurrent requests through two proxies on one database:
    the ledger holds every answered request's spend, and spend passes the budget by at
    most the bound the README states (the requests in flight at once)."""
    env, dbname = pg_env
    with fake_upstream("small,large") as up:
        httpx.post(f"{up.url}/admin/faults", json={"latency_ms": 200}).raise_for_status()
        config = _config(tmp_path, up.url)
        budget = 0.05
        secret = _create(env, "tight", "--budget-usd", str(budget), "--period", "day")
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with (
            running_proxy(config, env, cwd=tmp_path / "a", ready_s=90) as one,
            running_proxy(config, env, cwd=tmp_path / "b", ready_s=90) as two,
        ):
            urls = [one.url, two.url] * 20
            with ThreadPoolExecutor(16) as pool:
                replies = list(pool.map(lambda u: _ask(u, secret, max_tokens=8), urls))
            codes = [r.status_code for r in replies]
            assert set(codes) <= {200, 429}, codes
            assert 200 in codes and 429 in codes, codes
            refusal = next(r for r in replies if r.status_code == 429).json()["error"]
            assert refusal["code"] == "budget_exceeded" and "resets at" in refusal["message"]
            assert refusal["type"] == "rate_limit_error"
            costs = [
                float(r.headers["x-cascade-cost-usd"]) for r in replies if r.status_code == 200
            ]
            worst = max(costs)
    # the proxies stopped: every record flushed
    rows = _sql(
        dbname, "SELECT count(*), sum(cost_usd) FROM ledger_requests WHERE api_key = 'tight'"
    )
    assert rows[0][0] == codes.count(200)  # every answered request ledgered, none lost
    assert rows[0][1] == pytest.approx(sum(costs))
    # each instance holds its own in-flight requests to the budget; the other instance's
    # (up to 16 at once) and those started within one refresh can pass it
    assert sum(costs) <= budget + 16 * worst, (sum(costs), budget, worst)
    print(
        f"budget {budget}: {len(costs)} answered, {codes.count(429)} refused, "
        f"spend {sum(costs):.6f}"
    )
    daily = _sql(dbname, "SELECT sum(cost_usd) FROM ledger_daily WHERE api_key = 'tight'")
    assert daily[0][0] == pytest.approx(sum(costs))


# ------------------------------------------------------------------ the cache itself


def test_spend_not_yet_in_the_database_counts_and_is_counted_once(tmp_path):
    """A process's spend counts from the moment its record goes to the writer: while queued,
    while the database is down (kept in the spool), and once written it is read from the
    rollups instead, never twice."""
    from proxy.http.errors import ApiError
    from proxy.http.keys import KeyCache
    from proxy.ledger import LedgerWriter
    from proxy.ledger.db import make_engine, upgrade
    from proxy.ledger.keys import create_key
    from proxy.ledger.records import RequestRecord

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    now = dt.datetime.now(dt.UTC)
    engine = make_engine(url)
    create_key(engine, "k", budget_usd=1.0, period="day", rpm=None, cascades=None,
               expires_at=None, now=now)  # fmt: skip
    engine.dispose()
    cache = KeyCache(lambda: make_engine(url), refresh_s=60)
    cache.refresh()
    (key,) = cache.by_hash.values()
    cache.reserve(key, "r1", 0.5, now)  # in flight: 0.5 reserved
    with pytest.raises(ApiError) as refused:
        cache.reserve(key, "r2", 0.6, now)
    assert refused.value.code == "budget_exceeded" and "resets at" in refused.value.message
    record = RequestRecord(
        request_id="r1", ts=time.time(), api_key="sk-x", key_label="k", cascade="qa",
        model_requested="qa", policy_hash=None, status=200, chosen_model="small", n_calls=1,
        tokens_in=1, tokens_out=1, cost_usd=0.7, reference_cost_usd=0.7, latency_ms=1.0,
        overhead_ms=0.0, error=None,
    )  # fmt: skip
    cache.note(record)  # r1 ended: its reservation gives way to its cost, not yet written
    assert cache.spent(key, now) == pytest.approx(0.7)
    with pytest.raises(ApiError):
        cache.reserve(key, "r3", 0.4, now)
    cache.refresh()  # the database does not have it: it still counts
    assert cache.spent(key, now) == pytest.approx(0.7)
    cache._engine = make_engine("postgresql://postgres@127.0.0.1:1/none?connect_timeout=1")
    cache.refresh()  # the database is down: the last view stays, and so does the spend
    assert cache.last_error and cache.spent(key, now) == pytest.approx(0.7)
    writer = LedgerWriter(url, tmp_path / "spool.jsonl", flush_interval_s=0.05).start()
    writer.submit(record)
    writer.close()
    cache._engine = make_engine(url)
    cache.refresh()  # now in the rollups, and no longer counted as unwritten
    assert cache.last_error is None and cache.spent(key, now) == pytest.approx(0.7)
    cache.reserve(key, "r4", 0.3, now)  # 0.7 + 0.3 is within 1.0
    cache.stop()


def test_rate_limit_is_shared_by_limiters_on_one_folder(tmp_path):
    """Two workers' limiters on the folder they share count one window per key."""
    from proxy.http.errors import ApiError
    from proxy.http.keys import RateLimiter

    a, b = RateLimiter(tmp_path), RateLimiter(tmp_path)
    t = 120.0 * 60 + 10  # 10 s into a minute
    a.hit("k", 3, t)
    b.hit("k", 3, t)
    a.hit("k", 3, t)
    with pytest.raises(ApiError) as limited:
        b.hit("k", 3, t)
    assert limited.value.code == "rate_limited" and limited.value.headers == {"Retry-After": "50"}
    a.hit("other", 3, t)  # per key
    b.hit("k", 3, t + 60)  # the next minute starts afresh


def test_a_database_key_named_like_a_config_key_is_ignored(tmp_path):
    """Names are unique across the config and the database: a proxy ignores a database key
    whose name one of its config keys has (`keys create --config` refuses it to begin with)."""
    from proxy.http.keys import KeyCache
    from proxy.ledger.db import make_engine, upgrade
    from proxy.ledger.keys import create_key

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    now = dt.datetime.now(dt.UTC)
    made = {
        name: create_key(
            engine,
            name,
            budget_usd=None,
            period=None,
            rpm=None,
            cascades=None,
            expires_at=None,
            now=now,
        )
        for name in ("alice", "bob")
    }
    engine.dispose()
    cache = KeyCache(lambda: make_engine(url), reserved_names=frozenset({"alice"}))
    cache.refresh()
    assert cache.lookup(made["alice"]) is None
    assert cache.lookup(made["bob"]).name == "bob"
    assert cache.accepts(made["bob"]) and not cache.accepts(made["alice"])
    cache.stop()
