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
import time
from dataclasses import dataclass, field

from policies.answers import extract_answer
from policies.artifact import AgreementSetting, ArtifactError, PolicyArtifact
from policies.errors import InvalidInput
from policies.freetext import prompt_text, token_logprobs_summary, word_count
from policies.policy import CascadePolicy
from policies.rules import AgreementPolicy, SinglePolicy, ThresholdPolicy
from policies.sampling import Vote, is_sampled, parse_sampled, sampled_name, vote
from policies.signals import answer_confidence
from policies.tiers import tier_members, tier_vote
from policies.transitions import START, TransitionSpec, allowed_edges, taken_edges
from policies.walk import Rule, Walk
from upstreams.base import Backend, CallResult

POLICIES = ("index", "threshold", "agreement", "single")
EXPLORE = "explore"  # the decision of a call made only for the explored trace
EXPLORE_SAMPLES = "explore:samples"  # ... one that samples a sampled node's model further


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
    vote: Vote | None = None  # a sampled node (`model@k`): the vote of its samples
    samples: int | None = None  # a sampled node's k (also set on each of its parallel calls)
    sample_answers: list[str | None] | None = None  # a sampled node's extracted answers
    # mean, min, q05, q25 of the answer's token logprobs (policies/freetext.py); None when
    # the upstream returned none (read by free-text calibrators, policies/textcal.py)
    logprob_summary: tuple[float, float, float, float] | None = None

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
    # exploration: a sampled node's model -> the further answers sampled for its trace row
    explore_samples: dict[str, list[str | None]] = field(default_factory=dict)

    @property
    def model_calls(self) -> list[NodeCall]:
        """Every upstream call, a tier's members one by one (what the ledger records)."""
        return [m for c in self.calls for m in c.model_calls()]

    @property
    def cost_usd(self) -> float | None:
        costs = [c.result.cost_usd for c in self.calls]
        return None if any(c is None for c in costs) else float(sum(costs))

    def reference_cost(self, price: tuple[float, float] | None) -> float | None:
        """What the reference model would have cost for this request, priced per token
        (`price`: USD per token in, out): the prompt (the largest prompt count of the calls)
        and the answer's length. None without a price or an answer."""
        if price is None or self.answer is None:
            return None
        prompt_tokens = max((c.result.tokens_in or 0 for c in self.model_calls), default=0)
        return prompt_tokens * price[0] + (self.answer.result.tokens_out or 0) * price[1]

    @property
    def tokens(self) -> tuple[int, int]:
        return (
            sum(c.result.tokens_in or 0 for c in self.calls),
            sum(c.result.tokens_out or 0 for c in self.calls),
        )


@dataclass(frozen=True)
class Plan:
    """A decision rule with the models behind its nodes and their expected costs: what the
    engine walks for one request (policies/walk.py)."""

    rule: Rule
    names: list[str]
    node_cost: list[float | None]
    allowed: set[tuple[int, int]] | None = None  # the config's transitions (index only)
    node_ids: list[int] | None = None  # the node numbers the ledger records (default: k)


@dataclass(frozen=True)
class CappedPlan:
    """A plan as a capped request's worst case reads it (CascadeEngine.capped_plan)."""

    calls: list[list[tuple[str, int]]]  # by node: its upstream calls, as (model, choices)
    expected: list[float]  # by node: the expected cost the walk checks (unknown: 0)
    steps: list[tuple[int, ...]]  # the node groups one step of the walk can call at once


