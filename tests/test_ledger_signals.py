"""Each call's token-logprob summary in the ledger (`ledger_calls.lp_mean`, `lp_min`,
`lp_q05`, `lp_q25`, migration 0004): the migration up and down on SQLite and PostgreSQL
keeping the rows, the spool carrying the summary (and replaying spools written before it),
and end to end through the real proxy and fake upstream: the ledger holds the summary the
response's `cascade` object shows, and NULLs for a call without logprobs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import inspect, select, text

from policies.freetext import logprob_summary
from proxy.ledger import LedgerWriter, check_schema, downgrade, head_revision, make_engine, upgrade
from proxy.ledger.records import CallRecord, RequestRecord
from proxy.ledger.schema import LedgerCall
from proxy.ledger.spool import encode
from tests.serving import db_upgrade, fake_upstream, running_proxy, write_config
from tests.test_ledger import db_url, pg_db  # noqa: F401  (the fixtures)

LP_COLUMNS = ("lp_mean", "lp_min", "lp_q05", "lp_q25")
KEY = "sk-test-signals"
# 40 token logprobs whose mean, minimum and quantiles all differ
LOGPROBS = [round(-0.05 * k * k / 7.0, 6) for k in range(40)]
ANSWER = " ".join(f"word{k}" for k in range(40))


def _record(rid: str, summary: tuple[float, float, float, float] | None) -> RequestRecord:
    lp = dict(zip(LP_COLUMNS, summary, strict=True)) if summary else {}
    call = CallRecord(
        order=0, model="small", backend="openai", status="ok", http_status=200, tokens_in=5,
        tokens_out=20, cost_usd=1e-6, latency_ms=10.0, ttft_ms=None, confidence=-0.3,
        p_correct=0.7, agreement=None, decision="stop", error=None, node=0, **lp,
    )  # fmt: skip
    return RequestRecord(
        request_id=rid, ts=time.time(), api_key=None, cascade="chat", model_requested="chat",
        policy_hash=None, status=200, chosen_model="small", n_calls=1, tokens_in=5,
        tokens_out=20, cost_usd=1e-6, reference_cost_usd=None, latency_ms=12.0,
        overhead_ms=0.5, error=None, calls=[call],
    )  # fmt: skip


def _lp_rows(url: str) -> dict[str, tuple]:
    """request_id -> (lp_mean, lp_min, lp_q05, lp_q25) of each call row (call 0)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            cols = [LedgerCall.request_id, *(getattr(LedgerCall, c) for c in LP_COLUMNS)]
            return {r[0]: tuple(r[1:]) for r in conn.execute(select(*cols))}
    finally:
        engine.dispose()


def _columns(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return {c["name"] for c in inspect(engine).get_columns("ledger_calls")}
    finally:
        engine.dispose()


def _write(url: str, tmp_path: Path, records: list[RequestRecord]) -> None:
    w = LedgerWriter(url, tmp_path / "spool.jsonl", flush_interval_s=0.02, check_schema=True)
    w.start()
    for r in records:
        w.submit(r)
    assert w.flush(20.0)
    w.close()
    st = w.stats()
    assert (st["written"], st["rejected"], st["spool_backlog"]) == (len(records), 0, 0), st


def test_the_logprob_migration_goes_up_and_down_keeping_the_rows(db_url, tmp_path):  # noqa: F811
    """0004 adds the four nullable columns to ledger_calls (rows written before it read
    NULL), and down to 0003 drops exactly them, keeping every row."""
    assert head_revision() == "0004"
    assert upgrade(db_url, "0003") == "0003"
    assert not set(LP_COLUMNS) & _columns(db_url)
    engine = make_engine(db_url)
    try:  # a call row written at 0003 (the writer of this version writes the new columns)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO ledger_requests (request_id, ts, day, model_requested, status,"
                    " n_calls, tokens_in, tokens_out, latency_ms, overhead_ms, stream) VALUES "
                    "('old', :ts, :day, 'chat', 200, 1, 5, 20, 1.0, 0.1, false)"
                ),
                {"ts": "2026-12-01 10:00:00", "day": "2026-12-01"},
            )
            conn.execute(
                text(
                    "INSERT INTO ledger_calls (request_id, call_order, ts, model, status) "
                    "VALUES ('old', 0, :ts, 'small', 'ok')"
                ),
                {"ts": "2026-12-01 10:00:00"},
            )
    finally:
        engine.dispose()

    assert upgrade(db_url) == "0004"
    assert check_schema(db_url) == "0004"
    assert set(LP_COLUMNS) <= _columns(db_url)
    summary = logprob_summary(LOGPROBS)
    assert summary is not None and len(set(summary)) == 4
    _write(db_url, tmp_path, [_record("new", summary), _record("none", None)])
    rows = _lp_rows(db_url)
    assert rows["old"] == (None,) * 4 and rows["none"] == (None,) * 4
    assert rows["new"] == pytest.approx(summary, abs=1e-12)

    assert downgrade(db_url, "0003") == "0003"
    assert not set(LP_COLUMNS) & _columns(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            ids = conn.execute(text("SELECT request_id FROM ledger_calls")).scalars().all()
    finally:
        engine.dispose()
    assert sorted(ids) == ["new", "none", "old"]
    assert upgrade(db_url) == "0004"  # and up again
    assert _lp_rows(db_url)["new"] == (None,) * 4  # (the values went with the columns)


def test_the_spool_carries_the_summary_and_old_spools_still_replay(db_url, tmp_path):  # noqa: F811
    """A spool written before the lp_* fields existed (its call dicts lack them) replays with
    NULLs beside a new record whose values arrive intact."""
    upgrade(db_url)
    summary = logprob_summary(LOGPROBS)
    assert summary is not None
    new = _record("spooled-new", summary)
    line = json.loads(encode([new]))
    assert [line["calls"][0][c] for c in LP_COLUMNS] == list(summary)
    assert RequestRecord.from_dict(line) == new  # the spool form round-trips
    old = json.loads(encode([_record("spooled-old", None)]))
    for c in LP_COLUMNS:
        del old["calls"][0][c]  # as written by the previous version
    spool = tmp_path / "spool.jsonl"
    spool.write_bytes(json.dumps(old).encode() + b"\n" + encode([new]))

    w = LedgerWriter(db_url, spool, flush_interval_s=0.02, check_schema=True).start()
    try:
        deadline = time.monotonic() + 20
        while w.stats()["replayed"] < 2:
            assert time.monotonic() < deadline, w.stats()
            time.sleep(0.05)
    finally:
        w.close()
    assert w.stats()["rejected"] == 0
    rows = _lp_rows(db_url)
    assert rows["spooled-old"] == (None,) * 4
    assert rows["spooled-new"] == pytest.approx(summary, abs=1e-12)


# ---------------------------------------------------------------- through the proxy


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return request.getfixturevalue("pg_db")[1]


def _ask(url: str, model: str, prompt: str) -> httpx.Response:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": prompt}]},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30.0,
    )
    assert r.status_code == 200, r.text
    return r


