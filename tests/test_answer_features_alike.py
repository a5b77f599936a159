"""One answer, one set of free-text features: the fit (calibration/textfit.py), the vectorised
replay (calibrated columns), the row-by-row walk (calibration.replay.walk_traces) and the
proxy (CascadePolicy.signal as proxy/engine/cascade.py calls it) all read the prompt's word
count and the upstream's finish_reason, so a text calibrator's relative length and
truncation flag are the same numbers in each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from calibration.artifact import build_artifact
from calibration.evaluate import replay_artifact
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.replay import walk_traces
from calibration.textfit import fit_text_calibrators, trace_features
from calibration.traces import TraceSet, load_traces
from policies.freetext import FEATURES, prompt_text, word_count
from policies.textcal import TextCalibrator
from tests.policy_walk import assert_engine_equals_replay, assert_same_outcome

TRUNCATED = FEATURES.index("truncated")
REL_LENGTH = FEATURES.index("log_rel_length")
WORDS = ("the", "model", "answer", "because", "water", "system", "light", "people", "data",
         "value", "result", "history", "often", "many", "simple", "example", "river")  # fmt: skip


# ---------------------------------------------------------------- synthetic: finish_reason


def write_truncating(path: Path, n: int, seed: int) -> Path:
    """n rows of free-text answers by `small` and `big`; about a third of `small`'s stop at
    the token limit (`finish_reason: "length"`) and those are mostly wrong, while the length
    of an answer says nothing. A system message precedes the user's prompt."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        prompt = " ".join(rng.choice(WORDS, int(rng.integers(5, 30)))) + f" ({i})?"
        models = {}
        for name, price in (("small", 1e-6), ("big", 2e-5)):
            n_tok = int(rng.integers(60, 140))
            cut = name == "small" and rng.random() < 0.35
            good = bool(rng.random() < (0.15 if cut else 0.7))
            models[name] = {
                "answer": " ".join(rng.choice(WORDS, n_tok)),
                "correct": good,
                "confidence": None,
                "cost_usd": price * n_tok,
                "latency_ms": 5.0 * n_tok,
                "tokens_in": 30,
                "tokens_out": n_tok,
                "finish_reason": "length" if cut else "stop",
            }
        messages = [
            {"role": "system", "content": "Answer in plain prose."},
            {"role": "user", "content": prompt},
        ]
        row = {"id": f"t{i}", "task": "open", "reference": None, "models": models,
               "messages": messages}  # fmt: skip
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def truncating(tmp_path_factory) -> tuple[TraceSet, TraceSet]:
    folder = tmp_path_factory.mktemp("cut")
    train = load_traces(write_truncating(folder / "train.jsonl", 300, seed=3))
    test = load_traces(write_truncating(folder / "test.jsonl", 120, seed=4))
    assert train.finish_reasons is not None
    return train, test


def _cut(traces: TraceSet, col: int) -> np.ndarray:
    assert traces.finish_reasons is not None
    return np.array([r[col] == "length" for r in traces.finish_reasons])


def test_the_fit_sees_the_truncation_the_proxy_reads(truncating) -> None:
    """At fit time the features of an answer that hit the token limit read truncated = 1 (the
    fitted calibrator's mean of that input is the share of such answers), and the signal the
    proxy serves for it, given the upstream's finish_reason, is the replay's value."""
    train, test = truncating
    small = train.models.index("small")
    feats = trace_features(train, [small])[:, 0]
    assert (feats[:, TRUNCATED] == _cut(train, small)).all()
    assert 0.2 < feats[:, TRUNCATED].mean() < 0.5
    cals, _, chosen = fit_text_calibrators(train, [small], groups=("answer",))
    cal = cals[0]
    assert isinstance(cal, TextCalibrator), chosen
    at = cal.features.index("truncated")
    assert cal.mean[at] == pytest.approx(_cut(train, small).mean())
    assert cal.weights[at] < 0  # a cut-off answer is less likely right

    fitted = FittedIndex(train, recall=True, text_groups=("answer",))
    k = fitted.nodes.index(small)
    assert isinstance(fitted.length_calibrators[k], TextCalibrator), fitted.text_choice
    art = build_artifact(fitted, DEFAULT_MUS[10], train_path="train.jsonl")
    policy = art.policy()
    offline = fitted.node_confidence(test)
    cut = _cut(test, small)
    assert cut.any() and (~cut).any()
    served = []
    for i in range(len(test)):
        reason = test.finish_reasons[i][small]
        words = word_count(prompt_text(test.messages[i]))
        text, tokens = test.answers[i][small], test.tokens_out[i, small]
        live = policy.signal(k, None, tokens, text, words, reason)
        assert live == pytest.approx(offline[i, k], abs=1e-9), i
        served.append(live)
        # without the finish_reason a cut-off answer would read as a complete one
        if reason == "length":
            blind = policy.signal(k, None, tokens, text, words)
            assert blind is not None and blind > live
    assert np.mean(np.array(served)[cut]) < np.mean(np.array(served)[~cut])


