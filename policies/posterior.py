"""P(an answer is correct | everything observed so far): the signal the policy decides on.

One logistic model scores each candidate answer (an equivalence class of extracted
answers) from who voted for it, who dissented, and how confident each of them was. On
open-ended answers, which never match exactly, votes are graded: a model votes for a
candidate by the agreement of their texts in [0, 1] (policies/freetext.py) and dissents
by the rest; exact classes are the special case of agreement 1 or 0. The
same code runs at fit time (vectorised over rows and explored sets) and at serve time
(one query). Fitting lives in calibration/; this module only evaluates fitted weights.

Why one model over all explored sets instead of a min over per-model losses: the answer
returned is chosen by this posterior, which already counts agreement and dissent, so the
"best" answer is not the luckiest of several noisy estimates (winner's curse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

FEATURES_PER_MODEL = 5  # vote, vote*conf, dissent, dissent*conf, vote-without-extracted-answer
AGREEMENT_MODES = ("exact", "graded")  # how a model votes: same answer class, or similarity


def confidence_feature(confidence: np.ndarray) -> np.ndarray:
    """Raw confidence (a log-probability, <= 0) to a clipped log-odds; nan stays nan."""
    c = np.minimum(np.asarray(confidence, dtype=float), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.exp(c)
        logit = c - np.log1p(-np.minimum(p, 1 - 1e-9))
    return np.clip(logit, -10.0, 14.0)


def confidence_feature_one(confidence: float | None) -> float | None:
    """confidence_feature for one value, in plain Python (the serve-time fast path)."""
    if confidence is None or confidence != confidence:  # None or nan
        return None
    c = min(float(confidence), 0.0)
    p = min(math.exp(c), 1 - 1e-9)
    return min(max(c - math.log1p(-p), -10.0), 14.0)


def answer_classes(extracted: list[list[str | None]]) -> np.ndarray:
    """(N, M) int: models with equal extracted answers share the id of the first of them.

    A model whose answer could not be extracted is its own class (it agrees with nobody).
    """
    n_rows = len(extracted)
    n_models = len(extracted[0]) if n_rows else 0
    out = np.empty((n_rows, n_models), dtype=np.int16)
    for r, row in enumerate(extracted):
        seen: dict[str, int] = {}
        for k, ans in enumerate(row):
            if ans is None:
                out[r, k] = k
            else:
                out[r, k] = seen.setdefault(ans, k)
    return out


@dataclass(frozen=True)
class PosteriorModel:
    """Fitted logistic weights over FEATURES_PER_MODEL features per model plus a bias.

    `conf_mean`/`conf_scale` standardise each model's confidence feature; a missing
    confidence contributes 0 (the vote terms still count).
    """

    weights: np.ndarray  # (M * FEATURES_PER_MODEL,)
    bias: float
    conf_mean: np.ndarray  # (M,)
    conf_scale: np.ndarray  # (M,)

    def to_dict(self) -> dict:
        return {
            "weights": [float(x) for x in self.weights],
            "bias": float(self.bias),
            "conf_mean": [float(x) for x in self.conf_mean],
            "conf_scale": [float(x) for x in self.conf_scale],
        }

    @classmethod
    def from_dict(cls, d: dict) -> PosteriorModel:
        return cls(
            weights=np.asarray(d["weights"], dtype=float),
            bias=float(d["bias"]),
            conf_mean=np.asarray(d["conf_mean"], dtype=float),
            conf_scale=np.asarray(d["conf_scale"], dtype=float),
        )

    def standardise(self, conf_feat: np.ndarray) -> np.ndarray:
        z = (conf_feat - self.conf_mean) / self.conf_scale
        return np.where(np.isnan(z), 0.0, z)

    def _z_one(self, explored: list[int], confidence: list[float | None]) -> dict[int, float]:
        """The explored nodes' standardised confidence features (0 where there is none)."""
        z: dict[int, float] = {}
        for k in explored:
            f = confidence_feature_one(confidence[k])
            z[k] = 0.0 if f is None else (f - self._mean_list[k]) / self._scale_list[k]
        return z

    def best_one(
        self, explored: list[int], extracted: list[str | None], confidence: list[float | None]
    ) -> tuple[float, int, float]:
        """best_answer for one query in plain Python: (best p, its node, last node's p).

        Same formula as candidate_features + score, without numpy's per-call overhead
        (a decision step must cost microseconds). Ties go to the most expensive node.
        """
        w = self._weights_list
        z = self._z_one(explored, confidence)
        order = sorted(explored)
        best_p, best_m, last = -1.0, order[0], explored[-1]
        last_p = 0.0
        cache: dict[object, float] = {}
        for m in order:
            key: object = extracted[m] if extracted[m] is not None else ("missing", m)
            p = cache.get(key)
            if p is None:
                logit = self.bias
                for k in order:
                    base = FEATURES_PER_MODEL * k
                    same = extracted[k] == extracted[m] if extracted[m] is not None else k == m
                    if same:
                        logit += w[base] + w[base + 1] * z[k]
                        if extracted[k] is None:
                            logit += w[base + 4]
                    else:
                        logit += w[base + 2] + w[base + 3] * z[k]
                p = 1.0 / (1.0 + math.exp(-logit))
                cache[key] = p
            if p >= best_p:
                best_p, best_m = p, m
            if m == last:
                last_p = p
        return best_p, best_m, last_p

    def best_one_graded(
        self,
        explored: list[int],
        extracted: list[str | None],
        confidence: list[float | None],
        agree: list[list[float | None]],
    ) -> tuple[float, int, float]:
        """best_one under graded agreement: `agree[m][k]` in [0, 1] is how much node k's
        answer agrees with node m's (None where either is missing; a node agrees fully with
        itself). Every answer is its own candidate: essays do not fall into classes."""
        w = self._weights_list
        z = self._z_one(explored, confidence)
        order = sorted(explored)
        best_p, best_m, last = -1.0, order[0], explored[-1]
        last_p = 0.0
        for m in order:
            logit = self.bias
            row = agree[m]
            for k in order:
                base = FEATURES_PER_MODEL * k
                if k == m:
                    a = 1.0
                    if extracted[k] is None:
                        logit += w[base + 4]
                else:
                    a = row[k] or 0.0
                logit += w[base] * a + w[base + 1] * (a * z[k])
                d = 1.0 - a
                logit += w[base + 2] * d + w[base + 3] * (d * z[k])
            p = 1.0 / (1.0 + math.exp(-logit))
            if p >= best_p:
                best_p, best_m = p, m
            if m == last:
                last_p = p
        return best_p, best_m, last_p

    def __post_init__(self) -> None:
        object.__setattr__(self, "_weights_list", [float(x) for x in self.weights])
        object.__setattr__(self, "_mean_list", [float(x) for x in self.conf_mean])
        object.__setattr__(self, "_scale_list", [float(x) for x in self.conf_scale])

    def score(self, features: np.ndarray) -> np.ndarray:
        """Posterior probability for rows of candidate features (..., M * F)."""
        logits = features @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-logits))


