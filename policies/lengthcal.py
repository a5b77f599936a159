"""A node's confidence corrected by the length of its answer.

Token log-probabilities say little about a long chain of thought, but its length says a lot:
on GSM8K a small model's wrong answers run longer than its right ones (held-out AUC of the
confidence alone 0.56-0.70 for the 1B-8B models, with the length 0.68-0.80). Per node, a
logistic model over (confidence logit, log length, its square) gives a calibrated
log P(correct), which then stands for the node's confidence everywhere the policy reads one:
the posterior, the states, the online decisions. Nodes whose answers barely vary in length
(one-letter multiple choice) keep their raw confidence: they get no calibrator.

Pure: fitted in calibration/fit.py, evaluated here for a whole trace column (fit, bench,
evaluate) and for one call (the proxy), with the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.posterior import confidence_feature, confidence_feature_one

MIN_DISTINCT_LENGTHS = 5  # fewer distinct output lengths: a format, not a signal


def length_features(confidence: np.ndarray, tokens_out: np.ndarray) -> np.ndarray:
    """(N, 3): confidence logit, log(1 + tokens), its square; nan rows where either is."""
    lt = np.log1p(np.asarray(tokens_out, dtype=float))
    cf = confidence_feature(confidence)
    return np.stack([cf, lt, lt * lt], axis=1)


@dataclass(frozen=True)
class LengthCalibrator:
    """Standardised logistic weights over length_features; see the module docstring."""

    weights: tuple[float, float, float]
    bias: float
    mean: tuple[float, float, float]
    scale: tuple[float, float, float]

    def log_p(self, confidence: np.ndarray, tokens_out: np.ndarray) -> np.ndarray:
        """Calibrated log P(correct) per row; nan where the confidence or length is."""
        x = (length_features(confidence, tokens_out) - np.asarray(self.mean)) / np.asarray(
            self.scale
        )
        logit = x @ np.asarray(self.weights) + self.bias
        with np.errstate(invalid="ignore"):  # nan rows stay nan
            return -np.logaddexp(0.0, -logit)  # log sigmoid, stable at both ends

    def one(self, confidence: float | None, tokens_out: float | None) -> float | None:
        """log_p for one call in plain Python (a decision step costs microseconds)."""
        cf = confidence_feature_one(confidence)
        if cf is None or tokens_out is None or tokens_out != tokens_out:
            return None
        lt = math.log1p(float(tokens_out))
        logit = self.bias
        for w, v, m, s in zip(self.weights, (cf, lt, lt * lt), self.mean, self.scale, strict=True):
            logit += w * (v - m) / s
        return -math.log1p(math.exp(-logit)) if logit > -30 else logit

    def to_dict(self) -> dict:
        return {
            "weights": list(self.weights),
            "bias": self.bias,
            "mean": list(self.mean),
            "scale": list(self.scale),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LengthCalibrator:
        def three(key: str) -> tuple[float, float, float]:
            a, b, c = (float(x) for x in d[key])
            return a, b, c

        return cls(three("weights"), float(d["bias"]), three("mean"), three("scale"))


def calibrators_from(raw: list | None, n_nodes: int) -> list[LengthCalibrator | None]:
    """An artifact's `length_calibration` (one entry per node, null for none) as objects;
    an artifact without the field calibrates nothing."""
    if not raw:
        return [None] * n_nodes
    if len(raw) != n_nodes:
        raise ValueError(f"length_calibration has {len(raw)} entries for {n_nodes} nodes")
    return [None if d is None else LengthCalibrator.from_dict(d) for d in raw]


def calibrated_columns(
    calibrators: list[LengthCalibrator | None],
    confidence: np.ndarray,
    tokens_out: np.ndarray,
) -> np.ndarray:
    """(N, n) node confidences: calibrated where a node has a calibrator, raw elsewhere.
    `confidence` and `tokens_out` are the nodes' (N, n) trace columns."""
    out = np.array(confidence, dtype=float, copy=True)
    for k, cal in enumerate(calibrators):
        if cal is not None:
            out[:, k] = cal.log_p(confidence[:, k], tokens_out[:, k])
    return out
