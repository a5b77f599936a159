"""The baseline decision rules, each once, with the index policy's step interface.

- SinglePolicy: one model answers (the reference, or any one model);
- ThresholdPolicy: confidence-threshold cascade without recall (WoC-style): models in chain
  order, stop at the first whose raw confidence reaches its own threshold, return its answer;
- AgreementPolicy: Cascade of Ensembles (Kolawole et al.): tiers of models called at once,
  stop when the majority's vote fraction reaches theta, return the majority answer.

`step` decides one query (the proxy, through policies/walk.py); the array methods beside it
(`ThresholdPolicy.stop_positions`, `AgreementPolicy.agrees`) are the same rule over many
rows at once, which calibration tunes and replays with (calibration/baselines.py);
tests/policy_walk.py checks that both give the same decisions on real traces.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from policies.errors import InvalidInput
from policies.policy import Step
from policies.tiers import majority

ALWAYS, NEVER = "always", "never"  # how the artifact writes thresholds -inf and +inf
AGREEMENT_SLACK = 1e-9  # a vote fraction equal to theta up to rounding agrees


class _RawRule:
    """What the baseline rules share: no prompt-difficulty root, no calibration (a node's
    signal is its raw confidence), exact answers rather than their graded agreement."""

    graded = False

    def root_state(self, prompt: str) -> int:
        return 0

    def signal(
        self,
        node: int,
        confidence: float | None,
        tokens_out: float | None,
        text: str | None,
        prompt_words: int | None = None,
        finish_reason: str | None = None,
        logprob_summary: tuple[float, ...] | None = None,
    ) -> float | None:
        return confidence


class SinglePolicy(_RawRule):
    """One model answers every query (node 0)."""

    name = "single"
    n_nodes = 1

    def first(self, root_state: int = 0) -> Step:
        return Step(next_node=0, answer_node=None, p_correct=None, state=0)

    def step(
        self, explored: list[int], extracted: list[str | None], confidence: list[float | None]
    ) -> Step:
        return Step(None, 0, None, 0, reason="single: the reference model answers")


def decode_threshold(value: float | str) -> float:
    """An artifact's threshold: a number, "always" (-inf: always stop) or "never" (+inf)."""
    return -math.inf if value == ALWAYS else math.inf if value == NEVER else float(value)


def encode_threshold(value: float) -> float | str:
    return ALWAYS if value == -math.inf else NEVER if value == math.inf else float(value)


class ThresholdPolicy(_RawRule):
    """Nodes are the chain's models, cheapest first; `thresholds[k]` is node k's (the last
    node always stops). A failed call (no answer, no confidence) passes to the next node;
    an answer without a confidence reads as -inf, which only an "always" threshold stops."""

    name = "threshold"

    def __init__(self, chain: Sequence[str], thresholds: Sequence[float]) -> None:
        if len(thresholds) != len(chain) - 1:
            raise InvalidInput(f"{len(chain)} models need {len(chain) - 1} thresholds")
        self.chain = list(chain)
        self.thresholds = [float(t) for t in thresholds]
        self.n_nodes = len(self.chain)

    def first(self, root_state: int = 0) -> Step:
        return Step(next_node=0, answer_node=None, p_correct=None, state=0)

    def confident(self, node: int, confidence: float | None) -> bool:
        if node == self.n_nodes - 1:
            return True
        c = -math.inf if confidence is None or confidence != confidence else confidence
        return c >= self.thresholds[node]

    def step(
        self, explored: list[int], extracted: list[str | None], confidence: list[float | None]
    ) -> Step:
        last = explored[-1]
        failed = extracted[last] is None and confidence[last] is None
        if last == self.n_nodes - 1 and failed:
            return Step(None, None, None, last, reason="threshold: the last model that answered")
        if not failed and self.confident(last, confidence[last]):
            why = f"threshold: confident enough at {self.chain[last]}"
            return Step(None, last, None, last, reason=why)
        return Step(last + 1, last, None, last)

    def stop_positions(self, conf: np.ndarray) -> np.ndarray:
        """The same rule on rows: where each row of `conf` (rows x nodes, nan for no
        confidence) stops, the first node whose confidence reaches its threshold."""
        conf = np.nan_to_num(conf, nan=-np.inf)
        return stop_positions(conf, np.asarray(self.thresholds, dtype=float))


def stop_positions(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """ThresholdPolicy's rule on arrays (conf with -inf for no confidence), for the tuning
    search, which tries thousands of thresholds without building a policy for each."""
    n_rows, n = conf.shape
    hit = np.zeros((n_rows, n), dtype=bool)
    hit[:, :-1] = conf[:, :-1] >= thresholds[None, :]
    hit[:, -1] = True
    return np.argmax(hit, axis=1)


class AgreementPolicy(_RawRule):
    """Nodes are the tiers' models in order (cheapest tier first, each cheapest first); a
    tier is called at once; the walk stops at the first tier whose majority holds at least
    `theta` of its votes (or at the last tier) and answers with the majority (tiers.majority).
    """

    name = "agreement"

    def __init__(self, tier_sizes: Sequence[int], theta: float) -> None:
        self.theta = float(theta)
        self.tiers: list[tuple[int, ...]] = []
        start = 0
        for size in tier_sizes:
            self.tiers.append(tuple(range(start, start + size)))
            start += size
        self.n_nodes = start
        self._tier_of = {k: t for t, tier in enumerate(self.tiers) for k in tier}

    def _call(self, t: int) -> Step:
        tier = self.tiers[t]
        return Step(tier[0], None, None, t, parallel=tier[1:])

    def first(self, root_state: int = 0) -> Step:
        return self._call(0)

    def agrees(self, fraction: np.ndarray | float, last_tier: bool) -> np.ndarray | bool:
        """The stopping rule, on one fraction or an array of them."""
        return (fraction >= self.theta - AGREEMENT_SLACK) | last_tier

    def step(
        self, explored: list[int], extracted: list[str | None], confidence: list[float | None]
    ) -> Step:
        t = self._tier_of[explored[-1]]
        tier = self.tiers[t]
        voters = majority([extracted[k] for k in tier])
        last_tier = t == len(self.tiers) - 1
        if voters and self.agrees(len(voters) / len(tier), last_tier):
            why = f"agreement: {len(voters)} of {len(tier)} agree"
            return Step(None, tier[voters[-1]], None, t, reason=why)
        if last_tier:
            why = "agreement: no majority; the last model that answered"
            return Step(None, None, None, t, reason=why)
        return self._call(t + 1)
