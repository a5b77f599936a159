"""Hot reload and exploration, end to end: a real `cascade serve` process, the fake upstream,
two policy artifacts fitted on the synthetic traces (tests/synthetic.py); requests under load
while the policy changes."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest

from calibration.artifact import build_artifact, save_artifact
from calibration.traces import load_traces
from policies.artifact import content_hash
from policies.judging import judge_messages
from tests.policy_walk import fit_small_large, textbook_mu
from tests.serving import (
    QUESTION,
    db_upgrade,
    running_proxy,
    sqlite_env,
    upstream_admin,
    write_config,
)

ADMIN = "sk-admin-reload-test"
KEY = "sk-client-reload-test"


@pytest.fixture(scope="module")
def artifacts(synthetic: tuple[Path, Path], tmp_path_factory) -> dict[str, Path]:
    """Two policies over small -> large from the synthetic traces: cheap (a confident `small`
    answers alone) and accurate (both are always called): different tables and hashes."""
    fitted = fit_small_large(synthetic[0])
    folder = tmp_path_factory.mktemp("artifacts")
    out = {}
    for name, mu in (("cheap", textbook_mu(fitted)), ("accurate", 0.0)):
        art = build_artifact(fitted, mu, train_path="synthetic", answer_kind="choice")
        out[name] = folder / f"{name}.json"
        save_artifact(art, out[name])
    return out


def _hash(path: Path) -> str:
    return json.loads(path.read_text())["hash"]


@pytest.fixture(scope="module")
def served(upstream: str, artifacts: dict[str, Path], tmp_path_factory):
    folder = tmp_path_factory.mktemp("served")
    live = folder / "policy.json"
    shutil.copy(artifacts["cheap"], live)
    models = {
        name: {
            "backend": "openai",
            "base_url": f"{upstream}/v1",
            "price_in_per_mtok": price,
            "price_out_per_mtok": price,
            "timeout_s": 5.0,
        }
        for name, price in (("small", 0.1), ("large", 10.0), ("judge", 1.0))
    }
    line = {"nodes": ["small", "large"], "reference": "large"}
    explore = {**line, "policy": str(artifacts["cheap"]), "explore_rate": 1.0}
    config = {
        "models": models,
        "cascades": {
            "qa": {**line, "policy": "policy.json"},
            "qx": {**explore, "explore_out": "explored.jsonl"},
            "qj": {**explore, "explore_out": "judged.jsonl", "explore_grader": "judge:judge"},
        },
        "server": {"api_keys": [KEY], "admin_key_env": "RELOAD_TEST_ADMIN", "policy_watch_s": 0.2},
    }
    ledger = folder / "ledger.db"
    env = sqlite_env(ledger, RELOAD_TEST_ADMIN=ADMIN)
    db_upgrade(env)
    with running_proxy(write_config(folder, config), env, cwd=folder) as proxy:
        yield {"url": proxy.url, "live": live, "folder": folder, "ledger": ledger}


@pytest.fixture()
def up(upstream: str):
    with upstream_admin(upstream) as client:
        yield client


def _answer(up: httpx.Client, model: str, text: str, confidence: float) -> None:
    r = up.post("/admin/answers", json={"model": model, "answer": text, "confidence": confidence})
    r.raise_for_status()


def _chat(url: str, cascade: str = "qa") -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": cascade, "messages": [{"role": "user", "content": QUESTION}]},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=20.0,
    )


def _served_hash(url: str, cascade: str = "qa") -> str:
    return httpx.get(f"{url}/health", timeout=5.0).json()["cascades"][cascade]["policy_hash"]


def _reload(url: str, key: str = ADMIN) -> httpx.Response:
    return httpx.post(
        f"{url}/admin/reload", headers={"Authorization": f"Bearer {key}"}, timeout=10.0
    )


def _replace(path: Path, source: Path | str) -> None:
    """Write a file the way a deploy should: a temporary beside it, then an atomic rename."""
    tmp = path.with_suffix(".tmp")
    if isinstance(source, Path):
        shutil.copy(source, tmp)
    else:
        tmp.write_text(source)
    os.replace(tmp, path)


def _ledger_hashes(ledger: Path, request_ids: list[str], deadline_s: float = 10.0) -> dict:
    end = time.monotonic() + deadline_s
    while True:
        with sqlite3.connect(ledger) as db:
            marks = ",".join("?" * len(request_ids))
            rows = dict(
                db.execute(
                    f"SELECT request_id, policy_hash FROM ledger_requests "
                    f"WHERE request_id IN ({marks})",
                    request_ids,
                ).fetchall()
            )
        if len(rows) == len(request_ids) or time.monotonic() > end:
            return rows
        time.sleep(0.1)


def test_a_reload_under_load_fails_no_request_and_the_ledger_sees_the_new_hash(
    served, artifacts, up
) -> None:
    _answer(up, "small", "B", -0.3)
    _answer(up, "large", "B", -0.01)
    url, live = served["url"], served["live"]
    cheap, accurate = _hash(artifacts["cheap"]), _hash(artifacts["accurate"])
    assert cheap != accurate
    if _served_hash(url) != cheap:  # a previous test may have left the other one
        _replace(live, artifacts["cheap"])
        assert _reload(url).status_code == 200
    responses: list[httpx.Response] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            responses.append(_chat(url))

    def answered(at_least: int) -> None:  # by count, not by time: the CPU may be busy
        deadline = time.monotonic() + 30
        while len(responses) < at_least and time.monotonic() < deadline:
            time.sleep(0.05)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    answered(12)
    _replace(live, artifacts["accurate"])
    reload = _reload(url)
    answered(len(responses) + 12)
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert reload.status_code == 200, reload.text
    assert reload.json()["reloaded"]["qa"]["policy_hash"] == accurate
    assert _served_hash(url) == accurate
    assert len(responses) > 20
    assert [r.status_code for r in responses if r.status_code != 200] == []
    served_hashes = [r.json()["cascade"]["policy_hash"] for r in responses]
    assert set(served_hashes) == {cheap, accurate}, "the load must straddle the reload"
    ids = [r.headers["x-request-id"] for r in responses]
    ledgered = _ledger_hashes(served["ledger"], ids)
    assert ledgered == dict(zip(ids, served_hashes, strict=True))
    after = _chat(url)
    assert after.json()["cascade"]["policy_hash"] == accurate


def test_a_changed_file_is_picked_up_without_a_call(served, artifacts) -> None:
    url, live = served["url"], served["live"]
    target = (
        artifacts["cheap"]
        if _served_hash(url) != _hash(artifacts["cheap"])
        else (artifacts["accurate"])
    )
    _replace(live, target)
    deadline = time.monotonic() + 10
    while _served_hash(url) != _hash(target) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _served_hash(url) == _hash(target)


def test_a_bad_artifact_changes_nothing(served, artifacts) -> None:
    url, live = served["url"], served["live"]
    before = _served_hash(url)
    _replace(live, '{"schema": "cascade.policy/v1", "truncated')
    bad = _reload(url)
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "reload_failed"
    assert "policy.json" in bad.json()["error"]["message"]
    time.sleep(0.5)  # the watcher also sees the broken file and must keep the old policy
    assert _served_hash(url) == before
    assert _chat(url).status_code == 200
    assert _reload(url, key=KEY).status_code == 403
    assert _reload(url, key="sk-wrong").status_code == 401
    _replace(live, artifacts["cheap"])
    assert _reload(url).status_code == 200


def test_a_well_hashed_artifact_with_a_bad_field_is_refused_by_name(served, artifacts) -> None:
    """An artifact whose hash matches its content but whose field has the wrong shape (as
    a hand-edited file re-hashed, or a foreign writer, would give) is refused by
    /admin/reload naming the key, and the running policy stays."""
    url, live = served["url"], served["live"]
    before = _served_hash(url)
    art = json.loads(artifacts["accurate"].read_text())
    art["nodes"][1]["cost_usd"] = "ten cents"
    art["hash"] = content_hash(art)  # the hash matches: only the field is wrong
    _replace(live, json.dumps(art))
    bad = _reload(url)
    assert bad.status_code == 400, bad.text
    message = bad.json()["error"]["message"]
    assert "policy.json: nodes[1].cost_usd: expected a number, got str" in message
    time.sleep(0.5)  # the watcher sees the file too and must keep the old policy
    assert _served_hash(url) == before
    assert _chat(url).status_code == 200
    _replace(live, artifacts["cheap"])
    assert _reload(url).status_code == 200


def test_explored_requests_call_every_model_and_become_traces(served, up) -> None:
    _answer(up, "small", "B", -0.01)  # confident: the policy stops at small
    _answer(up, "large", "B", -0.01)
    agree = _chat(served["url"], "qx")
    _answer(up, "small", "C", -0.01)
    disagree = _chat(served["url"], "qx")
    for r in (agree, disagree):
        assert r.status_code == 200
        body = r.json()
        assert body["model"] == "small", "the response is still the policy's choice"
        assert [c["model"] for c in body["cascade"]["calls"]] == ["small", "large"]
        assert body["cascade"]["calls"][1]["decision"] == "explore"
    stats = up.get("/admin/stats").json()["models"]
    assert stats["small"]["calls"] == 2 and stats["large"]["calls"] == 2
    path = served["folder"] / "explored.jsonl"
    traces = load_traces(path)
    rows = {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}
    assert set(traces.ids) >= {agree.headers["x-request-id"], disagree.headers["x-request-id"]}
    first, second = rows[agree.headers["x-request-id"]], rows[disagree.headers["x-request-id"]]
    assert first["label"] == {"grader": "agreement", "against": "large"}
    assert first["models"]["small"]["correct"] is True
    assert second["models"]["small"]["correct"] is False
    assert second["models"]["large"]["correct"] is True
    assert second["policy_hash"] == disagree.json()["cascade"]["policy_hash"]
    with sqlite3.connect(served["ledger"]) as db:
        deadline = time.monotonic() + 10
        calls: list = []
        while len(calls) < 2 and time.monotonic() < deadline:
            calls = db.execute(
                "SELECT model, decision FROM ledger_calls WHERE request_id = ? ORDER BY call_order",
                (agree.headers["x-request-id"],),
            ).fetchall()
            time.sleep(0.1)
    assert calls == [("small", "stop"), ("large", "explore")]


def test_an_llm_judge_can_label_explored_traffic(served, up) -> None:
    _answer(up, "small", "C", -0.01)
    _answer(up, "large", "B", -0.01)
    _answer(up, "judge", "yes", -0.01)
    wrong = judge_messages(QUESTION, "C", None)[1]["content"]
    r = up.post(
        "/admin/answers",
        json={"model": "judge", "answer": "no", "confidence": -0.01, "prompt": wrong},
    )
    r.raise_for_status()
    reply = _chat(served["url"], "qj")
    assert reply.status_code == 200 and reply.json()["model"] == "small"
    rid = reply.headers["x-request-id"]
    path = served["folder"] / "judged.jsonl"
    deadline = time.monotonic() + 10
    while not (path.exists() and rid in path.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    row = json.loads(path.read_text().splitlines()[-1])
    assert row["id"] == rid
    assert row["label"] == {"grader": "judge", "model": "judge"}
    assert row["models"]["small"]["correct"] is False
    assert row["models"]["large"]["correct"] is True
    assert row["models"]["small"]["grader_cost_usd"] > 0
    assert load_traces(path).ids[-1] == rid
    assert up.get("/admin/stats").json()["models"]["judge"]["calls"] == 2
    with sqlite3.connect(served["ledger"]) as db:
        deadline = time.monotonic() + 10
        rows: list = []
        while len(rows) < 2 and time.monotonic() < deadline:
            rows = db.execute(
                "SELECT model_requested, status, cost_usd FROM ledger_requests "
                "WHERE request_id LIKE ?",
                (f"{rid}-judge-%",),
            ).fetchall()
            time.sleep(0.1)
    assert sorted(r[:2] for r in rows) == [("judge:judge", 200), ("judge:judge", 200)]
    assert all(r[2] > 0 for r in rows)


def _hash_per_worker(url: str, seen_workers: int, deadline_s: float = 20.0) -> dict[int, str]:
    """Ask /health on fresh connections until `seen_workers` distinct workers answered:
    {worker pid: the policy hash it serves for `qa`}."""
    out: dict[int, str] = {}
    end = time.monotonic() + deadline_s
    while len(out) < seen_workers and time.monotonic() < end:
        body = httpx.get(f"{url}/health", timeout=5.0).json()
        out[body["worker_pid"]] = body["cascades"]["qa"]["policy_hash"]
    return out


def test_an_admin_reload_reaches_every_worker(upstream: str, artifacts, tmp_path) -> None:
    """`serve --workers 2` with the file watch off: the one worker that receives
    POST /admin/reload makes the other reload too."""
    live = tmp_path / "policy.json"
    shutil.copy(artifacts["cheap"], live)
    config = {
        "models": {
            name: {
                "backend": "openai",
                "base_url": f"{upstream}/v1",
                "price_in_per_mtok": p,
                "price_out_per_mtok": p,
            }
            for name, p in (("small", 0.1), ("large", 10.0))
        },
        "cascades": {
            "qa": {"nodes": ["small", "large"], "reference": "large", "policy": "policy.json"}
        },
        "server": {"api_keys": [KEY], "admin_key_env": "RELOAD_TEST_ADMIN", "policy_watch_s": 0},
    }
    env = sqlite_env(tmp_path / "ledger.db", RELOAD_TEST_ADMIN=ADMIN)
    db_upgrade(env)
    with running_proxy(write_config(tmp_path, config), env, cwd=tmp_path, workers=2) as proxy:
        before = _hash_per_worker(proxy.url, 2)
        assert len(before) == 2, "both workers answer"
        assert set(before.values()) == {_hash(artifacts["cheap"])}
        _replace(live, artifacts["accurate"])
        time.sleep(1.0)  # no file watch: nothing changes by itself
        assert set(_hash_per_worker(proxy.url, 2).values()) == {_hash(artifacts["cheap"])}
        r = _reload(proxy.url)
        assert r.status_code == 200 and "other_workers" in r.json()
        time.sleep(1.5)  # the signal is polled every 0.5 s
        after = _hash_per_worker(proxy.url, 2)
        assert len(after) == 2 and set(after.values()) == {_hash(artifacts["accurate"])}
