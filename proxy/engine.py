"""The cascade engine: walk the nodes the policy picks, read the signals, return the best answer.

Per request: the prompt's difficulty picks the root state; each call's answer is extracted and
its confidence read (policies/answers.py, policies/signals.py: the same code calibration
uses); the fitted index policy (policies/policy.py) says whether to stop or which node to pay
for next, and which answer explored so far is most likely right (recall). A failed call is
an explored node with no answer: the policy goes on, and if it would stop with nothing
answered the engine tries the remaining nodes in order. Nothing here does I/O except
through the backends.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass, field

from policies.answers import extract_answer
from policies.policy import CascadePolicy, Step, nearest_lambda, policy_from_artifact
from policies.signals import answer_confidence
from policies.transitions import START, TransitionSpec, allowed_edges, taken_edges
from proxy.backends.base import Backend, CallResult

POLICIES = ("index", "threshold", "agreement", "single")


class OverrideError(ValueError):
    """A per-request `cascade` override is invalid; `param` names the field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Overrides:
    """The request's optional `cascade` object."""

    policy: str = "index"
    max_cost_usd: float | None = None
    lam: float | None = None  # per-request lambda: the artifact's nearest swept setting

    @classmethod
    def parse(cls, raw: object) -> Overrides:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise OverrideError("'cascade' must be an object", "cascade")
        unknown = sorted(set(raw) - {"policy", "max_cost_usd", "lambda"})
        if unknown:
            raise OverrideError(f"unknown field(s) {unknown} in 'cascade'", "cascade")
        lam = raw.get("lambda")
        if lam is not None and (
            isinstance(lam, bool) or not isinstance(lam, int | float) or not 0 < lam <= 1
        ):
            raise OverrideError(
                "'cascade.lambda' must be a number in (0, 1]: the weight of accuracy against "
                "cost (1 = accuracy only)",
                "cascade.lambda",
            )
        policy = raw.get("policy", "index")
        if policy not in POLICIES:
            raise OverrideError(
                f"'cascade.policy' must be one of {list(POLICIES)}, got {policy!r}",
                "cascade.policy",
            )
        cap = raw.get("max_cost_usd")
        if cap is not None and (  # NaN, Infinity and ints past a float's range fail too
            isinstance(cap, bool)
            or not isinstance(cap, int | float)
            or not 0 <= cap <= sys.float_info.max
        ):
            raise OverrideError(
                "'cascade.max_cost_usd' must be a finite non-negative number",
                "cascade.max_cost_usd",
            )
        return cls(
            policy=policy,
            max_cost_usd=None if cap is None else float(cap),
            lam=None if lam is None else float(lam),
        )


@dataclass
class NodeCall:
    """One explored node: the call, the signals read from it, and the decision after it."""

    node: int
    model: str
    result: CallResult
    extracted: str | None
    confidence: float | None
    p_correct: float | None = None
    decision: str = "stop"  # "stop" or "continue:<model>"
    signal_ms: float = 0.0  # time spent extracting the answer and reading its confidence


@dataclass
class CascadeRun:
    """What the engine did for one request."""

    cascade: str
    calls: list[NodeCall] = field(default_factory=list)
    answer: NodeCall | None = None
    reason: str = ""
    policy_hash: str | None = None
    overhead_ms: float = 0.0  # time spent deciding, not waiting for upstreams

    @property
    def cost_usd(self) -> float | None:
        costs = [c.result.cost_usd for c in self.calls]
        return None if any(c is None for c in costs) else float(sum(costs))

    @property
    def tokens(self) -> tuple[int, int]:
        return (
            sum(c.result.tokens_in or 0 for c in self.calls),
            sum(c.result.tokens_out or 0 for c in self.calls),
        )


