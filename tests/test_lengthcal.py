"""Length-calibrated confidences (policies/lengthcal.py): the arithmetic, when the fit uses
them, and the same decisions offline (replay), online (CascadePolicy) and in the proxy's
engine over recorded GSM8K chains of thought, where the length is the stronger signal: the
RouteLLM traces shipped in proxy/demo (no confidences) and, as research tests, the Llama
GSM8K traces (with self-check confidences)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest

from calibration.artifact import PolicyArtifact, build_artifact
from calibration.evaluate import replay_artifact
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.pricing import fill_costs
from calibration.traces import TraceSet, load_traces
from policies.lengthcal import (
    LengthCalibrator,
    calibrated_columns,
    calibrators_from,
    marker_columns,
)
from proxy import demo
from tests.policy_walk import (
    assert_cap_binds_alike,
    assert_engine_equals_replay,
    assert_online_equals_replay,
    assert_walk_equals_replay,
)

CAL = LengthCalibrator((1.2, -0.8, 0.1, 0.9), 0.3, (0.5, 4.0, 17.0, 0.8), (1.5, 0.9, 7.0, 0.4))
TEXTS = ["so 7\n#### 7", "it is 12", "The answer is 3.", "#### 40", "cut off mid-", "B"]


@pytest.mark.parametrize("uses_confidence", [True, False])
def test_one_call_and_a_column_give_the_same_log_probability(uses_confidence: bool) -> None:
    cal = dataclasses.replace(CAL, uses_confidence=uses_confidence)
    conf = np.array([-0.01, -0.7, -3.0, np.nan, -0.2, 0.0])
    tokens = np.array([12.0, 150.0, 600.0, 40.0, np.nan, 1.0])
    marker = marker_columns([[t] for t in TEXTS], [0])[:, 0]
    assert marker.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    column = cal.log_p(conf, tokens, marker)
    for c, t, text, expected in zip(conf, tokens, TEXTS, column, strict=True):
        raw = None if math.isnan(c) else float(c)
        got = cal.one(raw, None if math.isnan(t) else float(t), text)
        if math.isnan(expected):
            assert got is None  # a missing signal it uses stays missing
        else:
            assert got is not None and got <= 0.0 and math.isclose(got, expected, abs_tol=1e-12)
    # without confidences, a missing one does not matter; the length still does
    assert math.isnan(column[3]) == uses_confidence
    longer = cal.log_p(np.full(3, -0.3), np.array([10.0, 100.0, 400.0]), np.ones(3))
    assert np.all(np.diff(longer) < 0)
    with_marker = cal.log_p(np.full(2, -0.3), np.full(2, 100.0), np.array([0.0, 1.0]))
    assert with_marker[1] > with_marker[0]


def test_calibrators_round_trip_and_only_replace_their_own_columns() -> None:
    assert LengthCalibrator.from_dict(CAL.to_dict()) == CAL
    cals = calibrators_from([None, CAL.to_dict()], 2)
    conf = np.array([[-0.5, -0.5, -0.3], [-0.1, -0.1, -0.3]])
    tokens = np.array([[50.0, 50.0, 9.0], [300.0, 300.0, 9.0]])
    answers = [["#### 1", "#### 1", "x"], ["2", "2", "x"]]
    out = calibrated_columns(cals, conf, tokens, answers, [0, 1])
    assert np.array_equal(out[:, 0], conf[:, 0])
    assert np.allclose(out[:, 1], CAL.log_p(conf[:, 1], tokens[:, 1], np.array([1.0, 0.0])))
    assert calibrators_from(None, 3) == [None, None, None]  # an artifact from before
    # a three-feature calibrator of an earlier artifact reads as one with no marker weight
    old = {"weights": [1.2, -0.8, 0.1], "bias": 0.3, "mean": [0.5, 4.0, 17.0], "scale": [1, 1, 1]}
    read = LengthCalibrator.from_dict(old)
    assert read.weights[3] == 0.0 and read.scale[3] == 1.0 and read.uses_confidence
    assert read.one(-0.2, 80.0, "#### 3") == read.one(-0.2, 80.0, "3")
    with pytest.raises(ValueError, match="2 entries for 3 nodes"):
        calibrators_from([None, None], 3)


@pytest.fixture(scope="module")
def gsm(traces_dir: Path, tmp_path_factory) -> tuple[Path, Path]:  # research tests only
    """A split of the GSM8K chain-of-thought traces (train rows only: 200 fit, 100 check)."""
    text = (traces_dir / "gsm8k-llama-train.jsonl").read_text(encoding="utf-8")
    rows = [line for line in text.split("\n") if line.strip()]
    folder = tmp_path_factory.mktemp("gsm")
    train, test = folder / "gsm-train.jsonl", folder / "gsm-test.jsonl"
    train.write_text("\n".join(rows[:200]) + "\n", encoding="utf-8")
    test.write_text("\n".join(rows[200:]) + "\n", encoding="utf-8")
    return train, test


@pytest.fixture(scope="module")
def gsm_artifact(gsm) -> PolicyArtifact:
    train = load_traces(gsm[0])
    fitted = FittedIndex(train, recall=True)
    return build_artifact(fitted, DEFAULT_MUS[16], train_path=str(gsm[0]), answer_kind=train.kind)


@pytest.mark.research_traces
def test_lengths_are_used_on_chains_of_thought_not_on_one_letter_answers(
    gsm_artifact, traces_dir: Path
) -> None:
    used = [c for c in gsm_artifact.length_calibrators if c is not None]
    assert len(used) >= 2, gsm_artifact.length_calibrators
    mmlu = FittedIndex(load_traces(traces_dir / "mmlu-llama-train.jsonl"), recall=True)
    assert mmlu.length_calibrators == [None] * len(mmlu.nodes)


@pytest.mark.research_traces
def test_online_decisions_equal_the_replay_with_calibrated_lengths(gsm, gsm_artifact) -> None:
    assert assert_online_equals_replay(gsm_artifact, load_traces(gsm[1])) > 0


@pytest.mark.research_traces
def test_the_proxy_engine_decides_as_the_replay_over_recorded_calls(gsm, gsm_artifact) -> None:
    assert_engine_equals_replay(gsm_artifact, gsm[1], load_traces(gsm[1]))


@pytest.fixture(scope="module")
def routellm(tmp_path_factory) -> tuple[PolicyArtifact, Path, TraceSet]:
    """A policy over the shipped Mixtral/GPT-4 GSM8K traces, which record no confidence
    (their costs and lengths come from token counts), and 120 of their test rows."""
    train = fill_costs(load_traces(demo.TRAIN))
    fitted = FittedIndex(train, recall=True)
    art = build_artifact(fitted, DEFAULT_MUS[24], train_path=str(demo.TRAIN))
    rows = [x for x in demo.TEST.read_text(encoding="utf-8").split("\n") if x.strip()][:120]
    path = tmp_path_factory.mktemp("routellm") / "test.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return art, path, fill_costs(load_traces(path))


def test_lengths_are_used_on_shipped_chains_of_thought_not_on_one_letter_answers(
    routellm, synthetic
) -> None:
    art, _, _ = routellm
    assert all(c is not None for c in art.length_calibrators), art.length_calibrators
    letters = FittedIndex(load_traces(synthetic[0]), recall=True)
    assert letters.length_calibrators == [None] * len(letters.nodes)


def test_a_model_without_confidences_is_judged_by_its_length_and_final_answer(
    routellm,
) -> None:
    art, _, test = routellm
    cals = calibrators_from(art.data["length_calibration"], len(art.nodes))  # as written
    mixtral = cals[art.models.index(demo.SMALL)]
    assert mixtral is not None and not mixtral.uses_confidence
    # a chain that never states its answer (cut off) is less likely right than one that does
    assert mixtral.one(None, 120.0, "so she pays 36 * 68/1") < mixtral.one(None, 120.0, "#### 7")
    # and the signal reaches the decisions: some rows stop at Mixtral, some go on
    outcome = replay_artifact(art, test)
    escalated = outcome.explored.sum(axis=1) > 1
    assert 0 < escalated.sum() < len(test)


def test_without_confidences_online_proxy_and_replay_decide_alike(routellm) -> None:
    art, path, test = routellm
    assert assert_online_equals_replay(art, test) > 0
    assert_walk_equals_replay(art, test)  # every policy, by the driver on the traces
    assert_engine_equals_replay(art, path, test)  # every policy, through the engine


def test_the_cost_cap_binds_every_policy_alike(routellm) -> None:
    """A cap that affords the cheap model but not the dear one after it: every policy stops
    before the dear call in the engine as in the driver's walk on the traces."""
    art, path, test = routellm
    cheap, dear = (n.cost_usd for n in art.nodes)
    answered = assert_cap_binds_alike(art, path, test, cheap + dear / 2)
    # Mixtral answers every row of every cascade; the reference alone is over the cap
    assert answered == {
        "index": len(test),
        "threshold": len(test),
        "agreement": len(test),
        "single": 0,
    }
    none = assert_cap_binds_alike(art, path, test, cheap / 2)  # nothing affordable
    assert none == dict.fromkeys(answered, 0)
