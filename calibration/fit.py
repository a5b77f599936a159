"""Fit the index policy on training traces: posterior, states, kernels, tables per lambda.

Steps (research/ttamer.md §6, with the fixes reference-numbers.md calls for):
1. choose the nodes: drop models dominated on train cost and accuracy;
2. fit the answer posterior (policies/posterior.py) and score every (row, explored set)
   out-of-fold, so states and bin values are not judged by the rows they were fitted on;
3. the Markov state after a call is the bin of the posterior loss (of the best answer
   seen, with recall; of the last answer, without); bin values are the observed error
   rate of the answer that would be returned, shrunk toward the node's mean;
4. kernels P(next bin | bin) for every pair i < j (skips), shrunk toward the marginal;
5. backward induction (policies/index.py) for each cost price mu = (1 - lambda) / lambda.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from calibration.difficulty import fit_difficulty
from calibration.logistic import fit_logistic, log_loss
from calibration.replay import Outcome, outcome_from_choices
from calibration.router import fit_node_models, out_of_fold_p, predict, prompt_design, route
from calibration.textfit import calibrated_trace_columns, fit_text_calibrators, is_open_ended
from calibration.traces import TraceSet
from policies.difficulty import DifficultyModel
from policies.errors import InvalidInput
from policies.freetext import pairwise_agreement
from policies.index import ROOT, STOP, solve_skips
from policies.lengthcal import (
    MIN_DISTINCT_LENGTHS,
    N_FEATURES,
    LengthCalibrator,
    length_features,
    marker_columns,
)
from policies.policy import StateTables
from policies.posterior import (
    PosteriorModel,
    answer_classes,
    best_answer,
    candidate_features,
    confidence_feature,
    subset_members,
)
from policies.router import RouterModel
from policies.sampling import is_sampled
from policies.tiers import tier_members
from policies.transitions import START, TransitionSpec, allowed_edges, describe

DEFAULT_MUS = (0.0, *np.geomspace(0.005, 50.0, 48).tolist())
MAX_NODES = 6
MIN_ROWS_FOR_DIFFICULTY = 150  # fewer calibration prompts than this: one root state
ROOT_KINDS = ("auto", "difficulty", "router", "none")  # FittedIndex(root=...)


def select_nodes(train: TraceSet, max_nodes: int = MAX_NODES) -> list[int]:
    """Models worth exploring, cheapest first.

    Drop any model that another model beats or ties on both mean train cost and train
    accuracy, except the reference model (the most expensive: the one a user would
    otherwise always call, and whose answer the policy must be able to reach); keep at
    most `max_nodes` (the cheapest, the reference, then the most accurate).
    """
    acc = train.correct.mean(axis=0)
    cost = np.nanmean(train.cost_usd, axis=0)
    reference = train.reference
    keep = []
    for j in range(train.n_models):
        dominated = any(
            k != j
            and cost[k] <= cost[j]
            and acc[k] >= acc[j]
            and (cost[k] < cost[j] or acc[k] > acc[j])
            for k in range(train.n_models)
        )
        if not dominated or j == reference:
            keep.append(j)
    if len(keep) > max_nodes:
        cheapest = min(keep, key=lambda j: cost[j])
        rest = sorted((j for j in keep if j not in (cheapest, reference)), key=lambda j: -acc[j])
        keep = [cheapest, reference, *rest[: max_nodes - 2]]
    return sorted(keep, key=lambda j: (cost[j], j))


@dataclass(frozen=True)
class Signals:
    """Per-row inputs of the posterior for the selected nodes."""

    classes: np.ndarray  # (N, n)
    conf_feat: np.ndarray  # (N, n) nan where missing
    missing: np.ndarray  # (N, n)
    correct: np.ndarray  # (N, n)
    cost: np.ndarray  # (N, n)
    agree: np.ndarray | None = None  # (N, n, n) graded agreement; None: exact classes vote

    @classmethod
    def of(
        cls,
        traces: TraceSet,
        nodes: list[int],
        confidence: np.ndarray | None = None,
        graded: bool = False,
    ) -> Signals:
        """The nodes' signals; `confidence` (N, n) replaces the recorded confidences (the
        length-calibrated ones, see policies/lengthcal.py); `graded` adds the pairwise
        agreement of the answers' texts (open-ended traces: policies/freetext.py)."""
        extracted = [[row[j] for j in nodes] for row in traces.extracted]
        if confidence is None:
            confidence = traces.confidence[:, nodes]
        agree = None
        if graded:
            agree = pairwise_agreement([[row[j] for j in nodes] for row in traces.answers])
        return cls(
            classes=answer_classes(extracted),
            conf_feat=confidence_feature(confidence),
            missing=np.array([[e is None for e in row] for row in extracted], dtype=bool),
            correct=traces.correct[:, nodes],
            cost=np.nan_to_num(traces.cost_usd[:, nodes]),
            agree=agree,
        )

    def rows(self, idx: np.ndarray) -> Signals:
        per_row = (self.classes, self.conf_feat, self.missing, self.correct, self.cost)
        agree = None if self.agree is None else self.agree[idx]
        return Signals(*(a[idx] for a in per_row), agree=agree)


