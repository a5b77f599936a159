"""Fit the per-node free-text calibrators (policies/textcal.py) on open-ended traces.

Per node, each feature group of policies/textcal.GROUPS is scored by its held-out log-loss
(5 folds) against the node's base rate (or, where the node records confidences, against the
confidence alone); the best group is kept only if it beats that yardstick. The groups that
read token-logprob summaries are scored only for a node whose every train answer carries
one (so every group is scored on the same rows). The train
confidences the posterior is then fitted on are the out-of-fold calibrated ones, as for the
length calibrators of calibration/fit.py.
"""

from __future__ import annotations

import numpy as np

from calibration.logistic import fit_logistic, log_loss, varies
from calibration.traces import TraceSet
from policies.freetext import FEATURES
from policies.lengthcal import NodeCalibrator, calibrated_columns
from policies.textcal import GROUPS, TextCalibrator, feature_columns, reads_logprobs
from policies.tiers import tier_members

OPEN_ENDED_TOKENS = 40  # median answer length (tokens) from which a text task is open-ended
MIN_ROWS = 50


def trace_features(traces: TraceSet, cols: list[int]) -> np.ndarray:
    """feature_columns of the `cols` models with every input the proxy passes live (the
    prompt's words, the upstream's finish_reason, the token-logprob summary), so a
    calibrator is fitted and replayed on the features it is served with."""
    return feature_columns(
        traces.answers,
        traces.tokens_out,
        traces.prompts(),
        cols,
        traces.finish_reasons,
        traces.logprob_summaries,
    )


def calibrated_trace_columns(
    calibrators: list[NodeCalibrator | None], traces: TraceSet, cols: list[int]
) -> np.ndarray:
    """(N, len(cols)) confidences of the `cols` models as the policy reads them (calibrated
    where a node has a calibrator), from the same inputs as trace_features."""
    return calibrated_columns(
        calibrators,
        traces.confidence,
        traces.tokens_out,
        traces.answers,
        cols,
        traces.prompts(),
        traces.logprob_summaries,
        traces.finish_reasons,
    )


def is_open_ended(traces: TraceSet, nodes: list[int]) -> bool:
    """Free-text answers long enough that exact-match agreement says nothing: the text
    calibrators apply (short factual answers keep the length calibrators' path)."""
    if traces.kind != "text":
        return False
    tokens = traces.tokens_out[:, nodes]
    if np.isfinite(tokens).any():
        return bool(np.nanmedian(tokens) >= OPEN_ENDED_TOKENS)
    chars = [len(row[j]) / 4.0 for row in traces.answers for j in nodes if row[j]]
    return bool(chars) and float(np.median(chars)) >= OPEN_ENDED_TOKENS


def _fit(
    x: np.ndarray, y: np.ndarray, features: tuple[str, ...], uses_confidence: bool
) -> TextCalibrator:
    """Logistic regression on unstandardised inputs `x` (confidence logit first if used);
    `y` is `correct` (bool) or graded `quality`."""
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale = np.where(scale < 1e-9, 1.0, scale)
    clf = fit_logistic((x - mean) / scale, y, 1.0, max_iter=1000)
    return TextCalibrator(
        features,
        tuple(float(w) for w in clf.coef_[0]),
        float(clf.intercept_[0]),
        tuple(float(m) for m in mean),
        tuple(float(s) for s in scale),
        uses_confidence,
    )


def held_out(
    feats: np.ndarray,
    conf: np.ndarray,
    y: np.ndarray,
    features: tuple[str, ...],
    uses_confidence: bool,
    fold: np.ndarray,
) -> np.ndarray:
    """Out-of-fold calibrated log P(correct) of every row (nan where a signal is missing)."""
    shell = TextCalibrator(features, *_zeros(len(features) + int(uses_confidence)), uses_confidence)
    x = shell.design(feats, conf)
    ok = ~np.isnan(x).any(axis=1)
    out = np.full(len(y), np.nan)
    for f in np.unique(fold):
        held, rest = ok & (fold == f), ok & (fold != f)
        if held.any() and varies(y[rest]):
            out[held] = _fit(x[rest], y[rest], features, uses_confidence).log_p(
                feats[held], conf[held]
            )
    return out


