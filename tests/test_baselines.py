"""The baselines on recorded traces, checked against direct counts over the rows: the AlpacaEval
slice shipped in tests/data, the synthetic traces (tests/synthetic.py) and, as research tests,
the real MMLU and RouterBench traces. A research test gets its traces through `traces_dir`,
and only parameters marked `research_traces` name research traces."""

from __future__ import annotations

import numpy as np
import pytest

from calibration.baselines import (
    agreement_outcome,
    baseline_families,
    oracle_outcome,
    priced_selection,
    reference_cost,
    single_outcome,
    threshold_outcome,
    tier_structures,
)
from calibration.fit import DEFAULT_MUS, select_nodes
from calibration.replay import Outcome
from calibration.traces import TraceSet, load_traces
from tests.shipped import DATA

RESEARCH_PAIRS = ("mmlu-llama", "arc_challenge-routerbench")
research = pytest.mark.research_traces


def named(*names: str) -> list:
    """Parameters naming trace files (PAIR-SPLIT); those of research pairs carry the marker."""
    return [
        pytest.param(n, marks=research) if n.rsplit("-", 1)[0] in RESEARCH_PAIRS else n
        for n in names
    ]


@pytest.fixture(scope="module")
def _cache() -> dict[str, TraceSet]:
    return {}


@pytest.fixture
def loaded(request, _cache):
    """`loaded(name)`: the traces PAIR-SPLIT: `alpaca-fusechat-*` (shipped), `synthetic-*`, or a
    research pair's (through `traces_dir`: only for marked tests). Loaded once per module."""

    def load(name: str) -> TraceSet:
        if name not in _cache:
            if name.startswith("alpaca-fusechat-"):
                path = DATA / f"{name}.jsonl"
            elif name.startswith("synthetic-"):
                path = request.getfixturevalue("synthetic")[name.endswith("-test")]
            else:
                path = request.getfixturevalue("traces_dir") / f"{name}.jsonl"
            _cache[name] = load_traces(path)
        return _cache[name]

    return load


# the five models of a ladder, cheapest first: the synthetic one, and the real MMLU llama one
LADDERS = {
    "synthetic-test": ("tiny", "small", "medium", "big", "large"),
    "mmlu-llama-test": (
        "llama3.2-1b",
        "llama3.2-3b",
        "llama3.1-8b",
        "llama3.1-70b",
        "llama3.1-405b",
    ),
}


def _check_outcome(outcome: Outcome, traces: TraceSet) -> None:
    """Shapes, dtypes, and the bookkeeping every Outcome must satisfy row by row."""
    n, m = len(traces), traces.n_models
    assert outcome.correct.shape == (n,) and outcome.correct.dtype == bool
    assert outcome.cost.shape == (n,)
    assert outcome.latency.shape == (n,)
    assert outcome.explored.shape == (n, m) and outcome.explored.dtype == bool
    assert outcome.answer_model.shape == (n,)
    assert outcome.stop_model.shape == (n,)
    assert np.issubdtype(outcome.answer_model.dtype, np.integer)
    assert np.issubdtype(outcome.stop_model.dtype, np.integer)
    rows = np.arange(n)
    assert ((outcome.answer_model >= 0) & (outcome.answer_model < m)).all()
    assert ((outcome.stop_model >= 0) & (outcome.stop_model < m)).all()
    assert outcome.explored[rows, outcome.answer_model].all(), "answer from an unexplored model"
    assert outcome.explored[rows, outcome.stop_model].all(), "stopped at an unexplored model"
    assert outcome.calls.min() >= 1
    np.testing.assert_array_equal(
        outcome.correct, traces.correct[rows, outcome.answer_model], err_msg="correct"
    )
    paid = np.where(outcome.explored, traces.cost_usd, 0.0).sum(axis=1)
    np.testing.assert_allclose(outcome.cost, paid, rtol=1e-12, err_msg="cost")


# ---------------------------------------------------------------- single models


