"""The logistic regressions every calibrator of the fit shares, on hard or graded labels.

Boolean labels (`correct`) are classified. Graded ones (`quality` in [0, 1], `fit --label
quality`) are regressed under the logistic link, so the model's p estimates E[quality]: the
cross-entropy against a soft label y is that of a right copy of the row weighted y plus a
wrong copy weighted 1 - y. One place, so that no calibrator silently refuses graded labels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from sklearn.linear_model import LogisticRegression


def fit_logistic(
    x, y: np.ndarray, c_reg: float = 1.0, max_iter: int = 1000, solver: str = "lbfgs"
) -> LogisticRegression:
    """An L2 logistic regression of `y` (bool, or graded in [0, 1]) on `x` (dense or sparse)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c_reg, max_iter=max_iter, solver=solver)
    if y.dtype == bool:
        return clf.fit(x, y)
    import scipy.sparse

    y = np.asarray(y, dtype=float)
    stacked = scipy.sparse.vstack([x, x]) if scipy.sparse.issparse(x) else np.vstack([x, x])
    both = np.concatenate([np.ones(len(y)), np.zeros(len(y))])
    return clf.fit(stacked, both, sample_weight=np.concatenate([y, 1.0 - y]))


def varies(y: np.ndarray) -> bool:
    """Whether labels hold more than one value: a regression has something to fit."""
    return len(y) > 0 and bool(np.min(y) != np.max(y))


def log_loss(log_p: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of predicted log P(correct) against labels (hard or graded)."""
    if not len(y):
        return 0.0
    y = np.asarray(y, dtype=float)
    p = np.clip(np.exp(log_p), 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))
