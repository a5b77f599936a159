"""Every policy (index, threshold, agreement, single) walked online over recorded traces, by
the driver (policies/walk.py) and by the proxy engine, and checked against calibration's
offline replay of it, with and without a cost cap."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np

from calibration.baselines import agreement_outcome, single_outcome, threshold_outcome
from calibration.evaluate import replay_artifact
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.replay import Outcome, walk_traces
from calibration.traces import TraceSet, load_traces
from policies.artifact import PolicyArtifact
from policies.index import STOP
from policies.rules import AgreementPolicy, SinglePolicy, ThresholdPolicy
from policies.walk import Rule
from proxy.engine.cascade import POLICIES, CascadeEngine, Overrides
from upstreams.factory import make_backend
from upstreams.settings import ModelConfig


def assert_online_equals_replay(art: PolicyArtifact, test: TraceSet) -> int:
    """For every row of `test`, CascadePolicy walked by the proxy's driver (policies/walk.py:
    first, signal, step, as the engine calls them) explores the same models and returns the
    same answer as the vectorised replay_artifact. Returns how many rows called more than one
    node."""
    outcome = replay_artifact(art, test)
    walked = walk_traces(art.policy(), art.models, test)
    assert_same_outcome(walked, outcome, "index")
    return int((walked.calls > 1).sum())


def replays(art: PolicyArtifact, test: TraceSet) -> dict[str, Outcome]:
    """Every policy the proxy serves, replayed on `test` by calibration's own vectorised
    code: the index (replay_artifact), the artifact's threshold and agreement settings at
    its lambda (calibration/baselines.py) and the reference model alone."""
    threshold = art.threshold_setting()
    agreement = art.agreement_setting()
    return {
        "index": replay_artifact(art, test),
        "threshold": threshold_outcome(test, threshold.chain, np.array(threshold.thresholds)),
        "agreement": agreement_outcome(test, agreement.tiers, agreement.theta),
        "single": single_outcome(test, test.models.index(art.models[-1])),
    }


def rules(art: PolicyArtifact) -> dict[str, tuple[Rule, list[str]]]:
    """Every policy of `art` as the rule the driver walks, with the models of its nodes."""
    threshold = art.threshold_setting()
    agreement = art.agreement_setting()
    tiers = agreement.tiers
    return {
        "index": (art.policy(), art.models),
        "threshold": (ThresholdPolicy(threshold.chain, threshold.thresholds), threshold.chain),
        "agreement": (
            AgreementPolicy([len(t) for t in tiers], agreement.theta),
            [m for t in tiers for m in t],
        ),
        "single": (SinglePolicy(), [art.models[-1]]),
    }


def assert_walk_equals_replay(art: PolicyArtifact, test: TraceSet) -> None:
    """Every policy walked row by row by the driver (calibration.replay.walk_traces) makes
    the decisions of its vectorised replay."""
    expected = replays(art, test)
    for name, (rule, nodes) in rules(art).items():
        assert_same_outcome(walk_traces(rule, nodes, test), expected[name], name)


def assert_engine_equals_replay(
    art: PolicyArtifact, test_path: Path, test: TraceSet, policies: tuple[str, ...] = POLICIES
) -> None:
    """The proxy engine over replay backends of `test_path`, asked for each of `policies`
    (`cascade.policy`), calls the models the offline replay of that policy explores and
    returns the answer it returns, row by row. The engine reads each call's length from its
    usage (the recorded one, else tiktoken's count, as fill_costs)."""
    expected = replays(art, test)
    runs = _engine_runs(art, test_path, test, policies, None)
    for name in policies:
        for row, run in enumerate(runs[name]):
            called = sorted(test.models.index(c.model) for c in run.calls)
            assert called == list(np.flatnonzero(expected[name].explored[row])), (name, row)
            assert run.answer is not None, (name, row)
            answer = test.models.index(run.answer.model)
            assert answer == expected[name].answer_model[row], (name, row)


def assert_cap_binds_alike(
    art: PolicyArtifact, test_path: Path, test: TraceSet, cap: float
) -> dict[str, int]:
    """Under `max_cost_usd` = cap, every policy served by the engine calls what the driver's
    walk on the traces calls with the same expected node costs (the artifact's), and never
    starts a call whose expected cost would pass the cap. Returns per policy how many rows
    got an answer."""
    engine_runs = _engine_runs(art, test_path, test, POLICIES, cap)
    expected_cost: dict[str | None, float | None] = {n.model: n.cost_usd for n in art.nodes}
    expected_cost[art.reference_model] = art.reference_cost_usd
    answered: dict[str, int] = {}
    for name, (rule, nodes) in rules(art).items():
        costs = [expected_cost.get(m, 0.0) for m in nodes]
        walked = walk_traces(rule, nodes, test, max_cost_usd=cap, node_cost=costs)
        for row, run in enumerate(engine_runs[name]):
            called = sorted(test.models.index(c.model) for c in run.calls)
            assert called == list(np.flatnonzero(walked.explored[row])), (name, row)
            spent = sum(expected_cost.get(c.model, 0.0) for c in run.calls)
            assert spent <= cap + 1e-12, (name, row)
        answered[name] = sum(run.answer is not None for run in engine_runs[name])
    return answered


def _engine_runs(
    art: PolicyArtifact,
    test_path: Path,
    test: TraceSet,
    policies: tuple[str, ...],
    cap: float | None,
) -> dict[str, list]:
    names = art.models
    backends = {
        m: make_backend(m, ModelConfig(backend="replay", traces=[str(test_path)]))
        for m in test.models
    }
    engine = CascadeEngine("check", names, backends, names[-1], art)

    async def run_all() -> dict[str, list]:
        return {
            p: [
                await engine.run(test.messages[row], {}, Overrides(policy=p, max_cost_usd=cap))
                for row in range(len(test))
            ]
            for p in policies
        }

    return asyncio.run(run_all())


def assert_same_outcome(got: Outcome, expected: Outcome, name: str) -> None:
    """Row by row: the same models explored, the same answer returned, the same last call."""
    for row in range(len(expected.correct)):
        assert list(got.explored[row]) == list(expected.explored[row]), (name, row)
        assert got.answer_model[row] == expected.answer_model[row], (name, row)
        assert got.stop_model[row] == expected.stop_model[row], (name, row)


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