@pytest.mark.parametrize(
    "name", named("mmlu-llama-test", "arc_challenge-routerbench-train", "alpaca-fusechat-train")
)
def test_single_outcome_is_the_models_column(loaded, name) -> None:
    traces = loaded(name)
    for col in range(traces.n_models):
        o = single_outcome(traces, col)
        _check_outcome(o, traces)
        assert o.accuracy == pytest.approx(traces.correct[:, col].mean(), abs=1e-12)
        np.testing.assert_allclose(o.cost, traces.cost_usd[:, col])
        assert (o.calls == 1).all()
        assert (o.answer_model == col).all() and (o.stop_model == col).all()
        assert not o.recalled.any()


@pytest.mark.parametrize(
    ("name", "costliest"),
    [
        pytest.param("arc_challenge-routerbench-train", "gpt-4-1106-preview", marks=research),
        ("alpaca-fusechat-train", "FuseChat-Gemma-2-9B-Instruct"),
    ],
)
def test_reference_cost_is_the_costliest_models_mean(loaded, name, costliest) -> None:
    traces = loaded(name)
    means = traces.cost_usd.mean(axis=0)
    assert reference_cost(traces) == pytest.approx(means.max())
    assert reference_cost(traces) == pytest.approx(means[traces.models.index(costliest)])


# ---------------------------------------------------------------- threshold cascade


@pytest.mark.parametrize(
    "name", named("mmlu-llama-test", "arc_challenge-routerbench-train", "alpaca-fusechat-train")
)
def test_threshold_minus_inf_stops_at_the_first_chain_model(loaded, name) -> None:
    traces = loaded(name)
    chain = [traces.models[j] for j in select_nodes(traces)]
    assert len(chain) >= 3
    first = traces.models.index(chain[0])
    o = threshold_outcome(traces, chain, np.full(len(chain) - 1, -np.inf))
    _check_outcome(o, traces)
    assert (o.calls == 1).all()
    assert (o.stop_model == first).all() and (o.answer_model == first).all()
    np.testing.assert_allclose(o.cost, traces.cost_usd[:, first])
    assert o.accuracy == pytest.approx(traces.correct[:, first].mean())


@pytest.mark.parametrize(
    "name", named("mmlu-llama-test", "arc_challenge-routerbench-train", "alpaca-fusechat-train")
)
def test_threshold_plus_inf_pays_the_whole_chain(loaded, name) -> None:
    traces = loaded(name)
    chain = [traces.models[j] for j in select_nodes(traces)]
    cols = [traces.models.index(m) for m in chain]
    o = threshold_outcome(traces, chain, np.full(len(chain) - 1, np.inf))
    _check_outcome(o, traces)
    assert (o.calls == len(chain)).all()
    assert o.explored[:, cols].all()
    others = [j for j in range(traces.n_models) if j not in cols]
    assert not o.explored[:, others].any()
    assert (o.stop_model == cols[-1]).all() and (o.answer_model == cols[-1]).all()
    np.testing.assert_allclose(o.cost, traces.cost_usd[:, cols].sum(axis=1))
    assert o.accuracy == pytest.approx(traces.correct[:, cols[-1]].mean())


@pytest.mark.parametrize("name", named("mmlu-llama-test", "synthetic-test"))
def test_threshold_with_finite_thresholds_matches_a_direct_walk(loaded, name) -> None:
    traces = loaded(name)
    chain = list(LADDERS[name][1:])
    cols = [traces.models.index(m) for m in chain]
    thresholds = np.median(traces.confidence[:, cols[:-1]], axis=0)
    o = threshold_outcome(traces, chain, thresholds)
    _check_outcome(o, traces)
    stops = []
    for r in range(len(traces)):
        stop = cols[-1]
        for pos, col in enumerate(cols[:-1]):
            if traces.confidence[r, col] >= thresholds[pos]:
                stop = col
                break
        stops.append(stop)
        assert o.stop_model[r] == stop, r
        assert o.explored[r].sum() == cols.index(stop) + 1, r
    assert len(set(stops)) >= 3  # the walk really stops at different places


# ---------------------------------------------------------------- agreement tiers


def _all_agree(traces: TraceSet, row: int, cols: list[int]) -> bool:
    answers = [traces.extracted[row][c] for c in cols]
    return None not in answers and len(set(answers)) == 1


