"""The online policy and the proxy engine walked over recorded traces, and checked against
the offline replay."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np

from calibration.evaluate import replay_artifact
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.traces import TraceSet, load_traces
from policies.index import STOP
from policies.policy import policy_from_artifact
from proxy.engine.cascade import CascadeEngine, Overrides
from upstreams.factory import make_backend
from upstreams.settings import ModelConfig


def assert_online_equals_replay(art: dict, test: TraceSet) -> int:
    """For every row of `test`, CascadePolicy (first, signal, step: what the proxy calls)
    explores the same models and returns the same answer as replay_artifact. Returns how
    many rows called more than one node."""
    outcome = replay_artifact(art, test)
    policy = policy_from_artifact(art)
    nodes = [test.models.index(n["model"]) for n in art["nodes"]]
    escalated = 0
    for row in range(len(test)):
        step = policy.first(policy.root_state(test.prompt(row)))
        explored: list[int] = []
        conf: list[float | None] = [None] * len(nodes)
        extracted: list[str | None] = [None] * len(nodes)
        while step.next_node is not None:
            k = step.next_node
            explored.append(k)
            extracted[k] = test.extracted[row][nodes[k]]
            raw = float(test.confidence[row, nodes[k]])
            tokens = float(test.tokens_out[row, nodes[k]])
            conf[k] = policy.signal(k, raw, tokens, test.answers[row][nodes[k]])
            step = policy.step(explored, extracted, conf)
        called = sorted(nodes[k] for k in explored)
        assert called == list(np.flatnonzero(outcome.explored[row])), row
        assert nodes[step.answer_node] == outcome.answer_model[row], row
        escalated += len(explored) > 1
    return escalated


def assert_engine_equals_replay(art: dict, test_path: Path, test: TraceSet) -> None:
    """The proxy engine over replay backends of `test_path` calls the models the offline
    replay explores and returns the answer it returns, row by row. The engine reads each
    call's length from its usage (the recorded one, else tiktoken's count, as fill_costs)."""
    outcome = replay_artifact(art, test)
    names = [n["model"] for n in art["nodes"]]
    backends = {
        m: make_backend(m, ModelConfig(backend="replay", traces=[str(test_path)]))
        for m in test.models
    }
    engine = CascadeEngine("check", names, backends, names[-1], art)

    async def run_all() -> list:
        return [await engine.run(test.messages[row], {}, Overrides()) for row in range(len(test))]

    runs = asyncio.run(run_all())
    for row, run in enumerate(runs):
        called = sorted(test.models.index(c.model) for c in run.calls)
        assert called == list(np.flatnonzero(outcome.explored[row])), row
        assert run.answer is not None
        assert test.models.index(run.answer.model) == outcome.answer_model[row], row


def fit_small_large(train_path: Path, small: str = "small", large: str = "large") -> FittedIndex:
    """The index policy over `small` -> `large`, fitted as a line on the models `small` and
    `large` of the traces at `train_path` (renamed as the fake upstream's models): every query
    starts at `small`, and at lambda 1 both are called. The tests fit it on the synthetic
    traces (tests/synthetic.py); the research tests also on the real MMLU traces
    (llama3.2-1b and llama3.1-405b)."""
    train = load_traces(train_path).select_models([small, large])
    train = dataclasses.replace(train, models=("small", "large"))
    return FittedIndex(
        train, recall=True, models=["small", "large"], use_difficulty=False, transitions="line"
    )


def textbook_mu(fitted: FittedIndex) -> float:
    """The cheapest cost price of the sweep at which `fit_small_large`'s tables are the
    textbook cascade the serving tests rely on: start at `small`, stop on its most
    confident bin, escalate to `large` from every other. Found, not hard-coded, so a change
    to the fit cannot silently turn the serving tests' policy into another one."""
    for mu in DEFAULT_MUS:
        root, small = (d.tolist() for d in fitted.tables(mu).decision[:2])
        if root == [0] and small[0] == STOP and all(d == 1 for d in small[1:]):
            return mu
    raise AssertionError("no cost price gives small -> large with a confident stop")
