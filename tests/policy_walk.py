"""The online policy walked over recorded traces, and checked against the offline replay."""

from __future__ import annotations

import numpy as np

from calibration.evaluate import replay_artifact
from calibration.traces import TraceSet
from policies.policy import policy_from_artifact


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