@dataclass
class LoadedPolicy:
    """Everything one policy artifact decides, swapped as a whole on reload so that a
    request in flight finishes with the policy it started with."""

    nodes: list[str]
    node_cost: list[float | None]
    kind: str = "text"
    policy: CascadePolicy | None = None
    policy_hash: str | None = None
    artifact: PolicyArtifact | None = None
    allowed: set[tuple[int, int]] = field(default_factory=set)  # by node index, start = -1
    expected_cost: dict[str, float] = field(default_factory=dict)
    by_lambda: dict[float, CascadePolicy] = field(default_factory=dict)
    plans: dict[tuple[str, float], Plan] = field(default_factory=dict)

    def policy_for(self, lam: float | None) -> CascadePolicy | None:
        """The policy for a per-request lambda (the artifact's nearest swept setting)."""
        if lam is None or self.policy is None or self.artifact is None:
            return self.policy
        key = self.artifact.nearest_lambda(lam)
        if key not in self.by_lambda:
            self.by_lambda[key] = self.artifact.policy(key)
        return self.by_lambda[key]

    def plan(self, policy: str, lam: float | None, reference: str) -> Plan | None:
        """The rule a request's `cascade.policy` asks for (None: the artifact holds no such
        baseline setting); built once per setting and kept."""
        if self.policy is None or self.artifact is None or policy == "single":
            cost = self.expected_cost.get(reference)
            return Plan(SinglePolicy(), [reference], [cost], node_ids=[len(self.nodes)])
        if policy == "index":
            rule = self.policy_for(lam)
            assert rule is not None
            return Plan(rule, self.nodes, self.node_cost, self.allowed)
        setting = self.artifact.baseline(policy, lam)
        if setting is None:
            return None
        key = (policy, setting.lam)
        if key not in self.plans:
            if isinstance(setting, AgreementSetting):
                chain = [m for tier in setting.tiers for m in tier]
                rule: Rule = AgreementPolicy([len(t) for t in setting.tiers], setting.theta)
            else:
                chain = list(setting.chain)
                rule = ThresholdPolicy(chain, setting.thresholds)
            costs = [self.expected_cost.get(m, 0.0) for m in chain]
            self.plans[key] = Plan(rule, chain, costs)
        return self.plans[key]


