"""A key budget's worst case counts every call a request can make (proxy/http/keys.py
`worst_case`, proxy/engine/cascade.py `most_calls`): a sampled node `model@k` costs k answers
(one `n: k` call or k calls), and since any request of a cascade with `explore_rate` > 0 may
be explored, every explored call and further sample counts too. The arithmetic by hand, the
calls listed for a real engine over a fitted sampled policy, and end to end through real
proxies, a real fake upstream and keys in a real PostgreSQL: a budget just below the true
worst case is refused (429 budget_exceeded) with no upstream call, one just above is
admitted, and the calls the upstream then sees are the ones counted."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import httpx
import pytest

from calibration.artifact import load_artifact
from policies.judging import JUDGE_PARAMS, judge_messages
from proxy.config import load_config
from proxy.engine.cascade import CascadeEngine
from proxy.http.keys import WorstCase, judge_calls, price_calls
from tests.serving import QUESTION, db_upgrade, fake_upstream, running_proxy, write_config
from tests.test_keys import _create, _until
from tests.test_ledger import pg_db  # noqa: F401  (the fixture)
from tests.test_sampling_proxy import sampled_policy  # noqa: F401  (the fixture)
from upstreams.factory import make_backend

PRICES = {"small": (0.1, 0.2), "large": (3.0, 5.0)}  # USD per million tokens, in and out
MAX_TOKENS = 10


def _price(model: str):
    p_in, p_out = PRICES[model]
    return (p_in / 1e6, p_out / 1e6), None


# ---------------------------------------------------------------- the arithmetic


def test_calls_are_priced_per_input_and_per_choice() -> None:
    prices = {"a": ((1e-6, 2e-6), None), "b": ((3e-6, 4e-6), 50), "c": (None, None)}
    calls = [("a", 1), ("b", 3), ("a", 1), ("c", 2), ("c", 1)]
    got = price_calls(calls, 100, 10, prices.__getitem__)
    # a twice: 100 in + 10 out each; b once: 100 in + 3 choices of 10 out; c unknown
    assert got.usd == pytest.approx(2 * (100 * 1e-6 + 10 * 2e-6) + 100 * 3e-6 + 30 * 4e-6)
    assert got.unpriced == ["c"]
    # without max_tokens: the model's output limit, else 4096
    got = price_calls(calls, 100, None, prices.__getitem__)
    assert got.usd == pytest.approx(2 * (100 * 1e-6 + 4096 * 2e-6) + 100 * 3e-6 + 150 * 4e-6)
    with pytest.raises(ValueError, match="asks for 0 choices"):
        price_calls([("a", 0)], 100, 10, prices.__getitem__)


def test_a_judge_reads_each_answer_at_its_bound() -> None:
    prices = {"judge": ((1e-6, 1e-5), None), "small": ((0.0, 0.0), 300), "large": (None, None)}
    template = sum(len(m["content"].encode()) + 8 for m in judge_messages("", "", None))
    verdict = JUDGE_PARAMS["max_tokens"]
    got = judge_calls("judge", ["small", "large"], 40, None, prices.__getitem__)
    # small's answer is at most its 300-token limit; large's at most 4096 (limit unknown)
    expected = (40 + template + 300) * 1e-6 + (40 + template + 4096) * 1e-6 + 2 * verdict * 1e-5
    assert got.usd == pytest.approx(expected)
    assert judge_calls("large", ["small"], 40, 10, prices.__getitem__) == WorstCase(0.0, ["large"])
    assert WorstCase(1.0, ["x"]).plus(WorstCase(2.0, ["x", "y"])) == WorstCase(3.0, ["x", "y"])


def _engine(tmp_path: Path, policy: Path, sampling: str) -> CascadeEngine:
    """The `qa` cascade `small@5 -> large` over real (unstarted) backends."""
    config = write_config(tmp_path, _config("http://127.0.0.1:9", policy, sampling, 1.0))
    cfg = load_config(config)
    backends = {name: make_backend(name, m) for name, m in cfg.models.items()}
    cascade = cfg.cascades["qa"]
    return CascadeEngine("qa", cascade.nodes, backends, cascade.reference,
                         artifact=load_artifact(policy), transitions="line")  # fmt: skip


@pytest.mark.parametrize(
    ("sampling", "walked", "explored"),
    [
        # n: small@5 is one call with n: 5; explored: small and large called up front (large's
        # call serves the walk), then small sampled 4 times more in one call with n: 4
        ("n", [("small", 5), ("large", 1)],
         [("small", 1), ("large", 1), ("small", 5), ("small", 4)]),
        # parallel: five calls of small; explored: the up-front call of small serves the
        # first of them, and the 4 further samples are 4 more calls
        ("parallel", [("small", 1)] * 5 + [("large", 1)],
         [("small", 1), ("large", 1)] + [("small", 1)] * 4 + [("small", 1)] * 4),
    ],
)  # fmt: skip
def test_an_engine_lists_every_call_a_request_can_make(
    tmp_path: Path,
    sampled_policy: Path,  # noqa: F811
    sampling: str,
    walked: list,
    explored: list,
) -> None:
    engine = _engine(tmp_path, sampled_policy, sampling)
    assert engine.most_calls("index", None, explore=False) == walked
    assert engine.most_calls("index", None, explore=True) == explored
    # a baseline override is never explored: `single` calls the reference alone
    assert engine.most_calls("single", None, explore=True) == [("large", 1)]


# ---------------------------------------------------------------- end to end


def _config(upstream: str, policy: Path, sampling: str, explore_rate: float) -> dict:
    models = {
        m: {"backend": "openai", "base_url": f"{upstream}/v1", "max_retries": 0,
            "price_in_per_mtok": p_in, "price_out_per_mtok": p_out,
            **({"sampling": sampling} if m == "small" else {})}
        for m, (p_in, p_out) in PRICES.items()
    }  # fmt: skip
    cascade = {"nodes": ["small@5", "large"], "transitions": "line", "reference": "large",
               "policy": str(policy), "explore_rate": explore_rate}  # fmt: skip
    server = {"database_keys": True, "keys_refresh_s": 0.5}
    return {"models": models, "cascades": {"qa": cascade}, "server": server}


def _true_worst(calls: list[tuple[str, int]], content: str) -> float:
    """By hand: each call reads the prompt's bytes (+8 for its one message) and writes
    MAX_TOKENS per choice."""
    size = len(content.encode()) + 8
    usd = 0.0
    for model, choices in calls:
        p_in, p_out = PRICES[model]
        usd += (size * p_in + choices * MAX_TOKENS * p_out) / 1e6
    return usd


def _ask(url: str, secret: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "qa", "messages": [{"role": "user", "content": QUESTION}],
              "max_tokens": MAX_TOKENS},
        headers={"Authorization": f"Bearer {secret}"},
        timeout=30.0,
    )  # fmt: skip


@pytest.mark.parametrize("sampling", ["n", "parallel"])
def test_a_budget_below_the_sampled_explored_worst_case_is_refused_before_any_call(
    pg_db,  # noqa: F811
    sampled_policy: Path,  # noqa: F811
    tmp_path: Path,
    sampling: str,
) -> None:
    """Every request of `qa` may be explored (explore_rate 1): its worst case is the calls
    `most_calls` lists for an explored request, priced by hand here. A key with a budget a
    millionth below it gets 429 budget_exceeded and the upstream sees no call; a key a
    millionth above is answered, and the upstream sees exactly the calls counted (an
    explored request makes all of them), costing no more than the worst case."""
    env = {**os.environ, "CASCADE_DATABASE_URL": pg_db[1]}
    db_upgrade(env)
    calls = {
        "n": [("small", 1), ("large", 1), ("small", 5), ("small", 4)],
        "parallel": [("small", 1)] * 9 + [("large", 1)],
    }[sampling]
    worst = _true_worst(calls, QUESTION)
    # the refused budget is above what counting each model once with one answer gives
    assert worst * (1 - 1e-6) > _true_worst([("small", 1), ("large", 1)], QUESTION)
    below = _create(env, "below", "--budget-usd", repr(worst * (1 - 1e-6)), "--period", "day")
    above = _create(env, "above", "--budget-usd", repr(worst * (1 + 1e-6)), "--period", "day")
    with fake_upstream("small,large", log=tmp_path / "upstream.txt") as up:
        httpx.post(f"{up.url}/admin/answers", json=[
            {"model": "small", "answer": "B", "confidence": -0.01, "samples": ["C", "B", "A"]},
            {"model": "large", "answer": "B", "confidence": -0.01},
        ], timeout=5).raise_for_status()  # fmt: skip
        config = write_config(tmp_path, _config(up.url, sampled_policy, sampling, 1.0))
        with running_proxy(config, env, cwd=tmp_path) as proxy:
            _until(lambda: httpx.get(f"{proxy.url}/health", timeout=10).json()["keys"]["keys"], 2)
            httpx.delete(f"{up.url}/admin/stats", timeout=5).raise_for_status()

            refused = _ask(proxy.url, below)
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["code"] == "budget_exceeded"
            assert f"could cost up to ${worst:.6f}" in error["message"]
            assert httpx.get(f"{up.url}/admin/stats", timeout=5).json()["calls"] == 0

            admitted = _ask(proxy.url, above)
            assert admitted.status_code == 200, admitted.text
            seen = httpx.get(f"{up.url}/admin/stats", timeout=5).json()["models"]
            counted = Counter(model for model, _ in calls)
            assert {m: seen[m]["calls"] for m in ("small", "large")} == dict(counted)
            cost = float(admitted.headers["x-cascade-cost-usd"])
            assert 0 < cost <= worst
