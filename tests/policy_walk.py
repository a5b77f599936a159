"""The online policy and the proxy engine walked over recorded traces, and checked against
the offline replay."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from calibration.evaluate import replay_artifact
from calibration.traces import TraceSet
from policies.policy import policy_from_artifact
from proxy.backends.factory import make_backend
from proxy.config import ModelConfig
from proxy.engine import CascadeEngine, Overrides


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
