"""A cheap per-prompt difficulty estimate for the root state of the policy.

Before any model is called, the only thing known is the prompt. Hashed word counts
(sublinear tf, L2-normalised) feed a ridge regression fitted on the calibration prompts
to predict the share of models that answer correctly; its value picks a root bin, and
each root bin has its own first move, so prompts that look hard can skip the small
models. Pure Python + numpy: no tokenizer files, no vocabulary to ship, microseconds per
prompt.
"""

from __future__ import annotations

import itertools
import re
import zlib
from dataclasses import dataclass

import numpy as np

TOKEN = re.compile(r"[a-z0-9]+")
DIM = 1 << 16


def hashed_features(text: str, dim: int = DIM) -> tuple[np.ndarray, np.ndarray]:
    """Sparse (indices, values) of one prompt: unigram and bigram hashes, 1 + log tf, L2."""
    words = TOKEN.findall(text.lower())
    counts: dict[int, int] = {}
    for tok in words + [a + " " + b for a, b in itertools.pairwise(words)]:
        h = zlib.crc32(tok.encode()) % dim
        counts[h] = counts.get(h, 0) + 1
    if not counts:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    val = 1.0 + np.log(np.fromiter(counts.values(), dtype=float, count=len(counts)))
    return idx, val / np.linalg.norm(val)


def sparse_score(
    indices: np.ndarray, weights: np.ndarray, bias: float, idx: np.ndarray, val: np.ndarray
) -> float:
    """bias + weights . features: a model's weights on its sorted hashed columns `indices`,
    read at one prompt's sparse features (idx, val) (the difficulty model, the router)."""
    if not len(idx) or not len(indices):
        return bias
    pos = np.minimum(np.searchsorted(indices, idx), len(indices) - 1)
    hit = indices[pos] == idx
    return float(bias + weights[pos[hit]] @ val[hit])


@dataclass(frozen=True)
class DifficultyModel:
    """Sparse ridge weights over hashed features, and the inner edges of the root bins."""

    indices: np.ndarray  # int64, sorted
    weights: np.ndarray
    bias: float
    edges: np.ndarray  # inner edges of predicted accuracy, ascending

    @property
    def n_states(self) -> int:
        return len(self.edges) + 1

    def predict(self, text: str) -> float:
        idx, val = hashed_features(text)
        return sparse_score(self.indices, self.weights, self.bias, idx, val)

    def root_state(self, text: str) -> int:
        """Root bin: 0 = predicted hardest (lowest share of models right)."""
        return int(np.searchsorted(self.edges, self.predict(text), side="right"))

    def to_dict(self) -> dict:
        return {
            "dim": DIM,
            "indices": self.indices.tolist(),
            "weights": [round(float(w), 6) for w in self.weights],
            "bias": float(self.bias),
            "edges": [float(e) for e in self.edges],
        }

    @classmethod
    def from_dict(cls, d: dict) -> DifficultyModel:
        if int(d.get("dim", DIM)) != DIM:
            raise ValueError(f"difficulty model hashed into {d.get('dim')} buckets, need {DIM}")
        return cls(
            indices=np.asarray(d["indices"], dtype=np.int64),
            weights=np.asarray(d["weights"], dtype=float),
            bias=float(d["bias"]),
            edges=np.asarray(d["edges"], dtype=float),
        )
