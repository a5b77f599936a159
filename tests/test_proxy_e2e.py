"""The proxy end to end: a real `cascade serve` process in front of a real local upstream.

The upstream is tests/fake_upstream.py (OpenAI/vLLM protocol, logprobs, streaming, faults),
the caller the official `openai` client or httpx for raw bodies. The policy is fitted on the
synthetic multiple-choice traces (tests/synthetic.py) over the upstream's `small` and `large`,
so the decisions come from the confidence the upstream reports.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving import QUESTION, db_upgrade, running_proxy, sqlite_env, write_config

KEY = "sk-test-client"
LEDGER: dict[str, Path] = {}  # where the running proxy's SQLite ledger is


@pytest.fixture(scope="module")
def proxy(upstream: str, policy: Path, tmp_path_factory):
    folder = tmp_path_factory.mktemp("proxy")
    config = {
        "models": {
            name: {
                "backend": "openai",
                "base_url": f"{upstream}/v1",
                "price_in_per_mtok": price,
                "price_out_per_mtok": price,
                "timeout_s": 2.0,
                "max_retries": 1,
            }
            for name, price in (("small", 0.1), ("large", 10.0))
        },
        "cascades": {
            "qa": {"nodes": ["small", "large"], "reference": "large", "policy": str(policy)}
        },
        "server": {"api_keys": [KEY], "max_body_bytes": 20000},
    }
    path = write_config(folder, config)
    LEDGER["path"] = folder / "ledger.db"
    env = sqlite_env(LEDGER["path"])
    db_upgrade(env)
    with running_proxy(path, env) as served:
        yield served.url


@pytest.fixture()
def up(upstream: str):
    """Admin handle on the upstream: set answers and faults; everything reset after a test."""
    client = httpx.Client(base_url=upstream, timeout=5.0)

    def answer(model: str, text: str, confidence: float) -> None:
        r = client.post(
            "/admin/answers", json={"model": model, "answer": text, "confidence": confidence}
        )
        r.raise_for_status()

    client.answer = answer  # type: ignore[attr-defined]
    client.delete("/admin/faults").raise_for_status()
    client.delete("/admin/stats").raise_for_status()
    answer("small", "B", -0.01)
    answer("large", "B", -0.01)
    yield client
    client.delete("/admin/faults")
    client.close()


@pytest.fixture()
def client(proxy: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy}/v1", api_key=KEY, max_retries=0, timeout=20.0)


def ask(client: openai.OpenAI, **kw):
    return client.chat.completions.with_raw_response.create(
        model=kw.pop("model", "qa"), messages=[{"role": "user", "content": QUESTION}], **kw
    )


def calls_of(up: httpx.Client) -> dict[str, int]:
    stats = up.get("/admin/stats").json()["models"]
    return {m: s["calls"] for m, s in stats.items()}


# ---------------------------------------------------------------- happy paths


def test_a_confident_small_model_answers_alone(client, up) -> None:
    raw = ask(client)
    completion = raw.parse()
    assert completion.model == "small"
    assert completion.choices[0].message.content == "B"
    assert raw.headers["x-cascade-model"] == "small"
    assert raw.headers["x-cascade-calls"] == "1"
    assert float(raw.headers["x-cascade-cost-usd"]) > 0
    assert float(raw.headers["x-cascade-overhead-ms"]) >= 0
    assert raw.headers["x-request-id"].startswith("chatcmpl-")
    extra = completion.model_extra["cascade"]
    assert extra["policy_hash"].startswith("sha256:")
    assert [c["model"] for c in extra["calls"]] == ["small"]
    assert 0.0 < extra["calls"][0]["p_correct"] <= 1.0
    assert extra["reference_cost_usd"] > extra["cost_usd"]  # large is 100x the price
    assert completion.usage.total_tokens > 0
    assert calls_of(up) == {"small": 1, "large": 0}


def test_an_unconfident_small_model_escalates_and_usage_sums_both(client, up) -> None:
    up.answer("small", "C", -2.5)
    up.answer("large", "B", -0.05)
    raw = ask(client)
    completion = raw.parse()
    extra = completion.model_extra["cascade"]
    assert [c["model"] for c in extra["calls"]] == ["small", "large"]
    assert extra["calls"][0]["decision"] == "continue:large"
    assert completion.model == "large" and completion.choices[0].message.content == "B"
    assert raw.headers["x-cascade-calls"] == "2"
    one = client.chat.completions.create(
        model="large", messages=[{"role": "user", "content": QUESTION}]
    )
    assert completion.usage.prompt_tokens == 2 * one.usage.prompt_tokens
    assert calls_of(up)["small"] == 1 and calls_of(up)["large"] == 2


def test_streaming_a_cascade_sends_the_decided_answer_and_usage(client, up) -> None:
    up.answer("small", "The answer is (B) because two.", -0.01)
    stream = client.chat.completions.create(
        model="qa",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The answer is (B) because two."
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert {c.model for c in chunks} == {"small"}


def test_passthrough_streams_the_upstream_live(client, up) -> None:
    up.answer("large", "one two three four five", -0.1)
    stream = client.chat.completions.create(
        model="large",
        messages=[{"role": "user", "content": QUESTION}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert "".join(deltas) == "one two three four five"
    assert len(deltas) > 1  # tokens arrive as the upstream sends them
    assert chunks[-1].usage.completion_tokens > 0
    assert up.get("/admin/stats").json()["models"]["large"]["stream"] == 1


def test_models_health_and_metrics(proxy: str, client, up) -> None:
    ids = {m.id for m in client.models.list()}
    assert {"qa", "small", "large"} <= ids
    health = httpx.get(f"{proxy}/health").json()
    assert health["upstreams"] == {"small": True, "large": True}
    assert health["database"]["status"] == "ok"
    assert health["cascades"]["qa"]["nodes"] == ["small", "large"]
    ask(client)
    text = httpx.get(f"{proxy}/metrics").text
    assert 'cascade_requests_total{cascade="qa",status="200"}' in text
    assert "cascade_decision_overhead_seconds_bucket" in text
    assert 'cascade_upstream_calls_total{model="small",outcome="ok"}' in text


# ---------------------------------------------------------------- faults


def test_a_failing_node_is_skipped_and_the_next_answers(client, up) -> None:
    up.post("/admin/faults", json={"model": "small", "error_rate": 1.0, "error_status": 500})
    completion = ask(client).parse()
    extra = completion.model_extra["cascade"]
    assert [c["status"] for c in extra["calls"]] == ["http_500", "ok"]
    assert extra["calls"][0]["attempts"] == 2  # one retry on 5xx
    assert completion.model == "large"


def test_every_node_failing_is_a_502_listing_the_attempts(client, up) -> None:
    up.post("/admin/faults", json={"drop": True})
    with pytest.raises(openai.APIStatusError) as err:
        ask(client)
    assert err.value.status_code == 502
    body = err.value.response.json()["error"]
    assert body["code"] == "upstream_failed" and body["type"] == "upstream_error"
    assert [a["model"] for a in body["attempts"]] == ["small", "large"]
    assert all(a["error"] == "connection" for a in body["attempts"])


def test_rate_limits_are_retried_after_the_retry_after_delay(client, up) -> None:
    up.post(
        "/admin/faults", json={"model": "small", "rate_limit": True, "retry_after": 1, "count": 1}
    )
    start = time.monotonic()
    completion = ask(client).parse()
    assert time.monotonic() - start >= 1.0
    assert completion.model == "small"
    assert completion.model_extra["cascade"]["calls"][0]["attempts"] == 2


def test_a_malformed_upstream_body_or_a_timeout_moves_on(client, up) -> None:
    up.post("/admin/faults", json={"model": "small", "malformed": True})
    assert ask(client).parse().model_extra["cascade"]["calls"][0]["status"] == "malformed"
    up.post("/admin/faults", json={"model": "small", "latency_ms": 3000})
    start = time.monotonic()
    completion = ask(client).parse()
    assert completion.model_extra["cascade"]["calls"][0]["status"] == "timeout"
    assert completion.model == "large"
    assert time.monotonic() - start < 2 * 2.0 + 2.0  # per-attempt timeout 2 s, one retry


def test_a_client_that_disconnects_cancels_the_upstream_call(proxy: str, up) -> None:
    up.post("/admin/faults", json={"latency_ms": 4000})
    start = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{proxy}/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            json={"model": "small", "messages": [{"role": "user", "content": QUESTION}]},
            timeout=0.5,
        )
    while up.get("/admin/stats").json()["models"]["small"]["in_flight"] and (
        time.monotonic() - start < 5.0
    ):
        time.sleep(0.02)
    # freed long before the proxy's own 2 s timeout would have ended the call
    assert time.monotonic() - start < 1.5
    time.sleep(max(0.0, 2.5 - (time.monotonic() - start)))
    assert up.get("/admin/stats").json()["models"]["small"]["calls"] == 1  # and no retry
    import sqlite3

    with sqlite3.connect(LEDGER["path"]) as db:  # the hung-up request is ledgered too
        row = db.execute(
            "SELECT r.status, c.status FROM ledger_requests r JOIN ledger_calls c"
            " ON c.request_id = r.request_id WHERE r.model_requested = 'small'"
            " ORDER BY r.ts DESC LIMIT 1"
        ).fetchone()
    assert row == (499, "client_disconnected")


# ---------------------------------------------------------------- bad requests


def _post(proxy: str, body: bytes | dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{proxy}/v1/chat/completions", content=content, headers=headers)


def body_of(content: object = "x", role: str = "user", model: object = "qa", **extra) -> dict:
    return {"model": model, "messages": [{"role": role, "content": content}], **extra}


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        ({"model": "qa"}, 400, "messages", "invalid_messages"),
        ({"model": "qa", "messages": []}, 400, "messages", "invalid_messages"),
        (body_of(model=7), 400, "model", "invalid_model"),
        (body_of(role="robot"), 400, "messages[0]", "invalid_messages"),
        (body_of(content=5), 400, "messages[0].content", "invalid_messages"),
        (body_of(temperature="hot"), 400, "temperature", "invalid_parameter"),
        (body_of(max_tokens=-3), 400, "max_tokens", "invalid_parameter"),
        (body_of(stream="yes"), 400, "stream", "invalid_parameter"),
        (body_of(stream_options=[]), 400, "stream_options", "invalid_parameter"),
        (body_of(cascade={"policy": "magic"}), 400, "cascade.policy", "invalid_cascade_override"),
        (body_of(cascade={"lambda": 2}), 400, "cascade.lambda", "invalid_cascade_override"),
        (body_of(model="gpt-9"), 404, "model", "model_not_found"),
        (body_of(content="x" * 30000), 413, None, "request_too_large"),
    ],
)
def test_bad_requests_get_openai_errors_and_call_nobody(
    proxy, up, body, status, param, code
) -> None:
    r = _post(proxy, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["code"] == code  # every refusal has a code a client can branch on
    assert calls_of(up) == {"small": 0, "large": 0}


def test_missing_or_wrong_api_keys_are_401(proxy, up) -> None:
    body = {"model": "qa", "messages": [{"role": "user", "content": QUESTION}]}
    missing = _post(proxy, body, key=None)
    wrong = _post(proxy, body, key="sk-wrong")
    assert missing.status_code == wrong.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert wrong.json()["error"]["type"] == "authentication_error"
    assert calls_of(up) == {"small": 0, "large": 0}


def test_a_max_cost_cap_stops_before_the_expensive_model(client, up) -> None:
    up.answer("small", "C", -2.5)  # unconfident: the policy would escalate
    completion = ask(client, extra_body={"cascade": {"max_cost_usd": 1e-4}}).parse()
    extra = completion.model_extra["cascade"]
    assert [c["model"] for c in extra["calls"]] == ["small"]
    assert "max_cost_usd" in extra["reason"]
    assert calls_of(up) == {"small": 1, "large": 0}


def test_a_cap_below_every_model_is_a_400(client, up) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        ask(client, extra_body={"cascade": {"max_cost_usd": 1e-9}})
    assert err.value.response.json()["error"]["param"] == "cascade.max_cost_usd"
    assert calls_of(up) == {"small": 0, "large": 0}


def test_a_per_request_lambda_trades_cost_for_accuracy(client, up) -> None:
    accurate = ask(client, extra_body={"cascade": {"lambda": 1.0}}).parse()  # cost ignored
    assert [c["model"] for c in accurate.model_extra["cascade"]["calls"]] == ["small", "large"]
    up.answer("small", "C", -2.5)  # unconfident: the default setting would escalate
    thrifty = ask(client, extra_body={"cascade": {"lambda": 0.01}}).parse()
    assert [c["model"] for c in thrifty.model_extra["cascade"]["calls"]] == ["small"]
    default = ask(client).parse()
    assert [c["model"] for c in default.model_extra["cascade"]["calls"]] == ["small", "large"]


def test_the_threshold_baseline_runs_live_without_recall(client, up) -> None:
    confident = ask(client, extra_body={"cascade": {"policy": "threshold"}}).parse()
    assert [c["model"] for c in confident.model_extra["cascade"]["calls"]] == ["small"]
    assert confident.model_extra["cascade"]["reason"].startswith("threshold")
    up.answer("small", "C", -2.5)
    unsure = ask(client, extra_body={"cascade": {"policy": "threshold"}}).parse()
    assert [c["model"] for c in unsure.model_extra["cascade"]["calls"]] == ["small", "large"]
    assert unsure.model == "large"


def test_the_agreement_baseline_calls_a_tier_in_parallel(client, up) -> None:
    up.post("/admin/faults", json={"latency_ms": 600})
    start = time.monotonic()
    reply = ask(client, extra_body={"cascade": {"policy": "agreement", "lambda": 1.0}}).parse()
    elapsed = time.monotonic() - start
    extra = reply.model_extra["cascade"]
    assert sorted(c["model"] for c in extra["calls"]) == ["large", "small"]
    assert elapsed < 1.1  # two 0.6 s calls side by side, not one after the other
    assert extra["reason"] == "agreement: 2 of 2 agree" and reply.model == "large"


def _ledger_rows(request_id: str, deadline_s: float = 5.0) -> tuple[tuple, list[tuple]]:
    """The ledger's request row and call rows of one request (the writer is asynchronous)."""
    import sqlite3

    end = time.monotonic() + deadline_s
    while True:
        with sqlite3.connect(LEDGER["path"]) as db:
            request = db.execute(
                "SELECT status, cascade, chosen_model, n_calls, cost_usd, reference_cost_usd,"
                " policy_hash, error FROM ledger_requests WHERE request_id = ?",
                (request_id,),
            ).fetchone()
            calls = db.execute(
                "SELECT c.call_order, c.model, c.status, c.cost_usd, c.decision"
                " FROM ledger_calls c JOIN ledger_requests r ON c.request_id = r.request_id"
                " WHERE r.request_id = ? ORDER BY c.call_order",
                (request_id,),
            ).fetchall()
        if request is not None or time.monotonic() > end:
            return request, calls
        time.sleep(0.05)


