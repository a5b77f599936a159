"""The fitted index policy: online decisions equal the replay, targets hold. On the synthetic
traces (tests/synthetic.py) and, as research twins, on the real MMLU traces."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from calibration.artifact import build_artifact, choose_mu, content_hash
from calibration.evaluate import evaluate_artifact
from calibration.fit import (
    BIN_SCALES,
    DEFAULT_MUS,
    KAPPAS,
    FittedIndex,
    HeldOutCurve,
    Signals,
    align_fold_scores,
    fit_posterior,
    n_bins_for,
    score_sets,
    select_nodes,
)
from calibration.router import prompt_design
from calibration.traces import TraceSet, load_traces
from policies.index import STOP
from tests.policy_walk import assert_online_equals_replay, fit_small_large, textbook_mu


@pytest.fixture(
    scope="module",
    params=["synthetic", pytest.param("mmlu", marks=pytest.mark.research_traces)],
)
def pair(request) -> tuple[TraceSet, TraceSet]:
    """(train, test): the synthetic pair over five models, or the real MMLU llama pair (the
    research twin; its param carries the marker, so it is the only one to ask for
    `traces_dir`)."""
    if request.param == "synthetic":
        train, test = request.getfixturevalue("synthetic")
    else:
        folder = request.getfixturevalue("traces_dir")
        train, test = folder / "mmlu-llama-train.jsonl", folder / "mmlu-llama-test.jsonl"
    return load_traces(str(train)), load_traces(str(test))


@pytest.fixture(scope="module", params=[True, False], ids=["recall", "norecall"])
def fitted(request, pair) -> FittedIndex:
    return FittedIndex(pair[0], recall=request.param)


def test_dominated_models_are_not_nodes(pair) -> None:
    train = pair[0]
    nodes = select_nodes(train)
    acc = train.correct.mean(axis=0)
    cost = np.nanmean(train.cost_usd, axis=0)
    for j in nodes:
        assert not any(cost[k] < cost[j] and acc[k] >= acc[j] for k in range(train.n_models))
    assert nodes == sorted(nodes, key=lambda j: cost[j])


def test_online_policy_makes_the_same_decisions_as_the_replay(fitted, pair) -> None:
    test = pair[1].subset(np.arange(300))
    # a cost price at which a good share of the rows call more than one node
    mu = next(
        m
        for m in DEFAULT_MUS[10:]
        if (fitted.replay(fitted.tables(m), test).calls > 1).mean() > 0.2
    )
    art = build_artifact(fitted, mu, train_path=pair[0].path)
    assert assert_online_equals_replay(art, test) > 0  # the setting really cascades


def test_the_answer_returned_was_explored_and_recall_only_with_recall(fitted, pair) -> None:
    out = fitted.replay(fitted.tables(DEFAULT_MUS[10]), pair[1])
    rows = np.arange(len(out.correct))
    assert out.explored[rows, out.answer_model].all()
    if not fitted.recall:
        assert not out.recalled.any()


def test_a_high_cost_price_calls_one_model_and_a_zero_price_matches_the_best(fitted, pair) -> None:
    train = pair[0]
    cheap = fitted.replay(fitted.tables(1e6), train)
    assert (cheap.calls == 1).all()
    free = fitted.replay(fitted.tables(0.0), train)
    assert free.accuracy >= train.correct.mean(axis=0).max() - 0.03
    # at price 0 the difficulty-bin root explores past its first node; a router root starts
    # at the node it picks (the best it sees), so the bins are checked on their own fit then
    bins = fitted
    if fitted.root_kind == "router":
        bins = FittedIndex(train, recall=fitted.recall, root="difficulty")
    assert bins.replay(bins.tables(0.0), train).calls.mean() > 1.5


def test_target_accuracy_is_met_on_train_and_the_hash_identifies_content(pair) -> None:
    fitted = FittedIndex(pair[0], recall=True)
    mu, target = choose_mu(
        fitted, lam=None, target_accuracy=0.97, max_cost_usd=None, mus=DEFAULT_MUS
    )
    art = build_artifact(fitted, mu, train_path="t.jsonl", target=target)
    assert art.expected.accuracy >= 0.97 * target["reference_accuracy"] - 1e-12
    data = dict(art.data)
    assert art.hash == content_hash(data)
    data["lambda"] = 0.5
    assert art.hash != content_hash(data)
    lo, hi = art.expected.accuracy_95
    assert lo <= art.expected.accuracy <= hi


def test_choose_mu_rejects_conflicting_or_impossible_targets(pair) -> None:
    fitted = FittedIndex(pair[0], recall=True)
    with pytest.raises(ValueError, match="exactly one"):
        choose_mu(fitted, lam=0.5, target_accuracy=0.9, max_cost_usd=None, mus=DEFAULT_MUS)
    with pytest.raises(ValueError, match="lambda"):
        choose_mu(fitted, lam=1.5, target_accuracy=None, max_cost_usd=None, mus=DEFAULT_MUS)
    with pytest.raises(ValueError, match="costs at most"):
        choose_mu(fitted, lam=None, target_accuracy=None, max_cost_usd=1e-12, mus=DEFAULT_MUS)


def test_evaluate_reports_where_queries_stop(pair) -> None:
    fitted = FittedIndex(pair[0], recall=True)
    art = build_artifact(fitted, DEFAULT_MUS[15], train_path="t.jsonl")
    report = evaluate_artifact(art, pair[1])
    assert sum(report["stops_at"].values()) == pytest.approx(1.0)
    assert sum(report["answer_from"].values()) == pytest.approx(1.0)
    assert 0.0 <= report["returned_not_last"] <= 1.0
    assert report["calls_per_query"] >= 1.0
    assert 0.0 < report["cost_fraction_of_reference"] <= 2.0


def test_shrinkage_and_bins_are_the_held_out_best_and_recorded(fitted, pair) -> None:
    train = pair[0]
    router = fitted.root_kind == "router"  # its resolution is chosen on router-first areas
    prompts = prompt_design([train.prompt(i) for i in range(len(train))]) if router else None
    cv = HeldOutCurve(
        train, fitted.nodes, fitted.costs, fitted.recall, fitted._root_train, prompts=prompts
    )
    grid = {(k, max(2, round(s * n_bins_for(len(train))))) for k in KAPPAS for s in BIN_SCALES}
    areas = {point: cv.area(fitted.oof, *point, router=router) for point in grid}
    assert len(set(np.round(list(areas.values()), 9))) > 1  # the choice is not moot
    assert areas[(fitted.kappa, fitted.n_bins)] == pytest.approx(max(areas.values()))
    chosen = fitted.root_choice["held_out_area"]
    assert chosen[fitted.root_kind] == pytest.approx(max(areas.values()), abs=1e-6)
    assert chosen[fitted.root_kind] == max(chosen.values())  # the larger area is kept
    assert all(len(v) <= fitted.n_bins for v in fitted.states.values)
    art = build_artifact(fitted, DEFAULT_MUS[15], train_path="t.jsonl")
    assert art.data["training"]["shrinkage_kappa"] == fitted.kappa  # as written


def test_held_out_curve_rows_are_capped_and_never_fitted_on(pair, monkeypatch) -> None:
    import calibration.fit as fit

    monkeypatch.setattr(fit, "CV_MAX_ROWS", 200)
    train = pair[0]
    cv = HeldOutCurve(train, [0, 4], np.array([0.03, 1.0]), True, None)
    assert cv.n_rows == 200 and len(set(cv.keep)) == 200
    for fit_rows, held, held_traces in cv.parts:
        assert not set(fit_rows) & set(held)
        assert len(held_traces) == len(held)
    assert sorted(np.concatenate([h for _, h, _ in cv.parts]).tolist()) == list(range(200))


def test_fold_scores_keep_their_order_on_the_full_models_scale() -> None:
    rng = np.random.default_rng(3)
    n = 200
    fold_p = np.column_stack([rng.uniform(0.2, 0.9, n), np.full(n, 0.4)])
    fold_p[:120, 0] = 0.71  # an atom: 120 rows the posterior cannot tell apart
    full_p = np.column_stack([np.sqrt(fold_p[:, 0]) - 0.05, np.full(n, 0.45)])
    rows = np.zeros(n, dtype=bool)
    rows[::3] = True
    out = align_fold_scores(fold_p, full_p, rows)
    atom = fold_p[rows, 0] == 0.71
    assert np.all(out[atom, 0] == full_p[0, 0])  # the whole atom lands on the full model's value
    order = np.argsort(fold_p[rows, 0], kind="stable")
    assert np.all(np.diff(out[order, 0]) >= 0)  # a fold's ranking is kept
    assert set(out[:, 0]) <= set(full_p[:, 0]) and np.all(out[:, 1] == 0.45)


def test_answers_all_right_give_a_constant_posterior_that_scores() -> None:
    """Traces where every answer is right (an explore file labelled by agreement, whose
    reference model agrees with itself, once the other nodes agree too) fit a constant
    posterior that scores every explored set (it once had one weight in all, not one per
    feature)."""
    n = 12
    sig = Signals(
        classes=np.zeros((n, 2), dtype=int),
        conf_feat=np.full((n, 2), -0.1),
        missing=np.zeros((n, 2), dtype=bool),
        correct=np.ones((n, 2), dtype=bool),
        cost=np.tile([1.0, 10.0], (n, 1)),
    )
    scores = score_sets(fit_posterior(sig), sig)
    assert np.allclose(scores.best_p[:, 1:], 1 - 1e-3)  # every non-empty set: the clipped rate


@pytest.mark.research_traces
def test_rows_with_the_same_signals_share_one_state_on_train_and_when_served(
    traces_dir: Path,
) -> None:
    """A saturated self-check (gpt-4o-mini's log P("Y") = 0 on most TriviaQA rows) is one
    atom of the posterior. Out-of-fold scores must not cut it into bins by fold: the state
    a training row gets is the state the served policy gives the same signals."""
    train = load_traces(str(traces_dir / "triviaqa-qwen_oai-train.jsonl"))
    fitted = FittedIndex(train, recall=True)
    sig = Signals.of(train, fitted.nodes, fitted.node_confidence(train))
    served = score_sets(fitted.posterior, sig).with_margin(fitted.recall_margin).loss(True)
    oof = fitted.oof.loss(True)
    first = 1 << 0  # only the cheapest node explored
    conf = train.confidence[:, fitted.nodes[0]]
    atom = conf == np.nanmax(conf)
    assert atom.sum() > len(train) // 3
    train_bins = np.searchsorted(fitted.states.edges[0], oof[atom, first], side="right")
    served_bins = np.searchsorted(fitted.states.edges[0], served[atom, first], side="right")
    assert len(set(train_bins)) == 1
    assert set(train_bins) == set(served_bins)


def check_small_large_is_the_textbook_cascade(train: Path, test: TraceSet) -> None:
    """The fit behind the serving tests' policy (conftest's `policy`): some cost price gives
    the textbook cascade (start at `small`, stop on its most confident bin, escalate from
    every other), and online it decides as the replay does."""
    fitted = fit_small_large(train, *test.models)
    mu = textbook_mu(fitted)  # raises when no price gives it
    root, small, large = (d.tolist() for d in fitted.tables(mu).decision[:3])
    assert root == [0] and small[0] == STOP and set(small[1:]) == {1} and set(large) == {STOP}
    art = build_artifact(fitted, mu, train_path=str(train), answer_kind="choice")
    renamed = dataclasses.replace(test, models=("small", "large"))  # as fit_small_large names
    escalated = assert_online_equals_replay(art, renamed)
    assert 0 < escalated < len(test)  # both branches are taken


def test_the_small_large_fit_is_the_textbook_cascade(synthetic) -> None:
    test = load_traces(synthetic[1]).select_models(["small", "large"])
    check_small_large_is_the_textbook_cascade(synthetic[0], test)


@pytest.mark.research_traces
def test_the_small_large_fit_on_real_mmlu_is_the_textbook_cascade(traces_dir: Path) -> None:
    test = load_traces(traces_dir / "mmlu-llama-test.jsonl").subset(np.arange(400))
    test = test.select_models(["llama3.2-1b", "llama3.1-405b"])
    check_small_large_is_the_textbook_cascade(traces_dir / "mmlu-llama-train.jsonl", test)
