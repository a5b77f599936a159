"""Fit the serving prompt router (policies/router.py) on train prompts.

The same model as bench's `prerouter` with the hashed encoding (calibration/prerouter.py
PromptRouter(kind="hashed")): per node an L2 logistic regression of `correct` (or graded
`quality`) on the difficulty model's hashed prompt features, liblinear, C = 1. Only the
columns the training prompts use carry weight, so the serving model keeps those alone. The
fit builds the design once and fits on any subset of its rows (cross-validation folds).
"""

from __future__ import annotations

import numpy as np

from calibration.difficulty import _design
from calibration.logistic import fit_logistic, varies
from policies.router import SparseLogistic

C_REG = 1.0  # calibration/prerouter.py's: one router, fitted alike in the bench and the fit
MAX_ITER = 100
SOLVER = "liblinear"
CONSTANT_CLIP = 1e-12  # a node whose train labels never vary: its rate, kept off 0 and 1
# past this many rows a random subset fits each router (the fit's time grows with the
# prompts' words; a per-node logistic on hashed words no longer hinges on more rows)
MAX_ROWS = 3000


def prompt_design(prompts: list[str]):
    """(N, DIM) sparse hashed features of the prompts (policies/difficulty.hashed_features)."""
    return _design(prompts)


def fit_node_models(
    x, labels: np.ndarray, rows: np.ndarray | None = None, seed: int = 0
) -> list[SparseLogistic]:
    """Per column of `labels` (N, n) a SparseLogistic fitted on `rows` of the design `x`
    (at most MAX_ROWS of them, drawn at random with `seed`)."""
    rows = np.arange(x.shape[0]) if rows is None else rows
    if len(rows) > MAX_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_ROWS, replace=False))
    xr = x[rows]
    used = np.unique(xr.indices).astype(np.int64)
    out = []
    for k in range(labels.shape[1]):
        y = labels[rows, k]
        if not varies(y):
            p = float(np.clip(np.mean(y), CONSTANT_CLIP, 1 - CONSTANT_CLIP)) if len(y) else 0.5
            out.append(
                SparseLogistic(np.zeros(0, np.int64), np.zeros(0), float(np.log(p / (1 - p))))
            )
            continue
        clf = fit_logistic(xr, y, C_REG, max_iter=MAX_ITER, solver=SOLVER)
        coef = np.asarray(clf.coef_[0], dtype=float)
        cols = np.union1d(used, np.flatnonzero(coef)).astype(np.int64)  # sorted, unique
        out.append(SparseLogistic(cols, coef[cols], float(clf.intercept_[0])))
    return out


def predict(models: list[SparseLogistic], x) -> np.ndarray:
    """(rows of x, n) P(correct | prompt): the serving models on a design matrix at once."""
    cols = []
    for m in models:
        z = np.full(x.shape[0], m.bias)
        if len(m.indices):
            z = z + x[:, m.indices] @ m.weights
        cols.append(1.0 / (1.0 + np.exp(-z)))
    return np.stack(cols, axis=1)


def out_of_fold_p(x, labels: np.ndarray, folds: int = 5, seed: int = 0) -> np.ndarray:
    """(N, n) P(correct | prompt) of every row from a router fitted without its fold: the
    train rows' first moves, as a new prompt's would be made."""
    n_rows = x.shape[0]
    fold = np.random.default_rng(seed).permutation(n_rows) % folds
    p = np.zeros(labels.shape)
    for f in range(folds):
        held = np.flatnonzero(fold == f)
        if len(held):
            p[held] = predict(fit_node_models(x, labels, np.flatnonzero(fold != f)), x[held])
    return p


def route(p: np.ndarray, cost_fraction: np.ndarray, mu: float) -> np.ndarray:
    """Per row the node minimising (1 - p) + mu * cost fraction (the first on ties)."""
    return np.argmin(
        (1.0 - p) + mu * np.nan_to_num(np.asarray(cost_fraction, dtype=float))[None, :], axis=1
    )
