"""Token-logprob summaries beyond the mean (minimum, 5% and 25% quantiles) as signals of the
free-text calibrators, end to end: the fit chooses them out of fold for a node whose low
quantiles tell good answers from bad while the mean does not; the proxy computes them on the
live answer (the fake upstream sends per-token logprobs) and escalates a low-quantile
answer; `collect` records them."""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from calibration.artifact import build_artifact
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.textfit import fit_text_calibrators, held_out
from calibration.traces import TraceSet, load_traces
from cli.main import app
from policies.artifact import PolicyArtifact
from policies.freetext import (
    FEATURES,
    LOGPROB_FEATURES,
    logprob_summary,
    summary_as_dict,
    token_logprobs_summary,
    word_count,
)
from policies.lengthcal import calibrated_columns
from policies.policy import CascadePolicy
from policies.textcal import GROUPS, TextCalibrator, feature_columns
from policies.walk import Walk
from tests.fake_upstream import tokenize
from tests.policy_walk import assert_online_equals_replay
from tests.serving import db_upgrade, fake_upstream, running_proxy, sqlite_env, write_config

VOCAB = ("the", "model", "answer", "because", "water", "system", "light", "people", "data",
         "value", "result", "history", "often", "many", "simple", "example", "river", "energy",
         "market", "paper")  # fmt: skip
LOGPROB_GROUPS = ("logprobs", "answer+logprobs")
KEY = "sk-test-lp"


# ---------------------------------------------------------------- synthetic open-ended traces


def answer_logprobs(rng: np.random.Generator, looks_good: bool, n: int) -> list[float]:
    """Token logprobs of an n-token answer with the same expected mean either way: a good
    one's are all mildly uncertain, a bad one's mostly sure with a tenth of very unsure
    tokens (a low 5% quantile). A per-answer scale spreads the mean over a factor of three,
    so the mean alone says little."""
    scale = rng.uniform(0.5, 1.5)
    if looks_good:
        lps = -rng.exponential(0.4 * scale, n)
    else:
        rare = rng.random(n) < 0.1
        lps = -np.where(rare, rng.exponential(3.0 * scale, n), rng.exponential(0.111 * scale, n))
    return [round(float(x), 4) for x in lps]


# name, USD per token, P(correct), which answers carry a logprob summary
LADDER = (("small", 1e-6, 0.5, "all"), ("mid", 4e-6, 0.5, "most"), ("big", 2e-5, 0.7, "none"))