def _ledgered(url: str, request_id: str) -> tuple:
    """The lp_* of the request's one call row, once the writer has written it."""
    for _ in range(200):  # the writer flushes off the request path
        rows = _lp_rows(url)
        if request_id in rows:
            return rows[request_id]
        time.sleep(0.05)
    raise AssertionError(f"{request_id} never reached the ledger")


def test_the_ledger_holds_the_summary_the_response_shows(ledger_url, tmp_path):
    """`lp` asks `small` (its upstream sends token logprobs), `plain` asks `big` (configured
    with `logprobs: false`, so it sends none): the ledger rows hold the summary of the
    response's cascade object to 1e-9, and NULLs; a passthrough call to `small` is ledgered
    with the summary of the same logprobs."""
    prompt = "Describe the forty words."
    env = {**os.environ, "CASCADE_DATABASE_URL": ledger_url}
    db_upgrade(env)
    with fake_upstream("small,big", log=tmp_path / "upstream.txt") as up:
        answers = [
            {"model": "small", "answer": ANSWER, "prompt": prompt, "token_logprobs": LOGPROBS},
            {"model": "big", "answer": ANSWER.upper(), "confidence": -0.2},
        ]
        httpx.post(f"{up.url}/admin/answers", json=answers, timeout=5).raise_for_status()
        model = {"backend": "openai", "base_url": f"{up.url}/v1", "max_retries": 0,
                 "price_in_per_mtok": 1.0, "price_out_per_mtok": 1.0}  # fmt: skip
        config = {
            "models": {"small": model, "big": {**model, "logprobs": False}},
            "cascades": {
                "lp": {"nodes": ["small"], "reference": "small"},
                "plain": {"nodes": ["big"], "reference": "big"},
            },
            "server": {"api_keys": [KEY]},
        }
        with running_proxy(write_config(tmp_path, config), env, cwd=tmp_path) as proxy:
            with_lp = _ask(proxy.url, "lp", prompt)
            without = _ask(proxy.url, "plain", prompt)
            passthrough = _ask(proxy.url, "small", prompt)
            shown = with_lp.json()["cascade"]["calls"]
            assert [c["model"] for c in shown] == ["small"]
            summary = shown[0]["logprob_summary"]
            assert tuple(summary.values()) == pytest.approx(logprob_summary(LOGPROBS), abs=1e-9)
            assert "logprob_summary" not in without.json()["cascade"]["calls"][0]

            row = _ledgered(ledger_url, with_lp.headers["x-request-id"])
            assert row == pytest.approx(
                (summary["mean"], summary["min"], summary["q05"], summary["q25"]), abs=1e-9
            )
            assert _ledgered(ledger_url, without.headers["x-request-id"]) == (None,) * 4
            assert _ledgered(ledger_url, passthrough.headers["x-request-id"]) == pytest.approx(
                logprob_summary(LOGPROBS), abs=1e-9
            )
