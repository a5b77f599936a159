"""The server's request_timeout_s bounds every request: a slow upstream gets a 504 in OpenAI
error format at the deadline (never a hung client), and the request is still ledgered."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import httpx

from tests.test_proxy_e2e import (  # noqa: F401
    CASCADE,
    QUESTION,
    _free_port,
    _wait_ready,
    policy,
    upstream,
)


def test_a_slow_upstream_gets_a_504_at_the_deadline(
    upstream: str,  # noqa: F811
    policy: Path,  # noqa: F811
    tmp_path: Path,
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
    (tmp_path / "cascade.yaml").write_text(json.dumps(config))
    env = {**os.environ, "CASCADE_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}"}
    subprocess.run([str(CASCADE), "db", "upgrade"], env=env, check=True, capture_output=True)
    port = _free_port()
    proc = subprocess.Popen(
        [str(CASCADE), "serve", "--config", str(tmp_path / "cascade.yaml"), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    up = httpx.Client(base_url=upstream, timeout=5.0)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        _wait_ready(f"http://127.0.0.1:{port}/health", proc)
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
        proc.terminate()
        proc.wait(timeout=10)
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