def write_open_ended(path: Path, n: int, seed: int) -> Path:
    """n rows of long answers by `small` (logprob summaries that separate its good answers
    from its bad ones), `mid` (the same, but one answer in ten lacks its summary) and `big`
    (no summaries); answer lengths say nothing of correctness."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        prompt_words = int(rng.integers(5, 30))
        prompt = " ".join(rng.choice(VOCAB, prompt_words)) + f" ({i})?"
        models = {}
        for name, price, p_good, carried in LADDER:
            n_tok = int(rng.integers(60, 140))
            good = bool(rng.random() < p_good)
            looks_good = good if rng.random() < 0.9 else not good
            entry = {
                "answer": " ".join(rng.choice(VOCAB, n_tok)),
                "correct": good,
                "confidence": None,
                "cost_usd": price * (prompt_words + n_tok),
                "latency_ms": 5.0 * n_tok,
                "tokens_in": prompt_words,
                "tokens_out": n_tok,
                "finish_reason": "stop",
            }
            summary = summary_as_dict(logprob_summary(answer_logprobs(rng, looks_good, n_tok)))
            if carried == "all" or (carried == "most" and i % 10):
                entry["logprob_summary"] = summary
            models[name] = entry
        row = {"id": f"o{i}", "task": "open", "reference": None, "models": models,
               "messages": [{"role": "user", "content": prompt}]}  # fmt: skip
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[TraceSet, TraceSet]:
    folder = tmp_path_factory.mktemp("lp")
    train = load_traces(write_open_ended(folder / "train.jsonl", 400, seed=1))
    test = load_traces(write_open_ended(folder / "test.jsonl", 200, seed=2))
    return train, test


def _log_loss(log_p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(np.exp(log_p), 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


# ---------------------------------------------------------------- units


def test_the_live_summary_is_the_trace_summary_and_refuses_non_finite_logprobs() -> None:
    tokens = [("a", -0.1), (" b", -2.0), (" c", 0.0), (" d", -0.5)]
    assert token_logprobs_summary(tokens) == logprob_summary([-0.1, -2.0, 0.0, -0.5])
    assert token_logprobs_summary(None) is None and token_logprobs_summary([]) is None
    assert token_logprobs_summary([("a", -math.inf), ("b", -0.1)]) is None
    assert token_logprobs_summary([("a", math.nan)]) is None
    # an upstream's rounding above 0 is clipped: the summary is one the trace format takes
    assert logprob_summary([1e-7, -0.6, 0.0]) == pytest.approx((-0.2, -0.6, -0.6, -0.6))
    assert max(logprob_summary([1e-7, 2e-9])) <= 0.0
    assert summary_as_dict((-1.0, -3.0, -2.0, -1.5)) == {
        "mean": -1.0,
        "min": -3.0,
        "q05": -2.0,
        "q25": -1.5,
    }


def test_a_logprob_calibrator_gives_the_same_value_vectorised_and_in_plain_python() -> None:
    features = GROUPS["answer+logprobs"]
    n = len(features)
    rng = np.random.default_rng(0)
    cal = TextCalibrator(
        features,
        tuple(rng.normal(size=n).tolist()),
        0.3,
        tuple(rng.normal(size=n).tolist()),
        tuple(rng.uniform(0.5, 2.0, size=n).tolist()),
    )
    texts = [[" ".join(rng.choice(VOCAB, k))] for k in (50, 200, 900)] + [[None]]
    tokens = np.array([[50.0], [np.nan], [900.0], [np.nan]])
    summaries = np.full((4, 1, 4), np.nan)
    for i, k in enumerate((50, 200, 900)):
        summaries[i, 0] = logprob_summary((-rng.exponential(0.5, k)).tolist())
    summaries[1, 0] = np.nan  # the second answer carries none
    prompts = ["why is the sky blue", "explain", "write an essay", "no answer"]
    feats = feature_columns(texts, tokens, prompts, [0], summaries=summaries)
    vectorised = cal.log_p(feats[:, 0], np.full(4, np.nan))
    assert np.isfinite(vectorised[[0, 2]]).all() and np.isnan(vectorised[[1, 3]]).all()
    for i in range(4):
        tok = None if np.isnan(tokens[i, 0]) else float(tokens[i, 0])
        summary = None if np.isnan(summaries[i, 0]).any() else tuple(summaries[i, 0])
        one = cal.one(None, tok, texts[i][0], word_count(prompts[i]), None, summary)
        if one is None:
            assert np.isnan(vectorised[i])
        else:
            assert one == pytest.approx(vectorised[i], abs=1e-12)
    # an older calibrator (the seven answer features artifacts named before word_length and
    # emphasis) reads the same columns as before
    plain = TextCalibrator(FEATURES[:7], cal.weights[:7], 0.3, cal.mean[:7], cal.scale[:7])
    old = feature_columns(texts, tokens, prompts, [0])[:, 0, : len(FEATURES)]
    before, after = plain.log_p(old, np.full(4, np.nan)), plain.log_p(feats[:, 0], None)
    assert np.array_equal(before, after, equal_nan=True)
    with pytest.raises(ValueError, match="unknown answer feature"):
        TextCalibrator(("logprob_max",), (1.0,), 0.0, (0.0,), (1.0,))
    assert LOGPROB_FEATURES == ("logprob_mean", "logprob_min", "logprob_q05", "logprob_q25")


def test_summaries_stay_with_their_answers_when_tier_columns_are_added(pair) -> None:
    from calibration.tiers import add_tiers

    train, _ = pair
    tiered = add_tiers(train, [["small", "big"]])
    assert tiered.logprob_summaries.shape == (len(train), train.n_models + 1, 4)
    for name in train.models:
        before = train.logprob_summaries[:, train.models.index(name)]
        after = tiered.logprob_summaries[:, tiered.models.index(name)]
        assert np.array_equal(before, after, equal_nan=True)
    assert np.isnan(tiered.logprob_summaries[:, tiered.models.index("tier:small+big")]).all()


def test_the_replay_backend_returns_the_recorded_summary(pair) -> None:
    import asyncio

    from upstreams.replay import ReplayBackend
    from upstreams.settings import ModelConfig

    train, _ = pair
    cfg = ModelConfig(backend="replay", traces=[train.path], price_in_per_mtok=1.0,
                      price_out_per_mtok=1.0)  # fmt: skip
    for name, carried in (("small", True), ("big", False)):
        result = asyncio.run(ReplayBackend(name, cfg).complete(train.messages[3], {}))
        assert result.ok
        want = train.logprob_summaries[3, train.models.index(name)]
        if carried:
            assert result.logprob_summary == tuple(want.tolist())
        else:
            assert result.logprob_summary is None and np.isnan(want).all()


def test_the_hedging_scan_matches_what_it_matched_before_its_lookahead() -> None:
    """The hedging regex skips positions by its first letter (to make room for the summary
    in the 1 ms of a 1,000-token answer's features); it finds exactly what it found before,
    so older text calibrators read the same feature."""
    import re

    from policies.freetext import _HEDGE
    from tests.shipped import ALPACA_TEST

    before = re.compile(_HEDGE.pattern.replace("(?=[mplunirag])", ""), re.IGNORECASE)
    assert before.pattern != _HEDGE.pattern
    words = before.pattern.split("(?:")[1].split(")")[0].split("|")
    assert {w[0] for w in words} <= set("mplunirag")  # every word's first letter is looked for
    texts = [a for row in load_traces(ALPACA_TEST).answers for a in row if a]
    texts += [
        "MIGHT be, Perhaps; i THINK it DEPENDS",
        "İ think, ı think, mıght",
        "unmighty mayo",
        "not  sure",
        "Not sure.",
        "KınD of roughly—generally",
        "might've possibly",
    ]
    for text in texts:
        assert _HEDGE.findall(text) == before.findall(text)


# ---------------------------------------------------------------- fit


def test_the_fit_chooses_logprob_quantiles_where_they_separate_and_only_there(pair) -> None:
    train, _ = pair
    nodes = [0, 1, 2]
    assert train.models == ("small", "mid", "big")
    summaries = train.logprob_summaries
    y = train.correct[:, 0]
    mean_gap = abs(summaries[y, 0, 0].mean() - summaries[~y, 0, 0].mean())
    q05_gap = abs(summaries[y, 0, 2].mean() - summaries[~y, 0, 2].mean())
    assert q05_gap > 4 * mean_gap  # the planted world: q05 separates, the mean hardly

    cals, conf, chosen = fit_text_calibrators(train, nodes)
    assert chosen["small"].split(" (")[0] in LOGPROB_GROUPS, chosen
    assert "held-out log-loss +" in chosen["small"]
    assert cals[0] is not None and "logprob_q05" in cals[0].features
    # held out, the chosen group beats the length group by far
    prompts = [train.prompt(i) for i in range(len(train))]
    feats = feature_columns(train.answers, train.tokens_out, prompts, nodes, summaries=summaries)
    fold = np.random.default_rng(0).permutation(len(train)) % 5
    nan = np.full(len(train), np.nan)
    yf = y.astype(float)
    by_length = held_out(feats[:, 0], nan, yf, GROUPS["length"], False, fold)
    group = chosen["small"].split(" (")[0]
    by_group = held_out(feats[:, 0], nan, yf, GROUPS[group], False, fold)
    assert np.allclose(by_group, conf[:, 0], equal_nan=True)  # the train confidences are OOF
    assert _log_loss(by_group, yf) < _log_loss(by_length, yf) - 0.1
    # one answer in ten of `mid` lacks its summary, `big` has none: never a logprob group
    for name in ("mid", "big"):
        assert chosen[name].split(" (")[0] not in LOGPROB_GROUPS, chosen
    for cal in cals[1:]:
        assert cal is None or not set(cal.features) & set(LOGPROB_FEATURES)


def test_a_policy_reading_quantiles_scores_the_same_in_replay_and_live(pair) -> None:
    """Fitted through FittedIndex and an artifact: the vectorised confidences of test rows
    (evaluate's path) equal the proxy's CascadePolicy.signal given each answer's summary."""
    train, test = pair
    fitted = FittedIndex(train, recall=True, models=["small", "big"], use_difficulty=False)
    art = build_artifact(fitted, DEFAULT_MUS[10], train_path="train.jsonl")
    entry = art.data["length_calibration"][0]
    assert entry["kind"] == "text" and "logprob_q05" in entry["features"]
    policy = PolicyArtifact.from_dict(json.loads(art.to_json())).policy()
    cols = [0, 2]
    prompts = [test.prompt(i) for i in range(len(test))]
    offline = calibrated_columns(
        art.length_calibrators,
        test.confidence,
        test.tokens_out,
        test.answers,
        cols,
        prompts,
        test.logprob_summaries,
    )
    assert np.isfinite(offline[:, 0]).all()
    for i in range(len(test)):
        summary = tuple(float(x) for x in test.logprob_summaries[i, 0])
        live = policy.signal(
            0, None, test.tokens_out[i, 0], test.answers[i][0], word_count(prompts[i]),
            "stop", summary,
        )  # fmt: skip
        assert live == pytest.approx(offline[i, 0], abs=1e-9)
    # without a summary the node has no calibrated signal (as nan offline)
    assert policy.signal(0, None, 80.0, test.answers[0][0], 10, "stop", None) is None
    # walked row by row as the proxy's driver walks it (the recorded summaries passed to
    # signal), the policy explores and answers as the vectorised replay does
    assert entry["features"] == list(GROUPS["logprobs"])  # (the walk reads no prompt length)
    assert assert_online_equals_replay(art, test) > 0


# ---------------------------------------------------------------- the proxy


LIVE_TEXT = " ".join(np.random.default_rng(7).choice(VOCAB, 100))


def exponential_logprobs(n: int, mean: float) -> list[float]:
    """n token logprobs at the quantiles of an exponential law of `mean` (negated)."""
    return [round(mean * math.log1p(-(k + 0.5) / n), 4) for k in range(n)]


# answers as the train world draws them, with the same mean logprob (-0.4): a good one's
# tokens all mildly uncertain, a bad one's mostly sure but a tenth very unsure (low q05)
SURE = exponential_logprobs(100, 0.4)
UNSURE = exponential_logprobs(90, 0.111) + exponential_logprobs(10, 3.0)
PROMPTS = {"sure": "Explain the water cycle (sure).", "unsure": "Explain the market (unsure)."}


def _after_small(policy: CascadePolicy, lps: list[float], prompt: str) -> int | None:
    """The node the policy calls after `small` gave LIVE_TEXT with these token logprobs."""
    walk = Walk(policy, [0.0, 0.0])
    assert walk.next_calls() == (0,)
    summary = logprob_summary(lps)
    conf = policy.signal(0, None, 100.0, LIVE_TEXT, word_count(prompt), "stop", summary)
    walk.record(0, True, LIVE_TEXT, conf, None, walk.agreement(0, LIVE_TEXT))
    return walk.decide().next_node


@pytest.fixture(scope="module")
def proxy_setup(pair, tmp_path_factory):
    """The proxy over small -> big with a policy whose `small` calibrator reads the
    quantiles, at the first price where the sure answer stops and the unsure one escalates."""
    train = pair[0].select_models(["small", "big"])
    folder = tmp_path_factory.mktemp("lp-proxy")
    fitted = FittedIndex(train, recall=True, use_difficulty=False, transitions="line")
    art = None
    for mu in DEFAULT_MUS:
        candidate = build_artifact(fitted, mu, train_path="train.jsonl")
        policy = PolicyArtifact.from_dict(json.loads(candidate.to_json())).policy()
        if policy.first(0).next_node != 0:
            continue
        if (
            _after_small(policy, SURE, PROMPTS["sure"]) is None
            and _after_small(policy, UNSURE, PROMPTS["unsure"]) == 1
        ):
            art = candidate
            break
    assert art is not None, "no price at which the quantiles decide"
    assert "logprob_q05" in art.data["length_calibration"][0]["features"]
    (folder / "policy.json").write_text(art.to_json())
    with fake_upstream("small,big", log=folder / "upstream.txt") as up:
        answers = [
            {"model": "small", "answer": LIVE_TEXT, "prompt": PROMPTS["sure"],
             "token_logprobs": SURE},
            {"model": "small", "answer": LIVE_TEXT, "prompt": PROMPTS["unsure"],
             "token_logprobs": UNSURE},
            {"model": "big", "answer": LIVE_TEXT.upper(), "confidence": -0.1},
        ]  # fmt: skip
        httpx.post(f"{up.url}/admin/answers", json=answers, timeout=5).raise_for_status()
        config = {
            "models": {
                m: {"backend": "openai", "base_url": f"{up.url}/v1", "max_retries": 0,
                    "price_in_per_mtok": p, "price_out_per_mtok": p, "timeout_s": 5.0}
                for m, p in (("small", 0.1), ("big", 2.0))
            },
            "cascades": {"chat": {"nodes": ["small", "big"], "reference": "big",
                                  "policy": str(folder / "policy.json")}},
            "server": {"api_keys": [KEY]},
        }  # fmt: skip
        ledger = folder / "ledger.db"
        env = sqlite_env(ledger)
        db_upgrade(env)
        with running_proxy(write_config(folder, config), env) as proxy:
            yield proxy.url, ledger


def _ask(url: str, prompt: str) -> httpx.Response:
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "chat", "messages": [{"role": "user", "content": prompt}]},
        headers={"authorization": f"Bearer {KEY}"},
        timeout=30.0,
    )
    assert r.status_code == 200, r.text
    return r


