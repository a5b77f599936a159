"""The policies the index policy is judged against, on the same replay harness.

- singles: route every query to one model (each model is a setting; the curve through
  them is the hull of single models: randomising between two reaches any point between);
- single:NAME: one model, one point;
- threshold: confidence-threshold cascade without recall (WoC-style), policies/rules.py's
  ThresholdPolicy;
- agreement: Cascade of Ensembles (Kolawole et al.), policies/rules.py's AgreementPolicy;
- oracle-routing / oracle-cascade: the cheapest correct model, paying only it, or paying
  every model up to it (they read test correctness: bounds, not policies).

Every tunable baseline is tuned on train only: for each cost price mu of a shared grid the
setting minimising train error + mu * train cost fraction is kept, and bench replays the
kept settings on test.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from calibration.fit import DEFAULT_MUS, select_nodes
from calibration.replay import Outcome, PolicyFamily, outcome_from_choices, walk_traces
from calibration.traces import TraceSet
from policies.rules import AgreementPolicy, SinglePolicy, ThresholdPolicy, stop_positions
from policies.tiers import majority
from policies.walk import Rule

THRESHOLD_QUANTILES = 24
THRESHOLD_PASSES = 3
THETAS = (0.5, 0.6, 2 / 3, 0.75, 0.8, 1.0)


@dataclass
class FixedSetting:
    """A replayable setting defined by a function of the traces (a ReplayPolicy)."""

    name: str
    knob: float
    run: Callable[[TraceSet], Outcome]
    params: dict = field(default_factory=dict)  # what the proxy needs to run it live
    rule: Rule | None = None  # the decision rule, as the proxy walks it (policies/walk.py)
    nodes: list[str] = field(default_factory=list)  # the models of the rule's nodes

    def replay(self, traces: TraceSet) -> Outcome:
        """A rule's setting is walked row by row by the proxy's driver (walk_traces); the
        oracles, which read correctness, by their own function."""
        if self.rule is not None:
            return walk_traces(self.rule, self.nodes, traces)
        return self.run(traces)


def reference_cost(traces: TraceSet) -> float:
    """Mean cost of the most expensive model: the unit of every cost fraction."""
    return traces.reference_cost


def priced_selection(
    candidates: Sequence[tuple[object, Outcome]],
    ref_cost: float,
    mus: Sequence[float] = DEFAULT_MUS,
) -> list[tuple[float, object]]:
    """For each price mu, the candidate minimising train error + mu * cost fraction.

    Returns (mu, candidate) pairs, one per distinct winner (the smallest mu that picks it).
    """
    err = np.array([1.0 - o.accuracy for _, o in candidates])
    cost = np.array([o.mean_cost / ref_cost for _, o in candidates])
    chosen: list[tuple[float, object]] = []
    seen: set[int] = set()
    for mu in mus:
        k = int(np.argmin(err + mu * cost + 1e-12 * np.arange(len(err))))
        if k not in seen:
            seen.add(k)
            chosen.append((float(mu), candidates[k][0]))
    return chosen


# ---------------------------------------------------------------- single models


def single_outcome(traces: TraceSet, col: int) -> Outcome:
    n = len(traces)
    explored = np.zeros((n, traces.n_models), dtype=bool)
    explored[:, col] = True
    return outcome_from_choices(traces, explored, np.full(n, col), np.full(n, col))


class SinglesFamily:
    """Every model on its own; the envelope of their points is the hull of single models."""

    name = "singles"

    def fit_sweep(self, train: TraceSet) -> list[FixedSetting]:
        return [
            FixedSetting(
                self.name, float(j), _by_name(name, single_outcome), {}, SinglePolicy(), [name]
            )
            for j, name in enumerate(train.models)
        ]


class SingleModel:
    """One model, one point (bench's `single:NAME`)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.name = f"single:{model}"

    def fit_sweep(self, train: TraceSet) -> list[FixedSetting]:
        single = _by_name(self.model, single_outcome)
        return [FixedSetting(self.name, 0.0, single, {}, SinglePolicy(), [self.model])]


def _by_name(model: str, fn: Callable[[TraceSet, int], Outcome]) -> Callable:
    """Look the model up by name in whichever traces are replayed (train or test)."""
    return lambda traces: fn(traces, traces.models.index(model))


# ---------------------------------------------------------------- threshold cascade


def threshold_outcome(traces: TraceSet, chain: list[str], thresholds: np.ndarray) -> Outcome:
    cols = [traces.models.index(m) for m in chain]
    stop = ThresholdPolicy(chain, thresholds).stop_positions(traces.confidence[:, cols])
    n = len(traces)
    explored = np.zeros((n, traces.n_models), dtype=bool)
    for pos, col in enumerate(cols):
        explored[:, col] = stop >= pos
    stop_col = np.asarray(cols)[stop]
    return outcome_from_choices(traces, explored, stop_col, stop_col)


def _candidate_thresholds(conf: np.ndarray) -> np.ndarray:
    """-inf (always stop), quantiles of the train confidences, +inf (never stop)."""
    finite = conf[np.isfinite(conf)]
    qs = (
        np.unique(np.quantile(finite, np.linspace(0.0, 1.0, THRESHOLD_QUANTILES + 1)))
        if len(finite)
        else np.zeros(0)
    )
    return np.concatenate([[-np.inf], qs, [np.inf]])


class ThresholdFamily:
    """Confidence-threshold cascade without recall; one threshold per model, tuned on train.

    The chain is the models not dominated on train (cheapest first). For each cost price,
    thresholds are searched by coordinate descent over per-model quantile grids.
    """

    name = "threshold"

    def fit_sweep(self, train: TraceSet) -> list[FixedSetting]:
        nodes = select_nodes(train)
        chain = [train.models[j] for j in nodes]
        conf = np.nan_to_num(train.confidence[:, nodes], nan=-np.inf)
        correct = train.correct[:, nodes]
        cum_cost = np.cumsum(np.nan_to_num(train.cost_usd[:, nodes]), axis=1) / reference_cost(
            train
        )
        grids = [_candidate_thresholds(conf[:, k]) for k in range(len(nodes) - 1)]
        rows = np.arange(len(train))

        def objective(t: np.ndarray, mu: float) -> float:
            stop = stop_positions(conf, t)
            return float(1.0 - correct[rows, stop].mean() + mu * cum_cost[rows, stop].mean())

        settings: list[FixedSetting] = []
        seen: set[tuple] = set()
        for mu in DEFAULT_MUS:
            best_t, best_v = None, np.inf
            # start from "always stop at position k", for every k; keep the best descent
            for start in range(len(nodes)):
                t = np.full(len(nodes) - 1, np.inf)
                t[start:] = -np.inf
                value = objective(t, mu)
                for _ in range(THRESHOLD_PASSES):
                    improved = False
                    for k, grid in enumerate(grids):
                        for cand in grid:
                            trial = t.copy()
                            trial[k] = cand
                            v = objective(trial, mu)
                            if v < value - 1e-12:
                                t, value, improved = trial, v, True
                    if not improved:
                        break
                if value < best_v - 1e-12:
                    best_t, best_v = t, value
            key = tuple(best_t.tolist())
            if key in seen:
                continue
            seen.add(key)
            thresholds = best_t.copy()
            settings.append(
                FixedSetting(
                    self.name,
                    float(mu),
                    lambda traces, th=thresholds: threshold_outcome(traces, chain, th),
                    {"chain": chain, "thresholds": thresholds.tolist()},
                    ThresholdPolicy(chain, thresholds),
                    chain,
                )
            )
        return settings


# ---------------------------------------------------------------- agreement tiers


def _majority(extracted: list[list[str | None]], cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the majority answer's representative column and its vote fraction, by
    policies/tiers.py's `majority` over `cols` (cheapest first); a row where no member
    answered gives the last column and fraction 0."""
    rep = np.empty(len(extracted), dtype=int)
    frac = np.empty(len(extracted))
    for r, row in enumerate(extracted):
        voters = majority([row[c] for c in cols])
        if not voters:
            rep[r], frac[r] = cols[-1], 0.0
            continue
        rep[r], frac[r] = cols[voters[-1]], len(voters) / len(cols)
    return rep, frac


def agreement_outcome(
    traces: TraceSet,
    tiers: list[list[str]],
    theta: float,
    votes: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] | None = None,
) -> Outcome:
    """Walk the tiers; stop at the first whose vote fraction reaches theta (or the last).

    `votes` caches each tier's majority on these traces across calls.
    """
    votes = {} if votes is None else votes
    rule = AgreementPolicy([len(t) for t in tiers], theta)
    n = len(traces)
    explored = np.zeros((n, traces.n_models), dtype=bool)
    answer = np.full(n, -1)
    stop_col = np.full(n, -1)
    latency = np.zeros(n)
    active = np.ones(n, dtype=bool)
    for t, tier in enumerate(tiers):
        cols = [traces.models.index(m) for m in tier]
        key = tuple(cols)
        if key not in votes:
            votes[key] = _majority(traces.extracted, cols)
        rep, frac = votes[key]
        for c in cols:
            explored[active, c] = True
        latency[active] += np.max(traces.latency_ms[np.ix_(active, cols)], axis=1)
        done = active & rule.agrees(frac, t == len(tiers) - 1)
        answer[done] = rep[done]
        stop_col[done] = cols[-1]
        active &= ~done
    base = outcome_from_choices(traces, explored, answer, stop_col)
    return Outcome(
        correct=base.correct,
        cost=base.cost,
        latency=latency,
        explored=base.explored,
        answer_model=base.answer_model,
        stop_model=base.stop_model,
    )


def tier_structures(chain: list[str]) -> list[list[list[str]]]:
    """Every way to pick models from the chain (in order) and split them into contiguous
    tiers whose non-final tiers have >= 2 models (a lone model always agrees with itself)."""
    out = []
    n = len(chain)
    for size in range(1, n + 1):
        for picked in itertools.combinations(chain, size):
            for cuts in itertools.product([False, True], repeat=size - 1):
                tiers, current = [], [picked[0]]
                for k in range(1, size):
                    if cuts[k - 1]:
                        tiers.append(current)
                        current = []
                    current.append(picked[k])
                tiers.append(current)
                if all(len(t) >= 2 for t in tiers[:-1]):
                    out.append(tiers)
    return out


class AgreementFamily:
    """Cascade of Ensembles: tier structure and theta chosen per cost price on train."""

    name = "agreement"

    def fit_sweep(self, train: TraceSet) -> list[FixedSetting]:
        chain = [train.models[j] for j in select_nodes(train)]
        candidates = []
        votes: dict = {}
        for tiers in tier_structures(chain):
            thetas = THETAS if len(tiers) > 1 else (1.0,)
            for theta in thetas:
                setting = (tiers, theta)
                candidates.append((setting, agreement_outcome(train, tiers, theta, votes)))
        ref = reference_cost(train)
        return [
            FixedSetting(
                self.name,
                mu,
                lambda traces, s=setting: agreement_outcome(traces, s[0], s[1]),
                {"tiers": setting[0], "theta": setting[1]},
                AgreementPolicy([len(t) for t in setting[0]], setting[1]),
                [m for t in setting[0] for m in t],
            )
            for mu, setting in priced_selection(candidates, ref)
        ]


# ---------------------------------------------------------------- oracles


def oracle_outcome(traces: TraceSet, pay_prefix: bool, mu: float | None = None) -> Outcome:
    """Per row the cheapest of the models with the best label: the cheapest correct model
    (the cheapest model when none is right). On graded labels, with a cost price `mu`, the
    model of highest quality - mu x cost (cost as a fraction of the reference's): a
    single best-quality point would not bound a curve that trades quality for cost.

    Routing pays only that model; the cascade pays every model up to it in chain order.
    """
    n, m = traces.correct.shape
    cost = np.nan_to_num(traces.cost_usd)
    label = traces.correct.astype(float)
    if mu is not None:
        paid = np.cumsum(cost, axis=1) if pay_prefix else cost
        label = label - mu * paid / reference_cost(traces)
    top = label >= label.max(axis=1, keepdims=True) - 1e-12
    if pay_prefix:  # chain order: first best model in the trace's (cheapest-first) order
        pick = np.argmax(top, axis=1)
        explored = np.arange(m)[None, :] <= pick[:, None]
    else:
        pick = np.argmin(np.where(top, cost, np.inf), axis=1)
        explored = np.zeros((n, m), dtype=bool)
        explored[np.arange(n), pick] = True
    return outcome_from_choices(traces, explored, pick, pick)


class OracleFamily:
    """The oracles read the test labels: bounds, not policies. On boolean labels one point
    (every row at its cheapest correct model); on graded ones a sweep of the cost price."""

    def __init__(self, pay_prefix: bool) -> None:
        self.pay_prefix = pay_prefix
        self.name = "oracle-cascade" if pay_prefix else "oracle-routing"

    def fit_sweep(self, train: TraceSet) -> list[FixedSetting]:
        if train.label == "correct":
            return [FixedSetting(self.name, 0.0, lambda t: oracle_outcome(t, self.pay_prefix))]
        return [
            FixedSetting(self.name, mu, lambda t, mu=mu: oracle_outcome(t, self.pay_prefix, mu))
            for mu in DEFAULT_MUS
        ]


def baseline_families(train: TraceSet) -> list[PolicyFamily]:
    """Every baseline bench runs beside the index policy, oracles last."""
    return [
        ThresholdFamily(),
        AgreementFamily(),
        SinglesFamily(),
        *(SingleModel(m) for m in train.models),
        OracleFamily(pay_prefix=False),
        OracleFamily(pay_prefix=True),
    ]
