"""Fit the prompt-difficulty model (policies/difficulty.py) on calibration prompts."""

from __future__ import annotations

import numpy as np

from policies.difficulty import DIM, DifficultyModel, hashed_features

RIDGE_ALPHA = 3.0


def _design(prompts: list[str]):
    from scipy.sparse import csr_matrix

    rows, cols, vals = [], [], []
    for r, text in enumerate(prompts):
        idx, val = hashed_features(text)
        rows.extend([r] * len(idx))
        cols.extend(idx.tolist())
        vals.extend(val.tolist())
    return csr_matrix((vals, (rows, cols)), shape=(len(prompts), DIM))


def _ridge(x, y: np.ndarray):
    from sklearn.linear_model import Ridge

    return Ridge(alpha=RIDGE_ALPHA).fit(x, y)


def fit_difficulty(
    prompts: list[str],
    share_right: np.ndarray,
    n_states: int = 3,
    folds: int = 5,
    seed: int = 0,
    x=None,
) -> tuple[DifficultyModel, np.ndarray]:
    """The model fitted on all prompts, and out-of-fold root states of those prompts.

    Root bin edges are quantiles of the out-of-fold predictions, so each training prompt's
    state is what the proxy would have computed without having seen that prompt.
    """
    x = _design(prompts) if x is None else x  # `x`: the prompts' design, when already hashed
    y = np.asarray(share_right, dtype=float)
    fold = np.random.default_rng(seed).permutation(len(y)) % folds
    oof = np.zeros(len(y))
    for f in range(folds):
        test = fold == f
        oof[test] = _ridge(x[~test], y[~test]).predict(x[test])
    model = _ridge(x, y)
    used = np.unique(x.indices)
    edges = np.unique(np.quantile(oof, np.linspace(0, 1, n_states + 1)[1:-1]))
    difficulty = DifficultyModel(
        indices=used.astype(np.int64),
        weights=model.coef_[used].astype(float),
        bias=float(model.intercept_),
        edges=edges,
    )
    return difficulty, np.searchsorted(edges, oof, side="right")