class CascadeEngine:
    """One configured cascade over live backends."""

    def __init__(
        self,
        name: str,
        nodes: list[str],
        backends: dict[str, Backend],
        reference: str,
        artifact: PolicyArtifact | None = None,
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

    def load(self, artifact: PolicyArtifact) -> None:
        """Adopt a policy artifact (at start or on reload): checked in full first, then
        swapped in one assignment."""
        self.current = self.prepare(artifact)

    def prepare(self, artifact: PolicyArtifact) -> LoadedPolicy:
        """Check an artifact against this cascade (its nodes and baselines must be configured
        models, its transitions allowed) and build what `load` swaps in; ArtifactError if
        not."""
        names = artifact.models
        missing = [m for m in _models_of(names) if m not in self.backends]
        if missing:
            raise ArtifactError(
                f"cascade {self.name}: the policy's node(s) {missing} are not configured models "
                f"(have {sorted(self.backends)})"
            )
        self._check_sampled(names)
        self._check_transitions(artifact, names)
        for kind, settings in (
            ("threshold", artifact.threshold),
            ("agreement", artifact.agreement),
        ):
            for setting in settings:
                used = (
                    [m for tier in setting.tiers for m in tier]
                    if isinstance(setting, AgreementSetting)
                    else setting.chain
                )
                missing = sorted(set(_models_of(used)) - set(self.backends))
                if missing:
                    raise ArtifactError(
                        f"cascade {self.name}: the policy's {kind} baseline uses model(s) "
                        f"{missing} that are not configured"
                    )
        expected_cost = {n.model: n.cost_usd for n in artifact.nodes}
        if artifact.reference_model is not None and artifact.reference_cost_usd is not None:
            expected_cost.setdefault(artifact.reference_model, artifact.reference_cost_usd)
        return LoadedPolicy(
            nodes=names,
            node_cost=[n.cost_usd for n in artifact.nodes],
            kind=artifact.answer_kind or "text",
            policy=artifact.policy(),
            policy_hash=artifact.hash,
            artifact=artifact,
            allowed={
                (i, j)
                for i in range(-1, len(names))
                for j in range(len(names))
                if (_start_or(names, i), names[j]) in self._allowed_names
            },
            expected_cost=expected_cost,
        )

    def _check_sampled(self, names: list[str]) -> None:
        """Refuse a policy whose sampled nodes (`model@k`) are not the config's: a node the
        config does not sample, or the config sampling a node the policy was not fitted on."""
        fitted = {n for n in names if is_sampled(n)}
        configured = {n for n in self.config_nodes if is_sampled(n)}
        problems = []
        if fitted - configured:
            problems.append(
                f"the policy artifact has sampled node(s) {sorted(fitted - configured)} that "
                f"the config's nodes {self.config_nodes} do not name"
            )
        if configured - fitted:
            problems.append(
                f"the config names sampled node(s) {sorted(configured - fitted)} that the "
                f"policy artifact was not fitted with (its nodes: {names})"
            )
        if problems:
            raise ArtifactError(
                f"cascade {self.name}: {'; '.join(problems)}; refit with `cascade fit "
                "--samples ...` matching the config's nodes"
            )

    def _check_transitions(self, artifact: PolicyArtifact, names: list[str]) -> None:
        """Refuse a policy that can take a transition the cascade's config forbids."""
        tables = artifact.decision_tables()
        taken = {(_start_or(names, i), names[j]) for t in tables for i, j in taken_edges(t)}
        forbidden = sorted(taken - self._allowed_names)
        if forbidden:
            shown = ", ".join(f"{a}>{b}" for a, b in forbidden)
            raise ArtifactError(
                f"cascade {self.name}: the policy artifact can take transition(s) {shown}, "
                f"which `transitions: {self.transitions}` forbids; refit it with `cascade fit "
                "--transitions ...` matching the config"
            )

    def snapshot(self, loaded: LoadedPolicy | None = None) -> LoadedPolicy:
        """The policy a request runs with: the snapshot admission priced, else the current
        one (read once, so a reload mid-request changes nothing for it)."""
        return loaded if loaded is not None else self.current

    def new_run(self, loaded: LoadedPolicy | None = None) -> CascadeRun:
        cur = self.snapshot(loaded)
        return CascadeRun(cascade=self.name, policy_hash=cur.policy_hash)

    def explore_models(self, loaded: LoadedPolicy | None = None) -> list[str]:
        """Every model an explored request calls: the policy's nodes (of `loaded`, default
        the current policy), the configured nodes and the reference model (the one
        unlabelled traffic is graded against)."""
        cur = self.snapshot(loaded)
        names = [*cur.nodes, *self.config_nodes, self.reference]
        return list(dict.fromkeys(_models_of(names)))

    def explore_samples(self, loaded: LoadedPolicy | None = None) -> dict[str, int]:
        """How many further answers an explored request samples from each sampled node's
        model (the largest k - 1 of its `MODEL@k` nodes), so that its trace row carries the
        `samples` that `fit --samples k` votes over with the recorded answer."""
        cur = self.snapshot(loaded)
        counts: dict[str, int] = {}
        for name in [*cur.nodes, *self.config_nodes]:
            sampled = parse_sampled(name)
            if sampled is not None:
                model, k = sampled
                counts[model] = max(counts.get(model, 0), k - 1)
        return counts

    def most_calls(
        self,
        policy: str = "index",
        lam: float | None = None,
        explore: bool = False,
        loaded: LoadedPolicy | None = None,
    ) -> list[tuple[str, int]]:
        """Every upstream call one request can make, as (model, choices it asks with `n`):
        what a budget's worst case prices (proxy/http/keys.py), read off what `run` and
        `_Caller` do, so that the bound holds by construction.

        The walk calls each node of the request's plan at most once, so the longest walk
        calls all of them: a tier's members once each, a sampled node `model@k` once with
        `n: k` or k times (its model's `sampling`). An explored request (`explore`: index
        policy, a loaded policy, no cost cap) first calls every model of `explore_models`
        once, and those results serve the walk's first call of each model (a second call of
        the same model, as a tier member and alone or as a parallel sample, is a new call),
        then samples each sampled node's model `explore_samples` times more.

        `loaded` is the policy snapshot the request will run with (default: the current
        one): admission prices it and passes the same snapshot to `run`, so that a reload
        in between cannot make the request walk a plan that was not priced."""
        cur = self.snapshot(loaded)
        plan = cur.plan(policy, lam, self.reference)
        names = plan.names if plan is not None else []  # no such baseline: refused, no call
        explore = explore and cur.policy is not None and policy == "index"
        prefetched = self.explore_models(cur) if explore else []
        calls = [(m, 1) for m in prefetched]
        unused = set(prefetched)
        for name in names:
            for model, choices in self.node_calls(name):
                if choices == 1 and model in unused:
                    unused.discard(model)  # its prefetched call serves it
                else:
                    calls.append((model, choices))
        if explore:
            for model, count in self.explore_samples(cur).items():
                if _samples_by_n(self.backends[model]) and count > 1:
                    calls.append((model, count))
                else:
                    calls.extend([(model, 1)] * count)
        return calls

    def node_calls(self, name: str) -> list[tuple[str, int]]:
        """The upstream calls one node of a plan makes, as (model, choices): a tier's
        members once each, a sampled node `model@k` once with `n: k` or k times (its
        model's `sampling`), any other node once."""
        sampled = parse_sampled(name)
        if sampled is not None and _samples_by_n(self.backends[sampled[0]]):
            return [sampled]
        models = [sampled[0]] * sampled[1] if sampled else tier_members(name) or [name]
        return [(model, 1) for model in models]

    def capped_plan(
        self, policy: str = "index", lam: float | None = None, loaded: LoadedPolicy | None = None
    ) -> CappedPlan | None:
        """What a request under `cascade.max_cost_usd` can call, for its worst case
        (proxy/http/keys.py `capped_worst_case`): each node's calls and the expected cost the
        walk checks against the cap, and the node groups the walk can call at once. None:
        the policy holds no such baseline (refused before any call). A capped request is
        never explored (`run`), so no explored call is listed."""
        cur = self.snapshot(loaded)
        plan = cur.plan(policy, lam, self.reference)
        if plan is None:
            return None
        n = len(plan.names)
        steps: list[tuple[int, ...]] = [(k,) for k in range(n)]  # the fallback calls any alone
        if isinstance(plan.rule, AgreementPolicy):
            steps += [tier for tier in plan.rule.tiers if len(tier) > 1]
        return CappedPlan(
            calls=[self.node_calls(name) for name in plan.names],
            expected=[c or 0.0 for c in plan.node_cost],  # as the walk counts an unknown one
            steps=steps,
        )

    async def run(
        self,
        messages: list[dict],
        params: dict,
        overrides: Overrides,
        run: CascadeRun | None = None,
        explore: bool = False,
        loaded: LoadedPolicy | None = None,
    ) -> CascadeRun:
        """Answer one request. Pass `run` (from new_run) to keep what was done so far even
        if this coroutine is cancelled (a client that hung up is still ledgered).

        With `explore`, every model of `explore_models` is called at once; the policy walks
        over those results as if it had made only its own calls, its answer is returned,
        and the other calls are appended with decision "explore" (a full-information trace
        for refitting; never under a cost cap or a baseline override), then the further
        samples of each sampled node's model ("explore:samples") the trace row records.

        `loaded`: the policy snapshot admission priced the request's worst case with (see
        `most_calls`); default, the current one. Either way a reload mid-request does not
        change this request's policy."""
        cur = self.snapshot(loaded)
        run = run if run is not None else self.new_run(cur)
        run.policy_hash = cur.policy_hash
        explore = explore and cur.policy is not None and overrides.policy == "index"
        caller = _Caller(self.backends, cur.kind, messages, params)
        if explore and overrides.max_cost_usd is None:
            caller.prefetch(self.explore_models(cur))
            caller.prefetch_samples(self.explore_samples(cur))
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
        plan = cur.plan(overrides.policy, overrides.lam, self.reference)
        if plan is None:
            raise OverrideError(
                f"the policy artifact of cascade {self.name} holds no {overrides.policy} "
                "setting: refit it with this version of `cascade fit`",
                "cascade.policy",
            )
        await _walk(plan, caller, run, messages, overrides.max_cost_usd)


async def _walk(
    plan: Plan,
    caller: _Caller,
    run: CascadeRun,
    messages: list[dict],
    max_cost_usd: float | None,
) -> None:
    """Walk any rule (policies/walk.py): call the node(s) it names, read their signals,
    until it stops or the cap binds; answer with the node the walk chooses."""
    t0 = time.perf_counter()
    rule, names = plan.rule, plan.names
    ids = plan.node_ids or range(len(names))
    prompt = prompt_text(messages)  # the traces' TraceSet.prompt: one definition
    root = rule.root_state(prompt)
    prompt_words = word_count(prompt)  # read by free-text calibrators (policies/textcal.py)
    walk = Walk(rule, plan.node_cost, max_cost_usd, root, plan.allowed, names)
    by_node: dict[int, NodeCall] = {}
    decide = time.perf_counter() - t0
    while calls := walk.next_calls():
        if run.calls:
            run.calls[-1].decision = "continue:" + ",".join(names[k] for k in calls)
        if len(calls) == 1:
            made = [await caller.call(ids[calls[0]], names[calls[0]])]
        else:
            made = list(await asyncio.gather(*(caller.call(ids[k], names[k]) for k in calls)))
        t0 = time.perf_counter()
        run.calls.extend(made)
        for k, call in zip(calls, made, strict=True):
            by_node[k] = call
            result = call.result
            conf = rule.signal(
                k,
                call.confidence,
                result.tokens_out,
                result.text,
                prompt_words,
                result.finish_reason,
                call.logprob_summary,
            )
            # graded rules: the answer's agreement with those seen (a signal of the call)
            t_agree = time.perf_counter()
            agree = walk.agreement(k, result.text if result.ok else None)
            t_agree = time.perf_counter() - t_agree
            call.signal_ms += t_agree * 1000.0
            decide -= t_agree
            walk.record(k, result.ok, call.extracted, conf, result.cost_usd, agree)
        step = walk.decide()
        for call in made:
            call.p_correct = step.p_correct
        decide += time.perf_counter() - t0
    run.reason = walk.reason
    chosen = walk.answer()
    run.answer = None if chosen is None else _credited(by_node[chosen])
    run.overhead_ms = decide * 1000.0 + sum(c.signal_ms for c in run.calls)


def _credited(call: NodeCall) -> NodeCall:
    """The call whose model is credited with the answer: for a tier node, the member whose
    answer the tier gives."""
    if call.members and call.vote is not None:  # k parallel samples: the voted one
        return call.members[call.vote.index]
    if call.members:
        return next(m for m in call.members if m.model == call.result.served_model)
    return call


class _Caller:
    """Makes one request's upstream calls and reads their signals; when exploring, every
    model's call is started up front and the policy's calls take those results."""

    def __init__(
        self, backends: dict[str, Backend], kind: str, messages: list[dict], params: dict
    ) -> None:
        self.backends, self.kind, self.messages, self.params = backends, kind, messages, params
        self.prefetched: dict[str, asyncio.Task[CallResult]] = {}
        self.used: set[str] = set()
        # exploration: a model's further samples, as their calls and their answers
        self.sampling: dict[str, asyncio.Task[tuple[list[NodeCall], list[str | None]]]] = {}

    def prefetch(self, models: list[str]) -> None:
        self.prefetched = {
            m: asyncio.ensure_future(self.backends[m].complete(self.messages, self.params))
            for m in models
        }

    def prefetch_samples(self, counts: dict[str, int]) -> None:
        """Start sampling each model of `counts` that many more times (for the trace)."""
        self.sampling = {
            m: asyncio.ensure_future(self._samples(m, count)) for m, count in counts.items()
        }

    async def _samples(self, model: str, count: int) -> tuple[list[NodeCall], list[str | None]]:
        """`count` further answers of `model`: one call with `n: count`, or `count` parallel
        calls (the model's `sampling`, as a sampled node gets its k), and the calls made."""
        backend = self.backends[model]
        by_n = _samples_by_n(backend)
        if by_n and count > 1:
            result = await backend.complete(self.messages, {**self.params, "n": count})
            choices = result.extra.get("choices") or []
            texts = [c["message"]["content"] for c in choices[:count]] if result.ok else []
            texts = texts or ([result.text] if result.ok else [])
            calls = [NodeCall(0, sampled_name(model, count), result, None, None, samples=count)]
        else:
            one = [backend.complete(self.messages, self.params) for _ in range(count)]
            results = list(await asyncio.gather(*one))
            texts = [r.text if r.ok else None for r in results]
            calls = [NodeCall(0, model, r, None, None) for r in results]
        for c in calls:
            c.decision = EXPLORE_SAMPLES
        return calls, (texts + [None] * count)[:count]

    async def call(self, node: int, model: str) -> NodeCall:
        members = tier_members(model)
        if members is not None:
            return await self._call_tier(node, model, members)
        sampled = parse_sampled(model)
        if sampled is not None:
            return await self._call_sampled(node, model, *sampled)
        # a model's prefetched call serves it once; a second use (a model that is also in a
        # tier) calls again, as without exploration, so no call is counted twice
        task = None if model in self.used else self.prefetched.get(model)
        if task is not None:
            self.used.add(model)
            result = await asyncio.shield(task)
        else:
            result = await self.backends[model].complete(self.messages, self.params)
        t0 = time.perf_counter()
        extracted = confidence = summary = None
        if result.ok:
            extracted = extract_answer(result.text, self.kind)
            confidence = result.confidence
            if confidence is None:
                confidence = answer_confidence(result.text, result.token_logprobs, self.kind)
            summary = result.logprob_summary  # recorded (replay), else from the logprobs
            if summary is None:
                summary = token_logprobs_summary(result.token_logprobs)
        signal_ms = (time.perf_counter() - t0) * 1000.0
        return NodeCall(
            node,
            model,
            result,
            extracted,
            confidence,
            signal_ms=signal_ms,
            logprob_summary=summary,
        )

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

    async def _call_sampled(self, node: int, name: str, model: str, k: int) -> NodeCall:
        """A sampled node: k samples of `model`, from one call with `n: k` or from k parallel
        calls (the model's `sampling`), answered by their vote (policies/sampling.py)."""
        backend = self.backends[model]
        by_n = _samples_by_n(backend)
        members: list[NodeCall] = []
        if by_n:
            result = await backend.complete(self.messages, {**self.params, "n": k})
            t0 = time.perf_counter()
            choices = result.extra.get("choices") or ([] if result.text is None else [None])
            texts = [
                result.text if c is None else c["message"]["content"] for c in choices[:k]
            ] if result.ok else []  # fmt: skip
        else:
            members = list(await asyncio.gather(*(self.call(node, model) for _ in range(k))))
            t0 = time.perf_counter()
            texts = [c.result.text if c.result.ok else None for c in members]
            costs = [c.result.cost_usd for c in members]
            first = members[0].result
            result = CallResult(
                model=model,
                text=first.text,
                tokens_in=sum(c.result.tokens_in or 0 for c in members),
                tokens_out=sum(c.result.tokens_out or 0 for c in members),
                cost_usd=None if any(c is None for c in costs) else float(sum(costs)),
                latency_ms=max(c.result.latency_ms for c in members),
                attempts=sum(c.result.attempts for c in members),
                status=first.status,
                served_model=first.served_model,
            )
        texts += [None] * (k - len(texts))  # samples the upstream did not return: no vote
        forms = [None if t is None else extract_answer(t, self.kind) for t in texts]
        v = vote(forms, self.kind)
        if v is None:
            if result.ok or members:
                result.error = "no_samples"
                result.error_detail = result.error_detail or f"no sample of {name} answered"
            extracted = None
        else:
            result.text = texts[v.index]
            result.error = None
            extracted = forms[v.index]
        for i, c in enumerate(members):
            c.decision, c.samples, c.vote = f"member:{name}", k, v
            c.extracted = forms[i]
        signal_ms = (time.perf_counter() - t0) * 1000.0 + sum(c.signal_ms for c in members)
        call = NodeCall(
            node,
            name,
            result,
            extracted,
            None if v is None else v.confidence,
            signal_ms=signal_ms,
            members=members,
            vote=v,
            samples=k,
            sample_answers=forms,
        )
        return call

    async def rest(self, run: CascadeRun, nodes: list[str], reference: str) -> None:
        """The prefetched calls the policy did not make, appended as "explore" calls, then
        the sampled models' further samples ("explore:samples"), kept for the trace row."""
        run.explored_all = True
        for model, _ in list(self.prefetched.items()):
            if model in self.used:
                continue
            node = nodes.index(model) if model in nodes else len(nodes)
            call = await self.call(node, model)
            call.decision = EXPLORE
            run.calls.append(call)
        for model, task in self.sampling.items():
            calls, texts = await asyncio.shield(task)
            node = next((i for i, n in enumerate(nodes) if _sampled_model(n) == model), None)
            for c in calls:
                c.node = len(nodes) if node is None else node
            run.calls.extend(calls)
            run.explore_samples[model] = texts

    def cancel(self) -> None:
        for task in [*self.prefetched.values(), *self.sampling.values()]:
            task.cancel()


def _samples_by_n(backend: Backend) -> bool:
    """True when a model's samples come from one call with `n: k` (its config's `sampling`,
    the default), False when from k parallel calls."""
    return getattr(getattr(backend, "cfg", None), "sampling", "n") == "n"


def _models_of(names: list[str]) -> list[str]:
    """The models behind node names: a tier's members, a sampled node's model, or the model
    itself."""
    out = []
    for name in names:
        sampled = parse_sampled(name)
        out.extend(tier_members(name) or [sampled[0] if sampled else name])
    return out


def _sampled_model(name: str) -> str | None:
    """The model a sampled node (`MODEL@k`) samples; None for any other node."""
    sampled = parse_sampled(name)
    return sampled[0] if sampled else None


def _start_or(nodes: list[str], i: int) -> str:
    return START if i < 0 else nodes[i]