def _training_samples(sig: Signals, z: np.ndarray, max_set: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample per (row, explored set, answer class): features and whether it is right."""
    n = sig.classes.shape[1]
    xs, ys = [], []
    for mask in range(1, 1 << n):
        members = subset_members(mask, n)
        if len(members) > max_set:
            continue
        for m in members:
            # one sample per class: its most expensive member in the set represents it
            later = [k for k in members if k > m]
            rep = np.ones(len(sig.classes), dtype=bool)
            for k in later:
                rep &= sig.classes[:, k] != sig.classes[:, m]
            if not rep.any():
                continue
            agree = None if sig.agree is None else sig.agree[rep]
            feats = candidate_features(sig.classes[rep], z[rep], sig.missing[rep], mask, m, agree)
            xs.append(feats)
            ys.append(sig.correct[rep, m])
    return np.concatenate(xs), np.concatenate(ys)


def fit_posterior(
    sig: Signals, c_reg: float = 1.0, max_set: int = 4, max_rows: int = 3000, seed: int = 0
) -> PosteriorModel:
    """L2-regularised logistic regression of answer correctness (or quality) on vote/dissent
    features."""
    if len(sig.classes) > max_rows:  # the fit needs thousands of rows, not all of them
        rng = np.random.default_rng(seed)
        sig = sig.rows(np.sort(rng.choice(len(sig.classes), max_rows, replace=False)))
    seen = ~np.isnan(sig.conf_feat)
    count = np.maximum(seen.sum(axis=0), 1)
    filled = np.where(seen, sig.conf_feat, 0.0)
    mean = filled.sum(axis=0) / count  # 0 for a model with no confidence at all
    scale = np.sqrt((np.where(seen, filled - mean, 0.0) ** 2).sum(axis=0) / count)
    scale = np.where(scale < 1e-6, 1.0, scale)
    shell = PosteriorModel(np.zeros(1), 0.0, mean, scale)
    z = shell.standardise(sig.conf_feat)
    x, y = _training_samples(sig, z, max_set)
    if y.min() == y.max():  # degenerate: a constant posterior (zero weight on each feature)
        rate = float(np.clip(y.mean(), 1e-3, 1 - 1e-3))
        weights = np.zeros(x.shape[1])
        return PosteriorModel(weights, float(np.log(rate / (1 - rate))), mean, scale)
    clf = fit_logistic(x, y, c_reg, max_iter=500)
    return PosteriorModel(clf.coef_[0].astype(float), float(clf.intercept_[0]), mean, scale)


@dataclass(frozen=True)
class SetScores:
    """Posterior of every explored set (bit mask over nodes) for every row."""

    best_p: np.ndarray  # (N, 2^n)
    best_m: np.ndarray  # (N, 2^n) node whose answer recall returns
    last_p: np.ndarray  # (N, 2^n) posterior of the last node's answer

    def with_margin(self, margin: float) -> SetScores:
        """Recall an earlier answer only when its posterior beats the last's by `margin`."""
        if margin <= 0:
            return self
        last = np.array([_last_member(s) for s in range(self.best_m.shape[1])])
        keep = self.best_p - self.last_p > margin
        return SetScores(
            np.where(keep, self.best_p, self.last_p),
            np.where(keep, self.best_m, last[None, :]),
            self.last_p,
        )

    def loss(self, recall: bool) -> np.ndarray:
        return 1.0 - (self.best_p if recall else self.last_p)

    def answer(self, recall: bool) -> np.ndarray:
        if recall:
            return self.best_m
        n_sets = self.best_m.shape[1]
        last = np.array([_last_member(s) for s in range(n_sets)])
        return np.broadcast_to(last, self.best_m.shape)


def _last_member(mask: int) -> int:
    return mask.bit_length() - 1


def score_sets(model: PosteriorModel, sig: Signals) -> SetScores:
    n_rows, n = sig.classes.shape
    z = model.standardise(sig.conf_feat)
    best_p = np.zeros((n_rows, 1 << n))
    best_m = np.zeros((n_rows, 1 << n), dtype=int)
    last_p = np.zeros((n_rows, 1 << n))
    for mask in range(1, 1 << n):
        bp, bm, lp = best_answer(
            model, sig.classes, z, sig.missing, mask, _last_member(mask), sig.agree
        )
        best_p[:, mask], best_m[:, mask], last_p[:, mask] = bp, bm, lp
    return SetScores(best_p, best_m, last_p)


def out_of_fold_scores(
    sig: Signals, full: PosteriorModel, folds: int = 5, seed: int = 0, **kw
) -> SetScores:
    """Set scores for every row from a posterior fitted without that row's fold, put on
    the scale of `full` (the posterior fitted on every row, the one that scores new
    queries; align_fold_scores), so that rows the two cannot tell apart get the same state
    on train as on new queries."""
    n_rows, n = sig.classes.shape
    rng = np.random.default_rng(seed)
    fold = rng.permutation(n_rows) % folds
    out = SetScores(
        np.zeros((n_rows, 1 << n)),
        np.zeros((n_rows, 1 << n), dtype=int),
        np.zeros((n_rows, 1 << n)),
    )
    served = score_sets(full, sig)
    for f in range(folds):
        test = fold == f
        model = fit_posterior(sig.rows(np.flatnonzero(~test)), **kw)
        every = score_sets(model, sig)  # the fold's model on every row: its own scale
        out.best_m[test] = every.best_m[test]
        out.best_p[test] = align_fold_scores(every.best_p, served.best_p, test)
        out.last_p[test] = align_fold_scores(every.last_p, served.last_p, test)
    return out


def align_fold_scores(fold_p: np.ndarray, full_p: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`fold_p[rows]` mapped, set by set, to the value of the same rank under `full_p`.

    Both arrays hold one model's posteriors for every training row (N, 2^n). A fold's model
    differs from the full one by a small shift per set; left as they are, the rows of an
    atom (many queries with the same signals, such as a saturated self-check) scatter over
    five nearby values and quantile bins cut the atom by fold, not by anything observed,
    while on new queries the whole atom lands in one bin. Mapping ranks (midrank, so an
    atom stays whole) keeps each fold's honest ordering on the full model's scale.
    """
    n_rows = fold_p.shape[0]
    out = np.empty((int(np.count_nonzero(rows)), fold_p.shape[1]))
    for s in range(fold_p.shape[1]):
        ref = np.sort(fold_p[:, s])
        x = fold_p[rows, s]
        mid = (np.searchsorted(ref, x, "left") + np.searchsorted(ref, x, "right") - 1) // 2
        out[:, s] = np.sort(full_p[:, s])[np.clip(mid, 0, n_rows - 1)]
    return out


def fit_length_calibrators(
    train: TraceSet, nodes: list[int], folds: int = 5, seed: int = 0, min_rows: int = 50
) -> tuple[list[LengthCalibrator | None], np.ndarray]:
    """Per node, a LengthCalibrator fitted on train, and the nodes' (N, n) train confidences
    to fit the posterior on: out-of-fold calibrated ones where a node has a calibrator
    (honest estimates, as for the posterior itself), the recorded ones elsewhere.

    A node gets no calibrator where its answers' lengths barely vary or too few rows hold
    the signals. A node that records no confidence at all is calibrated from its length
    and marker alone (its yardstick is its base rate). The others get theirs only together,
    if the length pays for the cascade as a whole (_length_pays): node by node, the gain on
    a strong model with a handful of errors in a few hundred rows is noise, and a posterior
    fed half-calibrated signals did worse on held-out GSM8K splits than one fed all or
    none."""
    conf = np.array(train.confidence[:, nodes], dtype=float, copy=True)
    tokens = train.tokens_out[:, nodes]
    marker = marker_columns(train.answers, nodes)
    fold = np.random.default_rng(seed).permutation(len(train)) % folds
    found: dict[int, tuple[LengthCalibrator, np.ndarray]] = {}
    log_loss_with, log_loss_alone = 0.0, 0.0
    for k, j in enumerate(nodes):
        uses_confidence = bool(np.isfinite(conf[:, k]).any())
        feats = length_features(conf[:, k], tokens[:, k], marker[:, k], uses_confidence)
        ok = ~np.isnan(feats).any(axis=1)
        y = train.correct[:, j]
        if (
            tier_members(train.models[j]) is not None  # a tier's length is its members' sum
            or is_sampled(train.models[j])  # so is a sampled node's (its k samples')
            or ok.sum() < min_rows
            or len(np.unique(tokens[ok, k])) < MIN_DISTINCT_LENGTHS
            or len(np.unique(y[ok])) < 2
        ):
            continue
        mean, scale = feats[ok].mean(axis=0), feats[ok].std(axis=0)
        scale = np.where(scale < 1e-9, 1.0, scale)
        x = (feats - mean) / scale
        calibrated = np.full(len(train), np.nan)
        alone = np.full(len(train), np.nan)  # the same from the confidence alone: the yardstick
        for f in range(folds):
            held = ok & (fold == f)
            rest = np.flatnonzero(ok & (fold != f))
            if held.any() and len(np.unique(y[rest])) >= 2:
                args = (conf[held, k], tokens[held, k], marker[held, k])
                cal = _fit_calibrator(x[rest], y[rest], mean, scale, uses_confidence)
                calibrated[held] = cal.log_p(*args)
                plain = _fit_calibrator(x[rest], y[rest], mean, scale, uses_confidence, n_used=1)
                alone[held] = plain.log_p(*args)
        seen = ~np.isnan(calibrated) & ~np.isnan(alone)
        log_loss_with += log_loss(calibrated[seen], y[seen]) * seen.sum()
        log_loss_alone += log_loss(alone[seen], y[seen]) * seen.sum()
        rows = np.flatnonzero(ok)
        found[k] = (_fit_calibrator(x[rows], y[rows], mean, scale, uses_confidence), calibrated)
    if not found or not _length_pays(log_loss_with, log_loss_alone):
        return [None] * len(nodes), conf
    for k, (_, calibrated) in found.items():
        conf[:, k] = calibrated
    return [found[k][0] if k in found else None for k in range(len(nodes))], conf


LENGTH_GAIN = 0.02  # the share of held-out log-loss the lengths must save to be used


def _length_pays(log_loss_with: float, log_loss_alone: float) -> bool:
    """True if out of fold, over the cascade's nodes, P(correct) from confidence and length
    beats P(correct) from the confidence alone by LENGTH_GAIN of log-loss (GSM8K chains of
    thought: 4-9%; short factual answers: under 1%, or worse)."""
    return log_loss_with < (1.0 - LENGTH_GAIN) * log_loss_alone


def _fit_calibrator(
    x: np.ndarray,
    y: np.ndarray,
    mean: np.ndarray,
    scale: np.ndarray,
    uses_confidence: bool,
    n_used: int = N_FEATURES,
) -> LengthCalibrator:
    """Logistic regression of correctness on the first `n_used` standardised length
    features `x` (1: the confidence alone, the yardstick of _length_pays; for a node
    without confidences that feature is constant, so the yardstick is the base rate)."""
    clf = fit_logistic(x[:, :n_used], y, 1.0, max_iter=1000)
    return LengthCalibrator.from_dict(
        {
            "weights": [*clf.coef_[0], *[0.0] * N_FEATURES][:N_FEATURES],
            "bias": clf.intercept_[0],
            "mean": mean,
            "scale": scale,
            "uses_confidence": uses_confidence,
        }
    )


RECALL_MARGINS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 1.0)


def choose_recall_margin(oof: SetScores, correct: np.ndarray) -> float:
    """How much better an earlier answer's posterior must be before recall returns it.

    Chosen on out-of-fold train scores: the margin whose returned answers are right most
    often, averaged over every explored set. A posterior fitted on a few hundred rows
    over-rates the best of several answers (winner's curse); the margin keeps recall from
    trading a good last answer for a lucky-looking earlier one. 1.0 switches recall off.
    """
    rows = np.arange(correct.shape[0])
    n_sets = oof.best_m.shape[1]
    best, best_acc = 0.0, -1.0
    for margin in RECALL_MARGINS:
        chosen = oof.with_margin(margin).best_m
        acc = np.mean([correct[rows, chosen[:, s]].mean() for s in range(1, n_sets)])
        if acc > best_acc + 1e-9:
            best, best_acc = margin, acc
    return best


@dataclass(frozen=True)
class StateModel:
    """Bins, bin values and kernels: everything but the costs, so lambda sweeps are cheap."""

    edges: list[np.ndarray]
    values: list[np.ndarray]
    kernels: dict[tuple[int, int], np.ndarray]
    recall: bool
    notes: list[str] = field(default_factory=list)


def n_bins_for(n_rows: int) -> int:
    """About 40 rows per bin (ttamer.md §6.4), between 3 and 12."""
    return int(np.clip(n_rows // 40, 3, 12))


def fit_states(
    scores: SetScores,
    correct: np.ndarray,
    recall: bool,
    n_bins: int | None = None,
    kappa: float = 5.0,
    max_set: int = 4,
    root_state: np.ndarray | None = None,
    allowed: frozenset[tuple[int, int]] | None = None,
) -> StateModel:
    """Bins and values per node and the transition kernels of the `allowed` edges (all
    skips when None): a kernel that is absent is a transition the policy cannot take."""
    n_rows, n = correct.shape
    n_bins = n_bins or n_bins_for(n_rows)
    loss = scores.loss(recall)
    answer = scores.answer(recall)
    err = 1.0 - np.take_along_axis(correct, answer, axis=1)  # (N, 2^n)
    sets_ending = {
        j: [s for s in range(1, 1 << n) if _last_member(s) == j and bin(s).count("1") <= max_set]
        for j in range(n)
    }
    edges, values = [], []
    for j in range(n):
        sets = sets_ending[j]
        w = np.full(len(sets) * n_rows, 1.0 / len(sets))
        lj = loss[:, sets].T.ravel()
        ej = err[:, sets].T.ravel()
        qs = np.quantile(lj, np.linspace(0, 1, n_bins + 1)[1:-1])
        inner = np.unique(qs)
        b = np.searchsorted(inner, lj, side="right")
        cnt = np.bincount(b, weights=w, minlength=len(inner) + 1)
        tot = np.bincount(b, weights=w * ej, minlength=len(inner) + 1)
        prior = float(np.average(ej, weights=w))
        values.append((tot + kappa * prior) / (cnt + kappa))
        edges.append(inner)
    kernels: dict[tuple[int, int], np.ndarray] = {}
    bins = np.zeros_like(loss, dtype=int)
    for s in range(1, 1 << n):
        bins[:, s] = np.searchsorted(edges[_last_member(s)], loss[:, s], side="right")
    for j in range(n):
        nb = len(values[j])
        pooled = np.bincount(bins[:, 1 << j], minlength=nb) / n_rows
        if root_state is None:
            kernels[(ROOT, j)] = pooled[None, :]
        else:  # one row per root (prompt difficulty) bin, shrunk toward the pooled one
            n_root = int(root_state.max()) + 1
            counts = np.zeros((n_root, nb))
            np.add.at(counts, (root_state, bins[:, 1 << j]), 1.0)
            kernels[(ROOT, j)] = (counts + kappa * pooled) / (
                counts.sum(axis=1, keepdims=True) + kappa
            )
        for i in range(j):
            counts = np.zeros((len(values[i]), nb))
            for s in sets_ending[i]:
                if bin(s).count("1") >= max_set:
                    continue
                np.add.at(counts, (bins[:, s], bins[:, s | (1 << j)]), 1.0 / len(sets_ending[i]))
            marg = counts.sum(axis=0) + 1e-9
            marg = marg / marg.sum()
            kernels[(i, j)] = (counts + kappa * marg) / (counts.sum(axis=1, keepdims=True) + kappa)
    if allowed is not None:
        kernels = {pair: k for pair, k in kernels.items() if pair in allowed}
    return StateModel(edges, values, kernels, recall)


KAPPAS = (2.0, 5.0, 10.0, 20.0, 40.0)
BIN_SCALES = (0.6, 1.0, 1.5)  # multiples of n_bins_for(rows) tried by choose_resolution
CV_MUS = DEFAULT_MUS[::4]
CV_MAX_ROWS = 3000


class HeldOutCurve:
    """Cross-validated accuracy-cost curve of the index policy on the training traces.

    States are fitted on all folds but one and the tables of a spread of cost prices are
    replayed on the held-out fold; `area` is the area under the pooled held-out curve, the
    bench's criterion measured without the test split. Past CV_MAX_ROWS rows a random
    subset decides (the choices made with it no longer hinge on more rows).
    """

    def __init__(
        self,
        train: TraceSet,
        nodes: list[int],
        costs: np.ndarray,
        recall: bool,
        root_state: np.ndarray | None,
        folds: int = 5,
        seed: int = 1,
        allowed: frozenset[tuple[int, int]] | None = None,
        prompts=None,
    ) -> None:
        """`prompts`, the (N, DIM) hashed design of the train prompts, enables router-first
        areas (`area(..., router=True)`): per fold a prompt router fitted on the fold's
        train rows picks each held-out row's first node."""
        self.allowed = allowed
        rng = np.random.default_rng(seed)
        self.keep = np.arange(len(train))
        if len(train) > CV_MAX_ROWS:
            self.keep = np.sort(rng.choice(len(train), CV_MAX_ROWS, replace=False))
            train = train.subset(self.keep)
        self.root = None if root_state is None else root_state[self.keep]
        self.n_rows = len(train)
        self.nodes, self.costs, self.recall = nodes, costs, recall
        self.correct = train.correct[:, nodes]
        self.ref_cost = train.reference_cost
        fold = rng.permutation(self.n_rows) % folds
        self.parts = [
            (np.flatnonzero(fold != f), held, train.subset(held))
            for f in range(folds)
            for held in [np.flatnonzero(fold == f)]
        ]
        self.router_p: np.ndarray | None = None  # (rows, nodes) held-out P(correct | prompt)
        if prompts is not None:
            x = prompts[self.keep]
            self.router_p = np.zeros(self.correct.shape)
            for fit_rows, held, _ in self.parts:
                models = fit_node_models(x, self.correct, fit_rows)
                self.router_p[held] = predict(models, x[held])

    def area(self, scores: SetScores, kappa: float, n_bins: int, router: bool = False) -> float:
        """Held-out curve area, given the (out-of-fold) set scores of every train row; with
        `router`, the first call is the fold's prompt router's pick at each price and the
        tables (fitted without a prompt root) decide what follows."""
        from calibration.metrics import CurvePoint, area_under, pareto_envelope

        if router and self.router_p is None:
            raise ValueError("router-first areas need the prompts' design (HeldOutCurve prompts)")
        root = None if router else self.root
        scores = _rows_of(scores, self.keep)
        right = np.zeros(len(CV_MUS))
        spent = np.zeros(len(CV_MUS))
        for fit_rows, held, held_traces in self.parts:
            states = fit_states(
                _rows_of(scores, fit_rows),
                self.correct[fit_rows],
                self.recall,
                n_bins=n_bins,
                kappa=kappa,
                root_state=None if root is None else root[fit_rows],
                allowed=self.allowed,
            )
            for k, mu in enumerate(CV_MUS):
                tables = solve_tables(states, self.costs, mu)
                first = None if root is None else root[held].copy()
                if router:
                    assert self.router_p is not None
                    tables = router_first(tables)
                    first = route(self.router_p[held], self.costs, mu)
                o = replay_tables(
                    tables,
                    _rows_of(scores, held),
                    self.recall,
                    self.nodes,
                    held_traces,
                    root_state=first,
                )
                right[k] += o.correct.sum()
                spent[k] += o.cost.sum()
        points = [
            CurvePoint(mu, r / self.n_rows, c / self.n_rows / self.ref_cost)
            for mu, r, c in zip(CV_MUS, right, spent, strict=True)
        ]
        return area_under(pareto_envelope(points))


# What a long fit reports as it goes (the CLI draws it on a terminal): the phase, and how
# many of its steps are done out of how many.
Progress = Callable[[str, int, int], None]


def _quiet(phase: str, done: int, total: int) -> None:
    """No progress to show."""


CV_PHASE = "bins and shrinkage (cross-validation)"


def choose_resolution(
    cv: HeldOutCurve,
    scores: SetScores,
    n_rows: int,
    n_bins: int | None = None,
    progress: Progress = _quiet,
    router: bool = False,
) -> tuple[float, int, float]:
    """Shrinkage (pseudo-rows toward pooled estimates) and bins per node with the largest
    held-out curve area, and that area. Few calibration rows call for strong shrinkage and
    coarse bins, many for little and fine: the data decide, not a constant. A given `n_bins`
    is kept and only the shrinkage is chosen. `router`: areas of router-first (the root kind
    this resolution is for)."""
    base = n_bins_for(n_rows)
    scales = BIN_SCALES if n_bins is None else (1.0,)
    base = base if n_bins is None else n_bins
    grid = [(k, max(2, round(scale * base))) for k in KAPPAS for scale in scales]
    areas = []
    for kappa, bins in grid:
        progress(CV_PHASE, len(areas), len(grid))
        areas.append(cv.area(scores, kappa, bins, router=router))
    progress(CV_PHASE, len(grid), len(grid))
    best = int(np.argmax(areas))
    return (*grid[best], float(areas[best]))


MIN_ROWS_PER_BIN = 20  # fewer calibration rows per state bin and its estimates are noise
MIN_ROWS = 200  # below this the fitted policy is a guess, whatever the resolution


def resolution_warnings(n_rows: int, n_bins: int, root_state: np.ndarray | None) -> list[str]:
    """What is too thin about the calibration set for the state resolution in use."""
    out = []
    if n_rows < MIN_ROWS:
        out.append(
            f"only {n_rows} calibration rows: expect wide intervals; collect at least "
            f"{MIN_ROWS} (`cascade collect`)"
        )
    if n_rows / n_bins < MIN_ROWS_PER_BIN:
        out.append(
            f"{n_bins} loss bins per node over {n_rows} rows leave about "
            f"{n_rows // n_bins} rows per bin (want {MIN_ROWS_PER_BIN}+): use at most "
            f"{max(2, n_rows // MIN_ROWS_PER_BIN)} bins or collect more rows"
        )
    if root_state is not None:
        n_root = int(root_state.max()) + 1
        if n_rows / (n_root * n_bins) < MIN_ROWS_PER_BIN / 2:
            out.append(
                f"{n_root} prompt-difficulty states x {n_bins} bins over {n_rows} rows are "
                "thinly estimated (kernels are shrunk toward the pooled one)"
            )
    return out


def _rows_of(scores: SetScores, rows: np.ndarray) -> SetScores:
    return SetScores(scores.best_p[rows], scores.best_m[rows], scores.last_p[rows])


def solve_tables(states: StateModel, costs: np.ndarray, mu: float) -> StateTables:
    """Decision tables for cost price mu: minimise E[error] + mu * E[cost fraction]."""
    sol = solve_skips(states.values, states.kernels, list(mu * np.asarray(costs)), recall=False)
    decision = []
    for last in range(ROOT, len(states.values)):
        act = sol.action[last + 1]
        if last == ROOT:
            decision.append(act[:, -1].copy())  # nothing seen yet: X = inf
        else:
            xpos = np.searchsorted(sol.xgrid, states.values[last])
            decision.append(act[np.arange(act.shape[0]), xpos].copy())
    return StateTables(states.edges, states.values, decision, sol.sigma, mu=float(mu))


def router_first(tables: StateTables) -> StateTables:
    """The tables with a prompt router as root: root state k (the router's pick) calls
    node k; what follows is the tables' own."""
    n = len(tables.edges)
    return dataclasses.replace(tables, decision=[np.arange(n), *tables.decision[1:]])


def replay_tables(
    tables: StateTables,
    scores: SetScores,
    recall: bool,
    nodes: list[int],
    traces: TraceSet,
    root_state: np.ndarray | None = None,
) -> Outcome:
    """Vectorised replay of the decision tables on precomputed set scores."""
    n_rows = scores.best_p.shape[0]
    n = len(tables.edges)
    rows = np.arange(n_rows)
    state = np.zeros(n_rows, dtype=int) if root_state is None else root_state
    last = np.full(n_rows, ROOT)
    mask = np.zeros(n_rows, dtype=int)
    active = np.ones(n_rows, dtype=bool)
    loss = scores.loss(recall)
    decision = [np.asarray(d) for d in tables.decision]
    for _ in range(n):
        nxt = np.full(n_rows, STOP)
        for lst in range(ROOT, n):
            sel = active & (last == lst)
            if sel.any():
                nxt[sel] = decision[lst + 1][state[sel]]
        already = (nxt >= 0) & ((mask >> np.maximum(nxt, 0)) & 1).astype(bool)
        nxt[already] = STOP
        active &= nxt != STOP
        if not active.any():
            break
        j = nxt[active]
        mask[active] |= 1 << j
        last[active] = j
        l_now = loss[rows[active], mask[active]]
        new_state = np.empty(len(j), dtype=int)
        for node in np.unique(j):
            sel = j == node
            new_state[sel] = tables.bin_of(int(node), l_now[sel])
        state[active] = new_state
    answer_node = scores.answer(recall)[rows, mask]
    answer_node = np.where(mask > 0, answer_node, -1)
    full = np.zeros((n_rows, traces.n_models), dtype=bool)
    for k, col in enumerate(nodes):
        full[:, col] = (mask >> k) & 1
    to_col = np.asarray(nodes)
    answer_col = np.where(answer_node >= 0, to_col[np.maximum(answer_node, 0)], -1)
    stop_col = np.where(last >= 0, to_col[np.maximum(last, 0)], -1)
    return outcome_from_choices(traces, full, answer_col, stop_col)


def lambda_of(mu: float) -> float:
    """The T-Tamer weight: objective lambda * loss + (1 - lambda) * cost, mu = (1-l)/l."""
    return 1.0 / (1.0 + mu)


class FittedIndex:
    """Everything fitted on train that does not depend on lambda, plus replay caching."""

    def __init__(
        self,
        train: TraceSet,
        recall: bool,
        models: list[str] | None = None,
        folds: int = 5,
        seed: int = 0,
        use_difficulty: bool = True,
        transitions: TransitionSpec | None = None,
        n_bins: int | None = None,
        progress: Progress | None = None,
        text_groups: tuple[str, ...] | None = None,
        root: str = "auto",
    ) -> None:
        """`text_groups` limits the free-text feature groups the calibrators of open-ended
        traces choose from (policies/textcal.GROUPS; bench's `index-length` ablation).
        `root` is the kind of the first move (ROOT_KINDS): "auto" keeps whichever of the
        difficulty bins and the prompt router has the larger held-out curve area on train
        (5 folds; ties: difficulty); the others force one ("none": no prompt read).
        `use_difficulty=False` is `root="none"` unless a root is named."""
        if root not in ROOT_KINDS:
            raise InvalidInput(f"unknown root {root!r}: use one of {list(ROOT_KINDS)}")
        step = progress or _quiet
        step("nodes", 0, 1)
        if models is None and isinstance(transitions, Mapping):  # the map names the nodes
            models = sorted({m for src, dst in transitions.items() for m in [src, *dst]} - {START})
        if models:
            missing = [m for m in models if m not in train.models]
            if missing:
                raise InvalidInput(
                    f"unknown model(s) {missing}; the traces have {list(train.models)}"
                )
            chosen = [train.models.index(m) for m in models]
            cost = np.nanmean(train.cost_usd, axis=0)
            self.nodes = sorted(chosen, key=lambda j: (cost[j], j))
        else:
            self.nodes = select_nodes(train)
        self.recall = recall
        self.train = train
        self.transitions = transitions
        self.allowed = allowed_edges(transitions, [train.models[j] for j in self.nodes])
        step("length calibration", 0, 1)
        self.text_choice: dict[str, str] = {}
        # open-ended answers never match exactly: the posterior's votes are graded
        self.graded = is_open_ended(train, self.nodes)
        if self.graded:
            groups = {} if text_groups is None else {"groups": text_groups}
            cals, train_conf, self.text_choice = fit_text_calibrators(train, self.nodes, **groups)
            self.length_calibrators: list = cals
        else:
            self.length_calibrators, train_conf = fit_length_calibrators(train, self.nodes)
        sig = Signals.of(train, self.nodes, confidence=train_conf, graded=self.graded)
        step("answer posterior (out-of-fold)", 0, 1)
        self.posterior = fit_posterior(sig)
        oof = out_of_fold_scores(sig, self.posterior, folds=folds, seed=seed)
        self.recall_margin = choose_recall_margin(oof, sig.correct) if recall else 0.0
        self.oof = oof.with_margin(self.recall_margin)
        self.reference_cost = train.reference_cost
        self.node_cost_usd = np.nanmean(train.cost_usd[:, self.nodes], axis=0)
        self.costs = self.node_cost_usd / self.reference_cost
        kinds = self._root_candidates(root, use_difficulty, len(train))
        self.difficulty: DifficultyModel | None = None
        self.router: RouterModel | None = None  # at mu 0: artifacts route at their own price
        root_train = None
        prompts = [train.prompt(i) for i in range(len(train))] if kinds else []
        design = prompt_design(prompts) if kinds else None  # hashed once for both kinds
        if "difficulty" in kinds:
            step("prompt difficulty", 0, 1)
            share = sig.correct.mean(axis=1)
            self.difficulty, root_train = fit_difficulty(prompts, share, x=design)
        if "router" in kinds:
            step("prompt router", 0, 1)
        self._root_train = root_train
        areas: dict[str, float] = {}
        resolution: dict[str, tuple[float, int]] = {}
        cv = HeldOutCurve(
            train,
            self.nodes,
            self.costs,
            recall,
            root_train,
            allowed=self.allowed,
            prompts=design if "router" in kinds else None,
        )
        for kind in kinds or ["none"]:
            kappa, bins, areas[kind] = choose_resolution(
                cv, self.oof, len(train), n_bins, step, router=kind == "router"
            )
            resolution[kind] = (kappa, bins)
        # the larger held-out area on train; ties: the difficulty bins (the earlier default)
        kind = max(areas, key=lambda k: (areas[k], k != "router"))
        self.root_kind = kind
        self.root_choice = {
            "kind": kind,
            "requested": root,
            "held_out_area": {k: round(a, 6) for k, a in areas.items()},
        }
        self.kappa, self.n_bins = resolution[kind]
        if kind == "router":
            assert design is not None
            self.difficulty, root_train, self._root_train = None, None, None
            correct_nodes = sig.correct
            models = fit_node_models(design, correct_nodes)
            self.router = RouterModel(tuple(models), 0.0, np.nan_to_num(self.costs))
            self._router_p_train = out_of_fold_p(design, correct_nodes, folds=folds, seed=seed)
        self.warnings = resolution_warnings(len(train), self.n_bins, root_train)
        step("state model", 0, 1)
        self.states = fit_states(
            self.oof,
            sig.correct,
            recall,
            n_bins=self.n_bins,
            kappa=self.kappa,
            root_state=root_train,
            allowed=self.allowed,
        )
        self._scores: dict = {}

    def _root_candidates(self, root: str, use_difficulty: bool, n_rows: int) -> list[str]:
        """The root kinds to fit and compare: the difficulty bins and, where the start may
        go to every node (the router's pick must be callable), the prompt router; none
        below MIN_ROWS_FOR_DIFFICULTY prompts unless one is named."""
        starts_anywhere = len(self.nodes) > 1 and all(
            (ROOT, k) in self.allowed for k in range(len(self.nodes))
        )
        if root == "router":
            if not starts_anywhere:
                names = [self.train.models[j] for j in self.nodes]
                raise InvalidInput(
                    "a prompt-router root needs transitions from the start to every node "
                    f"(these allow {describe(self.allowed, names)})"
                )
            return ["router"]
        if root == "difficulty":
            return ["difficulty"]
        if root == "none" or not use_difficulty or n_rows < MIN_ROWS_FOR_DIFFICULTY:
            return []
        return ["difficulty", "router"] if starts_anywhere else ["difficulty"]

    def scores(self, traces: TraceSet) -> SetScores:
        hit = self._scores.get(id(traces))
        if hit is None or hit[0] is not traces:
            if traces is self.train:
                hit = (traces, self.oof)  # honest train estimates: out-of-fold posteriors
            else:
                conf = self.node_confidence(traces)
                sig = Signals.of(traces, self.nodes, conf, graded=self.graded)
                scores = score_sets(self.posterior, sig)
                hit = (traces, scores.with_margin(self.recall_margin))
            self._scores[id(traces)] = hit
        return hit[1]

    def node_confidence(self, traces: TraceSet) -> np.ndarray:
        """The nodes' (N, n) confidences as the policy reads them (length-calibrated)."""
        return calibrated_trace_columns(self.length_calibrators, traces, self.nodes)

    def root_states(self, traces: TraceSet, mu: float | None = None) -> np.ndarray | None:
        """Root state of every row (None: one root state): its prompt-difficulty bin, or
        with a router root the node the router picks at cost price `mu`; out-of-fold ones
        for the train rows."""
        if self.router is not None:
            if mu is None:
                raise ValueError("a prompt-router root depends on the cost price: pass mu")
            return route(self.router_p(traces), self.router.cost_fractions, mu)
        if self.difficulty is None:
            return None
        if traces is self.train:
            return self._root_train
        key = ("root", id(traces))
        hit = self._scores.get(key)
        if hit is None or hit[0] is not traces:
            states = np.array(
                [self.difficulty.root_state(traces.prompt(i)) for i in range(len(traces))],
                dtype=int,
            )
            hit = (traces, states)
            self._scores[key] = hit
        return hit[1]

    def router_p(self, traces: TraceSet) -> np.ndarray:
        """(N, nodes) the router's P(correct | prompt): out-of-fold on train, else the
        serving model's, prompt by prompt (what the proxy computes)."""
        assert self.router is not None
        if traces is self.train:
            return self._router_p_train
        key = ("router", id(traces))
        hit = self._scores.get(key)
        if hit is None or hit[0] is not traces:
            p = np.array([self.router.p_correct(traces.prompt(i)) for i in range(len(traces))])
            hit = (traces, p.reshape(len(traces), len(self.nodes)))
            self._scores[key] = hit
        return hit[1]

    def tables(self, mu: float) -> StateTables:
        tables = solve_tables(self.states, self.costs, mu)
        return router_first(tables) if self.router is not None else tables

    def replay(self, tables: StateTables, traces: TraceSet, mu: float | None = None) -> Outcome:
        """The tables on `traces`; a router root picks each row's first node at `mu`
        (default: the price the tables were solved at)."""
        root = self.root_states(traces, tables.mu if mu is None else mu)
        return replay_tables(
            tables,
            self.scores(traces),
            self.recall,
            self.nodes,
            traces,
            root_state=None if root is None else root.copy(),
        )


@dataclass
class IndexSetting:
    """One lambda of a fitted index policy (a ReplayPolicy)."""

    name: str
    knob: float
    fitted: FittedIndex
    mu: float
    tables: StateTables

    def replay(self, traces: TraceSet) -> Outcome:
        return self.fitted.replay(self.tables, traces, self.mu)


class IndexFamily:
    """The T-Tamer index policy with skips, swept over lambda (bench's "index")."""

    def __init__(
        self,
        recall: bool = True,
        mus: tuple[float, ...] = DEFAULT_MUS,
        text_groups: tuple[str, ...] | None = None,
        name: str | None = None,
    ) -> None:
        self.recall = recall
        self.mus = mus
        self.text_groups = text_groups
        self.name = name or ("index" if recall else "index-norecall")

    def fit_sweep(self, train: TraceSet) -> list[IndexSetting]:
        fitted = FittedIndex(train, self.recall, text_groups=self.text_groups)
        return [
            IndexSetting(self.name, lambda_of(mu), fitted, mu, fitted.tables(mu)) for mu in self.mus
        ]