def fit_group(
    feats: np.ndarray,
    conf: np.ndarray,
    y: np.ndarray,
    features: tuple[str, ...],
    uses_confidence: bool = False,
) -> TextCalibrator:
    """A calibrator over `features` fitted on every row of `feats` (feature_columns of one
    node) that holds its signals."""
    shell = TextCalibrator(features, *_zeros(len(features) + int(uses_confidence)), uses_confidence)
    design = shell.design(feats, conf)
    ok = ~np.isnan(design).any(axis=1)
    return _fit(design[ok], y[ok], features, uses_confidence)


def _zeros(n: int) -> tuple:
    return (0.0,) * n, 0.0, (0.0,) * n, (1.0,) * n


def fit_text_calibrators(
    train: TraceSet,
    nodes: list[int],
    groups: tuple[str, ...] = tuple(GROUPS),
    folds: int = 5,
    seed: int = 0,
) -> tuple[list[TextCalibrator | None], np.ndarray, dict[str, str]]:
    """Per node the text calibrator of the group with the least held-out log-loss (None
    where no group beats the yardstick), the nodes' (N, n) train confidences (out-of-fold
    calibrated where a node has a calibrator) and, per node, which group won and why."""
    conf = np.array(train.confidence[:, nodes], dtype=float, copy=True)
    feats = trace_features(train, nodes)
    n_text = len(FEATURES)  # the columns after them: the token-logprob summary
    fold = np.random.default_rng(seed).permutation(len(train)) % folds
    out: list[TextCalibrator | None] = [None] * len(nodes)
    chosen: dict[str, str] = {}
    for k, j in enumerate(nodes):
        name = train.models[j]
        y = train.correct[:, j]  # bool, or graded quality (`fit --label quality`)
        uses_confidence = bool(np.isfinite(conf[:, k]).any())
        answered = ~np.isnan(feats[:, k, 0])
        if tier_members(name) is not None or answered.sum() < MIN_ROWS or not varies(y):
            chosen[name] = "none (tier, too few rows or one class)"
            continue
        if uses_confidence:
            yard = held_out(feats[:, k], conf[:, k], y, (), True, fold)
        else:
            yard = np.full(len(y), np.nan)
            for f in range(folds):
                held, rest = answered & (fold == f), answered & (fold != f)
                rate = float(np.clip(y[rest].mean(), 1e-3, 1 - 1e-3))
                yard[held] = np.log(rate)
        has_summaries = bool(np.isfinite(feats[answered, k, n_text:]).all())
        best: tuple[float, str, np.ndarray] | None = None
        for g in groups:
            if reads_logprobs(GROUPS[g]) and not has_summaries:
                continue
            lp = held_out(feats[:, k], conf[:, k], y, GROUPS[g], uses_confidence, fold)
            seen = ~np.isnan(lp) & ~np.isnan(yard)
            if seen.sum() < MIN_ROWS:
                continue
            gain = log_loss(yard[seen], y[seen]) - log_loss(lp[seen], y[seen])
            if gain > 0 and (best is None or gain > best[0]):
                best = (gain, g, lp)
        if best is None:
            chosen[name] = "none (no feature group beats the base rate out of fold)"
            continue
        gain, g, lp = best
        x = TextCalibrator(
            GROUPS[g], *_zeros(len(GROUPS[g]) + int(uses_confidence)), uses_confidence
        )
        design = x.design(feats[:, k], conf[:, k])
        ok = ~np.isnan(design).any(axis=1)
        out[k] = _fit(design[ok], y[ok], GROUPS[g], uses_confidence)
        conf[:, k] = lp
        chosen[name] = f"{g} (held-out log-loss {gain:+.4f} against the yardstick)"
    return out, conf, chosen


__all__ = [
    "OPEN_ENDED_TOKENS",
    "calibrated_trace_columns",
    "fit_group",
    "fit_text_calibrators",
    "held_out",
    "is_open_ended",
    "trace_features",
]
