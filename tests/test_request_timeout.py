"""The server's request_timeout_s bounds every request: a slow upstream gets a 504 in OpenAI
error format at the deadline (never a hung client), and the request is still ledgered."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import httpx

from tests.serving import QUESTION, db_upgrade, running_proxy, sqlite_env, write_config


def test_a_slow_upstream_gets_a_504_at_the_deadline(
    upstream: str, policy: Path, tmp_path: Path
) -> None:
    models = {
        name: {"backend": "openai", "base_url": f"{upstream}/v1", "timeout_s": 30.0,
               "price_in_per_mtok": 1.0, "price_out_per_mtok": 1.0}
        for name in ("small", "large")
    }  # fmt: skip
    config = {
        "models": models,
        "cascades": {"qa": {"nodes": ["small", "large"], "reference": "large",
                            "policy": str(policy)}},
        "server": {"request_timeout_s": 1.0},
    }  # fmt: skip
    env = sqlite_env(tmp_path / "ledger.db")
    db_upgrade(env)
    up = httpx.Client(base_url=upstream, timeout=5.0)
    with running_proxy(write_config(tmp_path, config), env) as proxy:
        url = f"{proxy.url}/v1/chat/completions"
        try:
            up.delete("/admin/faults").raise_for_status()
            up.post("/admin/faults", json={"latency_ms": 5000}).raise_for_status()
            replies = {}
            for model in ("qa", "small"):
                start = time.monotonic()
                r = httpx.post(
                    url,
                    json={"model": model, "messages": [{"role": "user", "content": QUESTION}]},
                    timeout=20.0,
                )
                replies[model] = (r, time.monotonic() - start)
            up.delete("/admin/faults").raise_for_status()
            after = httpx.post(
                url,
                json={"model": "qa", "messages": [{"role": "user", "content": QUESTION}]},
                timeout=20.0,
            )
        finally:
            up.delete("/admin/faults")
    for model, (r, seconds) in replies.items():
        assert r.status_code == 504, (model, r.text)
        error = r.json()["error"]
        assert error["code"] == "request_timeout" and "1 s" in error["message"]
        assert set(error) >= {"message", "type", "param", "code"}
        assert 0.9 < seconds < 4.0, (model, seconds)  # the deadline, not the upstream's 5 s
    assert after.status_code == 200
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = dict(db.execute("SELECT request_id, status FROM ledger_requests"))
    for r, _ in replies.values():
        assert rows[r.headers["x-request-id"]] == 504


def _sse_events(client: httpx.Client, url: str, body: dict) -> tuple[list, float]:
    """The events of one streamed chat completion (parsed JSON, or "[DONE]") and the
    seconds until the stream ended."""
    start = time.monotonic()
    events: list = []
    with client.stream("POST", url, json=body) as reply:
        assert reply.status_code == 200, reply.read()
        for line in reply.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events, time.monotonic() - start


def test_a_silent_passthrough_stream_ends_at_the_request_timeout_a_busy_one_runs_on(
    upstream: str, tmp_path: Path
) -> None:
    """Issue 15, item 3: a passthrough stream whose upstream sends nothing for
    request_timeout_s (1 s here; the model's timeout_s is 30 s) ends with a request_timeout
    error event and [DONE], and is ledgered as a 504: before its first delta and in a
    silence after it. A stream that keeps sending outlives request_timeout_s."""
    model = {"backend": "openai", "base_url": f"{upstream}/v1", "timeout_s": 30.0,
             "price_in_per_mtok": 1.0, "price_out_per_mtok": 1.0}  # fmt: skip
    config = {"models": {"small": model}, "server": {"request_timeout_s": 1.0}}
    env = sqlite_env(tmp_path / "ledger.db")
    db_upgrade(env)
    up = httpx.Client(base_url=upstream, timeout=5.0)
    body = {"model": "small", "stream": True,
            "messages": [{"role": "user", "content": "a silent stream"}]}  # fmt: skip
    long_answer = " ".join(f"word{i}" for i in range(8))
    ends: dict[str, tuple[list, float]] = {}
    with (
        running_proxy(write_config(tmp_path, config), env) as proxy,
        httpx.Client(timeout=15.0) as client,
    ):
        url = f"{proxy.url}/v1/chat/completions"
        try:
            up.delete("/admin/faults").raise_for_status()
            up.post("/admin/faults", json={"model": "small", "ttft_ms": 20000, "count": 1})
            ends["before the first delta"] = _sse_events(client, url, body)
            up.post("/admin/faults", json={"model": "small", "stall_stream_after": 1, "count": 1})
            ends["after a delta"] = _sse_events(client, url, body)
            up.post("/admin/answers", json={"model": "small", "answer": long_answer})
            up.post("/admin/faults", json={"model": "small", "inter_token_ms": 300, "count": 1})
            busy, busy_s = _sse_events(client, url, body)
        finally:
            up.delete("/admin/faults")
            up.post("/admin/answers", json={"model": "small", "answer": "A"})
    for where, (events, seconds) in ends.items():
        assert 0.9 < seconds < 5.0, (where, seconds)  # the request timeout, not the 30 s
        assert events[-1] == "[DONE]", where
        error = events[-2]["error"]
        assert error["code"] == "request_timeout" and "1 s" in error["message"], where
        assert set(error) >= {"message", "type", "param", "code"}
    assert (
        "".join(
            e["choices"][0]["delta"].get("content") or "" for e in ends["after a delta"][0][:-2]
        )
        == "A"
    )
    # 8 words 0.3 s apart: over 2 s in all, never 1 s silent
    assert busy_s > 1.5 and busy[-1] == "[DONE]"
    assert not any("error" in e for e in busy if isinstance(e, dict))
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in busy[:-1] if e["choices"])
    assert text == long_answer
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        rows = db.execute("SELECT status, error FROM ledger_requests ORDER BY ts").fetchall()
    assert rows == [(504, "request_timeout"), (504, "request_timeout"), (200, None)]
