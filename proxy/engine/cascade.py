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
import time
from dataclasses import dataclass, field

from policies.answers import extract_answer
from policies.artifact import ArtifactError
from policies.errors import InvalidInput
from policies.freetext import word_count
from policies.policy import CascadePolicy, Step, nearest_lambda, policy_from_artifact
from policies.signals import answer_confidence
from policies.tiers import tier_members, tier_vote
from policies.transitions import START, TransitionSpec, allowed_edges, taken_edges
from upstreams.base import Backend, CallResult

POLICIES = ("index", "threshold", "agreement", "single")


class OverrideError(InvalidInput):
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
    members: list[NodeCall] = field(default_factory=list)  # a tier node: its models' calls

    def model_calls(self) -> list[NodeCall]:
        """The upstream calls behind this node: itself, or a tier's members."""
        return self.members or [self]


@dataclass
class CascadeRun:
    """What the engine did for one request."""

    cascade: str
    calls: list[NodeCall] = field(default_factory=list)
    answer: NodeCall | None = None
    reason: str = ""
    policy_hash: str | None = None
    explored_all: bool = False  # every model was called (exploration): a trace can be written
    overhead_ms: float = 0.0  # time spent deciding, not waiting for upstreams

    @property
    def model_calls(self) -> list[NodeCall]:
        """Every upstream call, a tier's members one by one (what the ledger records)."""
        return [m for c in self.calls for m in c.model_calls()]

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


