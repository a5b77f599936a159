"""The replay harness every policy shares: what happened per query when a policy ran on traces."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from calibration.traces import TraceSet
from policies.freetext import word_count
from policies.walk import Rule, Walk


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


def walk_traces(
    rule: Rule,
    nodes: Sequence[str],
    traces: TraceSet,
    max_cost_usd: float | None = None,
    node_cost: Sequence[float] | None = None,
) -> Outcome:
    """Replay any decision rule on traces row by row through policies/walk.py, the driver
    the proxy walks it with: the recorded answers stand for the calls, and rule.signal reads
    what the proxy passes it live (the prompt's word count, the recorded finish_reason and
    logprob summary), so a text calibrator gives the replay's value. `nodes` names the
    traces' model of each rule node; `node_cost` (default: the traces' mean cost per node)
    is what the cost cap expects a node to cost."""
    cols = [traces.models.index(m) for m in nodes]
    if node_cost is None:
        node_cost = np.nan_to_num(np.nanmean(traces.cost_usd[:, cols], axis=0)).tolist()
    n = len(traces)
    explored = np.zeros((n, traces.n_models), dtype=bool)
    answer = np.full(n, -1)
    stop = np.full(n, -1)
    latency = np.zeros(n)
    for r in range(n):
        prompt = traces.prompt(r)
        prompt_words = word_count(prompt)
        walk = Walk(rule, node_cost, max_cost_usd, rule.root_state(prompt))
        while calls := walk.next_calls():
            latency[r] += max(traces.latency_ms[r, cols[k]] for k in calls)  # at once
            for k in calls:
                c = cols[k]
                raw = float(traces.confidence[r, c])
                text = traces.answers[r][c]
                conf = rule.signal(
                    k,
                    raw,
                    float(traces.tokens_out[r, c]),
                    text,
                    prompt_words,
                    traces.finish_reason(r, c),
                    _summary(traces, r, c),
                )
                cost = float(traces.cost_usd[r, c])
                agree = walk.agreement(k, text)
                walk.record(
                    k,
                    True,
                    traces.extracted[r][c],
                    conf,
                    cost if cost == cost else None,
                    agree,
                )
            walk.decide()
        for k in walk.explored:
            explored[r, cols[k]] = True
        chosen = walk.answer()
        answer[r] = -1 if chosen is None else cols[chosen]
        stop[r] = cols[walk.explored[-1]] if walk.explored else -1
    base = outcome_from_choices(traces, explored, answer, stop)
    return dataclasses.replace(base, latency=latency)


def _summary(traces: TraceSet, row: int, col: int) -> tuple[float, ...] | None:
    """The recorded token-logprob summary of one answer, as the proxy passes it live."""
    if traces.logprob_summaries is None or np.isnan(traces.logprob_summaries[row, col]).any():
        return None
    return tuple(float(x) for x in traces.logprob_summaries[row, col])