def test_every_request_lands_in_the_ledger_with_its_calls(client, up) -> None:
    up.answer("small", "C", -2.5)
    raw = ask(client)
    request, calls = _ledger_rows(raw.headers["x-request-id"])
    extra = raw.parse().model_extra["cascade"]
    assert request[:4] == (200, "qa", "large", 2)
    assert request[4] == pytest.approx(extra["cost_usd"])
    assert request[5] == pytest.approx(extra["reference_cost_usd"])
    assert request[6] == extra["policy_hash"]
    assert [(c[1], c[2], c[4]) for c in calls] == [
        ("small", "ok", "continue:large"),
        ("large", "ok", "stop"),
    ]
    assert sum(c[3] for c in calls) == pytest.approx(request[4])


def test_failed_and_passthrough_requests_are_ledgered_too(proxy: str, client, up) -> None:
    up.post("/admin/faults", json={"error_rate": 1.0, "error_status": 500})
    failed = _post(proxy, body_of())
    assert failed.status_code == 502
    assert failed.headers["x-request-id"].startswith("chatcmpl-")
    request, calls = _ledger_rows(failed.headers["x-request-id"])
    assert request[0] == 502 and request[2] is None and request[7] == "upstream_failed"
    assert [c[2] for c in calls] == ["http_500", "http_500"]
    up.delete("/admin/faults")
    raw = client.chat.completions.with_raw_response.create(
        model="small", messages=[{"role": "user", "content": QUESTION}]
    )
    request, calls = _ledger_rows(raw.headers["x-request-id"])
    assert request[:4] == (200, None, "small", 1) and request[4] > 0