@dataclass
class LoadedPolicy:
    """Everything one policy artifact decides, swapped as a whole on reload so that a
    request in flight finishes with the policy it started with."""

    nodes: list[str]
    node_cost: list[float | None]
    kind: str = "text"
    policy: CascadePolicy | None = None
    policy_hash: str | None = None
    artifact: dict | None = None
    allowed: set[tuple[int, int]] = field(default_factory=set)  # by node index, start = -1
    expected_cost: dict[str, float] = field(default_factory=dict)
    by_lambda: dict[float, CascadePolicy] = field(default_factory=dict)

    def policy_for(self, lam: float | None) -> CascadePolicy | None:
        """The policy for a per-request lambda (the artifact's nearest swept setting)."""
        if lam is None or self.policy is None or self.artifact is None:
            return self.policy
        key = nearest_lambda(self.artifact, lam)
        if key not in self.by_lambda:
            self.by_lambda[key] = policy_from_artifact(self.artifact, key)
        return self.by_lambda[key]

    def baseline(self, kind: str, lam: float | None) -> dict | None:
        """The artifact's `kind` baseline setting for the lambda nearest `lam` (default: the
        artifact's own), or None when the artifact has none."""
        settings = ((self.artifact or {}).get("baselines") or {}).get(kind) or []
        if not settings:
            return None
        assert self.artifact is not None
        target = self.artifact["lambda"] if lam is None else lam
        return min(settings, key=lambda e: (abs(e["lambda"] - target), -e["lambda"]))


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
        self.config_nodes = list(nodes)
        names = allowed_edges(transitions, nodes)
        self._allowed_names = {(_start_or(nodes, i), nodes[j]) for i, j in names}
        self.backends = backends
        self.reference = reference
        self.current = LoadedPolicy(nodes=list(nodes), node_cost=[None] * len(nodes))
        if artifact is not None:
            self.load(artifact)

    # what the loaded policy says, for readers outside a request (health, tests)
    nodes = property(lambda self: self.current.nodes)
    node_cost = property(lambda self: self.current.node_cost)
    kind = property(lambda self: self.current.kind)
    policy = property(lambda self: self.current.policy)
    policy_hash = property(lambda self: self.current.policy_hash)

    def load(self, artifact: dict) -> None:
        """Adopt a policy artifact (at start or on reload): checked in full first, then
        swapped in one assignment."""
        self.current = self.prepare(artifact)

    def prepare(self, artifact: dict) -> LoadedPolicy:
        """Check an artifact against this cascade (its nodes and baselines must be configured
        models, its transitions allowed) and build what `load` swaps in; ValueError if not."""
        names = [n["model"] for n in artifact["nodes"]]
        missing = [m for m in _models_of(names) if m not in self.backends]
        if missing:
            raise ArtifactError(
                f"cascade {self.name}: the policy's node(s) {missing} are not configured models "
                f"(have {sorted(self.backends)})"
            )
        self._check_transitions(artifact, names)
        for kind, settings in (artifact.get("baselines") or {}).items():
            for setting in settings:
                used = setting.get("chain") or [m for tier in setting["tiers"] for m in tier]
                missing = sorted(set(used) - set(self.backends))
                if missing:
                    raise ArtifactError(
                        f"cascade {self.name}: the policy's {kind} baseline uses model(s) "
                        f"{missing} that are not configured"
                    )
        return LoadedPolicy(
            nodes=names,
            node_cost=[float(n["cost_usd"]) for n in artifact["nodes"]],
            kind=artifact.get("answer_kind") or "text",
            policy=policy_from_artifact(artifact),
            policy_hash=artifact["hash"],
            artifact=artifact,
            allowed={
                (i, j)
                for i in range(-1, len(names))
                for j in range(len(names))
                if (_start_or(names, i), names[j]) in self._allowed_names
            },
            expected_cost={n["model"]: float(n["cost_usd"]) for n in artifact["nodes"]},
        )

    def _check_transitions(self, artifact: dict, names: list[str]) -> None:
        """Refuse a policy that can take a transition the cascade's config forbids."""
        tables = [artifact["tables"]["decision"]]
        tables += [entry["decision"] for entry in artifact.get("sweep") or []]
        taken = {(_start_or(names, i), names[j]) for t in tables for i, j in taken_edges(t)}
        forbidden = sorted(taken - self._allowed_names)
        if forbidden:
            shown = ", ".join(f"{a}>{b}" for a, b in forbidden)
            raise ArtifactError(
                f"cascade {self.name}: the policy artifact can take transition(s) {shown}, "
                f"which `transitions: {self.transitions}` forbids; refit it with `cascade fit "
                "--transitions ...` matching the config"
            )

    def new_run(self) -> CascadeRun:
        return CascadeRun(cascade=self.name, policy_hash=self.policy_hash)

    def explore_models(self) -> list[str]:
        """Every model an explored request calls: the policy's nodes, the configured nodes
        and the reference model (the one unlabelled traffic is graded against)."""
        names = [*self.current.nodes, *self.config_nodes, self.reference]
        return list(dict.fromkeys(_models_of(names)))

    async def run(
        self,
        messages: list[dict],
        params: dict,
        overrides: Overrides,
        run: CascadeRun | None = None,
        explore: bool = False,
    ) -> CascadeRun:
        """Answer one request. Pass `run` (from new_run) to keep what was done so far even
        if this coroutine is cancelled (a client that hung up is still ledgered).

        With `explore`, every model of `explore_models` is called at once; the policy walks
        over those results as if it had made only its own calls, its answer is returned,
        and the other calls are appended with decision "explore" (a full-information trace
        for refitting; never under a cost cap or a baseline override)."""
        cur = self.current  # a reload mid-request does not change this request's policy
        run = run if run is not None else self.new_run()
        run.policy_hash = cur.policy_hash
        explore = explore and cur.policy is not None and overrides.policy == "index"
        caller = _Caller(self.backends, cur.kind, messages, params)
        if explore and overrides.max_cost_usd is None:
            caller.prefetch(self.explore_models())
        try:
            await self._dispatch(cur, caller, run, messages, overrides)
            if caller.prefetched:
                await caller.rest(run, cur.nodes, self.reference)
        finally:
            caller.cancel()
        return run

    async def _dispatch(
        self,
        cur: LoadedPolicy,
        caller: _Caller,
        run: CascadeRun,
        messages: list[dict],
        overrides: Overrides,
    ) -> None:
        if cur.policy is None or overrides.policy == "single":
            call = await caller.call(len(cur.nodes), self.reference)
            run.calls.append(call)
            run.answer = call if call.result.ok else None
            run.reason = "single: the reference model answers"
            run.overhead_ms = call.signal_ms
            return
        if overrides.policy in ("threshold", "agreement"):
            setting = cur.baseline(overrides.policy, overrides.lam)
            if setting is None:
                raise OverrideError(
                    f"the policy artifact of cascade {self.name} holds no {overrides.policy} "
                    "setting: refit it with this version of `cascade fit`",
                    "cascade.policy",
                )
            if overrides.policy == "threshold":
                await _run_threshold(cur, caller, run, setting, overrides)
            else:
                await _run_agreement(caller, run, setting)
            run.overhead_ms = sum(c.signal_ms for c in run.calls)
            return
        await _run_index(cur, caller, run, messages, overrides)


