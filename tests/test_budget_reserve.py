"""A request's reservation against a key's budget covers what it can really spend
(proxy/http/keys.py `worst_case`):

- under `cascade.max_cost_usd` the walk's cap is soft (it checks expected costs), so the
  reservation is the cap plus the most one step's worst case can pass its expected cost,
  never more than the plan's full worst case (`capped_worst_case`);
- a retried call (429/5xx, a stream broken before its first token) records one attempt's
  cost, and a stream broken mid-answer records the tokens it sent (they were generated and
  are billed) but is not retried, so one attempt per call is reserved;
- a policy reload between admission and the run does not change the plan that runs: the
  engine runs the snapshot admission priced.

End to end through real proxies, the fake upstream and keys in a real PostgreSQL; the reload
in process, with the reload injected right after admission."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import time
from pathlib import Path

import httpx
import pytest

import proxy.http.chat as chat_module
from calibration.artifact import build_artifact, load_artifact
from policies.artifact import PolicyArtifact
from proxy.config import parse_config
from proxy.engine.cascade import CappedPlan
from proxy.http.app import create_app
from proxy.http.keys import WorstCase, capped_worst_case
from proxy.http.state import build_state
from proxy.ledger.keys import StoredKey, hash_secret
from tests.policy_walk import fit_small_large
from tests.serving import QUESTION, db_upgrade, fake_upstream, running_proxy, write_config
from tests.test_keys import _create, _sql, _until
from tests.test_ledger import pg_db  # noqa: F401  (the fixture)
from tests.test_sampling_proxy import sampled_policy  # noqa: F401  (the fixture)
from upstreams.pricing import count_message_tokens

PRICES = {"small": (0.1, 0.2), "large": (3.0, 5.0)}  # USD per million tokens, in and out
MAX_TOKENS = 1000
LONG = "B " * 2 * MAX_TOKENS  # an answer the upstream cuts at max_tokens: the longest one
SIZE = len(QUESTION.encode()) + 8  # the prompt's input-token bound (one message)
MESSAGES = [{"role": "user", "content": QUESTION}]


def _worst(model: str, choices: int = 1) -> float:
    """One call's worst case, by hand: the prompt's bytes in, MAX_TOKENS out per choice."""
    p_in, p_out = PRICES[model]
    return (SIZE * p_in + choices * MAX_TOKENS * p_out) / 1e6


def _models(upstream: str, **extra) -> dict:
    return {
        m: {"backend": "openai", "base_url": f"{upstream}/v1", "price_in_per_mtok": p_in,
            "price_out_per_mtok": p_out, **extra}
        for m, (p_in, p_out) in PRICES.items()
    }  # fmt: skip


def _ask(url: str, secret: str, model: str, **body) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": QUESTION}],
              "max_tokens": MAX_TOKENS, **body},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30.0,
    )  # fmt: skip


def _ledgered(dbname: str, request_id: str) -> float:
    """The cost the ledger recorded for `request_id` (polled: the writer flushes in batches)."""
    rows: list = []

    def probe() -> bool:
        rows[:] = _sql(dbname, "SELECT cost_usd FROM ledger_requests WHERE request_id = %s",
                       request_id)  # fmt: skip
        return bool(rows)

    _until(probe, True)
    return float(rows[0][0])


def _calls(upstream: str) -> dict[str, int]:
    models = httpx.get(f"{upstream}/admin/stats", timeout=5).json()["models"]
    return {m: s["calls"] for m, s in models.items()}


# ---------------------------------------------------------------- the cap's bound


def test_the_capped_bound_by_hand() -> None:
    """Two nodes, expected 1 and 2 (USD), each 10 at worst ($1 per output token, 10
    tokens): under a cap of 3 both can be called and the last step passes the cap by at
    most 10 - 1; the plan's full worst case (20) binds when it is smaller. A node whose
    expected cost passes the cap is never called; an agreement tier is one step (its
    members' excesses summed)."""

    def price(model: str):
        return {"a": ((0.0, 1.0), None), "b": ((0.0, 1.0), None), "u": (None, None)}[model]

    plan = CappedPlan(calls=[[("a", 1)], [("b", 1)]], expected=[1.0, 2.0], steps=[(0,), (1,)])
    assert capped_worst_case(plan, 3.0, 0, 10, price).usd == pytest.approx(3.0 + 9.0)
    assert capped_worst_case(plan, 3.0, 0, 4, price).usd == pytest.approx(3.0 + 3.0)
    assert capped_worst_case(plan, 100.0, 0, 10, price).usd == pytest.approx(20.0)  # full
    assert capped_worst_case(plan, 1.5, 0, 10, price).usd == pytest.approx(10.0)  # a alone
    assert capped_worst_case(plan, 0.5, 0, 10, price) == WorstCase(0.0, [])  # no call
    tier = CappedPlan(calls=[[("a", 1)], [("b", 1)], [("u", 1)]], expected=[1.0, 1.0, 0.0],
                      steps=[(0,), (1,), (2,), (0, 1)])  # fmt: skip
    got = capped_worst_case(tier, 2.0, 0, 10, price)
    assert got.usd == pytest.approx(2.0 + 18.0) and got.unpriced == ["u"]


@pytest.mark.parametrize("policy", ["index", "single"])
def test_a_capped_request_reserves_what_its_walk_can_really_spend(
    pg_db,  # noqa: F811
    sampled_policy: Path,  # noqa: F811
    tmp_path: Path,
    policy: str,
) -> None:
    """`qa` is `small@5 -> large` (one `n: 5` call, then one call); a request capped at a
    little over both nodes' expected costs may call both. The upstream answers at the
    max_tokens bound, far past the expected costs: the walk's first call alone passes the
    cap. The reservation is the cap plus the most a step's worst case passes its expected
    cost (large's, here), by hand: a key a millionth below it is refused (429
    budget_exceeded, no upstream call), one a millionth above is answered, and the ledger
    records more than the cap (the cap alone would not hold) but no more than the
    reservation."""
    dbname, url = pg_db
    env = {**os.environ, "CASCADE_DATABASE_URL": url}
    db_upgrade(env)
    nodes = load_artifact(sampled_policy).nodes
    expected = {n.model: n.cost_usd for n in nodes}
    e_small, e_large = expected["small@5"], expected["large"]
    cap = 1.2 * (e_small + e_large)
    w_small, w_large = _worst("small", 5), _worst("large")
    if policy == "index":  # either node may be the last step
        bound = min(w_small + w_large, cap + max(w_small - e_small, w_large - e_large))
    else:  # `single`: the reference alone, at the expected cost the artifact gives it
        bound = min(w_large, cap + w_large - e_large)
    assert cap < bound < w_small + w_large  # the cap alone is too little, the full too much
    below = _create(env, "below", "--budget-usd", repr(bound * (1 - 1e-6)), "--period", "day")
    above = _create(env, "above", "--budget-usd", repr(bound * (1 + 1e-6)), "--period", "day")
    with fake_upstream("small,large", log=tmp_path / "upstream.txt") as up:
        models = _models(up.url, max_retries=0)
        httpx.post(f"{up.url}/admin/answers", json=[
            {"model": "small", "answer": LONG, "confidence": -0.01},
            {"model": "large", "answer": LONG, "confidence": -0.01},
        ], timeout=5).raise_for_status()  # fmt: skip
        cascade = {"nodes": ["small@5", "large"], "transitions": "line", "reference": "large",
                   "policy": str(sampled_policy)}  # fmt: skip
        server = {"database_keys": True, "keys_refresh_s": 0.5}
        config = write_config(
            tmp_path, {"models": models, "cascades": {"qa": cascade}, "server": server}
        )
        overrides = {"cascade": {"max_cost_usd": cap, "policy": policy}}
        with running_proxy(config, env, cwd=tmp_path) as proxy:
            _until(lambda: httpx.get(f"{proxy.url}/health", timeout=10).json()["keys"]["keys"], 2)
            httpx.delete(f"{up.url}/admin/stats", timeout=5).raise_for_status()

            refused = _ask(proxy.url, below, "qa", **overrides)
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["code"] == "budget_exceeded"
            assert f"could cost up to ${bound:.6f}" in error["message"]
            assert httpx.get(f"{up.url}/admin/stats", timeout=5).json()["calls"] == 0

            admitted = _ask(proxy.url, above, "qa", **overrides)
            assert admitted.status_code == 200, admitted.text
            spent = _ledgered(dbname, admitted.headers["x-request-id"])
    assert float(admitted.headers["x-cascade-cost-usd"]) == pytest.approx(spent)
    assert cap < spent <= bound


# ---------------------------------------------------------------- retries


def test_a_retried_call_records_no_more_than_one_attempt(pg_db, tmp_path: Path) -> None:  # noqa: F811
    """A call reserves one attempt, not 1 + max_retries: an attempt that failed before any
    token is not costed, and one that failed after some is not retried. A key whose budget
    is a millionth above one call's worst case is answered after two 503s (three upstream
    calls), and the ledger records at most that one call's worst case; a stream broken
    before its first token is retried and records one attempt; a stream broken mid-answer
    (five tokens sent) is not retried, and its call is ledgered with its error, the
    prompt's tokens, the five tokens and their cost at large's prices (within the worst
    case); the same after the proxy's request timeout ends a stalled stream, and after the
    client hangs up on it."""
    dbname, url = pg_db
    env = {**os.environ, "CASCADE_DATABASE_URL": url}
    db_upgrade(env)
    worst = _worst("large")
    exact = _create(env, "exact", "--budget-usd", repr(worst * (1 + 1e-6)), "--period", "day")
    streams = _create(env, "streams", "--budget-usd", repr(2.5 * worst), "--period", "day")
    with fake_upstream("small,large", log=tmp_path / "upstream.txt") as up:
        httpx.post(f"{up.url}/admin/answers", json={"model": "large", "answer": LONG},
                   timeout=5).raise_for_status()  # fmt: skip
        config = write_config(tmp_path, {
            "models": _models(up.url, max_retries=2),
            "cascades": {"solo": {"nodes": ["large"], "reference": "large"}},
            "server": {"database_keys": True, "keys_refresh_s": 0.5, "request_timeout_s": 3},
        })  # fmt: skip

        def faults(spec: dict) -> None:
            body = {"model": "large", **spec}
            httpx.post(f"{up.url}/admin/faults", json=body, timeout=5).raise_for_status()
            httpx.delete(f"{up.url}/admin/stats", timeout=5).raise_for_status()

        with running_proxy(config, env, cwd=tmp_path) as proxy:
            _until(lambda: httpx.get(f"{proxy.url}/health", timeout=10).json()["keys"]["keys"], 2)
            faults({"error_rate": 1, "error_status": 503, "count": 2})
            retried = _ask(proxy.url, exact, "solo")
            assert retried.status_code == 200, retried.text
            assert _calls(up.url)["large"] == 3
            spent = _ledgered(dbname, retried.headers["x-request-id"])
            assert 0 < spent <= worst

            faults({"drop_stream_after": 0, "count": 1})  # breaks before any token: retried
            whole = _ask(proxy.url, streams, "large", stream=True)
            assert whole.status_code == 200 and "[DONE]" in whole.text, whole.text
            assert _calls(up.url)["large"] == 2
            assert 0 < _ledgered(dbname, whole.headers["x-request-id"]) <= worst

            faults({"drop_stream_after": 5, "count": 1})  # breaks mid-answer: not retried
            broken = _ask(proxy.url, streams, "large", stream=True)
            assert broken.status_code == 200 and '"error"' in broken.text, broken.text
            assert _calls(up.url)["large"] == 1
            _charged_five_tokens(dbname, broken.headers["x-request-id"], "connection", worst)

            faults({"stall_stream_after": 5, "count": 1})  # five tokens, then silence
            stalled = _ask(proxy.url, streams, "large", stream=True)
            assert "request_timeout" in stalled.text, stalled.text
            assert _calls(up.url)["large"] == 1
            _charged_five_tokens(dbname, stalled.headers["x-request-id"], "request_timeout", worst)

            faults({"stall_stream_after": 5, "count": 1})  # the client hangs up after five
            gone = _hang_up_after(proxy.url, streams, 5)
            _charged_five_tokens(dbname, gone, "client_disconnected", worst)


def _hang_up_after(url: str, secret: str, deltas: int) -> str:
    """Stream a passthrough answer of `large`, hang up after `deltas` content deltas; the
    request's id."""
    body = {"model": "large", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True}
    headers = {"Authorization": f"Bearer {secret}"}
    seen = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=30.0) as reply:  # fmt: skip
        for line in reply.iter_lines():
            seen += '"content":" B"' in line or '"content":"B"' in line
            if seen == deltas:
                return reply.headers["x-request-id"]
    raise AssertionError(f"the stream ended after {seen} deltas")