@pytest.mark.parametrize("name", named("mmlu-llama-test", "synthetic-test"))
def test_agreement_theta_one_stops_only_when_every_member_agrees(loaded, name) -> None:
    traces, m = loaded(name), LADDERS[name]
    tiers = [[m[0], m[1], m[2]], [m[3], m[4]]]
    first = [traces.models.index(m) for m in tiers[0]]
    second = [traces.models.index(m) for m in tiers[1]]
    o = agreement_outcome(traces, tiers, theta=1.0)
    _check_outcome(o, traces)
    agree = np.array([_all_agree(traces, r, first) for r in range(len(traces))])
    assert 0 < agree.sum() < len(traces)  # both branches happen on these rows
    stopped_first = ~o.explored[:, second].any(axis=1)
    np.testing.assert_array_equal(stopped_first, agree)
    assert o.explored[:, first].all()
    assert (o.calls == np.where(agree, 3, 5)).all()
    # where the first tier agrees its answer is returned (its costliest member represents it)
    assert (o.answer_model[agree] == first[-1]).all()
    assert (o.stop_model[agree] == first[-1]).all()
    assert (o.stop_model[~agree] == second[-1]).all()
    # parallel tiers: latency is the slowest member of each tier explored, summed
    lat = traces.latency_ms
    expected_latency = lat[:, first].max(axis=1) + np.where(agree, 0.0, lat[:, second].max(axis=1))
    np.testing.assert_allclose(o.latency, expected_latency)
    # a few rows by hand: the answers of the first tier decide
    for r in np.flatnonzero(agree)[:3]:
        a = {traces.extracted[r][c] for c in first}
        assert len(a) == 1 and o.correct[r] == traces.correct[r, first[-1]]
    for r in np.flatnonzero(~agree)[:3]:
        assert len({traces.extracted[r][c] for c in first}) > 1 or any(
            traces.extracted[r][c] is None for c in first
        )
        assert o.explored[r].all()


@pytest.mark.parametrize("name", named("mmlu-llama-test", "synthetic-test"))
def test_agreement_final_tier_returns_its_majority(loaded, name) -> None:
    traces, m = loaded(name), LADDERS[name]
    tiers = [[m[0], m[1], m[2]], [m[3], m[4]]]
    first = [traces.models.index(m) for m in tiers[0]]
    a, b = (traces.models.index(m) for m in tiers[1])
    o = agreement_outcome(traces, tiers, theta=1.0)
    checked = 0
    for r in range(len(traces)):
        if _all_agree(traces, r, first):
            continue
        ea, eb = traces.extracted[r][a], traces.extracted[r][b]
        # a 1-1 tie or agreement goes to the costlier member; a failed member votes for nothing
        expected = a if eb is None and ea is not None else b
        assert o.answer_model[r] == expected, r
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("name", named("mmlu-llama-test", "synthetic-test"))
def test_agreement_lower_theta_never_calls_more(loaded, name) -> None:
    traces, m = loaded(name), LADDERS[name]
    tiers = [[m[0], m[1], m[2]], [m[3], m[4]]]
    strict = agreement_outcome(traces, tiers, theta=1.0)
    loose = agreement_outcome(traces, tiers, theta=0.6)
    _check_outcome(loose, traces)
    assert not (loose.explored & ~strict.explored).any()
    assert loose.calls.sum() < strict.calls.sum()  # two of three agreeing is common
    assert loose.mean_cost < strict.mean_cost


@pytest.mark.parametrize("name", named("mmlu-llama-test", "synthetic-test"))
def test_agreement_vote_cache_changes_nothing(loaded, name) -> None:
    traces, m = loaded(name), LADDERS[name]
    tiers = [[m[1], m[2]], [m[3], m[4]]]
    votes: dict = {}
    for theta in (0.5, 1.0, 0.5):
        cached = agreement_outcome(traces, tiers, theta, votes)
        fresh = agreement_outcome(traces, tiers, theta)
        for field in ("correct", "cost", "latency", "explored", "answer_model", "stop_model"):
            np.testing.assert_array_equal(getattr(cached, field), getattr(fresh, field), field)
    assert len(votes) == 2  # one entry per tier