def _ledger_calls(ledger: Path, request_id: str, n: int) -> list[tuple]:
    for _ in range(100):  # the writer flushes off the request path
        with sqlite3.connect(ledger) as db:
            rows = db.execute(
                "SELECT model, decision, p_correct FROM ledger_calls WHERE request_id = ? "
                "ORDER BY call_order",
                (request_id,),
            ).fetchall()
        if len(rows) >= n:
            return rows
        time.sleep(0.1)
    return rows


def test_a_low_quantile_answer_escalates_and_a_sure_one_stops(proxy_setup) -> None:
    url, ledger = proxy_setup
    sure = _ask(url, PROMPTS["sure"])
    calls = sure.json()["cascade"]["calls"]
    assert [c["model"] for c in calls] == ["small"] and calls[0]["decision"] == "stop"
    assert tuple(calls[0]["logprob_summary"].values()) == pytest.approx(logprob_summary(SURE))
    assert sure.json()["choices"][0]["message"]["content"] == LIVE_TEXT
    rows = _ledger_calls(ledger, sure.headers["x-request-id"], 1)
    assert [(m, d) for m, d, _ in rows] == [("small", "stop")]
    assert rows[0][2] == pytest.approx(calls[0]["p_correct"], abs=1e-6)

    unsure = _ask(url, PROMPTS["unsure"])
    calls = unsure.json()["cascade"]["calls"]
    assert [c["model"] for c in calls] == ["small", "big"]
    assert calls[0]["decision"] == "continue:big"
    summary = calls[0]["logprob_summary"]
    assert tuple(summary.values()) == pytest.approx(logprob_summary(UNSURE))
    # the same mean as the sure answer's, a far lower 5% quantile
    assert summary["mean"] == pytest.approx(logprob_summary(SURE)[0], abs=0.02)
    assert summary["q05"] < logprob_summary(SURE)[2] - 1.0
    rows = _ledger_calls(ledger, unsure.headers["x-request-id"], 2)
    assert [(m, d) for m, d, _ in rows] == [("small", "continue:big"), ("big", "stop")]
    # the unsure answer was trusted less than the sure one
    assert rows[0][2] < _ledger_calls(ledger, sure.headers["x-request-id"], 1)[0][2]


