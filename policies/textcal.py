"""A node's confidence on open-ended answers, from the answer's own features.

Free-text answers have no extractable answer to vote on and often no logprobs; what a node
shows is its answer (policies/freetext.py: length, length relative to the prompt,
truncation, refusal, hedging, structure) and, where its upstream returns token logprobs,
their summary beyond the mean (minimum, 5% and 25% quantiles: on long answers the mean is
dominated by easy tokens). Per node, a logistic model over a group of those features
(chosen out-of-fold in calibration/textfit.py) gives a calibrated log P(correct) that
stands for the node's confidence everywhere the policy reads one, as the length calibrator
of policies/lengthcal.py does for chains of thought. A node with recorded confidences also
reads their logit.

Pure: evaluated here for whole trace columns (fit, bench, evaluate) and for one live call
(the proxy), with the same features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from policies.freetext import FEATURES, LOGPROB_FEATURES, answer_features, word_count
from policies.posterior import confidence_feature, confidence_feature_one

TEXT_KIND = "text"  # the `kind` of a text calibrator in an artifact's length_calibration
# Every input a text calibrator may name: the answer's features, then its token-logprob
# summary (the answer features keep their positions, so older artifacts read the same).
CALIBRATOR_FEATURES = FEATURES + LOGPROB_FEATURES
# The feature groups the fit chooses from, smallest first; those reading logprobs are
# offered only for a node whose train answers all carry a logprob summary.
GROUPS: dict[str, tuple[str, ...]] = {
    "length": ("log_tokens", "log_tokens_sq"),
    "length+prompt": ("log_tokens", "log_tokens_sq", "log_rel_length"),
    "length+style": ("log_tokens", "log_tokens_sq", "log_rel_length", "word_length", "emphasis"),
    "answer": FEATURES,
    "logprobs": LOGPROB_FEATURES,
    "answer+logprobs": CALIBRATOR_FEATURES,
}


def reads_logprobs(features: tuple[str, ...]) -> bool:
    """The features include the token-logprob summary (absent where an upstream returns
    no logprobs)."""
    return any(f in LOGPROB_FEATURES for f in features)


def feature_columns(
    answers: list[list[str | None]],
    tokens_out: np.ndarray,
    prompts: list[str],
    cols: list[int],
    finish_reasons: list[list[str | None]] | None = None,
    summaries: np.ndarray | None = None,
) -> np.ndarray:
    """(N, len(cols), len(CALIBRATOR_FEATURES)) answer features of the `cols` models; nan
    rows where a model gave no answer, nan summaries where `summaries` (the traces' (N, M, 4)
    logprob summaries) hold none."""
    n_text = len(FEATURES)
    out = np.full((len(answers), len(cols), len(CALIBRATOR_FEATURES)), np.nan)
    for i, row in enumerate(answers):
        pw = word_count(prompts[i])
        for k, j in enumerate(cols):
            tok = tokens_out[i, j]
            fr = finish_reasons[i][j] if finish_reasons is not None else None
            f = answer_features(row[j], None if tok != tok else float(tok), pw, fr)
            if f is not None:
                out[i, k, :n_text] = f
                if summaries is not None:
                    out[i, k, n_text:] = summaries[i, j]
    return out


@dataclass(frozen=True)
class TextCalibrator:
    """Standardised logistic weights over the named answer features (and the confidence
    logit when `uses_confidence`); see the module docstring."""

    features: tuple[str, ...]
    weights: tuple[float, ...]  # confidence logit first when uses_confidence
    bias: float
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    uses_confidence: bool = False

    def __post_init__(self) -> None:
        unknown = [f for f in self.features if f not in CALIBRATOR_FEATURES]
        if unknown:
            raise ValueError(
                f"unknown answer feature(s) {unknown}; known: {list(CALIBRATOR_FEATURES)}"
            )
        n = len(self.features) + int(self.uses_confidence)
        if not len(self.weights) == len(self.mean) == len(self.scale) == n:
            raise ValueError(f"a text calibrator over {n} inputs needs {n} weights, means, scales")
        object.__setattr__(self, "_idx", [CALIBRATOR_FEATURES.index(f) for f in self.features])
        object.__setattr__(self, "_reads_logprobs", reads_logprobs(self.features))

    def design(self, feats: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        """(N, inputs) unstandardised inputs from (N, len(CALIBRATOR_FEATURES)) features (or
        (N, len(FEATURES)) for a calibrator that reads no logprobs)."""
        x = feats[:, self._idx]  # type: ignore[attr-defined]
        if self.uses_confidence:
            x = np.concatenate([confidence_feature(confidence)[:, None], x], axis=1)
        return x

    def log_p(self, feats: np.ndarray, confidence: np.ndarray) -> np.ndarray:
        """Calibrated log P(correct) per row; nan where the answer or a used signal is missing."""
        x = (self.design(feats, confidence) - np.asarray(self.mean)) / np.asarray(self.scale)
        logit = x @ np.asarray(self.weights) + self.bias
        with np.errstate(invalid="ignore"):
            return -np.logaddexp(0.0, -logit)

    def one(
        self,
        confidence: float | None,
        tokens_out: float | None,
        text: str | None,
        prompt_words: int | None = None,
        finish_reason: str | None = None,
        logprob_summary: tuple[float, ...] | None = None,
    ) -> float | None:
        """log_p for one live call in plain Python (a decision step costs microseconds;
        the features take a fraction of a millisecond on a 1,000-token answer).
        `logprob_summary` is freetext.logprob_summary of the answer's token logprobs; a
        calibrator reading it gives None without one, as log_p gives nan."""
        feats = answer_features(text, tokens_out, prompt_words, finish_reason)
        if feats is None:
            return None
        if self._reads_logprobs:  # type: ignore[attr-defined]
            if logprob_summary is None:
                return None
            feats = (*feats, *logprob_summary)
        values = [feats[i] for i in self._idx]  # type: ignore[attr-defined]
        if self.uses_confidence:
            cf = confidence_feature_one(confidence)
            if cf is None:
                return None
            values.insert(0, cf)
        logit = self.bias
        for w, v, m, s in zip(self.weights, values, self.mean, self.scale, strict=True):
            logit += w * (v - m) / s
        return -math.log1p(math.exp(-logit)) if logit > -30 else logit

    def to_dict(self) -> dict:
        return {
            "kind": TEXT_KIND,
            "features": list(self.features),
            "weights": list(self.weights),
            "bias": self.bias,
            "mean": list(self.mean),
            "scale": list(self.scale),
            "uses_confidence": self.uses_confidence,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TextCalibrator:
        return cls(
            tuple(str(f) for f in d["features"]),
            tuple(float(x) for x in d["weights"]),
            float(d["bias"]),
            tuple(float(x) for x in d["mean"]),
            tuple(float(x) for x in d["scale"]),
            bool(d.get("uses_confidence", False)),
        )
