"""Accuracy-cost curves and the numbers bench reports from them (DESIGN.md, evaluation).

A policy's curve is the Pareto envelope of its test points (cost as a fraction of the
reference model's mean test cost), linearly interpolated, anchored at (0, 0) and flat after
its last point. Pure functions over plain floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class CurvePoint:
    """One train-selected setting replayed on test."""

    knob: float
    accuracy: float
    cost: float


def pareto_envelope(points: list[CurvePoint]) -> list[CurvePoint]:
    """Points no other point beats on both cost and accuracy, by increasing cost.

    Among equal costs the most accurate is kept; a point is kept only if it is strictly
    more accurate than every cheaper one.
    """
    ordered = sorted(points, key=lambda p: (p.cost, -p.accuracy))
    out: list[CurvePoint] = []
    for p in ordered:
        if not np.isfinite(p.cost) or not np.isfinite(p.accuracy):
            continue
        if not out or p.accuracy > out[-1].accuracy + 1e-12:
            out.append(p)
    return out


def _knots(envelope: list[CurvePoint]) -> tuple[np.ndarray, np.ndarray]:
    """x (cost) and y (accuracy) of the interpolated curve, starting at (0, 0)."""
    xs = [0.0] + [p.cost for p in envelope]
    ys = [0.0] + [p.accuracy for p in envelope]
    if len(xs) > 1 and xs[1] == 0.0:  # a free point replaces the anchor
        xs, ys = xs[1:], ys[1:]
    return np.asarray(xs), np.asarray(ys)


def accuracy_at(envelope: list[CurvePoint], cost: float) -> float:
    """The curve's accuracy at `cost` (flat after the last point)."""
    xs, ys = _knots(envelope)
    return float(np.interp(cost, xs, ys))


def cost_to_reach(envelope: list[CurvePoint], accuracy: float) -> float | None:
    """Least cost at which the curve reaches `accuracy`; None if it never does."""
    xs, ys = _knots(envelope)
    if ys[-1] < accuracy - 1e-12:
        return None
    k = int(np.argmax(ys >= accuracy - 1e-12))
    if k == 0:
        return float(xs[0])
    x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
    return float(x0 + (x1 - x0) * (accuracy - y0) / (y1 - y0))


def area_under(envelope: list[CurvePoint], upto: float = 1.0) -> float:
    """Area under the curve over cost [0, upto], divided by `upto` (1.0 = always right)."""
    xs, ys = _knots(envelope)
    grid = np.unique(np.concatenate([xs[xs < upto], [0.0, upto]]))
    vals = np.interp(grid, xs, ys)
    return float(np.sum((vals[1:] + vals[:-1]) * np.diff(grid)) / 2.0 / upto)


def curve_stats(points: list[CurvePoint], best_accuracy: float) -> dict:
    """The bench.json entry of one policy: its curve and the numbers read off it."""
    env = pareto_envelope(points)
    return {
        "curve": [{"knob": p.knob, "accuracy": p.accuracy, "cost": p.cost} for p in env],
        "cost_to_match": cost_to_reach(env, best_accuracy),
        "cost_to_match_1pp": cost_to_reach(env, best_accuracy - 0.01),
        "acc_at_20": accuracy_at(env, 0.2),
        "acc_at_50": accuracy_at(env, 0.5),
        "auc": area_under(env),
    }


def oracle_savings(policy: dict, oracle: dict, at_accuracy: float | None = None) -> dict:
    """Share of the routing oracle's savings (1 - its cost) that `policy` captures.

    Measured where the policy first reaches the best single model's accuracy (`at_match`)
    and one point below it (`at_1pp`); None where the policy never gets there. The oracle's
    cost is that of its last point (a one-point oracle), or, given `at_accuracy`, the least
    cost at which its curve reaches that accuracy (an oracle swept over a cost price).
    """
    oracle_cost = oracle["curve"][-1]["cost"] if oracle["curve"] else None
    if at_accuracy is not None and oracle["curve"]:
        points = [CurvePoint(p["knob"], p["accuracy"], p["cost"]) for p in oracle["curve"]]
        oracle_cost = cost_to_reach(points, at_accuracy)

    def share(cost: float | None) -> float | None:
        if cost is None or oracle_cost is None or oracle_cost >= 1.0:
            return None
        return float((1.0 - cost) / (1.0 - oracle_cost))

    return {
        "oracle_cost": oracle_cost,
        "at_match": share(policy["cost_to_match"]),
        "at_1pp": share(policy["cost_to_match_1pp"]),
    }