async def _run_index(
    cur: LoadedPolicy,
    caller: _Caller,
    run: CascadeRun,
    messages: list[dict],
    overrides: Overrides,
) -> None:
    """The fitted index policy: stop, or pay for the node it names, until it stops."""
    decide = 0.0
    t0 = time.perf_counter()
    policy = cur.policy_for(overrides.lam)
    assert policy is not None
    n = len(cur.nodes)
    extracted: list[str | None] = [None] * n
    confidence: list[float | None] = [None] * n
    explored: list[int] = []
    prompt = _prompt_text(messages)
    step: Step = policy.first(policy.root_state(prompt))
    prompt_words = word_count(prompt)  # read by free-text calibrators (policies/textcal.py)
    decide += time.perf_counter() - t0
    spent = 0.0
    while True:
        k = step.next_node
        if k is None and not any(c.result.ok for c in run.calls):
            last = explored[-1] if explored else -1  # nothing answered: next allowed node
            k = next((j for j in range(n) if j not in explored and (last, j) in cur.allowed), None)
            if k is None:
                run.reason = "every node failed"
                break
        if k is None:
            run.reason = "policy stopped"
            break
        cost_k = cur.node_cost[k] or 0.0
        if overrides.max_cost_usd is not None and spent + cost_k > overrides.max_cost_usd:
            run.reason = f"max_cost_usd: {cur.nodes[k]} would exceed the cap"
            break
        if run.calls:
            run.calls[-1].decision = f"continue:{cur.nodes[k]}"
        call = await caller.call(k, cur.nodes[k])
        t0 = time.perf_counter()
        run.calls.append(call)
        spent += call.result.cost_usd if call.result.cost_usd is not None else cost_k
        explored.append(k)
        extracted[k] = call.extracted
        result = call.result
        confidence[k] = policy.signal(
            k, call.confidence, result.tokens_out, result.text, prompt_words, result.finish_reason
        )
        step = policy.step(explored, extracted, confidence)
        call.p_correct = step.p_correct
        decide += time.perf_counter() - t0
    run.answer = _answer(run, step)
    run.overhead_ms = decide * 1000.0 + sum(c.signal_ms for c in run.calls)


async def _run_threshold(
    cur: LoadedPolicy,
    caller: _Caller,
    run: CascadeRun,
    setting: dict,
    overrides: Overrides,
) -> None:
    """Confidence-threshold cascade without recall: stop at the first model whose raw
    confidence reaches its threshold and return its answer (bench's `threshold`)."""
    chain, thresholds = setting["chain"], setting["thresholds"]
    spent = 0.0
    for i, model in enumerate(chain):
        expected = cur.expected_cost.get(model, 0.0)
        cap = overrides.max_cost_usd
        if cap is not None and spent + expected > cap and run.calls:
            run.reason = f"max_cost_usd: {model} would exceed the cap"
            break
        if run.calls:
            run.calls[-1].decision = f"continue:{model}"
        call = await caller.call(i, model)
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


async def _run_agreement(caller: _Caller, run: CascadeRun, setting: dict) -> None:
    """Cascade of Ensembles: call each tier's models in parallel; stop when the majority's
    vote fraction reaches theta (bench's `agreement`); answer with the majority."""
    tiers, theta = setting["tiers"], float(setting["theta"])
    for t, tier in enumerate(tiers):
        calls = await asyncio.gather(*(caller.call(k, model) for k, model in enumerate(tier)))
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


def _answer(run: CascadeRun, step: Step) -> NodeCall | None:
    """The policy's recalled answer if that call answered, else the last that did; for a
    tier node, the member whose answer the tier gives (the model that is credited)."""
    answered = [c for c in run.calls if c.result.ok]
    if not answered:
        return None
    chosen = answered[-1]
    if step.answer_node is not None:
        chosen = next((c for c in answered if c.node == step.answer_node), chosen)
    if chosen.members:
        return next(m for m in chosen.members if m.model == chosen.result.served_model)
    return chosen


