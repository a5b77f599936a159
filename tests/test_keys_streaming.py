"""Budgets of database keys on `"stream": true` requests, through the real console script, a
real proxy process, its SQLite ledger and the fake upstream: a streamed answer (a cascade's
decided one, and a passthrough model's live one) is charged to the key like any other, and
once the key's budget is spent a streamed request is refused with the same OpenAI error as a
plain one, before any upstream call."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.serving import (
    CASCADE,
    db_upgrade,
    fake_upstream,
    running_proxy,
    sqlite_env,
    upstream_admin,
    write_config,
)

PRICE = 1000.0  # USD per million tokens, in and out: the fake's few tokens cost cents
ADMIN = "sk-admin-stream-test"


def _keys(env: dict, *args: str) -> str:
    done = subprocess.run(
        [str(CASCADE), "keys", *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def _config(folder: Path, upstream: str) -> Path:
    price = {"price_in_per_mtok": PRICE, "price_out_per_mtok": PRICE}
    return write_config(
        folder,
        {
            "models": {
                "small": {"backend": "openai", "base_url": f"{upstream}/v1", **price},
                "large": {"backend": "openai", "base_url": f"{upstream}/v1", **price},
            },
            "cascades": {"qa": {"nodes": ["small", "large"], "reference": "large"}},
            "server": {
                "database_keys": True,
                "keys_refresh_s": 0.5,
                "admin_key_env": "STREAM_TEST_ADMIN",
            },
        },
    )


def _ask(url: str, secret: str, model: str, stream: bool) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    return httpx.post(
        f"{url}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30.0,
    )


def _events(reply: httpx.Response) -> list[dict]:
    """The JSON events of an SSE body, `[DONE]` checked and left out."""
    data = [ln[len("data: ") :] for ln in reply.text.splitlines() if ln.startswith("data: ")]
    assert data and data[-1] == "[DONE]", reply.text
    return [json.loads(d) for d in data[:-1]]


def _key_spend(url: str, name: str) -> float | None:
    """The key's spend today as the admin reports API shows it (the ledger's daily rollups,
    which the budget check reads too); None while the ledger has none of it."""
    today = dt.datetime.now(dt.UTC).date().isoformat()
    report = httpx.get(
        f"{url}/v1/cascade/reports/spend",
        params={"by": "key", "since": today},
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=10.0,
    )
    report.raise_for_status()
    rows = [r for r in report.json()["rows"] if r["group"] == name]
    return rows[0]["cost_usd"] if rows else None


def _until(probe, done, seconds: float = 30.0):
    """`probe()` once `done` holds for it (polled; the machine may be loaded)."""
    start = time.monotonic()
    while not done(got := probe()):
        assert time.monotonic() - start < seconds, got
        time.sleep(0.1)
    return got


def _calls(up: httpx.Client) -> int:
    return sum(m["calls"] for m in up.get("/admin/stats").json()["models"].values())


def test_streamed_requests_are_charged_and_refused_like_plain_ones(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path / "ledger.db", STREAM_TEST_ADMIN=ADMIN)
    db_upgrade(env)
    with fake_upstream("small,large") as fake, upstream_admin(fake.url) as up:
        config = _config(tmp_path, fake.url)
        created = _keys(env, "create", "--name", "streamer", "--budget-usd", "1", "--period", "day")
        secret = created.strip().splitlines()[-1]
        with running_proxy(config, env, cwd=tmp_path) as proxy:
            # (a) under budget: a cascade's streamed answer and a passthrough stream
            decided = _until(
                lambda: _ask(proxy.url, secret, "qa", stream=True),
                lambda r: r.status_code != 503,  # (the keys' first read)
            )
            assert decided.status_code == 200, decided.text
            assert decided.headers["content-type"].startswith("text/event-stream")
            events = _events(decided)
            cascade_cost = events[0]["cascade"]["cost_usd"]
            assert cascade_cost > 0
            assert cascade_cost == pytest.approx(float(decided.headers["x-cascade-cost-usd"]))
            live = _ask(proxy.url, secret, "small", stream=True)
            assert live.status_code == 200, live.text
            usage = _events(live)[-1]["usage"]
            live_cost = (usage["prompt_tokens"] + usage["completion_tokens"]) * PRICE / 1e6
            assert live_cost > 0
            spent = _until(
                lambda: _key_spend(proxy.url, "streamer"),
                lambda s: s == pytest.approx(cascade_cost + live_cost),
            )

            # (b) the budget is spent: lower it to what was spent, wait for the proxy to see it
            _keys(env, "update", "streamer", "--budget-usd", repr(spent))
            plain = _until(
                lambda: _ask(proxy.url, secret, "qa", stream=False),
                lambda r: r.status_code == 429,
            )
            before = _calls(up)
            streamed = [_ask(proxy.url, secret, m, stream=True) for m in ("qa", "small")]
            assert _calls(up) == before  # refused before any upstream call
    error = plain.json()["error"]
    assert error["code"] == "budget_exceeded" and error["type"] == "rate_limit_error"
    for reply in streamed:
        assert reply.status_code == 429, reply.text
        assert reply.headers["content-type"].startswith("application/json")
        got = reply.json()["error"]
        assert (got["type"], got["code"], got["param"]) == (
            error["type"],
            error["code"],
            error["param"],
        )
        assert "streamer" in got["message"] and "resets at" in got["message"]
