"""Allowed transitions: the spec forms, the fit honouring them on the synthetic traces (and, as
research twins, on the real MMLU traces), the config and the proxy engine refusing a policy
that could take a forbidden one."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest

from calibration.artifact import PolicyArtifact, build_artifact
from calibration.fit import FittedIndex, resolution_warnings
from calibration.traces import load_traces
from policies.transitions import (
    TransitionError,
    allowed_edges,
    describe,
    parse_spec_text,
    taken_edges,
)
from proxy.config import ConfigError, parse_config
from proxy.engine.cascade import CascadeEngine

NODES = ["a", "b", "c"]


def test_spec_forms() -> None:
    assert allowed_edges("skips", NODES) == {(-1, 0), (-1, 1), (-1, 2), (0, 1), (0, 2), (1, 2)}
    assert allowed_edges(None, NODES) == allowed_edges("skips", NODES)
    assert allowed_edges("line", NODES) == {(-1, 0), (0, 1), (1, 2)}
    two_lines = parse_spec_text("start>a, start>b, a>c, b>c")
    assert two_lines == {"start": ["a", "b"], "a": ["c"], "b": ["c"]}
    edges = allowed_edges(two_lines, NODES)
    assert edges == {(-1, 0), (-1, 1), (0, 2), (1, 2)}
    assert describe(edges, NODES) == "start>a, start>b, a>c, b>c"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"start": ["a"], "c": ["a"]}, "goes back"),
        ({"start": ["z"]}, "'z' is not a node"),
        ({"a": ["b"]}, "nothing leaves 'start'"),
        ("circle", "unknown transitions"),
    ],
)
def test_bad_specs_are_refused(spec, message) -> None:
    with pytest.raises(TransitionError, match=message):
        allowed_edges(spec, NODES)


def test_bad_command_line_spec() -> None:
    with pytest.raises(TransitionError, match="expected FROM>TO"):
        parse_spec_text("a-b")


def test_taken_edges_reads_decision_tables() -> None:
    stop = -1
    decision = [np.array([0, 2]), np.array([stop, 1]), np.array([stop]), np.array([stop])]
    assert taken_edges(decision) == {(-1, 0), (-1, 2), (0, 1)}


@pytest.fixture(
    scope="module",
    params=["synthetic", pytest.param("mmlu", marks=pytest.mark.research_traces)],
)
def train(request):
    """Five models, cheapest first: the synthetic train traces, or the real MMLU llama ones
    (the research twin: its param carries the marker)."""
    if request.param == "synthetic":
        return load_traces(request.getfixturevalue("synthetic")[0])
    return load_traces(request.getfixturevalue("traces_dir") / "mmlu-llama-train.jsonl")


@pytest.fixture(scope="module")
def fitted(train) -> dict[str, FittedIndex]:
    """The same four cheapest models fitted with skips and as a line."""
    models = list(train.models[:4])  # cheapest first in the trace
    return {
        "skips": FittedIndex(train, recall=True, models=models),
        "line": FittedIndex(train, recall=True, models=models, transitions="line"),
    }


def _taken_by_name(art: PolicyArtifact) -> set[tuple[str, str]]:
    names = art.models
    tables = art.decision_tables()
    return {("start" if i < 0 else names[i], names[j]) for t in tables for i, j in taken_edges(t)}


def test_the_fit_takes_only_allowed_transitions(train, fitted) -> None:
    models = list(train.models[:4])
    skips = _taken_by_name(build_artifact(fitted["skips"], 0.5, train_path=train.path))
    # on these traces the unconstrained policy does skip: otherwise this test proves nothing
    assert any((a, b) not in _line(models) for a, b in skips), skips

    art = build_artifact(fitted["line"], 0.5, train_path=train.path)
    assert _taken_by_name(art) <= _line(models)
    assert art.transitions == describe(allowed_edges("line", models), models)

    spec = {"start": [models[0], models[1]], models[0]: [models[3]], models[1]: [models[2]]}
    lines = FittedIndex(train, recall=True, transitions=spec)  # the map names the nodes
    assert [train.models[j] for j in lines.nodes] == models
    allowed = {(a, b) for a, bs in spec.items() for b in bs}
    assert _taken_by_name(build_artifact(lines, 0.5, train_path=train.path)) <= allowed


def _line(models: list[str]) -> set[tuple[str, str]]:
    return {("start", models[0])} | set(pairwise(models))


def test_the_engine_refuses_a_policy_taking_a_forbidden_transition(train, fitted) -> None:
    models = list(train.models[:4])
    backends = dict.fromkeys(train.models)  # the artifact's baselines use every model
    skipping = build_artifact(fitted["skips"], 0.5, train_path="x")
    with pytest.raises(ValueError, match=r"forbids; refit it with `cascade fit --transitions"):
        CascadeEngine("qa", models, backends, models[-1], skipping, transitions="line")
    engine = CascadeEngine("qa", models, backends, models[-1], skipping, transitions="skips")
    assert engine.nodes == models
    art = build_artifact(fitted["line"], 0.5, train_path="x")
    assert CascadeEngine("qa", models, backends, models[-1], art, transitions="line").policy


def test_the_config_checks_transitions_against_its_nodes() -> None:
    doc = {
        "models": {"a": {"backend": "replay", "traces": ["t.jsonl"]}},
        "cascades": {"qa": {"nodes": ["a"], "reference": "a", "transitions": {"start": ["b"]}}},
    }
    with pytest.raises(ConfigError, match=r"cascades\.qa.*'b' is not a node"):
        parse_config(doc)
    doc["cascades"]["qa"]["transitions"] = "line"
    assert parse_config(doc).cascades["qa"].transitions == "line"


def test_thin_calibration_sets_are_warned_about() -> None:
    assert resolution_warnings(2000, 10, None) == []
    few = resolution_warnings(150, 10, None)
    assert any("only 150 calibration rows" in w for w in few)
    assert any("about 15 rows per bin" in w for w in few)
    assert any("difficulty" in w for w in resolution_warnings(300, 8, np.array([0, 3])))
