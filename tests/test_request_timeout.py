"""The server's request_timeout_s bounds every request: a slow upstream gets a 504 in OpenAI
error format at the deadline (never a hung client), and the request is still ledgered."""

from __future__ import annotations

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
