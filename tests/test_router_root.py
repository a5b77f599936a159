"""The prompt router as the index policy's root (policies/router.py, calibration/router.py):
the serving router predicts and picks as the bench's prerouter does; a router-root policy
decides alike in the vectorised replay, the row-by-row walk and the proxy; the artifact
carries the router and the loader refuses a malformed one by its field."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from calibration.artifact import build_artifact
from calibration.evaluate import replay_artifact
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.prerouter import PromptRouter, cost_fraction, route
from calibration.pricing import fill_costs
from calibration.replay import walk_traces
from calibration.router import fit_node_models, prompt_design
from calibration.traces import TraceSet, load_traces
from policies.artifact import ArtifactError, PolicyArtifact, content_hash
from policies.router import RouterError, RouterModel
from tests.policy_walk import assert_same_outcome
from tests.serving import (
    db_upgrade,
    fake_upstream,
    running_proxy,
    sqlite_env,
    start_proxy,
    stop,
    write_config,
)
from tests.shipped import ALPACA_TEST, ALPACA_TRAIN

KEY = "sk-test-router"
ROWS = 12  # test prompts the end-to-end test may send


@pytest.fixture(scope="module")
def pair() -> tuple[TraceSet, TraceSet]:
    return fill_costs(load_traces(ALPACA_TRAIN)), fill_costs(load_traces(ALPACA_TEST))


@pytest.fixture(scope="module")
def fitted(pair) -> FittedIndex:
    """The index policy with the router root forced (CV on 100 rows may not choose it)."""
    return FittedIndex(pair[0], recall=True, root="router")


def _serving(train: TraceSet, nodes: list[int], mu: float = 0.0) -> RouterModel:
    prompts = [train.prompt(i) for i in range(len(train))]
    models = fit_node_models(prompt_design(prompts), train.correct[:, nodes])
    return RouterModel(tuple(models), mu, cost_fraction(train)[nodes])


def _mixed_mu(fitted: FittedIndex, test: TraceSet, rows: int) -> float:
    """A price at which the router sends the first `rows` test prompts to more than one
    first node (so a root that ignored the prompt would be caught)."""
    for mu in DEFAULT_MUS:
        first = fitted.root_states(test, mu)
        if first is not None and len(set(first[:rows].tolist())) > 1:
            return mu
    raise AssertionError("the router sends every test prompt to one node at every price")


# ---------------------------------------------------------------- the serving router


@pytest.mark.parametrize("label", ["correct", "quality"])
def test_the_serving_router_predicts_and_picks_as_the_prerouter(pair, label) -> None:
    train, test = (t.with_label(label) for t in pair)
    nodes = [0, 2, 3]  # a subset: the serving router covers the policy's nodes only
    serving = _serving(train, nodes)
    expected = PromptRouter(train, "hashed").p_correct(test)[:, nodes]
    got = np.array([serving.p_correct(test.prompt(i)) for i in range(len(test))])
    assert np.abs(got - expected).max() < 1e-9
    assert got.std(axis=0).min() > 1e-3  # it reads the prompt
    cost = cost_fraction(train)[nodes]
    picks_seen = set()
    for mu in DEFAULT_MUS[::3]:
        want = route(expected, cost, mu)
        picks = [serving.pick(test.prompt(i), mu, cost) for i in range(len(test))]
        assert picks == want.tolist(), mu
        picks_seen |= set(picks)
    assert len(picks_seen) > 1  # the prices move the pick


def test_the_router_round_trips_through_its_dict(pair) -> None:
    train, test = pair
    serving = _serving(train, [0, 1, 2, 3], mu=0.3)
    again = RouterModel.from_dict(json.loads(json.dumps(serving.to_dict())))
    assert again.mu == 0.3 and list(again.cost_fractions) == list(serving.cost_fractions)
    for i in range(len(test)):
        prompt = test.prompt(i)
        assert list(again.p_correct(prompt)) == list(serving.p_correct(prompt))
        assert again.pick(prompt) == serving.pick(prompt) == serving.root_state(prompt)
    assert all(np.all(np.diff(m.indices) > 0) for m in again.models)


def _router_dict(pair) -> dict:
    return _serving(pair[0], [0, 3], mu=0.1).to_dict()


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("mu"), "router.mu: missing"),
        (lambda d: d.update(mu="cheap"), "router.mu: expected a finite number, got str"),
        (lambda d: d.update(mu=-1.0), "router.mu: expected a cost price >= 0"),
        (lambda d: d.update(dim=7), "router.dim: expected 65536"),
        (lambda d: d.update(models={}), "router.models: expected a list, got dict"),
        (lambda d: d.update(models=[]), "router.models: expected at least one node"),
        (lambda d: d["cost_fractions"].append(1.0), "router.cost_fractions: expected one per"),
        (lambda d: d["models"][1].pop("bias"), "router.models[1].bias: missing"),
        (lambda d: d["models"][0].update(weights=3), "router.models[0].weights: expected a list"),
        (lambda d: d["models"][0]["weights"].pop(), "router.models[0].weights: expected one per"),
        (lambda d: d["models"][0]["indices"].reverse(), "router.models[0].indices: expected stri"),
        (lambda d: d["models"][0]["indices"].__setitem__(0, 1.5), "indices[0]: expected an int"),
        (lambda d: d["models"][0]["indices"].__setitem__(-1, 1 << 20), "hashed columns in"),
    ],
)
def test_a_malformed_router_is_refused_by_its_field(pair, edit, message) -> None:
    d = _router_dict(pair)
    edit(d)
    with pytest.raises(RouterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RouterModel.from_dict(d)


# ---------------------------------------------------------------- fit, replay, walk


def test_the_root_kind_is_chosen_on_train_and_recorded(pair, fitted) -> None:
    train = pair[0]
    assert fitted.root_kind == "router" and fitted.difficulty is None
    assert set(fitted.root_choice["held_out_area"]) == {"router"}
    auto = FittedIndex(train, recall=True, root="auto", n_bins=3)
    assert auto.root_choice["requested"] == "auto"
    # 100 rows: fewer than the prompt models need, so auto reads no prompt
    assert auto.root_kind == "none" and auto.router is None
    with pytest.raises(ValueError, match="unknown root"):
        FittedIndex(train, recall=True, root="prompt")
    with pytest.raises(ValueError, match="start to every node"):
        FittedIndex(train, recall=True, root="router", transitions="line")


def test_the_router_root_walks_as_it_replays(pair, fitted) -> None:
    """At several prices: the artifact's vectorised replay equals the fit's replay of the
    same tables (the router's picks at the setting's own mu), and the row-by-row walk of
    the served policy (its router reads each prompt) makes the same calls and answer."""
    test = pair[1]
    mu = _mixed_mu(fitted, test, len(test))
    started = set()
    for m in sorted({mu, *DEFAULT_MUS[6:30:6]}):
        art = build_artifact(fitted, m, train_path=str(ALPACA_TRAIN))
        assert art.router is not None and art.router.mu == m and art.difficulty is None
        expected = replay_artifact(art, test)
        assert_same_outcome(fitted.replay(fitted.tables(m), test), expected, "fit")
        assert_same_outcome(walk_traces(art.policy(), art.models, test), expected, "index")
        first = [art.policy().root_state(test.prompt(i)) for i in range(len(test))]
        started |= set(first)
        assert all(expected.explored[i, fitted.nodes[k]] for i, k in enumerate(first))
    assert len(started) > 1


def test_a_per_request_lambda_routes_at_its_own_price(fitted) -> None:
    art = build_artifact(fitted, DEFAULT_MUS[12], train_path="t.jsonl")
    assert len(art.sweep) == len(DEFAULT_MUS)  # one entry per price: the pick depends on it
    for entry in art.sweep[::7]:
        policy = art.policy(entry.lam)
        assert policy.router is not None and policy.router.mu == entry.mu
        assert [list(d) for d in policy.tables.decision] == entry.decision
    assert art.data["training"]["root_choice"]["kind"] == "router"


def test_a_target_accuracy_is_met_with_the_router_root(fitted) -> None:
    from calibration.artifact import choose_mu

    mu, _ = choose_mu(fitted, lam=None, target_accuracy=0.95, max_cost_usd=None, mus=DEFAULT_MUS)
    art = build_artifact(fitted, mu, train_path="t.jsonl")
    ref = float(fitted.train.correct[:, fitted.train.reference].mean())
    assert art.expected.accuracy is not None and art.expected.accuracy >= 0.95 * ref - 1e-12
    budget = 0.5 * fitted.reference_cost
    mu, _ = choose_mu(fitted, lam=None, target_accuracy=None, max_cost_usd=budget, mus=DEFAULT_MUS)
    art = build_artifact(fitted, mu, train_path="t.jsonl")
    assert art.expected.mean_cost_usd is not None and art.expected.mean_cost_usd <= budget


# ---------------------------------------------------------------- the artifact


def _edited(art: PolicyArtifact, edit) -> dict:
    data = copy.deepcopy(art.data)
    edit(data)
    data["hash"] = content_hash(data)
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda a: a.update(router=[1]), "router: expected an object, got list"),
        (lambda a: a["router"].update(mu="0.1"), "router.mu: expected a finite number"),
        (
            lambda a: a["router"]["models"][2].update(weights="x"),
            r"router.models\[2\].weights: expected a list, got str",
        ),
        (
            lambda a: [a["router"][k].pop() for k in ("models", "cost_fractions")],
            "router.models: expected 4 entries",
        ),
        (
            lambda a: a.update(difficulty={"indices": [], "weights": [], "bias": 0, "edges": []}),
            "router: an artifact has one prompt root",
        ),
        (
            lambda a: a["tables"]["decision"].__setitem__(0, [0, 0, 0, 0]),
            r"tables.decision\[0\]: expected \[0, 1, 2, 3\]",
        ),
    ],
)
def test_a_malformed_router_entry_is_refused_by_the_loader(fitted, edit, message) -> None:
    art = build_artifact(fitted, DEFAULT_MUS[12], train_path="t.jsonl")
    with pytest.raises(ArtifactError, match=message):
        PolicyArtifact.from_dict(_edited(art, edit), "p.json")


def test_an_artifact_without_a_router_entry_loads_as_before(pair) -> None:
    fitted = FittedIndex(pair[0], recall=True, root="none", n_bins=3)
    art = build_artifact(fitted, DEFAULT_MUS[12], train_path="t.jsonl")
    assert art.data["router"] is None and art.router is None
    old = _edited(art, lambda a: a.pop("router"))
    loaded = PolicyArtifact.from_dict(old, "old.json")
    assert loaded.router is None and loaded.policy().router is None


# ---------------------------------------------------------------- the proxy


def _config(folder: Path, upstream: str, policy: Path, models: tuple[str, ...]) -> Path:
    config = {
        "models": {
            m: {
                "backend": "openai",
                "base_url": f"{upstream}/v1",
                "price_in_per_mtok": 0.1 * (k + 1),
                "price_out_per_mtok": 0.1 * (k + 1),
                "timeout_s": 5.0,
                "max_retries": 0,
            }
            for k, m in enumerate(models)
        },
        "cascades": {
            "chat": {"nodes": list(models), "reference": models[-1], "policy": str(policy)}
        },
        "server": {"api_keys": [KEY], "max_body_bytes": 200_000},
    }
    return write_config(folder, config)


def test_the_proxy_calls_first_the_node_the_router_picks(pair, fitted, tmp_path) -> None:
    """Two prompts the router sends to different first nodes: `cascade serve` over the fake
    upstream answers each with a first call to its own pick, and calls what the replay calls."""
    test = pair[1]
    mu = _mixed_mu(fitted, test, ROWS)
    art = build_artifact(fitted, mu, train_path=str(ALPACA_TRAIN))
    policy = tmp_path / "policy.json"
    policy.write_text(art.to_json())
    served = art.policy()
    first = [served.root_state(test.prompt(i)) for i in range(ROWS)]
    a = 0
    b = next(i for i in range(ROWS) if first[i] != first[a])
    outcome = replay_artifact(art, test)
    with fake_upstream(",".join(test.models), "--traces", str(ALPACA_TEST)) as up:
        ledger = tmp_path / "ledger.db"
        env = sqlite_env(ledger)
        db_upgrade(env)
        with running_proxy(_config(tmp_path, up.url, policy, test.models), env) as proxy:
            for row in (a, b):
                r = httpx.post(
                    f"{proxy.url}/v1/chat/completions",
                    json={"model": "chat", "messages": test.messages[row]},
                    headers={"authorization": f"Bearer {KEY}"},
                    timeout=30.0,
                )
                assert r.status_code == 200, r.text
                calls = [c["model"] for c in r.json()["cascade"]["calls"]]
                assert calls[0] == art.models[first[row]], row
                called = sorted(test.models.index(m) for m in calls)
                assert called == list(np.flatnonzero(outcome.explored[row])), row
    assert art.models[first[a]] != art.models[first[b]]


def test_serve_refuses_an_artifact_whose_router_is_malformed(fitted, tmp_path) -> None:
    art = build_artifact(fitted, DEFAULT_MUS[12], train_path="t.jsonl")
    bad = _edited(art, lambda a: a["router"]["models"][0].update(bias="high"))
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(bad))
    config = _config(tmp_path, "http://127.0.0.1:9", policy, tuple(art.models))
    env = sqlite_env(tmp_path / "ledger.db")
    running = start_proxy(config, env)
    try:
        _, err = running.proc.communicate(timeout=60)
    finally:
        stop(running.proc)
    assert running.proc.returncode != 0
    assert "router.models[0].bias: expected a finite number, got str" in err
