"""Ledger reports on SQLite and PostgreSQL against hand-computed figures; the `cascade report`
CLI in every format; the admin-only GET /v1/cascade/reports/{name} endpoint."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from proxy.ledger import LedgerWriter, key_id, make_engine, upgrade
from proxy.ledger.reports import (
    ReportError,
    errors,
    exits,
    latency,
    parse_since,
    percentile,
    savings,
    spend,
)
from tests.test_ledger import D1, call, known_set, pg_db, request  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
ALL = "2025-01-01"  # a UTC midnight: spend reads ledger_daily
# not a midnight: spend reads 2025-03-01 from the detail rows (every D1 request, from 10:00)
# and the later days (D2) from ledger_daily
ALL_DETAIL = "2025-03-01T09:00:00"
ALICE, BOB, CAROL = key_id("sk-alice"), key_id("sk-bob"), key_id("sk-carol")


def records():
    """test_ledger's seven requests plus R8 (recalled: answered by its first model), with
    distinct call latencies: small 10..60 ms, big 100..300 ms, in order of appearance."""
    recs = known_set()
    recs.append(
        request(
            "R8",
            D1,
            "sk-carol",
            "qa",
            "small",
            [
                call(0, "small", 0.001, 10, 10, decision="continue:big"),
                call(1, "big", 0.002, 10, 10),
            ],
            ref=0.01,
        )
    )
    lat = {"small": iter([10, 20, 30, 40, 50, 60]), "big": iter([100, 200, 300])}
    for r in recs:
        for c in r.calls:
            c.latency_ms = float(next(lat[c.model]))
    return recs


def _fill(url: str, tmp_path: Path) -> None:
    upgrade(url)
    writer = LedgerWriter(url, tmp_path / "spool.jsonl", flush_interval_s=0.05).start()
    for r in records():
        writer.submit(r)
    assert writer.flush(10.0)
    writer.close()
    assert writer.stats()["written"] == 8


@pytest.fixture(params=["sqlite", "postgresql"])
def filled(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.db'}"
    else:
        url = request.getfixturevalue("pg_db")[1]
    _fill(url, tmp_path)
    engine = make_engine(url)
    yield engine, url
    engine.dispose()


def by_group(report) -> dict:
    return {r["group"]: r for r in report.rows}


# --------------------------------------------------------------------------- reports


@pytest.mark.parametrize("since", [ALL, ALL_DETAIL])
def test_spend_by_model_cascade_key_day(filled, since):
    engine, _ = filled
    rep = spend(engine, since, "model")
    assert rep.source == ("ledger_daily" if since == ALL else "ledger_daily+detail")
    rows = by_group(rep)
    assert set(rows) == {"big", "small", "(none)"}
    big, small, none = rows["big"], rows["small"], rows["(none)"]
    assert rep.columns[:3] == ["group", "requests_answered", "calls_made"]  # named as counted
    assert any(n.startswith("by model: requests_answered counts") for n in rep.notes)
    counts = ("requests_answered", "calls_made", "tokens_in", "tokens_out")
    assert tuple(big[c] for c in counts) == (3, 3, 167, 108)
    assert big["cost_usd"] == pytest.approx(0.015)
    assert (big["unpriced_calls"], big["flag"]) == (0, "")
    assert tuple(small[c] for c in counts) == (3, 6, 250, 80)
    assert small["cost_usd"] == pytest.approx(0.0029)
    assert (small["unpriced_calls"], small["flag"]) == (2, "unpriced")
    assert (none["requests_answered"], none["calls_made"], none["cost_usd"]) == (2, 0, 0.0)
    assert rep.unpriced_models == ["small"]
    assert any("unpriced: small" in n for n in rep.notes)

    rows = by_group(spend(engine, since, "cascade"))
    assert {g: (r["requests"], r["calls"]) for g, r in rows.items()} == {
        "math": (5, 6),
        "code": (1, 1),
        "qa": (1, 2),
        "(none)": (1, 0),
    }
    assert rows["math"]["cost_usd"] == pytest.approx(0.0118)
    assert rows["qa"]["cost_usd"] == pytest.approx(0.003)
    assert rows["(none)"]["cost_usd"] == pytest.approx(0.003)
    assert rows["math"]["flag"] == "unpriced" and rows["qa"]["flag"] == ""

    rows = by_group(spend(engine, since, "key"))
    assert {g: (r["requests"], r["calls"]) for g, r in rows.items()} == {
        ALICE: (4, 5),
        BOB: (3, 2),
        CAROL: (1, 2),
    }
    assert rows[ALICE]["cost_usd"] == pytest.approx(0.0118)
    assert rows[BOB]["cost_usd"] == pytest.approx(0.0031)

    rows = by_group(spend(engine, since, "day"))
    assert (rows["2025-03-01"]["requests"], rows["2025-03-01"]["calls"]) == (6, 8)
    assert rows["2025-03-01"]["cost_usd"] == pytest.approx(0.0148)
    assert (rows["2025-03-02"]["requests"], rows["2025-03-02"]["calls"]) == (2, 1)
    assert rows["2025-03-02"]["cost_usd"] == pytest.approx(0.0031)


def test_spend_window_excludes_older_requests(filled):
    engine, _ = filled
    for since in ("2025-03-02", "2025-03-02T12:00:00+00:00"):
        rows = by_group(spend(engine, since, "cascade"))
        assert {g: r["requests"] for g, r in rows.items()} == {"code": 1, "(none)": 1}
    assert spend(engine, "2099-01-01", "model").rows == []


def test_savings(filled):
    engine, _ = filled
    rep = savings(engine, ALL, "cascade")
    rows = by_group(rep)
    math = rows["math"]
    assert (math["requests"], math["compared"], math["no_reference"]) == (5, 2, 2)
    assert math["cost_usd"] == pytest.approx(0.0078)
    assert math["reference_cost_usd"] == pytest.approx(0.022)
    assert math["saved_usd"] == pytest.approx(0.0142)
    assert math["saved_fraction"] == pytest.approx(0.0142 / 0.022, abs=1e-6)
    assert (math["unpriced_requests"], math["flag"]) == (2, "unpriced")
    assert rows["qa"]["saved_usd"] == pytest.approx(0.007)
    assert rows["qa"]["saved_fraction"] == pytest.approx(0.7)
    assert rows["code"]["saved_usd"] == pytest.approx(0.0199)
    none = rows["(none)"]
    assert (none["compared"], none["saved_usd"], none["no_reference"]) == (0, None, 1)
    assert any("3 request(s) had no reference price" in n for n in rep.notes)
    assert rep.unpriced_models == ["small"]


def test_exits_and_recall_rate(filled):
    engine, _ = filled
    rep = exits(engine, ALL, "cascade")
    rows = {(r["group"], r["kind"], r["value"]): r for r in rep.rows}
    assert rows[("math", "n_calls", "2")]["requests"] == 2
    assert rows[("math", "n_calls", "2")]["share"] == pytest.approx(0.4)
    assert rows[("math", "n_calls", "1")]["requests"] == 2
    assert rows[("math", "n_calls", "0")]["share"] == pytest.approx(0.2)
    assert rows[("math", "chosen_model", "big")]["requests"] == 2
    assert rows[("math", "chosen_model", "(none)")]["requests"] == 2
    assert rows[("math", "chosen_model", "small")]["flag"] == "unpriced"
    # math: R1, R2, R3 answered by their last call; R4 unanswered is not counted
    assert (
        rows[("math", "recalled", "yes")]["requests"],
        rows[("math", "recalled", "yes")]["share"],
    ) == (0, 0.0)
    # qa: R8 returned small's answer after calling big
    assert rows[("qa", "recalled", "yes")]["requests"] == 1
    assert rows[("qa", "recalled", "yes")]["share"] == pytest.approx(1.0)
    assert rep.unpriced_models == ["small"]


def test_exits_recall_is_judged_against_the_last_call_row(filled, tmp_path):
    """The last call is the one with the highest call_order, whatever n_calls says (a tier's
    members are one node but several call rows) and however often a model was called."""
    engine, url = filled
    edge = [
        # small, big, small again, answered by small: its last call; not recalled
        request("E1", D1, "sk-dave", "edge", "small",
                [call(0, "small", 0.001), call(1, "big", 0.002), call(2, "small", 0.001)]),
        # answered by a model it never called: not the last one called
        request("E2", D1, "sk-dave", "edge", "other", [call(0, "small", 0.001),
                                                       call(1, "big", 0.002)]),
        # big first, then small; big's answer returned
        request("E3", D1, "sk-dave", "edge", "big", [call(0, "big", 0.002),
                                                     call(1, "small", 0.001)]),
        # one node, a tier of two members: two call rows; the first member's answer
        request("E4", D1, "sk-dave", "edge", "small", [call(0, "small", 0.001),
                                                       call(1, "big", 0.002)]),
    ]  # fmt: skip
    edge[3].n_calls = 1
    writer = LedgerWriter(url, tmp_path / "edge-spool.jsonl", flush_interval_s=0.05).start()
    for r in edge:
        writer.submit(r)
    assert writer.flush(10.0)
    writer.close()
    rows = {(r["group"], r["kind"], r["value"]): r for r in exits(engine, ALL, "cascade").rows}
    assert rows[("edge", "recalled", "yes")]["requests"] == 3
    assert rows[("edge", "recalled", "yes")]["share"] == pytest.approx(0.75)
    assert rows[("edge", "n_calls", "1")]["requests"] == 1
    assert rows[("edge", "n_calls", "2")]["requests"] == 2
    assert rows[("qa", "recalled", "yes")]["requests"] == 1  # the others are unchanged
    assert rows[("math", "recalled", "yes")]["requests"] == 0


def test_latency_percentiles(filled):
    engine, _ = filled
    rep = latency(engine, ALL, "model")
    rows = {r["group"]: r for r in rep.rows}
    overall = rows["(all)"]
    assert (overall["n"], overall["p50_ms"]) == (8, 100.0)
    assert (rows["small"]["n"], rows["small"]["p50_ms"]) == (6, 35.0)
    assert rows["small"]["p95_ms"] == pytest.approx(57.5)
    assert rows["small"]["flag"] == "unpriced"
    assert rows["big"]["p50_ms"] == pytest.approx(200.0)
    assert rows["big"]["p99_ms"] == pytest.approx(298.0)
    assert rows["big"]["mean_ms"] == pytest.approx(200.0)
    rows = {r["group"]: r for r in latency(engine, ALL, "cascade").rows}
    assert rows["(none)"]["p50_ms"] == 5.0 and rows["math"]["n"] == 5


def test_errors(filled):
    engine, _ = filled
    rep = errors(engine, ALL, "model")
    rows = {(r["scope"], r["group"]): r for r in rep.rows}
    small = rows[("call", "small")]
    assert (small["total"], small["failed"]) == (6, 1)
    assert small["failure_rate"] == pytest.approx(1 / 6, abs=1e-6)
    assert small["breakdown"] == "ok:5, timeout:1"
    assert small["flag"] == "unpriced"
    assert (rows[("call", "big")]["failed"], rows[("call", "big")]["failure_rate"]) == (0, 0.0)
    none = rows[("request", "(none)")]
    assert (none["total"], none["failed"], none["breakdown"]) == (2, 2, "400:1, 502:1")
    rows = {(r["scope"], r["group"]): r for r in errors(engine, ALL, "cascade").rows}
    assert rows[("request", "math")]["failure_rate"] == pytest.approx(0.4)
    assert rows[("call", "math")]["failed"] == 1


def test_inputs():
    now = parse_since("2025-03-02T00:00:00+00:00")
    assert parse_since("7d", now).isoformat() == "2025-02-23T00:00:00+00:00"
    assert parse_since("24h", now).isoformat() == "2025-03-01T00:00:00+00:00"
    assert parse_since("30m", now).isoformat() == "2025-03-01T23:30:00+00:00"
    assert parse_since("2025-03-05").isoformat() == "2025-03-05T00:00:00+00:00"
    with pytest.raises(ReportError):
        parse_since("yesterday")
    with pytest.raises(ReportError):
        spend(None, "7d", "week")
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert percentile([], 0.5) is None


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "report", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "HOME": str(REPO)},
    )


def test_cli_formats(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _fill(url, tmp_path)
    out = _cli(
        "spend", "--since", ALL, "--by", "cascade", "--format", "json", "--database-url", url
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    rows = {r["group"]: r for r in doc["rows"]}
    assert rows["math"]["requests"] == 5 and rows["math"]["cost_usd"] == pytest.approx(0.0118)
    assert doc["unpriced_models"] == ["small"] and doc["source"] == "ledger_daily"

    out = _cli("errors", "--since", ALL, "--format", "csv", "--database-url", url)
    assert out.returncode == 0, out.stderr
    rows = {(r["scope"], r["group"]): r for r in csv.DictReader(io.StringIO(out.stdout))}
    assert (
        rows[("call", "small")]["failed"] == "1" and rows[("call", "small")]["flag"] == "unpriced"
    )
    assert "unpriced: small" in out.stderr

    out = _cli("savings", "--since", ALL, "--format", "table", "--database-url", url)
    assert out.returncode == 0, out.stderr
    assert "math" in out.stdout and "0.0142" in out.stdout and "unpriced: small" in out.stdout


def test_cli_bad_options_and_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    for args in (["--by", "week"], ["--since", "yesterday"], ["--format", "xml"]):
        out = _cli("spend", *args, "--database-url", url)
        assert out.returncode == 2 and out.stderr.startswith("error:"), (args, out.stderr)
    out = _cli("spend", "--database-url", f"sqlite:///{tmp_path / 'empty.db'}")
    assert out.returncode == 2 and "cascade db upgrade" in out.stderr, out.stderr


# --------------------------------------------------------------------------- endpoint


def test_admin_endpoint(tmp_path, monkeypatch):
    from proxy import demo
    from proxy.config import parse_config
    from proxy.http.app import create_app
    from proxy.http.state import build_state

    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    _fill(url, tmp_path)
    monkeypatch.setenv("CASCADE_DATABASE_URL", url)
    monkeypatch.setenv("TEST_REPORTS_ADMIN", "admin-secret")
    config = parse_config(
        {
            "models": {demo.SMALL: {"backend": "replay", "traces": [str(demo.TRAIN)]}},
            "server": {"api_keys": ["client-key"], "admin_key_env": "TEST_REPORTS_ADMIN"},
        }
    )
    state = build_state(config)
    with TestClient(create_app(state)) as client:
        path = f"/v1/cascade/reports/spend?since={ALL}&by=model"
        r = client.get(path)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = client.get(path, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = client.get(path, headers={"Authorization": "Bearer client-key"})
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
        admin = {"Authorization": "Bearer admin-secret"}
        r = client.get("/v1/cascade/reports/nope", headers=admin)
        assert r.status_code == 404 and "nope" in r.json()["error"]["message"]
        r = client.get(path, headers=admin)
        assert r.status_code == 200, r.text
        rows = {row["group"]: row for row in r.json()["rows"]}
        big = rows["big"]
        assert big["requests_answered"] == 3 and big["cost_usd"] == pytest.approx(0.015)
        assert r.json()["unpriced_models"] == ["small"]
        r = client.get(f"/v1/cascade/reports/exits?since={ALL}", headers=admin)
        recalled = [x for x in r.json()["rows"] if x["kind"] == "recalled" and x["group"] == "qa"]
        assert recalled[0]["share"] == pytest.approx(1.0)
        r = client.get("/v1/cascade/reports/spend?by=week", headers=admin)
        assert r.status_code == 400