def candidate_features(
    classes: np.ndarray,
    z: np.ndarray,
    missing: np.ndarray,
    explored: int,
    candidate: int,
    agree: np.ndarray | None = None,
) -> np.ndarray:
    """Features (N, M * F) of the answer class of model `candidate` given explored set.

    `classes` (N, M) from answer_classes; `z` (N, M) standardised confidence features;
    `missing` (N, M) True where no answer could be extracted; `explored` is a bit mask.
    With `agree` (N, M, M; pairwise_agreement) a model's vote is the graded agreement of
    its answer with the candidate's and its dissent the rest (open-ended answers, which
    never match exactly); without it, votes are exact answer-class matches.
    """
    n_models = classes.shape[1]
    in_set = np.array([(explored >> k) & 1 for k in range(n_models)], dtype=bool)[None, :]
    if agree is None:
        vote = in_set & (classes == classes[:, [candidate]])
        dissent = in_set & ~vote
    else:
        vote = np.where(in_set, agree[:, candidate, :], 0.0)
        dissent = np.where(in_set, 1.0 - agree[:, candidate, :], 0.0)
    feats = np.empty((classes.shape[0], n_models, FEATURES_PER_MODEL))
    feats[:, :, 0] = vote
    feats[:, :, 1] = vote * z
    feats[:, :, 2] = dissent
    feats[:, :, 3] = dissent * z
    feats[:, :, 4] = vote * missing
    return feats.reshape(classes.shape[0], n_models * FEATURES_PER_MODEL)


def subset_members(mask: int, n_models: int) -> list[int]:
    return [k for k in range(n_models) if (mask >> k) & 1]


def best_answer(
    model: PosteriorModel,
    classes: np.ndarray,
    z: np.ndarray,
    missing: np.ndarray,
    explored: int,
    last: int,
    agree: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For one explored set: (best posterior, model whose answer is best, last's posterior).

    Ties inside a class go to its most expensive member (models are cheapest first);
    `agree` as in candidate_features.
    """
    n_rows, n_models = classes.shape
    best_p = np.full(n_rows, -1.0)
    best_m = np.zeros(n_rows, dtype=int)
    last_p = np.zeros(n_rows)
    for m in subset_members(explored, n_models):
        p = model.score(candidate_features(classes, z, missing, explored, m, agree))
        take = p >= best_p  # later (more expensive) members win ties
        best_p = np.where(take, p, best_p)
        best_m = np.where(take, m, best_m)
        if m == last:
            last_p = p
    return best_p, best_m, last_p
