"""Bench's `prerouter`: a prompt classifier that picks one model per query before any call.

RouteLLM-style: from the prompt alone, predict per model P(correct) and route to the model
minimising (1 - P(correct)) + mu * cost fraction, mu swept over the grid the other baselines
use. Two prompt encodings are tried, TF-IDF words (unigrams, bigrams) and the hashed features
of the difficulty model (policies/difficulty.py), each with a logistic regression per model;
the one with the larger held-out curve area on train (5 folds) is kept. The index policy's
prompt-aware root must do at least as well.
"""

from __future__ import annotations

import numpy as np

from calibration.baselines import FixedSetting
from calibration.difficulty import _design
from calibration.fit import DEFAULT_MUS
from calibration.logistic import fit_logistic, varies
from calibration.metrics import CurvePoint, area_under, pareto_envelope
from calibration.replay import Outcome, outcome_from_choices
from calibration.router import route  # one routing rule: the bench's and the root's
from calibration.traces import TraceSet

ENCODINGS = ("tfidf", "hashed")
C_REG = 1.0


def _prompts(traces: TraceSet) -> list[str]:
    return [traces.prompt(i) for i in range(len(traces))]


class _Encoder:
    """Prompt texts to a sparse design matrix, fitted on train prompts only."""

    def __init__(self, kind: str, prompts: list[str]) -> None:
        self.kind = kind
        if kind == "tfidf":
            from sklearn.feature_extraction.text import TfidfVectorizer

            self.vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True)
            self.vec.fit(prompts)

    def __call__(self, prompts: list[str]):
        return self.vec.transform(prompts) if self.kind == "tfidf" else _design(prompts)


class PromptRouter:
    """Per model P(correct | prompt): logistic regressions over one prompt encoding."""

    def __init__(self, train: TraceSet, kind: str, rows: np.ndarray | None = None) -> None:
        rows = np.arange(len(train)) if rows is None else rows
        prompts = [train.prompt(int(i)) for i in rows]
        self.encode = _Encoder(kind, prompts)
        x = self.encode(prompts)
        self.models: list[object] = []
        for j in range(train.n_models):
            y = train.correct[rows, j]
            if not varies(y):
                self.models.append(float(y.mean()))
            else:  # bool `correct`, or graded `quality` (calibration/logistic.py)
                self.models.append(fit_logistic(x, y, C_REG, max_iter=100, solver="liblinear"))

    def p_correct(self, traces: TraceSet, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, M) predicted P(correct) per row and model."""
        rows = np.arange(len(traces)) if rows is None else rows
        x = self.encode([traces.prompt(int(i)) for i in rows])
        cols = [
            np.full(len(rows), m) if isinstance(m, float) else m.predict_proba(x)[:, 1]
            for m in self.models
        ]
        return np.stack(cols, axis=1)


def routed_outcome(traces: TraceSet, pick: np.ndarray) -> Outcome:
    explored = np.zeros((len(traces), traces.n_models), dtype=bool)
    explored[np.arange(len(traces)), pick] = True
    return outcome_from_choices(traces, explored, pick, pick)


def held_out_area(train: TraceSet, kind: str, folds: int = 5, seed: int = 0) -> float:
    """Area under the pooled held-out accuracy-cost curve of one encoding on train."""
    fold = np.random.default_rng(seed).permutation(len(train)) % folds
    p = np.zeros((len(train), train.n_models))
    for f in range(folds):
        held = np.flatnonzero(fold == f)
        p[held] = PromptRouter(train, kind, np.flatnonzero(fold != f)).p_correct(train, held)
    cost = cost_fraction(train)
    points = []
    for mu in DEFAULT_MUS:
        o = routed_outcome(train, route(p, cost, mu))
        points.append(CurvePoint(mu, o.accuracy, o.mean_cost / train.reference_cost))
    return area_under(pareto_envelope(points))


def cost_fraction(traces: TraceSet) -> np.ndarray:
    """Per model its mean cost as a fraction of the reference model's: the router's prices."""
    return np.nan_to_num(np.nanmean(traces.cost_usd, axis=0)) / traces.reference_cost


class PrerouterFamily:
    """The prompt router with its cost price swept; see the module docstring."""

    name = "prerouter"

    def __init__(self) -> None:
        self.areas: dict[str, float] = {}

    def fit_sweep(self, train: TraceSet) -> list[FixedSetting]:
        self.areas = {kind: held_out_area(train, kind) for kind in ENCODINGS}
        kind = max(ENCODINGS, key=lambda k: (self.areas[k], k == "tfidf"))
        router = PromptRouter(train, kind)
        cost = cost_fraction(train)  # train prices decide; replay pays the test costs
        cache: dict[int, tuple[TraceSet, np.ndarray]] = {}

        def predicted(traces: TraceSet) -> np.ndarray:
            hit = cache.get(id(traces))
            if hit is None or hit[0] is not traces:
                hit = (traces, router.p_correct(traces))
                cache[id(traces)] = hit
            return hit[1]

        settings, seen = [], set()
        train_p = predicted(train)
        for mu in DEFAULT_MUS:
            key = tuple(route(train_p, cost, mu))
            if key in seen:  # the same routing of every train prompt: one setting
                continue
            seen.add(key)
            settings.append(
                FixedSetting(
                    self.name,
                    float(mu),
                    lambda t, mu=mu: routed_outcome(t, route(predicted(t), cost, mu)),
                    {"encoding": kind, "mu": float(mu)},
                )
            )
        return settings
