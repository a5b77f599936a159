"""The proxy on open-ended prompts, end to end: `cascade serve` in front of the fake upstream
answering AlpacaEval instructions with the recorded long answers of the four FuseChat models
(tests/data, shipped), under a policy fitted on the shipped train slice whose nodes read
free-text signals (policies/textcal.py). The proxy must call the models the offline replay
calls, return (and stream) the answer it recalls, and ledger every call."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import numpy as np
import pytest

from calibration.artifact import build_artifact
from calibration.evaluate import replay_artifact
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.pricing import fill_costs
from calibration.traces import load_traces
from tests.serving import db_upgrade, fake_upstream, running_proxy, sqlite_env, write_config
from tests.shipped import ALPACA_TEST, ALPACA_TRAIN

KEY = "sk-test-open"
ROWS = 12  # test prompts sent through the proxy


def length_labelled(path: Path, out: Path) -> Path:
    """The shipped train slice with `correct` relabelled as "longer than the model's median
    answer": real long answers with a signal strong enough that the fitted policy's
    decisions vary with what each answer shows (on the judge's labels 100 rows leave the
    free-text signals too weak to be chosen out of fold, so every query would take one path)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    for model in rows[0]["models"]:
        median = np.median([r["models"][model]["tokens_out"] for r in rows])
        for r in rows:
            r["models"][model]["correct"] = bool(r["models"][model]["tokens_out"] > median)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(artifact, test traces, proxy URL, ledger path): a policy over the four models as a
    line, its nodes calibrated on free-text features chosen out of fold, at a cost price
    where some test queries stop after one call and others pay for more."""
    folder = tmp_path_factory.mktemp("open")
    train = fill_costs(load_traces(length_labelled(ALPACA_TRAIN, folder / "train.jsonl")))
    test = fill_costs(load_traces(ALPACA_TEST))
    fitted = FittedIndex(
        train, recall=True, models=list(train.models), use_difficulty=False, transitions="line"
    )
    outcomes = {mu: replay_artifact(_art(fitted, mu), test) for mu in DEFAULT_MUS}
    mu = next(  # some queries stop after one call, some pay for more
        m for m, o in outcomes.items() if 0 < (o.calls[:ROWS] == 1).sum() < ROWS
    )
    art = _art(fitted, mu)
    policy = folder / "policy.json"
    policy.write_text(art.to_json())
    models = ",".join(test.models)
    with fake_upstream(models, "--traces", str(ALPACA_TEST)) as up:
        config = {
            "models": {
                m: {
                    "backend": "openai",
                    "base_url": f"{up.url}/v1",
                    "price_in_per_mtok": 0.1 * (k + 1),
                    "price_out_per_mtok": 0.1 * (k + 1),
                    "timeout_s": 5.0,
                    "max_retries": 0,
                }
                for k, m in enumerate(test.models)
            },
            "cascades": {
                "chat": {
                    "nodes": list(test.models),
                    "reference": test.models[-1],
                    "policy": str(policy),
                }
            },
            "server": {"api_keys": [KEY], "max_body_bytes": 200_000},
        }
        ledger = folder / "ledger.db"
        env = sqlite_env(ledger)
        db_upgrade(env)
        with running_proxy(write_config(folder, config), env) as proxy:
            yield art, test, proxy.url, ledger


def _art(fitted: FittedIndex, mu: float) -> dict:
    return build_artifact(fitted, mu, train_path=str(ALPACA_TRAIN))


def _post(url: str, messages: list[dict], stream: bool = False) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "chat", "messages": messages, "stream": stream},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30.0,
    )


def test_long_prompts_get_the_recalled_answer_the_replay_picks(setup) -> None:
    art, test, url, ledger = setup
    assert all(c and c["kind"] == "text" for c in art.data["length_calibration"][:3])
    assert art.data["agreement"] == "graded"  # recall reads how much the essays agree
    outcome = replay_artifact(art, test)
    ids = []
    for row in range(ROWS):
        r = _post(url, test.messages[row])
        assert r.status_code == 200, r.text
        body = r.json()
        called = sorted(test.models.index(c["model"]) for c in body["cascade"]["calls"])
        assert called == list(np.flatnonzero(outcome.explored[row])), row
        chosen = int(outcome.answer_model[row])
        assert body["model"] == test.models[chosen]
        content = body["choices"][0]["message"]["content"]
        assert content == test.answers[row][chosen]
        assert len(content) > 200  # an essay, not a letter
        ids.append(r.headers["x-request-id"])
    calls = outcome.calls[:ROWS]
    assert (calls == 1).any() and (calls > 1).any()  # it stops early and it escalates
    assert body["cascade"]["calls"][-1]["p_correct"] is not None
    _assert_ledgered(ledger, ids, int(calls.sum()))
    # under graded agreement recall returns an earlier essay over the last one on some
    # queries: the proxy serves that essay, as the replay does
    recalled = np.flatnonzero(outcome.recalled)
    assert len(recalled) > 0
    for row in recalled[:3]:
        r = _post(url, test.messages[int(row)])
        chosen = int(outcome.answer_model[row])
        last = int(outcome.stop_model[row])
        assert chosen != last
        body = r.json()
        assert body["model"] == test.models[chosen]
        assert body["choices"][0]["message"]["content"] == test.answers[row][chosen]
        called = sorted(test.models.index(c["model"]) for c in body["cascade"]["calls"])
        assert called == list(np.flatnonzero(outcome.explored[row]))


def _assert_ledgered(ledger: Path, ids: list[str], n_calls: int) -> None:
    """Every call of the requests is in the ledger with its tokens, cost and p_correct."""
    import time

    marks = ",".join("?" * len(ids))
    for _ in range(100):  # the writer flushes off the request path
        with sqlite3.connect(ledger) as db:
            rows = db.execute(
                f"SELECT tokens_out, cost_usd, p_correct, decision FROM ledger_calls "
                f"WHERE request_id IN ({marks})",
                ids,
            ).fetchall()
        if len(rows) >= n_calls:
            break
        time.sleep(0.1)
    assert len(rows) == n_calls
    assert all(t and t > 0 for t, _, _, _ in rows)
    assert all(c and c > 0 for _, c, _, _ in rows)
    assert all(p is not None and 0.0 < p < 1.0 for _, _, p, _ in rows)


def test_the_chosen_long_answer_streams_whole(setup) -> None:
    art, test, url, _ = setup
    outcome = replay_artifact(art, test)
    row = int(np.argmax(outcome.calls[:ROWS]))  # a query that escalated
    r = _post(url, test.messages[row], stream=True)
    assert r.status_code == 200
    text, models = "", set()
    for line in r.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            models.add(chunk["model"])
            for choice in chunk.get("choices", []):
                text += choice["delta"].get("content") or ""
    chosen = int(outcome.answer_model[row])
    assert text == test.answers[row][chosen]
    assert models == {test.models[chosen]}