def test_an_explored_request_writes_its_summaries_in_a_valid_trace_row() -> None:
    from policies.traceformat import check_row
    from proxy.engine.cascade import CascadeRun, NodeCall
    from proxy.engine.exploration import trace_row
    from upstreams.base import CallResult

    def call(node: int, model: str, summary) -> NodeCall:
        result = CallResult(model=model, text="An essay.", tokens_in=5, tokens_out=3,
                            cost_usd=1e-6, latency_ms=10.0)  # fmt: skip
        return NodeCall(node, model, result, "an essay", -0.2, logprob_summary=summary)

    run = CascadeRun("chat", calls=[call(0, "small", logprob_summary(UNSURE)),
                                    call(1, "big", None)])  # fmt: skip
    messages = [{"role": "user", "content": "Write an essay."}]
    row = trace_row("r1", "chat", messages, run, "big")
    assert row["models"]["small"]["logprob_summary"] == summary_as_dict(logprob_summary(UNSURE))
    assert "logprob_summary" not in row["models"]["big"]
    assert check_row(row, ("small", "big")) == []


# ---------------------------------------------------------------- collect


def test_collect_records_the_summary_of_the_logprobs_the_upstream_sent(tmp_path: Path) -> None:
    text = "B because " + " ".join(np.random.default_rng(3).choice(VOCAB, 60))
    lps = [-round(0.01 * k, 2) for k in range(len(tokenize(text)))]
    with fake_upstream("small,big", log=tmp_path / "upstream.txt") as up:
        answers = [
            {"model": "small", "answer": text, "token_logprobs": lps},
            {"model": "big", "answer": "A", "confidence": -0.25},
        ]
        httpx.post(f"{up.url}/admin/answers", json=answers, timeout=5).raise_for_status()
        lines = ["models:"]
        for name, price in (("small", 0.1), ("big", 2.0)):
            lines.append(
                f"  {name}: {{backend: openai, base_url: '{up.url}/v1', max_retries: 0, "
                f"price_in_per_mtok: {price}, price_out_per_mtok: {price}}}"
            )
        lines += ["cascades:", "  mc: {nodes: [small, big], reference: big}"]
        config = tmp_path / "cascade.yaml"
        config.write_text("\n".join(lines) + "\n")
        data = tmp_path / "data.jsonl"
        items = [
            {"id": f"q{i}", "reference": "B",
             "messages": [{"role": "user", "content": f"Which letter {i}?"}]}
            for i in range(3)
        ]  # fmt: skip
        data.write_text("".join(json.dumps(it) + "\n" for it in items))
        out = tmp_path / "traces.jsonl"
        got = CliRunner().invoke(
            app,
            ["collect", "--config", str(config), "--cascade", "mc", "--dataset", str(data),
             "--out", str(out)],
            env={"CASCADE_NO_PROGRESS": "1"},
        )  # fmt: skip
    assert got.exit_code == 0, got.stdout + got.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines() if line]
    assert len(rows) == 3
    for row in rows:
        small, big = row["models"]["small"], row["models"]["big"]
        assert small["logprob_summary"] == summary_as_dict(logprob_summary(lps))
        assert big["logprob_summary"] == summary_as_dict(logprob_summary([-0.25]))
    traces = load_traces(out)  # the format reads back what collect wrote
    assert traces.logprob_summaries[0, 0].tolist() == list(logprob_summary(lps))
