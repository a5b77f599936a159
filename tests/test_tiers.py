"""Tiers as cascade nodes: the vote rule, tier columns built from traces, a policy fitted
over a tier, and the real proxy calling a tier's models in parallel and ledgering each. The
traces are the synthetic ones (tests/synthetic.py) and, as research twins, the real MMLU
ones."""

from __future__ import annotations

import dataclasses
import math
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from calibration.artifact import build_artifact, save_artifact
from calibration.evaluate import evaluate_artifact
from calibration.fit import FittedIndex
from calibration.tiers import add_tiers, parse_tiers
from calibration.traces import TraceError, load_traces
from policies.tiers import tier_members, tier_name, tier_vote
from tests.serving import QUESTION, db_upgrade, running_proxy, sqlite_env, write_config


@dataclasses.dataclass(frozen=True)
class Ladder:
    """A train/test pair of traces, its three cheapest models and its priciest one."""

    train: Path
    test: Path
    small: list[str]
    large: str

    @property
    def tier(self) -> str:
        return tier_name(self.small)


@pytest.fixture(
    scope="module",
    params=["synthetic", pytest.param("mmlu", marks=pytest.mark.research_traces)],
)
def ladder(request) -> Ladder:
    """The synthetic ladder, or the real MMLU llama one (the research twin: its param
    carries the marker)."""
    if request.param == "synthetic":
        train, test = request.getfixturevalue("synthetic")
        return Ladder(train, test, ["tiny", "small", "medium"], "large")
    folder = request.getfixturevalue("traces_dir")
    return Ladder(
        folder / "mmlu-llama-train.jsonl",
        folder / "mmlu-llama-test.jsonl",
        ["llama3.2-1b", "llama3.2-3b", "llama3.1-8b"],
        "llama3.1-405b",
    )


def test_the_vote_rule() -> None:
    assert tier_name(["a", "b"]) == "tier:a+b" and tier_members("tier:a+b") == ["a", "b"]
    assert tier_members("a") is None
    k, conf = tier_vote(["B", "B", "C"], [-0.1, -0.3, -0.01])
    assert k == 1 and conf == pytest.approx(math.log(2 / 3) - 0.2)
    k, conf = tier_vote(["A", "B", None], [-0.1, -0.2, None])  # a tie: the priciest voter
    assert k == 1 and conf == pytest.approx(math.log(1 / 3) - 0.2)
    assert tier_vote([None, None], [None, None]) == (None, None)
    with pytest.raises(ValueError, match="at least two"):
        tier_name(["a"])


def test_tier_columns_built_from_traces(ladder: Ladder) -> None:
    traces = load_traces(ladder.train)
    tiered = add_tiers(traces, parse_tiers("+".join(ladder.small)))
    assert ladder.tier in tiered.models and len(tiered.models) == len(traces.models) + 1
    cost = np.nanmean(tiered.cost_usd, axis=0)
    assert (np.diff(cost) >= 0).all(), "columns stay cheapest first"
    assert tiered.models[tiered.reference] == ladder.large, "a tier is never the reference"
    t = tiered.models.index(ladder.tier)
    idx = [traces.models.index(m) for m in ladder.small]
    for i in range(len(traces)):  # by hand: the majority answer, its correctness, summed cost
        answers = [traces.extracted[i][j] for j in idx]
        counts = {a: answers.count(a) for a in answers if a is not None}
        top = max(counts.values())
        winners = [j for j, a in zip(idx, answers, strict=True) if counts.get(a) == top]
        assert tiered.correct[i, t] == traces.correct[i, winners[-1]]
        assert tiered.cost_usd[i, t] == pytest.approx(traces.cost_usd[i, idx].sum())
    majority_acc = tiered.correct[:, t].mean()
    assert majority_acc >= traces.correct[:, idx].mean(axis=0).min()
    with pytest.raises(TraceError, match="unknown model"):
        add_tiers(traces, [[ladder.small[0], "nope"]])
    with pytest.raises(TraceError, match="bad --tiers"):
        parse_tiers("a,b")


@pytest.fixture(scope="module")
def tier_policy(ladder: Ladder, tmp_path_factory) -> Path:
    """A line `tier:s1+s2+s3 -> large` fitted on the ladder's traces (models renamed)."""
    names = {**dict(zip(ladder.small, ["s1", "s2", "s3"], strict=True)), ladder.large: "large"}
    train = load_traces(ladder.train).select_models(list(names))
    train = dataclasses.replace(train, models=tuple(names.values()))
    train = add_tiers(train, [["s1", "s2", "s3"]])
    fitted = FittedIndex(train, recall=True, models=["tier:s1+s2+s3", "large"], transitions="line")
    art = build_artifact(fitted, 0.05, train_path=str(ladder.train), answer_kind="choice")
    test = load_traces(ladder.test).select_models(list(names))
    test = dataclasses.replace(test, models=tuple(names.values()))
    report = evaluate_artifact(art, test)  # evaluate adds the tier column itself
    assert 0.5 < report["accuracy"] <= 1.0
    path = tmp_path_factory.mktemp("tiers") / "policy.json"
    save_artifact(art, path)
    return path


