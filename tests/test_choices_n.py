"""`n` (issue 15, item 6): a passthrough model gets `n` forwarded and every choice comes back,
with the upstream's usage and its cost in the ledger; a cascade, which returns one decided
answer, refuses n > 1 with a 400 that says so. Through a real `cascade serve` process, the
`openai` client and the fake upstream (which answers n choices, as vLLM does)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving import (
    QUESTION,
    db_upgrade,
    running_proxy,
    sqlite_env,
    upstream_admin,
    write_config,
)
from tests.synthetic import PRICES

KEY_ENV = "CASCADE_TEST_LITELLM_KEY"


@pytest.fixture(scope="module")
def served(
    upstream: str, policy: Path, synthetic: tuple[Path, Path], tmp_path_factory
) -> tuple[str, Path]:
    folder = tmp_path_factory.mktemp("n")
    fake = {"backend": "openai", "base_url": f"{upstream}/v1", "price_in_per_mtok": 1.0,
            "price_out_per_mtok": 2.0}  # fmt: skip
    external = {"backend": "litellm", "model": "openai/large", "base_url": f"{upstream}/v1",
                "api_key_env": KEY_ENV, "price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0,
                "max_retries": 0}  # fmt: skip
    price_in, price_out = PRICES["medium"]
    recorded = {"backend": "replay", "model": "medium",
                "traces": [str(synthetic[0])],
                "price_in_per_mtok": price_in, "price_out_per_mtok": price_out}  # fmt: skip
    config = {
        "models": {"small": fake, "large": fake, "ext": external, "recorded": recorded},
        "cascades": {
            "qa": {"nodes": ["small", "large"], "reference": "large", "policy": str(policy)}
        },
    }
    env = sqlite_env(folder / "ledger.db", **{KEY_ENV: "dummy-key"})
    db_upgrade(env)
    with running_proxy(write_config(folder, config), env, ready_s=60.0) as proxy:
        yield proxy.url, folder / "ledger.db"


def _ledgered(ledger: Path, request_id: str) -> tuple:
    """The ledger row of `request_id` (status, tokens in and out, cost), once written."""
    row = None
    deadline = time.monotonic() + 10.0
    while row is None and time.monotonic() < deadline:
        with sqlite3.connect(ledger) as db:
            row = db.execute(
                "SELECT status, tokens_in, tokens_out, cost_usd FROM ledger_requests "
                "WHERE request_id = ?",
                (request_id,),
            ).fetchone()
        time.sleep(0.05)
    assert row is not None, f"{request_id} not in the ledger"
    return row


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("model", ["small", "ext"])
def test_a_passthrough_model_returns_every_choice(served, upstream: str, model: str) -> None:
    url, ledger = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with upstream_admin(upstream) as up:
        up.post("/admin/answers", json={"model": "large", "answer": "B two"}).raise_for_status()
        try:
            raw = client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": QUESTION}], n=3
            )
            sent = up.get("/admin/stats").json()["models"]
        finally:
            up.post("/admin/answers", json={"model": "large", "answer": "A"})
    reply = raw.parse()
    upstream_model = "small" if model == "small" else "large"
    assert sent[upstream_model]["last_request"]["n"] == 3  # forwarded, not forced to 1
    assert sent[upstream_model]["calls"] == 1
    text = "A" if model == "small" else "B two"
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert [c.message.content for c in reply.choices] == [text] * 3
    assert all(c.finish_reason == "stop" for c in reply.choices)
    words = len(text.split())
    assert reply.usage.completion_tokens == 3 * words  # as the upstream counted them
    request_id = raw.headers["x-request-id"]
    status, tokens_in, tokens_out, cost = _ledgered(ledger, request_id)
    assert (status, tokens_in, tokens_out) == (200, reply.usage.prompt_tokens, 3 * words)
    assert cost == pytest.approx((tokens_in * 1.0 + 3 * words * 2.0) / 1e6)
    assert float(raw.headers["x-cascade-cost-usd"]) == pytest.approx(cost)


def test_a_cascade_refuses_n_above_one_and_says_why(served, upstream: str) -> None:
    url, _ = served
    body = {"model": "qa", "messages": [{"role": "user", "content": QUESTION}]}
    with upstream_admin(upstream) as up:
        refused = httpx.post(f"{url}/v1/chat/completions", json={**body, "n": 2}, timeout=10)
        calls = up.get("/admin/stats").json()["calls"]
        one = httpx.post(f"{url}/v1/chat/completions", json={**body, "n": 1}, timeout=10)
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["code"] == "n_not_supported" and error["param"] == "n"
    assert "one decided answer" in error["message"] and "n must be 1" in error["message"]
    assert calls == 0  # refused before any model was called (and nothing to ledger)
    assert one.status_code == 200 and len(one.json()["choices"]) == 1


@pytest.mark.parametrize(
    ("model", "stream", "why"),
    [("small", True, "streaming returns one choice"), ("recorded", False, "replays recorded")],
)
def test_n_where_one_answer_is_all_there_is_is_refused(
    served, upstream: str, model: str, stream: bool, why: str
) -> None:
    url, _ = served
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "n": 2}
    with upstream_admin(upstream) as up:
        reply = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": stream})
        calls = up.get("/admin/stats").json()["calls"]
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["code"] == "n_not_supported" and why in error["message"]
    assert calls == 0


def test_n_past_what_any_upstream_takes_is_refused_before_the_call(served, upstream: str) -> None:
    url, _ = served
    body = {"model": "small", "messages": [{"role": "user", "content": QUESTION}], "n": 129}
    with upstream_admin(upstream) as up:
        reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)
        calls = up.get("/admin/stats").json()["calls"]
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "n", reply.text
    assert "at most 128" in reply.json()["error"]["message"] and calls == 0