class _Caller:
    """Makes one request's upstream calls and reads their signals; when exploring, every
    model's call is started up front and the policy's calls take those results."""

    def __init__(
        self, backends: dict[str, Backend], kind: str, messages: list[dict], params: dict
    ) -> None:
        self.backends, self.kind, self.messages, self.params = backends, kind, messages, params
        self.prefetched: dict[str, asyncio.Task[CallResult]] = {}
        self.used: set[str] = set()

    def prefetch(self, models: list[str]) -> None:
        self.prefetched = {
            m: asyncio.ensure_future(self.backends[m].complete(self.messages, self.params))
            for m in models
        }

    async def call(self, node: int, model: str) -> NodeCall:
        members = tier_members(model)
        if members is not None:
            return await self._call_tier(node, model, members)
        # a model's prefetched call serves it once; a second use (a model that is also in a
        # tier) calls again, as without exploration, so no call is counted twice
        task = None if model in self.used else self.prefetched.get(model)
        if task is not None:
            self.used.add(model)
            result = await asyncio.shield(task)
        else:
            result = await self.backends[model].complete(self.messages, self.params)
        t0 = time.perf_counter()
        extracted = confidence = None
        if result.ok:
            extracted = extract_answer(result.text, self.kind)
            confidence = result.confidence
            if confidence is None:
                confidence = answer_confidence(result.text, result.token_logprobs, self.kind)
        signal_ms = (time.perf_counter() - t0) * 1000.0
        return NodeCall(node, model, result, extracted, confidence, signal_ms=signal_ms)

    async def _call_tier(self, node: int, name: str, members: list[str]) -> NodeCall:
        """A tier: its models called in parallel, answered by majority (policies/tiers.py)."""
        calls = await asyncio.gather(*(self.call(node, m) for m in members))
        t0 = time.perf_counter()
        k, confidence = tier_vote([c.extracted for c in calls], [c.confidence for c in calls])
        costs = [c.result.cost_usd for c in calls]
        chosen = calls[k].result if k is not None else None
        result = CallResult(
            model=name,
            text=chosen.text if chosen else None,
            tokens_in=sum(c.result.tokens_in or 0 for c in calls),
            tokens_out=sum(c.result.tokens_out or 0 for c in calls),
            cost_usd=None if any(c is None for c in costs) else float(sum(costs)),
            latency_ms=max(c.result.latency_ms for c in calls),
            finish_reason=chosen.finish_reason if chosen else None,
            error=None if chosen else "tier_failed",
            error_detail=None if chosen else f"no model of {name} answered",
            attempts=sum(c.result.attempts for c in calls),
            served_model=calls[k].model if k is not None else None,
        )
        for c in calls:
            c.decision = f"member:{name}"
        signal_ms = (time.perf_counter() - t0) * 1000.0 + sum(c.signal_ms for c in calls)
        extracted = calls[k].extracted if k is not None else None
        return NodeCall(
            node, name, result, extracted, confidence, signal_ms=signal_ms, members=list(calls)
        )

    async def rest(self, run: CascadeRun, nodes: list[str], reference: str) -> None:
        """The prefetched calls the policy did not make, appended as "explore" calls."""
        run.explored_all = True
        for model, _ in list(self.prefetched.items()):
            if model in self.used:
                continue
            node = nodes.index(model) if model in nodes else len(nodes)
            call = await self.call(node, model)
            call.decision = "explore"
            run.calls.append(call)

    def cancel(self) -> None:
        for task in self.prefetched.values():
            task.cancel()


def _models_of(names: list[str]) -> list[str]:
    """The models behind node names: a tier's members, or the model itself."""
    return [m for name in names for m in (tier_members(name) or [name])]


def _start_or(nodes: list[str], i: int) -> str:
    return START if i < 0 else nodes[i]


def _prompt_text(messages: list[dict]) -> str:
    return "\n".join(str(m.get("content") or "") for m in messages)
