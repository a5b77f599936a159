"""Free-text signals (policies/freetext.py) and text calibrators (policies/textcal.py,
calibration/textfit.py) on the real AlpacaEval answers shipped in tests/data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from calibration.fit import FittedIndex
from calibration.pricing import fill_costs
from calibration.textfit import fit_text_calibrators, is_open_ended
from calibration.traces import load_traces
from policies.artifact import PolicyArtifact
from policies.freetext import (
    FEATURES,
    agreement,
    answer_features,
    char_shingles,
    logprob_summary,
    word_count,
)
from policies.lengthcal import calibrated_columns, calibrators_from
from policies.textcal import TextCalibrator, feature_columns
from tests.shipped import ALPACA_TEST, ALPACA_TRAIN, GSM8K_TRAIN


@pytest.fixture(scope="module")
def alpaca():
    return fill_costs(load_traces(ALPACA_TRAIN))


def test_agreement_is_graded_symmetric_and_bounded(alpaca) -> None:
    row = alpaca.answers[0]
    a, b = row[0], row[3]
    assert agreement(a, a) == 1.0
    assert agreement(a, b) == pytest.approx(agreement(b, a))
    assert 0.0 < agreement(a, b) < 1.0
    # case and whitespace do not count; a different answer to another prompt agrees less
    assert agreement(a, "  " + a.upper().replace(" ", "\n ")) == 1.0
    other = alpaca.answers[1][3]
    assert agreement(a, other) < agreement(a, b)
    assert agreement(a, None) is None
    assert agreement("", a) == 0.0
    assert 0.0 < agreement(a, b, "word") < 1.0
    with pytest.raises(ValueError, match="unknown agreement method"):
        agreement(a, b, "embedding")


def test_answers_to_the_same_prompt_agree_more_than_to_other_prompts(alpaca) -> None:
    """On real answers: two models' answers to one prompt share more 3-grams than
    answers to different prompts, for most prompts."""
    same = [agreement(r[2], r[3]) for r in alpaca.answers[:40]]
    cross = [agreement(alpaca.answers[i][2], alpaca.answers[i + 1][3]) for i in range(40)]
    assert np.mean(np.array(same) > np.array(cross)) > 0.8


def test_char_shingles_are_the_distinct_ngrams() -> None:
    grams = char_shingles("abcab", 3)
    assert len(grams) == 3  # abc, bca, cab
    assert list(grams) == sorted(grams)
    assert len(char_shingles("ab", 3)) == 1
    with pytest.raises(ValueError, match=r"1\.\.8"):
        char_shingles("abc", 9)


def test_answer_features_read_length_truncation_refusal_hedging_and_structure(alpaca) -> None:
    text = alpaca.answers[0][3]
    f = dict(zip(FEATURES, answer_features(text, 629.0, 15), strict=True))
    assert f["log_tokens"] == pytest.approx(math.log1p(629))
    assert f["log_tokens_sq"] == pytest.approx(math.log1p(629) ** 2)
    assert f["log_rel_length"] == pytest.approx(math.log1p(word_count(text)) - math.log1p(15))
    assert f["truncated"] == 0.0 and f["refusal"] == 0.0
    assert f["structure"] > 0  # a numbered list
    cut = answer_features(text, 629.0, 15, finish_reason="length")
    assert cut is not None and cut[FEATURES.index("truncated")] == 1.0
    refusal = answer_features("I'm sorry, but I can't help with that request.", None, 10)
    assert refusal is not None and refusal[FEATURES.index("refusal")] == 1.0
    hedge = answer_features("It might possibly work; I think it depends.", None, 10)
    assert hedge is not None and hedge[FEATURES.index("hedging")] > 30
    assert answer_features(None) is None
    # without a token count the length is estimated from the characters
    est = answer_features("x" * 400)
    assert est is not None and est[0] == pytest.approx(math.log1p(100))


def test_logprob_summary_goes_beyond_the_mean() -> None:
    lps = [-0.01] * 95 + [-3.0] * 4 + [-9.0]
    mean, low, q05, q25 = logprob_summary(lps)
    assert mean == pytest.approx(np.mean(lps))
    assert low == -9.0 and q05 == -3.0 and q25 == -0.01
    assert logprob_summary([]) is None and logprob_summary(None) is None


def test_open_ended_traces_get_text_calibrators_short_answers_do_not(alpaca) -> None:
    assert is_open_ended(alpaca, [0, 1, 2, 3])
    gsm = fill_costs(load_traces(GSM8K_TRAIN))
    assert not is_open_ended(gsm, [0, 1])
    cals, conf, chosen = fit_text_calibrators(alpaca, [0, 1, 2, 3])
    assert set(chosen) == set(alpaca.models)
    for k, cal in enumerate(cals):
        if cal is None:
            assert np.isnan(conf[:, k]).all()  # no confidence recorded, none made up
        else:
            assert (conf[:, k] < 0).all()  # out-of-fold log P(correct)
            assert chosen[alpaca.models[k]].split(" ")[0] in ("length", "length+prompt", "answer")


def test_a_column_and_one_live_call_give_the_same_calibrated_confidence() -> None:
    test = fill_costs(load_traces(ALPACA_TEST))
    cal = TextCalibrator(
        FEATURES,
        (0.3, -0.2, 0.5, -1.0, -0.7, -0.1, 0.4),
        0.2,
        (6.0, 36, 3.0, 0, 0, 0.5, 1.0),
        (1.0, 9.0, 1.2, 1.0, 1.0, 0.5, 1.0),
    )
    prompts = [test.prompt(i) for i in range(len(test))]
    column = calibrated_columns(
        [None, cal], test.confidence, test.tokens_out, test.answers, [0, 2], prompts
    )
    for i in range(len(test)):
        one = cal.one(None, test.tokens_out[i, 2], test.answers[i][2], word_count(prompts[i]))
        assert one == pytest.approx(column[i, 1], abs=1e-9)
    assert np.isnan(column[:, 0]).all()  # node 0: raw (no confidence recorded)
    round_trip = calibrators_from([None, cal.to_dict()], 2)[1]
    assert round_trip == cal
    with pytest.raises(ValueError, match="unknown answer feature"):
        TextCalibrator(("colour",), (1.0,), 0.0, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="need"):
        TextCalibrator(("log_tokens",), (1.0, 2.0), 0.0, (0.0,), (1.0,))
    with pytest.raises(ValueError, match="need the prompts"):
        calibrated_columns([cal], test.confidence, test.tokens_out, test.answers, [0])


def test_the_fitted_policy_reads_the_same_signals_offline_and_online(alpaca) -> None:
    """Text calibrators in an artifact give the proxy's CascadePolicy.signal the values the
    fit's replay reads on test rows (on 100 rows no group may beat the base rate, so one
    is fitted here on every feature)."""
    from calibration.artifact import build_artifact
    from calibration.fit import DEFAULT_MUS
    from calibration.textfit import fit_group

    test = fill_costs(load_traces(ALPACA_TEST))
    fitted = FittedIndex(alpaca, recall=True)
    prompts = [alpaca.prompt(i) for i in range(len(alpaca))]
    feats = feature_columns(alpaca.answers, alpaca.tokens_out, prompts, fitted.nodes)
    assert feats.shape == (len(alpaca), len(fitted.nodes), len(FEATURES))
    k0, j0 = 0, fitted.nodes[0]
    cal = fit_group(feats[:, k0], alpaca.confidence[:, j0], alpaca.correct[:, j0], FEATURES)
    fitted.length_calibrators[k0] = cal
    art = build_artifact(fitted, DEFAULT_MUS[10], train_path=str(ALPACA_TRAIN))
    assert art.data["length_calibration"][k0]["kind"] == "text"
    reloaded = PolicyArtifact.from_dict(json.loads(art.to_json()))  # through the loader
    policy = reloaded.policy()
    offline = fitted.node_confidence(test)
    assert np.isfinite(offline[:, k0]).all()
    for i in range(len(test)):
        words = word_count(test.prompt(i))
        for k, j in enumerate(fitted.nodes):
            live = policy.signal(k, None, test.tokens_out[i, j], test.answers[i][j], words)
            if live is None:
                assert np.isnan(offline[i, k])
            else:
                assert live == pytest.approx(offline[i, k], abs=1e-9)
