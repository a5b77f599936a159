"""Length-calibrated confidences (policies/lengthcal.py): the arithmetic, when the fit uses
them, and the same decisions offline (replay), online (CascadePolicy) and in the proxy's
engine over recorded GSM8K chains of thought, where the length is the stronger signal."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import numpy as np
import pytest

from calibration.artifact import build_artifact
from calibration.evaluate import replay_artifact
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.traces import load_traces
from policies.lengthcal import LengthCalibrator, calibrated_columns, calibrators_from
from proxy.backends.factory import make_backend
from proxy.config import ModelConfig
from proxy.engine import CascadeEngine, Overrides
from tests.policy_walk import assert_online_equals_replay

CAL = LengthCalibrator((1.2, -0.8, 0.1), 0.3, (0.5, 4.0, 17.0), (1.5, 0.9, 7.0))


def test_one_call_and_a_column_give_the_same_log_probability() -> None:
    conf = np.array([-0.01, -0.7, -3.0, np.nan, -0.2, 0.0])
    tokens = np.array([12.0, 150.0, 600.0, 40.0, np.nan, 1.0])
    column = CAL.log_p(conf, tokens)
    for c, t, expected in zip(conf, tokens, column, strict=True):
        got = CAL.one(None if math.isnan(c) else float(c), None if math.isnan(t) else float(t))
        if math.isnan(expected):
            assert got is None  # a missing confidence or length stays missing
        else:
            assert got is not None and got <= 0.0 and math.isclose(got, expected, abs_tol=1e-12)
    assert np.all(np.diff(CAL.log_p(np.full(3, -0.3), np.array([10.0, 100.0, 400.0]))) < 0)


def test_calibrators_round_trip_and_only_replace_their_own_columns() -> None:
    assert LengthCalibrator.from_dict(CAL.to_dict()) == CAL
    cals = calibrators_from([None, CAL.to_dict()], 2)
    conf = np.array([[-0.5, -0.5], [-0.1, -0.1]])
    tokens = np.array([[50.0, 50.0], [300.0, 300.0]])
    out = calibrated_columns(cals, conf, tokens)
    assert np.array_equal(out[:, 0], conf[:, 0])
    assert np.allclose(out[:, 1], CAL.log_p(conf[:, 1], tokens[:, 1]))
    assert calibrators_from(None, 3) == [None, None, None]  # an artifact from before
    with pytest.raises(ValueError, match="2 entries for 3 nodes"):
        calibrators_from([None, None], 3)


@pytest.fixture(scope="module")
def gsm(traces_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """A split of the GSM8K chain-of-thought traces (train rows only: 200 fit, 100 check)."""
    text = (traces_dir / "gsm8k-llama-train.jsonl").read_text(encoding="utf-8")
    rows = [line for line in text.split("\n") if line.strip()]
    folder = tmp_path_factory.mktemp("gsm")
    train, test = folder / "gsm-train.jsonl", folder / "gsm-test.jsonl"
    train.write_text("\n".join(rows[:200]) + "\n", encoding="utf-8")
    test.write_text("\n".join(rows[200:]) + "\n", encoding="utf-8")
    return train, test


@pytest.fixture(scope="module")
def gsm_artifact(gsm) -> dict:
    train = load_traces(gsm[0])
    fitted = FittedIndex(train, recall=True)
    return build_artifact(fitted, DEFAULT_MUS[16], train_path=str(gsm[0]), answer_kind=train.kind)


def test_lengths_are_used_on_chains_of_thought_not_on_one_letter_answers(
    gsm_artifact, traces_dir: Path
) -> None:
    used = [c for c in gsm_artifact["length_calibration"] if c is not None]
    assert len(used) >= 2, gsm_artifact["length_calibration"]
    mmlu = FittedIndex(load_traces(traces_dir / "mmlu-llama-train.jsonl"), recall=True)
    assert mmlu.length_calibrators == [None] * len(mmlu.nodes)


def test_online_decisions_equal_the_replay_with_calibrated_lengths(gsm, gsm_artifact) -> None:
    assert assert_online_equals_replay(gsm_artifact, load_traces(gsm[1])) > 0


def test_the_proxy_engine_decides_as_the_replay_over_recorded_calls(gsm, gsm_artifact) -> None:
    """The engine reads each call's length from its usage (here: the recorded one)."""
    test = load_traces(gsm[1])
    outcome = replay_artifact(gsm_artifact, test)
    names = [n["model"] for n in gsm_artifact["nodes"]]
    backends = {
        m: make_backend(m, ModelConfig(backend="replay", traces=[str(gsm[1])])) for m in test.models
    }
    engine = CascadeEngine("gsm", names, backends, names[-1], gsm_artifact)

    async def run_all() -> list:
        return [await engine.run(test.messages[row], {}, Overrides()) for row in range(len(test))]

    runs = asyncio.run(run_all())
    for row, run in enumerate(runs):
        called = sorted(test.models.index(c.model) for c in run.calls)
        assert called == list(np.flatnonzero(outcome.explored[row])), row
        assert run.answer is not None
        assert test.models.index(run.answer.model) == outcome.answer_model[row], row