def test_the_proxy_calls_a_tier_in_parallel_and_ledgers_each_model(
    upstream: str, tier_policy: Path, tmp_path: Path
) -> None:
    up = httpx.Client(base_url=upstream, timeout=5.0)
    up.delete("/admin/faults").raise_for_status()
    up.delete("/admin/stats").raise_for_status()
    for model, answer in (("s1", "B"), ("s2", "B"), ("s3", "C"), ("large", "B")):
        r = up.post("/admin/answers", json={"model": model, "answer": answer, "confidence": -0.01})
        r.raise_for_status()
    price = {"s1": 0.05, "s2": 0.1, "s3": 0.2, "large": 5.0}
    config = {
        "models": {
            m: {
                "backend": "openai",
                "base_url": f"{upstream}/v1",
                "price_in_per_mtok": p,
                "price_out_per_mtok": p,
            }
            for m, p in price.items()
        },
        "cascades": {
            "qa": {
                "nodes": [["s1", "s2", "s3"], "large"],
                "transitions": "line",
                "reference": "large",
                "policy": str(tier_policy),
            }
        },
    }
    env = sqlite_env(tmp_path / "ledger.db")
    db_upgrade(env)
    with running_proxy(write_config(tmp_path, config), env) as proxy:
        reply = httpx.post(
            f"{proxy.url}/v1/chat/completions",
            json={"model": "qa", "messages": [{"role": "user", "content": QUESTION}]},
            timeout=20.0,
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    first = body["cascade"]["calls"][0]
    assert first["model"] == "tier:s1+s2+s3"
    assert [(m["model"], m["answer"]) for m in first["members"]] == [
        ("s1", "B"),
        ("s2", "B"),
        ("s3", "C"),
    ]
    assert first["confidence"] == pytest.approx(math.log(2 / 3) - 0.01, abs=1e-3)
    stats = up.get("/admin/stats").json()["models"]
    assert {m: stats[m]["calls"] for m in ("s1", "s2", "s3")} == {"s1": 1, "s2": 1, "s3": 1}
    models_called = [m["model"] for m in first["members"]] + [
        c["model"] for c in body["cascade"]["calls"][1:]
    ]
    assert reply.headers["x-cascade-calls"] == str(len(models_called))
    if len(body["cascade"]["calls"]) == 1:  # stopped at the tier: the majority's priciest voter
        assert body["model"] == "s2"
    with sqlite3.connect(tmp_path / "ledger.db") as db:
        deadline = time.monotonic() + 10
        rows: list = []
        while len(rows) < len(models_called) and time.monotonic() < deadline:
            rows = db.execute(
                "SELECT model, agreement, node, decision FROM ledger_calls WHERE request_id = ? "
                "ORDER BY call_order",
                (reply.headers["x-request-id"],),
            ).fetchall()
            time.sleep(0.1)
    assert [r[0] for r in rows] == models_called
    assert [r[1] for r in rows[:3]] == [1.0, 1.0, 0.0]  # voted with the tier's answer or not
    assert {r[2] for r in rows[:3]} == {0} and len({r[3] for r in rows[:3]}) == 1


def test_exploring_never_counts_one_upstream_call_twice() -> None:
    """A model that is a node and also in a tier: with exploration's prefetch, its first
    use takes the prefetched call and its second makes a call of its own (as without
    exploration), so every NodeCall stands for exactly one upstream call."""
    import asyncio

    from proxy.engine.cascade import _Caller
    from upstreams.base import CallResult

    calls: dict[str, int] = {}

    class Counting:
        def __init__(self, name: str) -> None:
            self.name = name

        async def complete(self, messages: list[dict], params: dict) -> CallResult:
            calls[self.name] = calls.get(self.name, 0) + 1
            return CallResult(model=self.name, text="B", cost_usd=1.0)

    async def scenario() -> list:
        caller = _Caller({m: Counting(m) for m in ("a", "b")}, "choice", [], {})
        caller.prefetch(["a", "b"])
        alone = await caller.call(0, "a")
        tier = await caller.call(1, "tier:a+b")
        caller.cancel()
        return [alone, *tier.members]

    made = asyncio.run(scenario())
    assert calls == {"a": 2, "b": 1}
    assert len(made) == sum(calls.values())
    assert len({id(c.result) for c in made}) == len(made)
