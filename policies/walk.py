"""The one driver that walks any decision rule over one query (pure; no I/O).

A rule (CascadePolicy, or one of policies/rules.py) says which node(s) to call next; the
walk keeps what every rule shares, so it holds the same for all of them, online in the
proxy engine and on recorded traces (calibration/replay.py `walk_traces`):

- the cost cap: a call whose expected cost (the realised cost of what was called, plus the
  expected cost of the next call or tier) would pass `max_cost_usd` is not made; the walk
  stops there, even before the first call;
- failed calls: a failed node counts as explored and answers nothing; if the rule stops
  with nothing answered, the walk tries the next node in order (that `allowed` permits);
- the answer: the rule's chosen node if it answered, else the last node that did.

The caller loops: `while (calls := walk.next_calls()): ...call them...; walk.record(...)
for each; walk.decide()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from policies.freetext import agreement_row, shingles_of
from policies.policy import Step


class Rule(Protocol):
    """The step interface of every decision rule."""

    name: str
    n_nodes: int
    graded: bool  # reads the answers' pairwise agreement (open-ended traffic)

    def root_state(self, prompt: str) -> int: ...

    def first(self, root_state: int = 0) -> Step: ...

    def signal(
        self,
        node: int,
        confidence: float | None,
        tokens_out: float | None,
        text: str | None,
        prompt_words: int | None = None,
        finish_reason: str | None = None,
        logprob_summary: tuple[float, ...] | None = None,
    ) -> float | None: ...

    def step(
        self,
        explored: list[int],
        extracted: list[str | None],
        confidence: list[float | None],
        agree: list[list[float | None]] | None = None,
    ) -> Step: ...


class Walk:
    """One query's walk through `rule`; `node_cost[k]` is node k's expected cost (None:
    unknown, counted as 0); `allowed` (by node, -1 for the start) limits the fallback
    after failed calls; `names` name the nodes in `reason`."""

    def __init__(
        self,
        rule: Rule,
        node_cost: Sequence[float | None],
        max_cost_usd: float | None = None,
        root_state: int = 0,
        allowed: set[tuple[int, int]] | None = None,
        names: Sequence[str] | None = None,
    ) -> None:
        self.rule = rule
        self.names = names
        self.node_cost = node_cost
        self.max_cost_usd = max_cost_usd
        self.allowed = allowed
        n = rule.n_nodes
        self.extracted: list[str | None] = [None] * n
        self.confidence: list[float | None] = [None] * n
        # graded rules: agree[m][k] between the answers of nodes m and k, and each answer's
        # shingles (computed once, when it arrives)
        self.agree: list[list[float | None]] | None = None
        self._shingles: list = [None] * n
        if rule.graded:
            self.agree = [[None] * n for _ in range(n)]
        self.explored: list[int] = []
        self.answered: list[int] = []
        self.spent = 0.0
        self.step: Step = rule.first(root_state)
        self.reason = ""

    def next_calls(self) -> tuple[int, ...]:
        """The node(s) to call now, at once; empty when the walk is over (`reason` says why)."""
        calls = self.step.calls
        if not calls and not self.answered:
            calls = self._fallback()
            if not calls:
                self.reason = "every node failed"
                return ()
        if not calls:
            self.reason = self.step.reason or "policy stopped"
            return ()
        if self.max_cost_usd is not None:
            cost = sum(self.node_cost[k] or 0.0 for k in calls)
            if self.spent + cost > self.max_cost_usd:
                name = self.names[calls[0]] if self.names else f"node {calls[0]}"
                self.reason = f"max_cost_usd: {name} would exceed the cap"
                return ()
        return calls

    def _fallback(self) -> tuple[int, ...]:
        last = self.explored[-1] if self.explored else -1
        for j in range(self.rule.n_nodes):
            if j not in self.explored and (self.allowed is None or (last, j) in self.allowed):
                return (j,)
        return ()

    def agreement(self, node: int, text: str | None) -> list[float | None] | None:
        """The agreement of `node`'s answer `text` with every answer recorded so far (by
        node; None for a rule that does not read it): the caller computes it outside the
        decision step, as it does `rule.signal`, and passes it to `record`."""
        if self.agree is None:
            return None
        shingles = shingles_of(text)
        self._shingles[node] = shingles
        return agreement_row(shingles, self._shingles) if shingles is not None else None

    def record(
        self,
        node: int,
        ok: bool,
        extracted: str | None,
        confidence: float | None,
        cost_usd: float | None,
        agree: list[float | None] | None = None,
    ) -> None:
        """A call's result: `confidence` as the rule reads it (rule.signal), `cost_usd` the
        realised cost (None: unknown, its expected cost counts), `agree` from `agreement`."""
        if self.agree is not None and agree is not None:
            for k in self.explored:
                self.agree[node][k] = self.agree[k][node] = agree[k]
        self.explored.append(node)
        if ok:
            self.answered.append(node)
        self.extracted[node] = extracted
        self.confidence[node] = confidence
        self.spent += cost_usd if cost_usd is not None else (self.node_cost[node] or 0.0)

    def decide(self) -> Step:
        """The rule's step after the calls recorded so far."""
        if self.agree is None:
            self.step = self.rule.step(self.explored, self.extracted, self.confidence)
        else:
            self.step = self.rule.step(self.explored, self.extracted, self.confidence, self.agree)
        return self.step

    def answer(self) -> int | None:
        """The node whose answer is returned: the rule's choice if it answered, else the
        last node that answered (None: nothing answered)."""
        chosen = self.step.answer_node
        if chosen is not None and chosen in self.answered:
            return chosen
        return self.answered[-1] if self.answered else None