def _brute_tiers(chain: list[str]) -> set[tuple[tuple[str, ...], ...]]:
    """Independently: every non-empty in-order pick of the chain, split into contiguous tiers
    (any sizes), kept when no tier but the last is a lone model."""
    out = set()
    for mask in range(1, 1 << len(chain)):
        picked = [m for k, m in enumerate(chain) if mask >> k & 1]

        def splits(rest: list[str]) -> list[list[list[str]]]:
            if not rest:
                return [[]]
            return [[rest[:k], *tail] for k in range(1, len(rest) + 1) for tail in splits(rest[k:])]

        for tiers in splits(picked):
            if all(len(t) >= 2 for t in tiers[:-1]):
                out.add(tuple(tuple(t) for t in tiers))
    return out


@pytest.mark.parametrize(("n", "count"), [(1, 1), (2, 3), (3, 8), (4, 21), (5, 55), (6, 144)])
def test_tier_structures_never_has_a_lone_model_before_the_last_tier(n, count) -> None:
    chain = [f"m{k}" for k in range(n)]
    structures = tier_structures(chain)
    as_set = {tuple(tuple(t) for t in s) for s in structures}
    assert len(as_set) == len(structures)  # no duplicates
    for tiers in structures:
        assert tiers and all(tiers), tiers
        assert all(len(t) >= 2 for t in tiers[:-1]), tiers
        flat = [m for t in tiers for m in t]
        assert flat == sorted(flat, key=chain.index) and len(set(flat)) == len(flat), tiers
    assert [chain] in structures  # everything in one tier is always allowed
    assert [[chain[-1]]] in structures  # the final model alone
    assert len(structures) == count
    assert as_set == _brute_tiers(chain)


# ---------------------------------------------------------------- oracles


@pytest.mark.parametrize(
    "name", named("mmlu-llama-test", "arc_challenge-routerbench-train", "alpaca-fusechat-train")
)
def test_routing_oracle_is_right_whenever_any_model_is_and_pays_the_cheapest(loaded, name) -> None:
    traces = loaded(name)
    o = oracle_outcome(traces, pay_prefix=False)
    _check_outcome(o, traces)
    any_right = traces.correct.any(axis=1)
    assert o.accuracy == pytest.approx(any_right.mean())
    np.testing.assert_array_equal(o.correct, any_right)
    assert (o.calls == 1).all()
    cheapest_correct = np.where(traces.correct, traces.cost_usd, np.inf).min(axis=1)
    assert (o.cost[any_right] <= cheapest_correct[any_right] + 1e-15).all()
    np.testing.assert_allclose(o.cost[any_right], cheapest_correct[any_right])
    assert (o.cost[~any_right] <= traces.cost_usd[~any_right].min(axis=1) + 1e-15).all()
    assert o.mean_cost < traces.cost_usd.mean(axis=0).max()


@pytest.mark.parametrize(
    "name", named("mmlu-llama-test", "arc_challenge-routerbench-train", "alpaca-fusechat-train")
)
def test_cascade_oracle_pays_the_prefix_up_to_the_first_correct_model(loaded, name) -> None:
    traces = loaded(name)
    routing = oracle_outcome(traces, pay_prefix=False)
    cascade = oracle_outcome(traces, pay_prefix=True)
    _check_outcome(cascade, traces)
    np.testing.assert_array_equal(cascade.correct, routing.correct)
    assert (cascade.cost >= routing.cost - 1e-15).all()
    first_right = np.where(traces.correct.any(axis=1), np.argmax(traces.correct, axis=1), 0)
    np.testing.assert_array_equal(cascade.calls, first_right + 1)


# ---------------------------------------------------------------- priced selection


@pytest.mark.parametrize("name", named("arc_challenge-routerbench-train", "alpaca-fusechat-train"))
def test_priced_selection_with_no_price_picks_the_most_accurate(loaded, name) -> None:
    traces = loaded(name)
    candidates = [(m, single_outcome(traces, j)) for j, m in enumerate(traces.models)]
    ref = reference_cost(traces)
    acc = traces.correct.mean(axis=0)
    assert priced_selection(candidates, ref, mus=[0.0]) == [
        (0.0, traces.models[int(np.argmax(acc))])
    ]
    # a huge price picks the cheapest
    cost = traces.cost_usd.mean(axis=0)
    assert priced_selection(candidates, ref, mus=[1e9]) == [
        (1e9, traces.models[int(np.argmin(cost))])
    ]


