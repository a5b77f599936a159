"""The serving prompt router: per node P(correct | prompt), and the node it would call first.

A root kind of the index policy (the other is the difficulty bins of policies/difficulty.py):
where cross-validation on train finds it pays (calibration/router.py), the first call of a
query is the node minimising (1 - P(correct | prompt)) + mu * cost fraction, at the policy's
own cost price mu, and the index tables decide what follows. The model per node is a sparse
logistic regression over the difficulty model's hashed prompt features, so the prompt is
hashed once and read in microseconds, with no vocabulary or tokenizer to ship. Pure: numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from policies.difficulty import DIM, hashed_features, sparse_score
from policies.errors import InvalidInput


class RouterError(InvalidInput):
    """A router entry is malformed; the message names the field."""


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class SparseLogistic:
    """One node's P(correct | prompt): weights over the hashed feature columns it uses."""

    indices: np.ndarray  # int64, sorted, unique
    weights: np.ndarray  # one per index
    bias: float

    def logit(self, idx: np.ndarray, val: np.ndarray) -> float:
        """The linear score of one prompt's sparse features (idx, val)."""
        return sparse_score(self.indices, self.weights, self.bias, idx, val)

    def to_dict(self) -> dict:
        return {
            "indices": self.indices.tolist(),
            "weights": [float(w) for w in self.weights],
            "bias": float(self.bias),
        }

    @classmethod
    def from_dict(cls, d: Any, path: str) -> SparseLogistic:
        if not isinstance(d, dict):
            raise RouterError(f"{path}: expected an object, got {_kind(d)}")
        for key in ("indices", "weights", "bias"):
            if key not in d:
                raise RouterError(f"{path}.{key}: missing")
        indices = _int_list(d["indices"], f"{path}.indices")
        weights = _number_list(d["weights"], f"{path}.weights")
        bias = _number(d["bias"], f"{path}.bias")
        if len(indices) != len(weights):
            raise RouterError(
                f"{path}.weights: expected one per index ({len(indices)}), got {len(weights)}"
            )
        idx = np.asarray(indices, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= DIM):
            raise RouterError(f"{path}.indices: expected hashed columns in [0, {DIM})")
        if np.any(np.diff(idx) <= 0):
            raise RouterError(f"{path}.indices: expected strictly increasing columns")
        return cls(idx, np.asarray(weights, dtype=float), bias)


@dataclass(frozen=True)
class RouterModel:
    """Per node a SparseLogistic, the cost price `mu` it routes at and the nodes' cost
    fractions (mean cost over the reference model's, on train): the router of one artifact."""

    models: tuple[SparseLogistic, ...]
    mu: float
    cost_fractions: np.ndarray  # (n_nodes,)

    @property
    def n_nodes(self) -> int:
        return len(self.models)

    def p_correct(self, prompt: str) -> np.ndarray:
        """(n_nodes,) predicted P(correct | prompt) (E[quality] for graded labels)."""
        idx, val = hashed_features(prompt)
        return _sigmoid(np.array([m.logit(idx, val) for m in self.models]))

    def pick(
        self, prompt: str, mu: float | None = None, cost_fractions: np.ndarray | None = None
    ) -> int:
        """argmin_k (1 - p_k) + mu * cost_k, the first on ties; by default at the router's
        own price and costs."""
        mu = self.mu if mu is None else mu
        cost = self.cost_fractions if cost_fractions is None else np.asarray(cost_fractions)
        return int(np.argmin((1.0 - self.p_correct(prompt)) + mu * cost))

    def root_state(self, prompt: str) -> int:
        """The root state of a query: the index of the node to call first."""
        return self.pick(prompt)

    def at_price(self, mu: float) -> RouterModel:
        """The same router routing at cost price `mu` (a per-request lambda)."""
        return RouterModel(self.models, float(mu), self.cost_fractions)

    def to_dict(self) -> dict:
        return {
            "dim": DIM,
            "mu": float(self.mu),
            "cost_fractions": [float(c) for c in self.cost_fractions],
            "models": [m.to_dict() for m in self.models],
        }

    @classmethod
    def from_dict(cls, d: Any, path: str = "router") -> RouterModel:
        """Check and type a router entry; RouterError names the first bad field."""
        if not isinstance(d, dict):
            raise RouterError(f"{path}: expected an object, got {_kind(d)}")
        for key in ("mu", "cost_fractions", "models"):
            if key not in d:
                raise RouterError(f"{path}.{key}: missing")
        if "dim" in d and (isinstance(d["dim"], bool) or d["dim"] != DIM):
            raise RouterError(f"{path}.dim: expected {DIM}, got {d['dim']!r}")
        mu = _number(d["mu"], f"{path}.mu")
        if not mu >= 0:
            raise RouterError(f"{path}.mu: expected a cost price >= 0, got {mu}")
        cost = _number_list(d["cost_fractions"], f"{path}.cost_fractions")
        if not isinstance(d["models"], list):
            raise RouterError(f"{path}.models: expected a list, got {_kind(d['models'])}")
        models = tuple(
            SparseLogistic.from_dict(m, f"{path}.models[{k}]") for k, m in enumerate(d["models"])
        )
        if not models:
            raise RouterError(f"{path}.models: expected at least one node")
        if len(cost) != len(models):
            raise RouterError(
                f"{path}.cost_fractions: expected one per node ({len(models)}), got {len(cost)}"
            )
        return cls(models, mu, np.asarray(cost, dtype=float))


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _number(v: Any, path: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise RouterError(f"{path}: expected a finite number, got {_kind(v)}")
    return float(v)


def _number_list(v: Any, path: str) -> list[float]:
    if not isinstance(v, list):
        raise RouterError(f"{path}: expected a list, got {_kind(v)}")
    return [_number(x, f"{path}[{i}]") for i, x in enumerate(v)]


def _int_list(v: Any, path: str) -> list[int]:
    if not isinstance(v, list):
        raise RouterError(f"{path}: expected a list, got {_kind(v)}")
    for i, x in enumerate(v):
        if isinstance(x, bool) or not isinstance(x, int):
            raise RouterError(f"{path}[{i}]: expected an integer, got {_kind(x)}")
    return list(v)