def test_the_walk_and_the_engine_read_the_finish_reason_as_the_replay(truncating) -> None:
    """The row-by-row walk and the proxy engine over replay backends (which return the
    recorded finish_reason) decide as the vectorised replay on truncating traces."""
    train, test = truncating
    fitted = FittedIndex(train, recall=True, text_groups=("answer",))
    cascaded = 0
    for mu in DEFAULT_MUS[4:14:3]:
        art = build_artifact(fitted, mu, train_path="train.jsonl")
        expected = replay_artifact(art, test)
        assert_same_outcome(walk_traces(art.policy(), art.models, test), expected, "index")
        cascaded += int((expected.calls > 1).sum())
    assert cascaded > 0
    art = build_artifact(fitted, DEFAULT_MUS[7], train_path="train.jsonl")
    assert_engine_equals_replay(art, Path(test.path), test, ("index",))


def test_the_prompt_is_every_message_s_text() -> None:
    """One prompt text for the traces and the proxy: every message's content, system ones
    included; a content given as parts reads as its text parts (not as a list's repr)."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Name"}, {"type": "text", "text": "a river."}],
        },
        {"role": "assistant", "content": None},
    ]
    assert prompt_text(messages) == "Be brief.\nName\na river.\n"
    assert word_count(prompt_text(messages)) == 5


# ---------------------------------------------------------------- research traces: alpaca


@pytest.fixture(scope="module")
def alpaca_prompt_fit(traces_dir: Path) -> tuple[FittedIndex, TraceSet]:
    """The index policy on the open-ended pair alpaca-fusechat with text calibrators over
    the answer's length and its length relative to the prompt (the group `length+prompt`,
    chosen here so that the prompt's word count matters), and the first 150 test rows."""
    train = load_traces(traces_dir / "alpaca-fusechat-train.jsonl")
    test = load_traces(traces_dir / "alpaca-fusechat-test.jsonl").subset(np.arange(150))
    fitted = FittedIndex(train, recall=True, text_groups=("length+prompt",))
    return fitted, test


@pytest.mark.research_traces
def test_the_walk_decides_as_the_replay_on_open_ended_answers(alpaca_prompt_fit) -> None:
    """walk_traces passes each row's prompt word count (and finish_reason) to rule.signal,
    so on alpaca-fusechat it explores, answers and stops as replay_artifact, row by row."""
    fitted, test = alpaca_prompt_fit
    cals = fitted.length_calibrators
    reads_prompt = [
        c for c in cals if isinstance(c, TextCalibrator) and "log_rel_length" in c.features
    ]
    assert reads_prompt, fitted.text_choice
    cascaded = 0
    for mu in (DEFAULT_MUS[4], DEFAULT_MUS[8]):
        art = build_artifact(fitted, mu, train_path="alpaca-fusechat-train.jsonl")
        expected = replay_artifact(art, test)
        assert_same_outcome(walk_traces(art.policy(), art.models, test), expected, "index")
        cascaded += int((expected.calls > 1).sum())
    assert cascaded > 0


@pytest.mark.research_traces
def test_relative_length_is_read_alike_offline_and_online(alpaca_prompt_fit) -> None:
    """The features the fit computes for a row's answer have the relative length the proxy
    computes from the row's messages."""
    fitted, test = alpaca_prompt_fit
    feats = trace_features(test, fitted.nodes)
    for i in range(0, len(test), 7):
        words = word_count(prompt_text(test.messages[i]))
        for k, j in enumerate(fitted.nodes):
            text = test.answers[i][j]
            if text is None:
                continue
            want = np.log1p(word_count(text)) - np.log1p(words)
            assert feats[i, k, REL_LENGTH] == pytest.approx(want)
