"""The prompt router baseline (calibration/prerouter.py) on the shipped AlpacaEval slice."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from calibration.prerouter import ENCODINGS, PrerouterFamily, PromptRouter, route
from calibration.pricing import fill_costs
from calibration.traces import load_traces
from tests.shipped import ALPACA_TEST, ALPACA_TRAIN


@pytest.fixture(scope="module")
def pair():
    return fill_costs(load_traces(ALPACA_TRAIN)), fill_costs(load_traces(ALPACA_TEST))


def test_each_setting_calls_one_model_per_query_and_a_higher_price_spends_less(pair) -> None:
    train, test = pair
    family = PrerouterFamily()
    settings = family.fit_sweep(train)
    assert set(family.areas) == set(ENCODINGS)
    assert all(0.0 < a < 1.0 for a in family.areas.values())
    assert len(settings) >= 2
    knobs = [s.knob for s in settings]
    assert knobs == sorted(knobs)
    costs = []
    for s in settings:
        assert s.params["encoding"] in ENCODINGS
        o = s.replay(test)
        assert (o.calls == 1).all()  # one model per query, before any call: no cascade
        assert (o.answer_model == o.stop_model).all()
        costs.append(s.replay(train).mean_cost)
    assert all(a >= b - 1e-12 for a, b in itertools.pairwise(costs))
    assert costs[0] > costs[-1]  # the sweep spans cheap to expensive routing


def test_the_router_reads_the_prompt(pair) -> None:
    """Different prompts get different predictions; at a middle price some queries go to
    a cheap model and some to an expensive one."""
    train, test = pair
    router = PromptRouter(train, "tfidf")
    p = router.p_correct(test)
    assert p.shape == (len(test), test.n_models)
    assert ((p > 0) & (p < 1)).all()
    assert p.std(axis=0).min() > 0
    cost = np.nanmean(train.cost_usd, axis=0) / train.reference_cost
    picks = [len(np.unique(route(p, cost, mu))) for mu in (0.05, 0.1, 0.2, 0.4)]
    assert max(picks) >= 2