class CascadeEngine:
    """One configured cascade over live backends."""

    def __init__(
        self,
        name: str,
        nodes: list[str],
        backends: dict[str, Backend],
        reference: str,
        artifact: dict | None = None,
        transitions: TransitionSpec = "skips",
    ) -> None:
        self.name = name
        self.transitions = transitions
        names = allowed_edges(transitions, nodes)
        self._allowed_names = {(_start_or(nodes, i), nodes[j]) for i, j in names}
        self._allowed: set[tuple[int, int]] = set()  # the same, by the policy's node index
        self.backends = backends
        self.reference = reference
        self.policy: CascadePolicy | None = None
        self.policy_hash: str | None = None
        self._artifact: dict | None = None
        self._expected_cost: dict[str, float] = {}
        self.kind = "text"
        self.nodes = list(nodes)
        self.node_cost = [None] * len(self.nodes)
        if artifact is not None:
            self.load(artifact)

    def load(self, artifact: dict) -> None:
        """Adopt a policy artifact: its nodes (by model name) must be configured models."""
        names = [n["model"] for n in artifact["nodes"]]
        missing = [m for m in names if m not in self.backends]
        if missing:
            raise ValueError(
                f"cascade {self.name}: the policy's node(s) {missing} are not configured models "
                f"(have {sorted(self.backends)})"
            )
        self._check_transitions(artifact, names)
        self.nodes = names
        self._allowed = {
            (i, j)
            for i in range(-1, len(names))
            for j in range(len(names))
            if (_start_or(names, i), names[j]) in self._allowed_names
        }
        self.node_cost = [float(n["cost_usd"]) for n in artifact["nodes"]]
        self.kind = artifact.get("answer_kind") or "text"
        self.policy = policy_from_artifact(artifact)
        self.policy_hash = artifact["hash"]
        self._artifact = artifact
        self._by_lambda: dict[float, CascadePolicy] = {}
        self._expected_cost = {n["model"]: float(n["cost_usd"]) for n in artifact["nodes"]}
        for kind, settings in (artifact.get("baselines") or {}).items():
            for setting in settings:
                names = setting.get("chain") or [m for tier in setting["tiers"] for m in tier]
                missing = sorted(set(names) - set(self.backends))
                if missing:
                    raise ValueError(
                        f"cascade {self.name}: the policy's {kind} baseline uses model(s) "
                        f"{missing} that are not configured"
                    )

    def _check_transitions(self, artifact: dict, names: list[str]) -> None:
        """Refuse a policy that can take a transition the cascade's config forbids."""
        tables = [artifact["tables"]["decision"]]
        tables += [entry["decision"] for entry in artifact.get("sweep") or []]
        taken = {(_start_or(names, i), names[j]) for t in tables for i, j in taken_edges(t)}
        forbidden = sorted(taken - self._allowed_names)
        if forbidden:
            shown = ", ".join(f"{a}>{b}" for a, b in forbidden)
            raise ValueError(
                f"cascade {self.name}: the policy artifact can take transition(s) {shown}, "
                f"which `transitions: {self.transitions}` forbids; refit it with `cascade fit "
                "--transitions ...` matching the config"
            )

    def policy_for(self, lam: float | None) -> CascadePolicy | None:
        """The policy for a per-request lambda (the artifact's nearest swept setting)."""
        if lam is None or self.policy is None:
            return self.policy
        key = nearest_lambda(self._artifact, lam)
        if key not in self._by_lambda:
            self._by_lambda[key] = policy_from_artifact(self._artifact, key)
        return self._by_lambda[key]

    def baseline(self, kind: str, lam: float | None) -> dict | None:
        """The artifact's `kind` baseline setting for the lambda nearest `lam` (default: the
        artifact's own), or None when the artifact has none."""
        settings = ((self._artifact or {}).get("baselines") or {}).get(kind) or []
        if not settings:
            return None
        target = self._artifact["lambda"] if lam is None else lam
        return min(settings, key=lambda e: (abs(e["lambda"] - target), -e["lambda"]))

    def new_run(self) -> CascadeRun:
        return CascadeRun(cascade=self.name, policy_hash=self.policy_hash)

    async def run(
        self,
        messages: list[dict],
        params: dict,
        overrides: Overrides,
        run: CascadeRun | None = None,
    ) -> CascadeRun:
        """Answer one request. Pass `run` (from new_run) to keep what was done so far even
        if this coroutine is cancelled (a client that hung up is still ledgered)."""
        run = run if run is not None else self.new_run()
        if self.policy is None or overrides.policy == "single":
            call = await self._call(len(self.nodes), self.reference, messages, params)
            run.calls.append(call)
            run.answer = call if call.result.ok else None
            run.reason = "single: the reference model answers"
            run.overhead_ms = call.signal_ms
            return run
        if overrides.policy in ("threshold", "agreement"):
            setting = self.baseline(overrides.policy, overrides.lam)
            if setting is None:
                raise OverrideError(
                    f"the policy artifact of cascade {self.name} holds no {overrides.policy} "
                    "setting: refit it with this version of `cascade fit`",
                    "cascade.policy",
                )
            if overrides.policy == "threshold":
                await self._run_threshold(run, setting, messages, params, overrides)
            else:
                await self._run_agreement(run, setting, messages, params)
            run.overhead_ms = sum(c.signal_ms for c in run.calls)
            return run
        decide = 0.0
        t0 = time.perf_counter()
        policy = self.policy_for(overrides.lam)
        assert policy is not None
        n = len(self.nodes)
        extracted: list[str | None] = [None] * n
        confidence: list[float | None] = [None] * n
        explored: list[int] = []
        step: Step = policy.first(policy.root_state(_prompt_text(messages)))
        decide += time.perf_counter() - t0
        spent = 0.0
        while True:
            k = step.next_node
            if k is None and not any(c.result.ok for c in run.calls):
                last = explored[-1] if explored else -1  # nothing answered: next allowed node
                k = next(
                    (j for j in range(n) if j not in explored and (last, j) in self._allowed),
                    None,
                )
                if k is None:
                    run.reason = "every node failed"
                    break
            if k is None:
                run.reason = "policy stopped"
                break
            if overrides.max_cost_usd is not None and spent + self.node_cost[k] > (
                overrides.max_cost_usd
            ):
                run.reason = f"max_cost_usd: {self.nodes[k]} would exceed the cap"
                break
            if run.calls:
                run.calls[-1].decision = f"continue:{self.nodes[k]}"
            call = await self._call(k, self.nodes[k], messages, params)
            t0 = time.perf_counter()
            run.calls.append(call)
            spent += call.result.cost_usd if call.result.cost_usd is not None else self.node_cost[k]
            explored.append(k)
            extracted[k], confidence[k] = call.extracted, call.confidence
            step = policy.step(explored, extracted, confidence)
            call.p_correct = step.p_correct
            decide += time.perf_counter() - t0
        run.answer = self._answer(run, step)
        run.overhead_ms = decide * 1000.0 + sum(c.signal_ms for c in run.calls)
        return run

    async def _run_threshold(
        self,
        run: CascadeRun,
        setting: dict,
        messages: list[dict],
        params: dict,
        overrides: Overrides,
    ) -> None:
        """Confidence-threshold cascade without recall: stop at the first model whose raw
        confidence reaches its threshold and return its answer (bench's `threshold`)."""
        chain, thresholds = setting["chain"], setting["thresholds"]
        spent = 0.0
        for i, model in enumerate(chain):
            expected = self._expected_cost.get(model, 0.0)
            cap = overrides.max_cost_usd
            if cap is not None and spent + expected > cap and run.calls:
                run.reason = f"max_cost_usd: {model} would exceed the cap"
                break
            if run.calls:
                run.calls[-1].decision = f"continue:{model}"
            call = await self._call(i, model, messages, params)
            run.calls.append(call)
            spent += call.result.cost_usd if call.result.cost_usd is not None else expected
            if not call.result.ok:
                continue
            limit = "always" if i == len(chain) - 1 else thresholds[i]
            conf = -math.inf if call.confidence is None else call.confidence
            if limit == "always" or (limit != "never" and conf >= limit):
                run.answer, run.reason = call, f"threshold: confident enough at {model}"
                return
        answered = [c for c in run.calls if c.result.ok]
        run.answer = answered[-1] if answered else None
        run.reason = run.reason or "threshold: the last model that answered"

    async def _run_agreement(
        self, run: CascadeRun, setting: dict, messages: list[dict], params: dict
    ) -> None:
        """Cascade of Ensembles: call each tier's models in parallel; stop when the majority's
        vote fraction reaches theta (bench's `agreement`); answer with the majority."""
        tiers, theta = setting["tiers"], float(setting["theta"])
        for t, tier in enumerate(tiers):
            calls = await asyncio.gather(
                *(self._call(k, model, messages, params) for k, model in enumerate(tier))
            )
            if run.calls:
                run.calls[-1].decision = f"continue:{','.join(tier)}"
            run.calls.extend(calls)
            votes: dict[str, list[NodeCall]] = {}
            for call in calls:  # tier order is cheapest first: the last voter is the priciest
                if call.result.ok and call.extracted is not None:
                    votes.setdefault(call.extracted, []).append(call)
            last = t == len(tiers) - 1
            if votes:
                top = max(votes, key=lambda a: (len(votes[a]), tier.index(votes[a][-1].model)))
                if len(votes[top]) / len(tier) >= theta - 1e-9 or last:
                    run.answer = votes[top][-1]
                    run.reason = f"agreement: {len(votes[top])} of {len(tier)} agree"
                    return
        answered = [c for c in run.calls if c.result.ok]
        run.answer = answered[-1] if answered else None
        run.reason = "agreement: no majority; the last model that answered"

    def _answer(self, run: CascadeRun, step: Step) -> NodeCall | None:
        """The policy's recalled answer if that call answered, else the last that did."""
        answered = [c for c in run.calls if c.result.ok]
        if not answered:
            return None
        if step.answer_node is not None:
            chosen = next((c for c in answered if c.node == step.answer_node), None)
            if chosen is not None:
                return chosen
        return answered[-1]

    async def _call(self, node: int, model: str, messages: list[dict], params: dict) -> NodeCall:
        result = await self.backends[model].complete(messages, params)
        t0 = time.perf_counter()
        extracted = confidence = None
        if result.ok:
            extracted = extract_answer(result.text, self.kind)
            confidence = result.confidence
            if confidence is None:
                confidence = answer_confidence(result.text, result.token_logprobs, self.kind)
        signal_ms = (time.perf_counter() - t0) * 1000.0
        return NodeCall(node, model, result, extracted, confidence, signal_ms=signal_ms)


def _start_or(nodes: list[str], i: int) -> str:
    return START if i < 0 else nodes[i]


def _prompt_text(messages: list[dict]) -> str:
    return "\n".join(str(m.get("content") or "") for m in messages)
