"""The fitted cascade policy as the proxy uses it: state -> next node or stop -> answer.

Built from a policy artifact (calibration/artifact.py writes it; PolicyArtifact.policy in
policies/artifact.py builds this). The state after each
call is (last node explored, bin of the posterior loss); the decision table comes from the
T-Tamer backward induction with skips (policies/index.py). With recall the loss is that
of the best answer seen so far and the answer returned is that best one; without recall
(the ablation) it is the last answer's.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from policies.difficulty import DifficultyModel
from policies.index import ROOT, STOP
from policies.lengthcal import NodeCalibrator
from policies.posterior import PosteriorModel
from policies.router import RouterModel
from policies.textcal import TextCalibrator


@dataclass(frozen=True)
class StateTables:
    """Per node: inner bin edges of the posterior loss, the bin values, the decisions.

    `decision[last + 1][state]` is STOP or the next node; the root (last = ROOT) has
    `root_states` states (one unless the prompt is binned by difficulty; with a prompt
    router as root, one per node, and `decision[0][k] = k`: the router's pick is called).
    """

    edges: list[np.ndarray]  # per node, inner edges (B_j - 1,)
    values: list[np.ndarray]  # per node, expected error in each bin (B_j,)
    decision: list[np.ndarray]  # per last node + 1: (n_states,) int
    sigma: list[np.ndarray]  # per last node + 1: dynamic index per state
    # the cost price the decisions were solved at (None: unknown, e.g. read from an artifact);
    # a router root's first move depends on it (policies/router.py)
    mu: float | None = None

    def bin_of(self, node: int, loss: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.edges[node], loss, side="right")

    def to_dict(self) -> dict:
        return {
            "edges": [e.tolist() for e in self.edges],
            "values": [v.tolist() for v in self.values],
            "decision": [d.tolist() for d in self.decision],
            "sigma": [[float(x) for x in s] for s in self.sigma],
        }

    @classmethod
    def from_dict(cls, d: dict) -> StateTables:
        return cls(
            edges=[np.asarray(e, dtype=float) for e in d["edges"]],
            values=[np.asarray(v, dtype=float) for v in d["values"]],
            decision=[np.asarray(x, dtype=int) for x in d["decision"]],
            sigma=[np.asarray(s, dtype=float) for s in d["sigma"]],
        )


@dataclass(frozen=True)
class Step:
    """What the policy says after the calls so far."""

    next_node: int | None  # None: stop
    answer_node: int | None  # whose answer to return if stopping now (None: nothing yet)
    p_correct: float | None  # posterior that that answer is right (None: the rule has none)
    state: int
    parallel: tuple[int, ...] = ()  # nodes called at once with next_node (an ensemble's tier)
    reason: str = ""  # why the rule stops here, for the response and the ledger

    @property
    def calls(self) -> tuple[int, ...]:
        """The nodes to call next, at once (empty: stop)."""
        return () if self.next_node is None else (self.next_node, *self.parallel)


class CascadePolicy:
    """Online decisions for one query; the same tables drive the vectorised replay.

    The step interface every decision rule shares (policies/rules.py, walked by
    policies/walk.py): `name`, `n_nodes`, `root_state(prompt)`, `first(root_state)`,
    `signal(node, confidence, tokens_out, text)`, `step(explored, extracted, confidence)`;
    a `graded` rule (open-ended traffic) also reads the answers' pairwise agreement, which
    the walk computes as answers arrive (policies/walk.py `Walk.agreement`)."""

    name = "index"

    def __init__(
        self,
        posterior: PosteriorModel,
        tables: StateTables,
        recall: bool,
        recall_margin: float = 0.0,
        difficulty: DifficultyModel | None = None,
        length_calibrators: list[NodeCalibrator | None] | None = None,
        graded: bool = False,
        router: RouterModel | None = None,
    ) -> None:
        """`router` (at the tables' cost price) replaces `difficulty` as the root: an
        artifact uses at most one of the two."""
        self.graded = graded
        self.difficulty = difficulty
        self.router = router
        self.length_calibrators = length_calibrators or [None] * len(tables.edges)
        self.posterior = posterior
        self.tables = tables
        self.recall = recall
        self.recall_margin = recall_margin
        self.n_nodes = len(tables.edges)
        self._edges = [e.tolist() for e in tables.edges]  # plain lists: fast bisect
        self._decision = [[int(x) for x in d] for d in tables.decision]
        self._root_matters = len(set(self._decision[ROOT + 1])) > 1

    def root_state(self, prompt: str) -> int:
        """The root state of a query: the node the prompt router picks at the policy's
        price, else its prompt-difficulty bin (0 without a model).

        The root state only chooses the first node; when every root state chooses the same
        one, the prompt is not read at all (saves the hashing on every request).
        """
        if self.router is not None:
            return self.router.root_state(prompt)
        if self.difficulty is None or not self._root_matters:
            return 0
        return self.difficulty.root_state(prompt)

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
        """The confidence `step` reads for `node`: its answer's raw confidence, or the one
        calibrated by the answer's length and final-answer marker (policies/lengthcal.py)
        or by its free-text features (policies/textcal.py; `prompt_words`, `finish_reason`
        and `logprob_summary`, freetext.logprob_summary of the answer's token logprobs, are
        read only there) where the node has a calibrator."""
        cal = self.length_calibrators[node]
        if cal is None:
            return confidence
        if isinstance(cal, TextCalibrator):
            return cal.one(
                confidence, tokens_out, text, prompt_words, finish_reason, logprob_summary
            )
        return cal.one(confidence, tokens_out, text)

    def first(self, root_state: int = 0) -> Step:
        nxt = int(self.tables.decision[ROOT + 1][root_state])
        return Step(
            next_node=None if nxt == STOP else nxt,
            answer_node=None,
            p_correct=0.0,
            state=root_state,
        )

    def step(
        self,
        explored: list[int],
        extracted: list[str | None],
        confidence: list[float | None],
        agree: list[list[float | None]] | None = None,
    ) -> Step:
        """Decide after `explored` nodes (in call order) answered.

        `extracted`/`confidence` are indexed by node (None for nodes not explored or failed).
        A failed node is passed in `explored` with extracted None: it counts as explored but
        votes for nothing. A graded policy reads `agree[m][k]`, the agreement of node m's
        answer with node k's (required then).
        """
        last = explored[-1]
        if self.graded:
            if agree is None:
                raise ValueError("a graded-agreement policy needs the answers' agreement")
            best_p, best_m, last_p = self.posterior.best_one_graded(
                explored, extracted, confidence, agree
            )
        else:
            best_p, best_m, last_p = self.posterior.best_one(explored, extracted, confidence)
        recalled = self.recall and best_p - last_p > self.recall_margin
        p = best_p if recalled else last_p
        answer = best_m if recalled else last
        state = bisect.bisect_right(self._edges[last], 1.0 - p)
        nxt = self._decision[last + 1][state]
        if nxt != STOP and nxt in explored:  # never call a node twice
            nxt = STOP
        return Step(
            next_node=None if nxt == STOP else nxt, answer_node=answer, p_correct=p, state=state
        )
