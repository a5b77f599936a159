"""Report figures against sums worked out by hand from what the real proxy answered.

A real `cascade serve` process (SQLite ledger in a temporary folder) in front of the local
fake upstream serves a known set of requests: confident answers, escalations, a recalled
answer, a failing first node, a request every node fails, pass-throughs (one streamed, one to
a model with no known price) and a request for an unknown model (refused, never ledgered).
Each response's `cascade` object, `x-cascade-cost-usd` header and usage are what the figures
are summed from; `cascade report spend|savings|exits --format json` (the console script) and
the admin endpoint `GET /v1/cascade/reports/...` must show exactly those sums.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from proxy.ledger.records import key_id
from tests.serving import (
    CASCADE,
    QUESTION,
    db_upgrade,
    fake_upstream,
    running_proxy,
    sqlite_env,
    write_config,
)

ALICE, BOB, ADMIN = "sk-alice-reports", "sk-bob-reports", "admin-reports-secret"
PRICES = {"small": (2.0, 8.0), "large": (30.0, 60.0)}  # USD per million tokens, in and out
UNPRICED = "mystery-7b"  # served by the upstream, priced nowhere


@dataclass
class Seen:
    """One request as the client saw it."""

    key: str
    cascade: str | None
    status: int
    chosen: str | None
    calls: list[tuple[str, str, float | None]]  # (model, "ok" or the error, cost or None)
    tokens: tuple[int, int] = (0, 0)
    cost: float | None = None
    reference: float | None = None
    recalled: bool = False


@dataclass
class Served:
    url: str
    upstream: str
    ledger: Path
    seen: list[Seen] = field(default_factory=list)


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    with fake_upstream(f"small,large,{UNPRICED}") as up:
        yield up.url


@pytest.fixture(scope="module")
def served(upstream: str, policy: Path, tmp_path_factory) -> Served:
    """`cascade serve` over `small` -> `large` (policy fitted on the synthetic traces, as in
    test_proxy_e2e), every request of the known set already made and ledgered."""
    folder = tmp_path_factory.mktemp("reports-proxy")
    models = {
        name: {
            "backend": "openai",
            "base_url": f"{upstream}/v1",
            "price_in_per_mtok": pin,
            "price_out_per_mtok": pout,
            "timeout_s": 2.0,
            "max_retries": 0,
        }
        for name, (pin, pout) in PRICES.items()
    }
    models[UNPRICED] = {"backend": "openai", "base_url": f"{upstream}/v1", "timeout_s": 2.0}
    config = {
        "models": models,
        "cascades": {
            "qa": {"nodes": ["small", "large"], "reference": "large", "policy": str(policy)}
        },
        "server": {"api_keys": [ALICE, BOB], "admin_key_env": "TEST_REPORTS_PROXY_ADMIN"},
    }
    ledger = folder / "ledger.db"
    env = sqlite_env(ledger, TEST_REPORTS_PROXY_ADMIN=ADMIN)
    db_upgrade(env)
    with running_proxy(write_config(folder, config), env) as proxy:
        s = Served(proxy.url, upstream, ledger)
        make_the_known_requests(s)
        _wait_ledgered(ledger, len(s.seen))
        yield s


# --------------------------------------------------------------------------- requests


def make_the_known_requests(s: Served) -> None:
    up = httpx.Client(base_url=s.upstream, timeout=5.0)
    client = httpx.Client(base_url=s.url, timeout=20.0)

    def answers(small: tuple[str, float], large: tuple[str, float]) -> None:
        up.delete("/admin/faults").raise_for_status()
        for model, (text, confidence) in (("small", small), ("large", large)):
            body = {"model": model, "answer": text, "confidence": confidence}
            up.post("/admin/answers", json=body).raise_for_status()

    def cascade(key: str, **extra) -> dict:
        body = {"model": "qa", "messages": [{"role": "user", "content": QUESTION}], **extra}
        r = client.post("/v1/chat/completions", json=body, headers=_auth(key))
        seen = _from_cascade_response(key, r)
        s.seen.append(seen)
        return r.json()

    # 1-2. confident small answers alone (the second with a longer answer)
    answers(("B", -0.01), ("B", -0.01))
    assert _calls(cascade(ALICE)) == ["small"]
    answers(("The answer is (B) because two.", -0.01), ("B", -0.01))
    assert _calls(cascade(BOB)) == ["small"]
    # 3-4. an unconfident small model escalates; large answers
    answers(("C", -2.5), ("B", -0.05))
    assert _calls(cascade(ALICE)) == ["small", "large"]
    assert _calls(cascade(ALICE, max_tokens=50)) == ["small", "large"]
    # 5. accuracy only (lambda 1): both called; the unsure large disagrees, so small's
    #    answer is the better one and is recalled
    answers(("B", -0.01), ("C", -3.0))
    recalled = cascade(ALICE, cascade={"lambda": 1.0})
    assert _calls(recalled) == ["small", "large"]
    assert recalled["cascade"]["answer_is_last"] is False and recalled["model"] == "small"
    # 6. the first node fails (HTTP 500, no cost known), large answers
    answers(("B", -0.01), ("B", -0.01))
    up.post("/admin/faults", json={"model": "small", "error_rate": 1.0, "error_status": 500})
    failing_first = cascade(BOB)
    assert [c["status"] for c in failing_first["cascade"]["calls"]] == ["http_500", "ok"]
    # 7. every node fails: a 502 with the attempts, no answer, no reference
    up.post("/admin/faults", json={"error_rate": 1.0, "error_status": 500})
    assert "attempts" in cascade(ALICE)["error"]
    up.delete("/admin/faults").raise_for_status()

    # 8. pass-through to large, priced: the header gives its cost
    body = {"model": "large", "messages": [{"role": "user", "content": QUESTION}]}
    r = client.post("/v1/chat/completions", json=body, headers=_auth(BOB))
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    cost = float(r.headers["x-cascade-cost-usd"])
    assert cost == pytest.approx(_price("large", usage), abs=1e-8)  # what the config says
    s.seen.append(_passthrough(BOB, "large", usage, cost))
    # 9. pass-through to small, streamed: no header can carry the cost; the usage chunk and
    #    the configured prices give it
    body = {**body, "model": "small", "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=_auth(ALICE)) as r:
        assert r.status_code == 200
        assert "x-cascade-cost-usd" not in r.headers
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    usage = json.loads(events[-2])["usage"]
    s.seen.append(_passthrough(ALICE, "small", usage, _price("small", usage)))
    # 10. pass-through to a model with no known price: cost unknown, never 0
    body = {"model": UNPRICED, "messages": [{"role": "user", "content": QUESTION}]}
    r = client.post("/v1/chat/completions", json=body, headers=_auth(BOB))
    assert r.status_code == 200 and "x-cascade-cost-usd" not in r.headers
    s.seen.append(_passthrough(BOB, UNPRICED, r.json()["usage"], None))
    # refused before any upstream call: not ledgered
    r = client.post("/v1/chat/completions", json={**body, "model": "gpt-9"}, headers=_auth(BOB))
    assert r.status_code == 404
    up.close()
    client.close()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _calls(response: dict) -> list[str]:
    return [c["model"] for c in response["cascade"]["calls"]]


def _price(model: str, usage: dict) -> float:
    pin, pout = PRICES[model]
    return (usage["prompt_tokens"] * pin + usage["completion_tokens"] * pout) / 1e6


def _from_cascade_response(key: str, r: httpx.Response) -> Seen:
    body = r.json()
    if r.status_code != 200:  # every node failed: the attempts are all there is
        assert r.status_code == 502, r.text
        attempts = body["error"]["attempts"]
        calls = [(a["model"], a["error"], 0.0) for a in attempts]  # failed: nothing billed
        return Seen(key, "qa", 502, None, calls, cost=0.0)
    extra = body["cascade"]
    calls = [(c["model"], c["status"], c["cost_usd"]) for c in extra["calls"]]
    header = r.headers["x-cascade-cost-usd"]
    if extra["cost_usd"] is None:
        assert header == "unknown"
    else:
        assert float(header) == pytest.approx(extra["cost_usd"], abs=1e-8)
    usage = body["usage"]
    return Seen(
        key,
        "qa",
        200,
        body["model"],
        calls,
        (usage["prompt_tokens"], usage["completion_tokens"]),
        extra["cost_usd"],
        extra["reference_cost_usd"],
        recalled=not extra["answer_is_last"],
    )


def _passthrough(key: str, model: str, usage: dict, cost: float | None) -> Seen:
    tokens = (usage["prompt_tokens"], usage["completion_tokens"])
    # a pass-through is its own reference: it saves nothing
    return Seen(key, None, 200, model, [(model, "ok", cost)], tokens, cost, cost)


def _wait_ledgered(ledger: Path, n: int, seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        with sqlite3.connect(ledger) as db:
            have = db.execute("SELECT count(*) FROM ledger_requests").fetchone()[0]
        if have >= n or time.monotonic() > deadline:
            assert have == n, f"{have} ledgered requests, expected {n}"
            return
        time.sleep(0.05)


# --------------------------------------------------------------------------- by hand


def _group(s: Seen, by: str, model: str | None = None) -> str:
    value = {
        "model": model,
        "cascade": s.cascade,
        "key": key_id(s.key),
    }[by]
    return value or "(none)"


def _add(a: float | None, b: float | None) -> float | None:
    return a if b is None else (b if a is None else a + b)


def spend_by_hand(seen: list[Seen], by: str) -> dict[str, dict]:
    out: dict[str, dict] = defaultdict(
        lambda: {"requests": 0, "calls": 0, "cost_usd": None, "unpriced_calls": 0}
    )
    for s in seen:
        out[_group(s, by, s.chosen)]["requests"] += 1
        for model, _, cost in s.calls:
            g = out[_group(s, by, model)]
            g["calls"] += 1
            g["cost_usd"] = _add(g["cost_usd"], cost)
            g["unpriced_calls"] += cost is None
    return dict(out)


def savings_by_hand(seen: list[Seen]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for s in seen:
        g = out.setdefault(
            _group(s, "cascade"),
            {"requests": 0, "compared": 0, "cost_usd": 0.0, "reference_cost_usd": 0.0,
             "no_reference": 0, "unpriced_requests": 0},
        )  # fmt: skip
        g["requests"] += 1
        g["no_reference"] += s.reference is None
        g["unpriced_requests"] += s.cost is None
        if s.cost is not None and s.reference is not None:
            g["compared"] += 1
            g["cost_usd"] += s.cost
            g["reference_cost_usd"] += s.reference
    return out


def exits_by_hand(seen: list[Seen]) -> dict[tuple[str, str, str], int]:
    out: Counter = Counter()
    for s in seen:
        g = _group(s, "cascade")
        out[g, "n_calls", str(len(s.calls))] += 1
        out[g, "chosen_model", s.chosen or "(none)"] += 1
        if s.chosen is not None:
            out[g, "answered", ""] += 1
            out[g, "recalled", "yes"] += s.recalled
    return dict(out)


# --------------------------------------------------------------------------- reading


def cli(served: Served, name: str, *args: str) -> dict:
    done = subprocess.run(
        [str(CASCADE), "report", name, *args, "--format", "json",
         "--database-url", f"sqlite:///{served.ledger}"],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def endpoint(served: Served, name: str, **params: str) -> dict:
    r = httpx.get(
        f"{served.url}/v1/cascade/reports/{name}", params=params, headers=_auth(ADMIN), timeout=20
    )
    assert r.status_code == 200, r.text
    return r.json()


def rows_by_group(doc: dict) -> dict[str, dict]:
    return {r["group"]: r for r in doc["rows"]}


YESTERDAY = (dt.datetime.now(dt.UTC) - dt.timedelta(days=1)).date().isoformat()


# --------------------------------------------------------------------------- tests


def test_the_known_set_is_what_was_meant(served: Served):
    seen = served.seen
    assert len(seen) == 10
    assert sum(s.recalled for s in seen) == 1
    assert [s.status for s in seen].count(502) == 1
    assert sum(s.cost is None for s in seen) == 1  # only the model with no price
    assert {s.key for s in seen} == {ALICE, BOB}


@pytest.mark.parametrize("by", ["model", "cascade", "key"])
def test_spend_matches_the_responses(served: Served, by: str):
    want = spend_by_hand(served.seen, by)
    docs = [
        endpoint(served, "spend", since="1h", by=by),  # the detail rows
        endpoint(served, "spend", since=YESTERDAY, by=by),
    ]  # the daily rollups
    if by == "model":
        docs.append(cli(served, "spend", "--since", "1h", "--by", "model"))
    assert docs[0]["source"] == "ledger_daily+detail" and docs[1]["source"] == "ledger_daily"
    for doc in docs:
        got = rows_by_group(doc)
        assert set(got) == set(want), (doc["source"], set(got), set(want))
        names = ("requests_answered", "calls_made") if by == "model" else ("requests", "calls")
        assert doc["columns"][1:3] == list(names)
        for g, w in want.items():
            row = got[g]
            assert (row[names[0]], row[names[1]], row["unpriced_calls"]) == (
                w["requests"], w["calls"], w["unpriced_calls"]
            ), (by, g)  # fmt: skip
            if w["cost_usd"] is None:
                assert row["cost_usd"] is None, (by, g)
            else:
                assert row["cost_usd"] == pytest.approx(w["cost_usd"], abs=1e-9), (by, g)
            assert row["flag"] == ("unpriced" if w["unpriced_calls"] else "")
        # every token the client was billed for, once
        assert sum(r["tokens_in"] for r in doc["rows"]) == sum(s.tokens[0] for s in served.seen)
        assert sum(r["tokens_out"] for r in doc["rows"]) == sum(s.tokens[1] for s in served.seen)
        # a failed call of a priced model cost nothing; only the unpriced model is flagged
        assert doc["unpriced_models"] == [UNPRICED]
    if by != "model":  # a request's tokens stay in its own cascade and key
        tokens: Counter = Counter()
        for s in served.seen:
            tokens[_group(s, by)] += s.tokens[0]
        assert {g: r["tokens_in"] for g, r in rows_by_group(docs[0]).items()} == dict(tokens)


def test_savings_match_the_responses(served: Served):
    want = savings_by_hand(served.seen)
    for doc in (cli(served, "savings", "--since", "1h"), endpoint(served, "savings", since="1h")):
        got = rows_by_group(doc)
        assert set(got) == set(want) == {"qa", "(none)"}
        for g, w in want.items():
            row = got[g]
            for col in ("requests", "compared", "no_reference", "unpriced_requests"):
                assert row[col] == w[col], (g, col)
            assert row["cost_usd"] == pytest.approx(w["cost_usd"], abs=1e-9)
            assert row["reference_cost_usd"] == pytest.approx(w["reference_cost_usd"], abs=1e-9)
            saved = w["reference_cost_usd"] - w["cost_usd"]
            assert row["saved_usd"] == pytest.approx(saved, abs=1e-9)
            assert row["saved_fraction"] == pytest.approx(saved / w["reference_cost_usd"], 1e-5)
        assert got["qa"]["saved_usd"] > 0  # the cascade saved money against large alone
        assert got["(none)"]["saved_usd"] == pytest.approx(0.0, abs=1e-12)
        # the all-failed request and the unpriced pass-through have no reference price
        no_ref = sum(w["no_reference"] for w in want.values())
        assert no_ref == 2
        assert any(f"{no_ref} request(s) had no reference price" in n for n in doc["notes"])


def test_exits_match_the_responses(served: Served):
    want = exits_by_hand(served.seen)
    for doc in (cli(served, "exits", "--since", "1h"), endpoint(served, "exits", since="1h")):
        got = {(r["group"], r["kind"], r["value"]): r for r in doc["rows"]}
        totals = Counter()
        for (g, kind, _), n in want.items():
            if kind == "n_calls":
                totals[g] += n
        for (g, kind, value), n in want.items():
            if kind == "answered":
                continue
            if kind == "recalled":
                answered = want[g, "answered", ""]
                assert got[g, kind, value]["requests"] == n, (g, kind)
                assert got[g, kind, value]["share"] == pytest.approx(n / answered, abs=1e-6)
            else:
                assert got[g, kind, value]["requests"] == n, (g, kind, value)
                assert got[g, kind, value]["share"] == pytest.approx(n / totals[g], abs=1e-6)
        assert {k for k in got if k[1] != "recalled"} == {
            k for k in want if k[1] not in ("recalled", "answered")
        }
        assert got["qa", "recalled", "yes"]["requests"] == 1
        assert got["(none)", "recalled", "yes"]["requests"] == 0


def test_latency_and_errors_count_every_request_and_call(served: Served):
    seen = served.seen
    latency = rows_by_group(endpoint(served, "latency", since="1h", by="model"))
    assert latency["(all)"]["n"] == len(seen)
    calls = Counter(m for s in seen for m, _, _ in s.calls)
    assert {g: r["n"] for g, r in latency.items() if g != "(all)"} == dict(calls)
    errors = endpoint(served, "errors", since="1h", by="model")
    failed = Counter(m for s in seen for m, status, _ in s.calls if status != "ok")
    got = {(r["scope"], r["group"]): r for r in errors["rows"]}
    for model, n in calls.items():
        assert (got["call", model]["total"], got["call", model]["failed"]) == (n, failed[model])
    assert got["request", "(none)"]["breakdown"] == "502:1"