@pytest.mark.parametrize("name", named("arc_challenge-routerbench-train", "alpaca-fusechat-train"))
def test_priced_selection_trades_accuracy_for_cost_as_the_price_grows(loaded, name) -> None:
    traces = loaded(name)
    candidates = [(m, single_outcome(traces, j)) for j, m in enumerate(traces.models)]
    chosen = priced_selection(candidates, reference_cost(traces), DEFAULT_MUS)
    names = [c for _, c in chosen]
    assert len(names) == len(set(names)) >= 2
    mus = [mu for mu, _ in chosen]
    assert mus == sorted(mus) and mus[0] == 0.0
    by_name = dict(candidates)
    costs = [by_name[n].mean_cost for n in names]
    accs = [by_name[n].accuracy for n in names]
    assert costs == sorted(costs, reverse=True)
    assert accs == sorted(accs, reverse=True)


# ---------------------------------------------------------------- families


@pytest.mark.parametrize(
    "pair",
    [*(pytest.param(p, marks=research) for p in RESEARCH_PAIRS), "alpaca-fusechat", "synthetic"],
)
def test_every_family_replays_its_settings_on_test(loaded, pair) -> None:
    train, test = loaded(f"{pair}-train"), loaded(f"{pair}-test")
    families = baseline_families(train)
    names = [f.name for f in families]
    for expected in ("threshold", "agreement", "singles", "oracle-routing", "oracle-cascade"):
        assert expected in names
    assert len(names) == len(set(names))
    for family in families:
        settings = family.fit_sweep(train)
        assert settings, family.name
        for setting in settings:
            assert setting.name == family.name
            assert np.isfinite(setting.knob)
            _check_outcome(setting.replay(test), test)


@pytest.mark.parametrize(
    "pair",
    [*(pytest.param(p, marks=research) for p in RESEARCH_PAIRS), "alpaca-fusechat", "synthetic"],
)
def test_threshold_without_a_price_is_as_accurate_on_train_as_any_chain_model(loaded, pair) -> None:
    train = loaded(f"{pair}-train")
    family = next(f for f in baseline_families(train) if f.name == "threshold")
    settings = family.fit_sweep(train)
    assert settings[0].knob == 0.0
    free = settings[0].replay(train)
    best_single = train.correct[:, select_nodes(train)].mean(axis=0).max()
    assert free.accuracy >= best_single - 1e-12
    assert [s.knob for s in settings] == sorted(s.knob for s in settings)


@pytest.mark.research_traces
def test_every_policy_walks_online_as_it_replays_on_mmlu(traces_dir, tmp_path) -> None:
    """On the real MMLU traces (5 models, multi-model agreement tiers possible): every policy
    the proxy serves, walked by the driver on the traces and by the engine over replay
    backends, makes the decisions of calibration's replay; a cap binds them alike."""
    from calibration.artifact import build_artifact
    from calibration.fit import FittedIndex
    from tests.policy_walk import (
        assert_cap_binds_alike,
        assert_engine_equals_replay,
        assert_walk_equals_replay,
    )

    train = load_traces(traces_dir / "mmlu-llama-train.jsonl")
    rows = (traces_dir / "mmlu-llama-test.jsonl").read_text(encoding="utf-8").splitlines()[:150]
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    test = load_traces(path)
    fitted = FittedIndex(train, recall=True)
    # at this lambda (0.966) agreement calls llama3.2-3b and llama3.1-70b at once, then 405b
    art = build_artifact(
        fitted, DEFAULT_MUS[11], train_path="mmlu-llama-train.jsonl", answer_kind=train.kind
    )
    tiers = art.agreement_setting().tiers
    assert len(tiers) > 1 and len(tiers[0]) > 1, tiers
    assert_walk_equals_replay(art, test)
    assert_engine_equals_replay(art, path, test)
    # a cap that affords the first agreement tier but not the reference model after it
    cost = {n.model: n.cost_usd for n in art.nodes}
    first = sum(cost[m] for m in tiers[0])
    answered = assert_cap_binds_alike(art, path, test, first + cost[art.models[-1]] / 2)
    assert answered["agreement"] == answered["threshold"] == len(test)
    assert answered["single"] == 0
