"""Free-text signals (policies/freetext.py) and text calibrators (policies/textcal.py,
calibration/textfit.py) on the real AlpacaEval answers shipped in tests/data."""

from __future__ import annotations

import dataclasses
import json
import math
import re

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
    pairwise_agreement,
    word_count,
)
from policies.lengthcal import calibrated_columns, calibrators_from
from policies.posterior import FEATURES_PER_MODEL, answer_classes, candidate_features
from policies.textcal import CALIBRATOR_FEATURES, TextCalibrator, feature_columns
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
    words = re.findall(r"\w+", text)
    assert f["word_length"] == pytest.approx(sum(map(len, words)) / len(words))
    assert f["emphasis"] == pytest.approx(math.log1p(text.count("**") / 2))
    plain = answer_features("It is a big cat.", None, 5)
    assert plain is not None and plain[FEATURES.index("emphasis")] == 0.0
    assert plain[FEATURES.index("word_length")] == pytest.approx(11 / 5)
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
            assert chosen[alpaca.models[k]].split(" ")[0] in (
                "length",
                "length+prompt",
                "length+style",
                "answer",
            )


def test_a_column_and_one_live_call_give_the_same_calibrated_confidence() -> None:
    test = fill_costs(load_traces(ALPACA_TEST))
    cal = TextCalibrator(
        FEATURES,
        (0.3, -0.2, 0.5, -1.0, -0.7, -0.1, 0.4, 0.6, 0.2),
        0.2,
        (6.0, 36, 3.0, 0, 0, 0.5, 1.0, 4.5, 1.0),
        (1.0, 9.0, 1.2, 1.0, 1.0, 0.5, 1.0, 0.5, 1.0),
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
    assert feats.shape == (len(alpaca), len(fitted.nodes), len(CALIBRATOR_FEATURES))
    assert np.isnan(feats[:, :, len(FEATURES) :]).all()  # these traces hold no logprobs
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


# ---------------------------------------------------------------- recall under graded agreement


def test_pairwise_agreement_is_each_pairs_agreement(alpaca) -> None:
    """The offline (N, M, M) matrix holds `agreement` of every pair of real answers, 1 for
    an answer with itself and 0 where an answer is missing."""
    texts = [list(row) for row in alpaca.answers[:15]]
    texts[3][1] = None
    agree = pairwise_agreement(texts)
    m = alpaca.n_models
    assert agree.shape == (15, m, m)
    for r, row in enumerate(texts):
        for i in range(m):
            assert agree[r, i, i] == 1.0
            for j in range(m):
                if i != j:
                    want = agreement(row[i], row[j])
                    assert agree[r, i, j] == (0.0 if want is None else want)
    assert agree[3, 1, 0] == agree[3, 0, 1] == 0.0
    assert 0.05 < agree[:, 0, 1].mean() < 0.95  # graded, not exact-match 0/1


def _features(agree: np.ndarray, cand: int, mask: int, z: np.ndarray, missing: np.ndarray):
    classes = np.zeros(z.shape, dtype=np.int16)  # unread when `agree` is given
    feats = candidate_features(classes, z, missing, mask, cand, agree)
    return feats.reshape(len(z), z.shape[1], FEATURES_PER_MODEL)


def test_graded_votes_are_the_agreement_and_dissent_its_complement(alpaca) -> None:
    texts = alpaca.answers[:30]
    agree = pairwise_agreement(texts)
    rng = np.random.default_rng(0)
    z = rng.normal(size=(30, alpaca.n_models))
    missing = np.zeros(z.shape, dtype=bool)
    mask, cand = 0b1011, 1
    f = _features(agree, cand, mask, z, missing)
    for k in range(alpaca.n_models):
        a = agree[:, cand, k]
        if (mask >> k) & 1:
            np.testing.assert_array_equal(f[:, k, 0], a)
            np.testing.assert_array_equal(f[:, k, 1], a * z[:, k])
            np.testing.assert_array_equal(f[:, k, 2], 1.0 - a)
            np.testing.assert_array_equal(f[:, k, 3], (1.0 - a) * z[:, k])
        else:
            assert not f[:, k].any()  # an unexplored model neither votes nor dissents
    assert (f[:, cand, 0] == 1.0).all() and not f[:, cand, 2].any()


def test_exact_agreement_is_the_graded_features_special_case() -> None:
    """Agreement 1 within an answer class and 0 across gives the exact-class features bit
    for bit (short answers keep their posterior)."""
    gsm = load_traces(GSM8K_TRAIN)
    classes = answer_classes(gsm.extracted[:200])
    missing = np.array([[e is None for e in row] for row in gsm.extracted[:200]])
    z = np.random.default_rng(1).normal(size=classes.shape)
    agree = (classes[:, :, None] == classes[:, None, :]).astype(float)
    for mask in (0b1, 0b101, 0b111, (1 << gsm.n_models) - 1):
        for cand in range(gsm.n_models):
            if (mask >> cand) & 1:
                exact = candidate_features(classes, z, missing, mask, cand)
                graded = candidate_features(classes, z, missing, mask, cand, agree)
                np.testing.assert_array_equal(exact, graded)


def test_recall_reads_the_same_graded_posterior_offline_and_online(alpaca) -> None:
    """An open-ended fit is graded; the artifact's policy, fed answers one by one through
    the walk (which computes their agreement as they arrive), gives for every explored set
    the posterior and recalled answer the vectorised scoring gives the test rows."""
    from calibration.artifact import build_artifact
    from calibration.fit import DEFAULT_MUS, Signals, score_sets
    from policies.walk import Walk

    test = fill_costs(load_traces(ALPACA_TEST))
    fitted = FittedIndex(alpaca, recall=True)
    assert fitted.graded
    # every fifth row, the second node's call failed: no text, no extracted answer
    failed = fitted.nodes[1]
    gone = [
        [None if (r % 5 == 0 and j == failed) else a for j, a in enumerate(row)]
        for r, row in enumerate(test.answers)
    ]
    test = dataclasses.replace(
        test,
        answers=gone,
        extracted=[
            [e if g is not None else None for e, g in zip(row, grow, strict=True)]
            for row, grow in zip(test.extracted, gone, strict=True)
        ],
    )
    art = build_artifact(fitted, DEFAULT_MUS[10], train_path=str(ALPACA_TRAIN))
    assert art.data["agreement"] == "graded"
    policy = PolicyArtifact.from_dict(json.loads(art.to_json())).policy()
    assert policy.graded
    nodes = fitted.nodes
    conf = fitted.node_confidence(test)
    scores = score_sets(fitted.posterior, Signals.of(test, nodes, conf, graded=True))
    n = len(nodes)
    recalled_early = 0
    for r in range(len(test)):
        for mask in range(1, 1 << n):
            walk = Walk(policy, [0.0] * n)
            for k in (k for k in range(n) if (mask >> k) & 1):
                text = test.answers[r][nodes[k]]
                c = None if np.isnan(conf[r, k]) else float(conf[r, k])
                ok, got = text is not None, test.extracted[r][nodes[k]]
                walk.record(k, ok, got, c, 0.0, walk.agreement(k, text))
            p, m, last_p = policy.posterior.best_one_graded(
                walk.explored, walk.extracted, walk.confidence, walk.agree
            )
            assert p == pytest.approx(scores.best_p[r, mask], abs=1e-9)
            assert last_p == pytest.approx(scores.last_p[r, mask], abs=1e-9)
            assert m == scores.best_m[r, mask]
            recalled_early += m != mask.bit_length() - 1
            step = walk.decide()  # the step recalls m when it beats the last by the margin
            recalled = p - last_p > policy.recall_margin
            assert step.answer_node == (m if recalled else walk.explored[-1])
            assert step.p_correct == (p if recalled else last_p)
    assert recalled_early > 0  # recall picks an earlier answer on some rows
