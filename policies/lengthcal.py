"""A node's confidence corrected by the length and the shape of its answer.

Token log-probabilities say little about a long chain of thought, but its length says a lot:
on GSM8K a small model's wrong answers run longer than its right ones (held-out AUC of the
confidence alone 0.56-0.70 for the 1B-8B models, with the length 0.68-0.80), and a chain
that never states a final answer ("#### 18", "The answer is 18") was cut off or lost its
way (Mixtral on GSM8K: right 23% of the time without one, 68% with one). Per node, a
logistic model over (confidence logit, log length, its square, final-answer marker) gives a
calibrated log P(correct), which then stands for the node's confidence everywhere the policy
reads one: the posterior, the states, the online decisions. A node that reports no
confidence at all (an API without logprobs) gets one from its answer's length and marker
alone. Nodes whose answers barely vary in length (one-letter multiple choice) keep their
raw confidence: they get no calibrator.

Pure: fitted in calibration/fit.py, evaluated here for a whole trace column (fit, bench,
evaluate) and for one call (the proxy), with the same arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.answers import has_final_marker
from policies.posterior import confidence_feature, confidence_feature_one
from policies.textcal import TEXT_KIND, TextCalibrator, feature_columns

MIN_DISTINCT_LENGTHS = 5  # fewer distinct output lengths: a format, not a signal
N_FEATURES = 4  # confidence logit, log(1 + tokens), its square, final-answer marker

Four = tuple[float, float, float, float]


def length_features(
    confidence: np.ndarray, tokens_out: np.ndarray, marker: np.ndarray, uses_confidence: bool
) -> np.ndarray:
    """(N, 4): confidence logit (0 for a node without confidences), log(1 + tokens), its
    square, the final-answer marker (0/1); nan rows where a signal used is missing."""
    lt = np.log1p(np.asarray(tokens_out, dtype=float))
    cf = confidence_feature(confidence) if uses_confidence else np.zeros_like(lt)
    return np.stack([cf, lt, lt * lt, np.asarray(marker, dtype=float)], axis=1)


def marker_columns(answers: list[list[str | None]], cols: list[int]) -> np.ndarray:
    """(N, len(cols)) 0/1: whether each answer of the `cols` models states a final answer."""
    return np.array(
        [[float(has_final_marker(row[j])) for j in cols] for row in answers], dtype=float
    ).reshape(len(answers), len(cols))


@dataclass(frozen=True)
class LengthCalibrator:
    """Standardised logistic weights over length_features; see the module docstring."""

    weights: Four
    bias: float
    mean: Four
    scale: Four
    uses_confidence: bool = True  # False: the node reports none; length and marker only

    def log_p(
        self, confidence: np.ndarray, tokens_out: np.ndarray, marker: np.ndarray
    ) -> np.ndarray:
        """Calibrated log P(correct) per row; nan where a signal it uses is missing."""
        feats = length_features(confidence, tokens_out, marker, self.uses_confidence)
        x = (feats - np.asarray(self.mean)) / np.asarray(self.scale)
        logit = x @ np.asarray(self.weights) + self.bias
        with np.errstate(invalid="ignore"):  # nan rows stay nan
            return -np.logaddexp(0.0, -logit)  # log sigmoid, stable at both ends

    def one(
        self, confidence: float | None, tokens_out: float | None, text: str | None
    ) -> float | None:
        """log_p for one call (its answer `text` gives the marker) in plain Python: a
        decision step costs microseconds."""
        cf = confidence_feature_one(confidence) if self.uses_confidence else 0.0
        if cf is None or tokens_out is None or tokens_out != tokens_out:
            return None
        lt = math.log1p(float(tokens_out))
        values = (cf, lt, lt * lt, float(has_final_marker(text)))
        logit = self.bias
        for w, v, m, s in zip(self.weights, values, self.mean, self.scale, strict=True):
            logit += w * (v - m) / s
        return -math.log1p(math.exp(-logit)) if logit > -30 else logit

    def to_dict(self) -> dict:
        return {
            "weights": list(self.weights),
            "bias": self.bias,
            "mean": list(self.mean),
            "scale": list(self.scale),
            "uses_confidence": self.uses_confidence,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LengthCalibrator:
        """Also reads the three-feature calibrators of earlier artifacts (no marker)."""

        def four(key: str, pad: float) -> Four:
            a, b, c, m = ([float(x) for x in d[key]] + [pad])[:N_FEATURES]
            return a, b, c, m

        return cls(
            four("weights", 0.0),
            float(d["bias"]),
            four("mean", 0.0),
            four("scale", 1.0),
            bool(d.get("uses_confidence", True)),
        )


NodeCalibrator = LengthCalibrator | TextCalibrator


def calibrator_from(d: dict | None) -> NodeCalibrator | None:
    """One `length_calibration` entry: a text calibrator (policies/textcal.py) when its
    `kind` says so, else a length calibrator."""
    if d is None:
        return None
    return (
        TextCalibrator.from_dict(d) if d.get("kind") == TEXT_KIND else LengthCalibrator.from_dict(d)
    )


def calibrators_from(raw: list | None, n_nodes: int) -> list[NodeCalibrator | None]:
    """An artifact's `length_calibration` (one entry per node, null for none) as objects;
    an artifact without the field calibrates nothing."""
    if not raw:
        return [None] * n_nodes
    if len(raw) != n_nodes:
        raise ValueError(f"length_calibration has {len(raw)} entries for {n_nodes} nodes")
    return [calibrator_from(d) for d in raw]


def calibrated_columns(
    calibrators: list[NodeCalibrator | None],
    confidence: np.ndarray,
    tokens_out: np.ndarray,
    answers: list[list[str | None]],
    cols: list[int],
    prompts: list[str] | None = None,
    summaries: np.ndarray | None = None,
    finish_reasons: list[list[str | None]] | None = None,
) -> np.ndarray:
    """(N, n) node confidences: calibrated where a node has a calibrator, raw elsewhere.
    `confidence` and `tokens_out` are the full (N, M) trace columns, `answers` the trace's
    answer texts, `cols` the models the nodes are, `prompts` the rows' prompt texts,
    `summaries` the (N, M, 4) token-logprob summaries and `finish_reasons` the [row][model]
    ones (all read by text calibrators, as the proxy passes them live; nan where a
    calibrator reads a summary the row lacks)."""
    out = np.array(confidence[:, cols], dtype=float, copy=True)
    texts = [(k, cal) for k, cal in enumerate(calibrators) if isinstance(cal, TextCalibrator)]
    if texts:
        if prompts is None:
            raise ValueError("text calibrators need the prompts")
        feats = feature_columns(
            answers, tokens_out, prompts, [cols[k] for k, _ in texts], finish_reasons, summaries
        )
        for i, (k, cal) in enumerate(texts):
            out[:, k] = cal.log_p(feats[:, i], confidence[:, cols[k]])
    used = [(k, cal) for k, cal in enumerate(calibrators) if isinstance(cal, LengthCalibrator)]
    if used:
        marker = marker_columns(answers, [cols[k] for k, _ in used])
        for i, (k, cal) in enumerate(used):
            out[:, k] = cal.log_p(confidence[:, cols[k]], tokens_out[:, cols[k]], marker[:, i])
    return out