def _charged_five_tokens(dbname: str, request_id: str, status: str, worst: float) -> None:
    """The request's one call is ledgered failed (`status`, its error kept) with the prompt's
    tokens and five output tokens, costed at large's prices, within its worst case."""
    spent = _ledgered(dbname, request_id)
    (row,) = _sql(dbname, "SELECT status, error, tokens_in, tokens_out, cost_usd FROM "
                  "ledger_calls WHERE request_id = %s", request_id)  # fmt: skip
    got_status, error, tokens_in, tokens_out, cost = row
    assert got_status == status and error
    assert (tokens_in, tokens_out) == (count_message_tokens(MESSAGES), 5)
    p_in, p_out = PRICES["large"]
    assert float(cost) == pytest.approx((tokens_in * p_in + 5 * p_out) / 1e6)
    assert float(cost) == pytest.approx(spent) and 0 < spent <= worst


# ---------------------------------------------------------------- a reload mid-admission


@pytest.fixture(scope="module")
def accurate(synthetic: tuple[Path, Path]) -> PolicyArtifact:
    """A policy over small -> large that always calls both (cost price 0)."""
    return build_artifact(fit_small_large(synthetic[0]), 0.0, train_path="synthetic",
                          answer_kind="choice")  # fmt: skip


def test_a_reload_after_admission_does_not_change_the_priced_plan(
    accurate: PolicyArtifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`qa` has no policy (the reference `small` answers alone) when a request is admitted;
    a reload right after admission (as the policy watch or /admin/reload may do) loads one
    that calls small and then large. The request runs the plan that was priced: small alone,
    within its reservation; the next request is priced and run with the new policy."""
    with fake_upstream("small,large", log=tmp_path / "upstream.txt") as up:
        httpx.post(f"{up.url}/admin/answers", json=[
            {"model": "small", "answer": LONG}, {"model": "large", "answer": LONG},
        ], timeout=5).raise_for_status()  # fmt: skip
        config = parse_config({
            "models": _models(up.url, max_retries=0),
            "cascades": {"qa": {"nodes": ["small", "large"], "reference": "small"}},
            "server": {"database_keys": True},
            "database_url": f"sqlite:///{tmp_path / 'ledger.db'}",
        })  # fmt: skip
        from proxy.ledger.db import upgrade

        upgrade(config.database_url)
        state = build_state(config)
        assert state.ledger is not None
        state.ledger.start()
        secret = "sk-cascade-reload-between"
        key = StoredKey("k", hash_secret(secret), secret[:12], 1.0, "day", None, None, None,
                        dt.datetime.now(dt.UTC), None)  # fmt: skip
        cache = state.keys
        assert cache is not None
        cache.by_hash, cache.loaded, cache.budgeted = {key.key_hash: key}, True, frozenset({"k"})
        reserved: list[float] = []
        reserve = cache.reserve

        def spy(key: StoredKey, request_id: str, worst: float, now: dt.datetime) -> None:
            reserved.append(worst)
            reserve(key, request_id, worst, now)

        monkeypatch.setattr(cache, "reserve", spy)
        admit = chat_module.admit
        engine = state.engines["qa"]

        def admit_then_reload(*args, **kwargs):
            worst = admit(*args, **kwargs)
            if engine.policy is None:  # the first request only
                engine.load(accurate)
            return worst

        monkeypatch.setattr(chat_module, "admit", admit_then_reload)

        async def ask() -> httpx.Response:
            transport = httpx.ASGITransport(app=create_app(state))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await client.post(
                    "/v1/chat/completions",
                    json={"model": "qa", "max_tokens": MAX_TOKENS,
                          "messages": [{"role": "user", "content": QUESTION}]},
                    headers={"Authorization": f"Bearer {secret}"},
                )  # fmt: skip

        async def both() -> tuple[httpx.Response, httpx.Response]:
            try:
                return await ask(), await ask()
            finally:
                for backend in state.backends.values():
                    await backend.aclose()

        httpx.delete(f"{up.url}/admin/stats", timeout=5).raise_for_status()
        try:
            first, second = asyncio.run(both())
            assert first.status_code == 200 and second.status_code == 200, first.text
            assert engine.policy_hash == accurate.hash  # the reload did happen
            # the first request ran the snapshot it was priced with: small alone
            assert first.headers["x-cascade-calls"] == "1"
            assert float(first.headers["x-cascade-cost-usd"]) <= reserved[0]
            assert reserved[0] == pytest.approx(_worst("small"))
            # the second was priced with the new policy and ran it: small, then large
            assert second.headers["x-cascade-calls"] == "2"
            assert reserved[1] == pytest.approx(_worst("small") + _worst("large"))
            assert float(second.headers["x-cascade-cost-usd"]) <= reserved[1]
            assert _calls(up.url) == {"small": 2, "large": 1}
            now = dt.datetime.fromtimestamp(time.time(), dt.UTC)
            assert cache.spent(key, now) <= sum(reserved)
        finally:
            state.ledger.close()
