"""The replay harness every policy shares: what happened per query when a policy ran on traces."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from calibration.traces import TraceSet


@dataclass(frozen=True)
class Outcome:
    """Per-row result of replaying one policy setting on a TraceSet.

    `explored` is a bool matrix (N, M): which models were called. `answer_model` is the
    index of the model whose answer was returned (-1 if none answered); `stop_model` is the
    last model explored. Cost sums the explored models' costs; latency adds sequential steps
    and takes the max inside a parallel tier.
    """

    correct: np.ndarray  # bool (N,); the quality returned (float) for traces scored on quality
    cost: np.ndarray  # float (N,) USD
    latency: np.ndarray  # float (N,) ms (nan if unknown)
    explored: np.ndarray  # bool (N, M)
    answer_model: np.ndarray  # int (N,)
    stop_model: np.ndarray  # int (N,)

    @property
    def calls(self) -> np.ndarray:
        return self.explored.sum(axis=1)

    @property
    def recalled(self) -> np.ndarray:
        """True where the returned answer is not the last explored model's."""
        return (self.answer_model >= 0) & (self.answer_model != self.stop_model)

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean()) if len(self.correct) else float("nan")

    @property
    def mean_cost(self) -> float:
        return float(self.cost.mean()) if len(self.cost) else float("nan")


class ReplayPolicy(Protocol):
    """One fitted setting of a policy (one knob value), replayable on any TraceSet."""

    name: str
    knob: float

    def replay(self, traces: TraceSet) -> Outcome: ...


class PolicyFamily(Protocol):
    """A policy with a knob: fit one setting per knob value on train only."""

    name: str

    def fit_sweep(self, train: TraceSet) -> list[ReplayPolicy]: ...


def outcome_from_choices(
    traces: TraceSet, explored: np.ndarray, answer_model: np.ndarray, stop_model: np.ndarray
) -> Outcome:
    """Build an Outcome from which models were called and whose answer was returned.

    Sequential latency: sum of the explored models' latencies (nan if any is unknown).
    """
    explored = explored.astype(bool)
    rows = np.arange(len(traces))
    ok = answer_model >= 0
    correct = np.zeros(len(traces), dtype=traces.correct.dtype)  # bool, or graded quality
    correct[ok] = traces.correct[rows[ok], answer_model[ok]]
    cost = np.where(explored, np.nan_to_num(traces.cost_usd), 0.0).sum(axis=1)
    latency = np.where(explored, traces.latency_ms, 0.0).sum(axis=1)
    return Outcome(
        correct=correct,
        cost=cost,
        latency=latency,
        explored=explored,
        answer_model=answer_model.astype(int),
        stop_model=stop_model.astype(int),
    )
