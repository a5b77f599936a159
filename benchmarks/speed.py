"""Speed of the decision core on real traces. Prints figures; asserts nothing about timings.

Measures, and prints against the targets:
  a. `cascade fit` on N queries x 5 models (default 10,000, resampled from mmlu-llama-test)
     including the lambda search: FittedIndex + choose_mu(--target-accuracy 0.97) +
     build_artifact, the path `cli/main.py fit` runs (target: under 20 s in all);
  b. one online decision, CascadePolicy.step, over real test rows and explored prefixes of
     1..5 nodes (target: under 20 us per step), and CascadePolicy.first; b2. the same
     decisions as the engine makes them, through the driver (policies/walk.py);
  c. the prompt-difficulty estimate, CascadePolicy.root_state(prompt) (target: under 10 ms);
     c2. the same with a prompt-router root (policies/router.py; fitted with root="router"
     on alpaca-fusechat-train, timed on its test prompts: P(correct | prompt) per node and
     the pick at the artifact's price);
  d. a sampled node at k = 5 (`small@5`, synthetic traces with samples: the recorded traces
     hold none): CascadePolicy.step with the vote's confidence (target: under 20 us), and
     apart from it, extracting the 5 answers and voting on them (policies/sampling.py).
  e. free-text signals on AlpacaEval answers of about 1,000 tokens (alpaca-fusechat-test):
     the answer's features (target: under 1 ms), the graded agreement of two such answers
     (target: under 2 ms), and the decision step of a policy fitted on alpaca-fusechat-train
     (text calibrators, 4 nodes, recall under graded agreement; target: under 20 us per
     step), and apart from it the agreement of each arriving answer with those seen
     (Walk.agreement, what the engine computes outside the step).

Run from the repository root:  .venv/bin/python benchmarks/speed.py [--traces DIR] [--rows N]
(`--sampled-only`: part d alone, which needs no recorded traces; `--freetext-only`: part e;
`--root-only`: part c2).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path

import common
import numpy as np

from calibration.artifact import build_artifact, choose_mu
from calibration.fit import DEFAULT_MUS, FittedIndex
from calibration.traces import TraceSet, load_traces
from policies.artifact import PolicyArtifact
from policies.freetext import (
    agreement,
    answer_features,
    pairwise_agreement,
    token_logprobs_summary,
    word_count,
)
from policies.policy import CascadePolicy
from policies.walk import Walk

FIT_TARGET_S = 20.0
STEP_TARGET_US = 20.0
DIFFICULTY_TARGET_MS = 10.0
FEATURES_TARGET_MS = 1.0
AGREEMENT_TARGET_MS = 2.0
SEED = 0


def header(args: argparse.Namespace) -> None:
    import sklearn

    print("cascade speed benchmark")
    print(f"  date      {common.now_utc()}")
    print(f"  machine   {common.machine()}")
    print(f"  python    {platform.python_version()} ({sys.executable})")
    print(f"  numpy     {np.__version__}; scikit-learn {sklearn.__version__}")
    print(f"  traces    {args.traces}")
    print(f"  rows      {args.rows} (fit benchmark); seed {SEED}")
    print(f"  command   {common.command()}")
    print()


def resampled(source: TraceSet, rows: int, seed: int) -> TraceSet:
    """`rows` rows drawn with replacement from `source`, each with a fresh unique id."""
    idx = np.random.default_rng(seed).integers(0, len(source), size=rows)
    big = source.subset(idx)
    return dataclasses.replace(big, ids=[f"speed-{k}" for k in range(rows)])


def bench_fit(traces_dir: Path, rows: int) -> None:
    path = traces_dir / "mmlu-llama-test.jsonl"
    t0 = time.perf_counter()
    source = load_traces(path)
    load_s = time.perf_counter() - t0
    traces = resampled(source, rows, SEED)
    print(f"a. cascade fit: {len(traces)} queries x {traces.n_models} models")
    print(
        f"   resampled with replacement from {path.name} ({len(source)} rows, loaded in "
        f"{load_s:.2f} s, not counted); models {', '.join(traces.models)}"
    )
    phases: list[tuple[str, float]] = []
    t = time.perf_counter()
    fitted = FittedIndex(traces, recall=True)
    phases.append(("FittedIndex(traces, recall=True)", time.perf_counter() - t))
    t = time.perf_counter()
    mu, target = choose_mu(
        fitted, lam=None, target_accuracy=0.97, max_cost_usd=None, mus=DEFAULT_MUS
    )
    phases.append(
        (f"choose_mu(target_accuracy=0.97, {len(DEFAULT_MUS)} mus)", time.perf_counter() - t)
    )
    t = time.perf_counter()
    art = build_artifact(fitted, mu, train_path=str(path), answer_kind=traces.kind, target=target)
    phases.append(("build_artifact", time.perf_counter() - t))
    total = sum(s for _, s in phases)
    for name, s in phases:
        print(f"   {name:<48} {s:8.2f} s")
    verdict = "within" if total < FIT_TARGET_S else "OVER"
    print(f"   {'total':<48} {total:8.2f} s  (target < {FIT_TARGET_S:.0f} s: {verdict})")
    exp = art.expected
    nodes = " -> ".join(art.models)
    print(
        f"   nodes {nodes}; lambda {art.lam:.4f}; expected accuracy "
        f"{exp.accuracy:.3f}, cost {exp.cost_fraction:.3f} x reference"
    )
    print()


def fit_small_policy(traces_dir: Path) -> tuple[CascadePolicy, PolicyArtifact, TraceSet]:
    """A policy fitted on mmlu-llama-train with all 5 models as nodes (the widest state)."""
    train = load_traces(traces_dir / "mmlu-llama-train.jsonl")
    test = load_traces(traces_dir / "mmlu-llama-test.jsonl")
    fitted = FittedIndex(train, recall=True, models=list(train.models))
    mu, target = choose_mu(
        fitted, lam=None, target_accuracy=0.97, max_cost_usd=None, mus=DEFAULT_MUS
    )
    art = build_artifact(
        fitted, mu, train_path="mmlu-llama-train.jsonl", answer_kind=train.kind, target=target
    )
    return art.policy(), art, test


def percentiles(ns: np.ndarray) -> tuple[float, float, float]:
    return float(np.mean(ns)), float(np.percentile(ns, 50)), float(np.percentile(ns, 99))


def bench_step(policy: CascadePolicy, art: PolicyArtifact, test: TraceSet, reps: int) -> None:
    n = len(art.models)
    calls = common.prefix_calls(test, art.models)
    step = policy.step
    # mean: one tight loop (no per-call timer); spread: each call timed on its own
    mean_loop_us = common.loop_us(step, calls, reps)
    clock = time.perf_counter_ns
    each = np.empty(reps * len(calls))
    i = 0
    for _ in range(reps):
        for explored, extracted, conf in calls:
            t0 = clock()
            step(explored, extracted, conf)
            each[i] = clock() - t0
            i += 1
    timer_ns = np.median([-(clock() - clock()) for _ in range(10_000)])  # two-clock overhead
    mean, p50, p99 = percentiles(each / 1e3)
    by_k = each.reshape(reps, len(test), n)
    names = ", ".join(art.models)
    bins = [len(v) for v in policy.tables.values]
    print(
        f"b. CascadePolicy.step: policy fitted on mmlu-llama-train, {n} nodes ({names}), "
        f"recall on, loss bins per node {bins}, lambda {art.lam:.4f}"
    )
    print(
        f"   {len(calls)} (row, prefix) inputs = {len(test)} mmlu-llama-test rows x prefixes "
        f"of 1..{n} nodes, x {reps} repetitions = {len(each)} steps"
    )
    verdict = "within" if mean_loop_us < STEP_TARGET_US else "OVER"
    print(
        f"   mean {mean_loop_us:6.2f} us/step (tight loop)  (target < {STEP_TARGET_US:.0f} us:"
        f" {verdict})"
    )
    print(
        f"   timed one by one: mean {mean:6.2f}  p50 {p50:6.2f}  p99 {p99:6.2f} us "
        f"(includes ~{timer_ns / 1e3:.2f} us timer overhead)"
    )
    for k in range(n):
        m, p, q = percentiles(by_k[:, :, k].ravel() / 1e3)
        print(f"     {k + 1} node(s) explored: mean {m:6.2f}  p50 {p:6.2f}  p99 {q:6.2f} us")
    roots = list(range(policy.tables.decision[0].shape[0]))
    first = policy.first
    t = time.perf_counter_ns()
    loops = 20_000
    for i in range(loops):
        first(roots[i % len(roots)])
    first_us = (time.perf_counter_ns() - t) / loops / 1e3
    print(
        f"   CascadePolicy.first: mean {first_us:6.2f} us ({len(roots)} root state(s), "
        f"{loops} calls)"
    )
    print()


def bench_walk(policy: CascadePolicy, art: PolicyArtifact, test: TraceSet, reps: int) -> None:
    """The engine's decision loop without the calls: policies/walk.py's Walk over each test
    row (next_calls, signal, record, decide until it stops), root state given."""
    cols = [test.models.index(m) for m in art.models]
    costs = [n.cost_usd for n in art.nodes]
    rows = [
        ([test.extracted[r][c] for c in cols], [float(test.confidence[r, c]) for c in cols])
        for r in range(len(test))
    ]
    steps = 0
    t = time.perf_counter_ns()
    for _ in range(reps):
        for extracted, conf in rows:
            walk = Walk(policy, costs, None, 0)
            while calls := walk.next_calls():
                for k in calls:
                    signal = policy.signal(k, conf[k], None, None)
                    walk.record(k, True, extracted[k], signal, costs[k])
                walk.decide()
                steps += 1
    total_us = (time.perf_counter_ns() - t) / 1e3
    print(
        f"b2. the engine's decision loop, policies/walk.py Walk (next_calls + signal + record "
        f"+ decide) over {len(rows)} rows x {reps}: {steps} steps, mean "
        f"{total_us / steps:6.2f} us per step (the rule's step included), "
        f"{total_us / (reps * len(rows)):6.2f} us per query"
    )
    print()


def time_root_states(policy: CascadePolicy, prompts: list[str], reps: int) -> np.ndarray:
    """Nanoseconds of each `root_state(prompt)` call, one prompt at a time as the proxy
    calls it, after a warm-up."""
    root_state = policy.root_state
    for p in prompts[:50]:
        root_state(p)
    clock = time.perf_counter_ns
    each = np.empty(reps * len(prompts))
    i = 0
    for _ in range(reps):
        for p in prompts:
            t0 = clock()
            root_state(p)
            each[i] = clock() - t0
            i += 1
    return each


def bench_difficulty(policy: CascadePolicy, test: TraceSet, reps: int) -> None:
    prompts = [test.prompt(r) for r in range(len(test))]
    each = time_root_states(policy, prompts, reps)
    mean, p50, p99 = percentiles(each / 1e6)
    chars = np.array([len(p) for p in prompts])
    if policy.difficulty is not None:
        model = f"DifficultyModel, {len(policy.difficulty.indices)} weights"
    elif policy.router is not None:  # the fit chose the prompt-router root (see c2)
        weights = sum(len(m.indices) for m in policy.router.models)
        model = f"the fit chose a RouterModel, {weights} weights"
    else:
        model = "no prompt model: constant 0"
    print(f"c. prompt root, CascadePolicy.root_state(prompt) ({model})")
    print(
        f"   {len(prompts)} mmlu-llama-test prompts (mean {chars.mean():.0f} chars, max "
        f"{chars.max()}) x {reps} repetitions = {len(each)} calls"
    )
    verdict = "within" if p99 < DIFFICULTY_TARGET_MS else "OVER"
    print(
        f"   mean {mean:.4f} ms  p50 {p50:.4f} ms  p99 {p99:.4f} ms per prompt  "
        f"(target < {DIFFICULTY_TARGET_MS:.0f} ms: {verdict})"
    )
    print()


def bench_router_root(traces: Path, reps: int) -> None:
    """c2. CascadePolicy.root_state(prompt) of a prompt-router root: the router's pick."""
    from calibration.pricing import fill_costs

    train = fill_costs(load_traces(traces / "alpaca-fusechat-train.jsonl"))
    test = fill_costs(load_traces(traces / "alpaca-fusechat-test.jsonl"))
    fitted = FittedIndex(train, recall=True, root="router")
    art = build_artifact(fitted, DEFAULT_MUS[12], train_path="alpaca-fusechat-train.jsonl")
    policy = art.policy()
    assert policy.router is not None
    prompts = [test.prompt(r) for r in range(len(test))]
    each = time_root_states(policy, prompts, reps)
    mean, p50, p99 = percentiles(each / 1e3)
    chars = np.array([len(p) for p in prompts])
    weights = sum(len(m.indices) for m in policy.router.models)
    print(
        f"c2. prompt-router root, CascadePolicy.root_state(prompt) (RouterModel, "
        f"{policy.router.n_nodes} nodes, {weights} weights in all)"
    )
    print(
        f"   {len(prompts)} alpaca-fusechat-test prompts (mean {chars.mean():.0f} chars, max "
        f"{chars.max()}) x {reps} repetitions = {len(each)} calls"
    )
    print(f"   mean {mean:.1f} us  p50 {p50:.1f} us  p99 {p99:.1f} us per prompt")
    print()


def bench_sampled(reps: int) -> None:
    """d. The decision step over a policy whose first node is sampled (k = 5), and the
    extraction and vote of its 5 answers, measured apart."""
    import tempfile

    from calibration.sampling import add_sampled, parse_samples
    from policies.answers import extract_answer
    from policies.sampling import vote
    from tests.synthetic import write_choice_traces

    with tempfile.TemporaryDirectory() as tmp:
        kw = {"models": ["small", "big", "large"], "samples": 4}
        train = write_choice_traces(Path(tmp) / "tr.jsonl", n_rows=600, seed=1, prefix="tr", **kw)
        test = write_choice_traces(Path(tmp) / "te.jsonl", n_rows=600, seed=2, prefix="te", **kw)
        spec = parse_samples("small@5")
        plain = load_traces(test)
        train_set = add_sampled(load_traces(train), spec)
        test_set = add_sampled(plain, spec)
    names = ["small@5", "big", "large"]
    fitted = FittedIndex(train_set, recall=True, models=names)
    mu, target = choose_mu(
        fitted, lam=None, target_accuracy=0.97, max_cost_usd=None, mus=DEFAULT_MUS
    )
    art = build_artifact(fitted, mu, train_path="synthetic", answer_kind="choice", target=target)
    policy = art.policy()
    calls = common.prefix_calls(test_set, art.models)
    step_us = common.loop_us(policy.step, calls, reps)
    j = plain.models.index("small")
    texts = [[plain.answers[r][j], *plain.samples[r][j][:4]] for r in range(len(plain))]
    forms = [[extract_answer(a, "choice") for a in row] for row in texts]
    t = time.perf_counter_ns()
    for _ in range(reps):
        for row in texts:
            [extract_answer(a, "choice") for a in row]
    extract_us = (time.perf_counter_ns() - t) / (reps * len(texts)) / 1e3
    t = time.perf_counter_ns()
    for _ in range(reps):
        for row in forms:
            vote(row, "choice")
    vote_us = (time.perf_counter_ns() - t) / (reps * len(forms)) / 1e3
    print(
        f"d. sampled node small@5 (synthetic traces with 4 samples per model, nodes "
        f"{art.models}, lambda {art.lam:.4f})"
    )
    verdict = "within" if step_us < STEP_TARGET_US else "OVER"
    print(
        f"   CascadePolicy.step: mean {step_us:6.2f} us/step over {len(calls)} (row, prefix) "
        f"inputs x {reps} (target < {STEP_TARGET_US:.0f} us: {verdict})"
    )
    print(
        f"   apart from it: extracting 5 answers {extract_us:6.2f} us, their vote {vote_us:6.2f} us"
    )
    print()


def _timed_ms(fn, inputs: list, reps: int) -> np.ndarray:
    """Each call of fn(*args) timed on its own, in milliseconds."""
    for args in inputs[:20]:
        fn(*args)
    clock = time.perf_counter_ns
    each = []
    for _ in range(reps):
        for args in inputs:
            t0 = clock()
            fn(*args)
            each.append(clock() - t0)
    return np.asarray(each) / 1e6


def bench_freetext(traces_dir: Path, reps: int) -> None:
    train = load_traces(traces_dir / "alpaca-fusechat-train.jsonl")
    test = load_traces(traces_dir / "alpaca-fusechat-test.jsonl")
    long = [
        (test.answers[r][j], float(test.tokens_out[r, j]), word_count(test.prompt(r)))
        for r in range(len(test))
        for j in range(test.n_models)
        if test.answers[r][j] and 900 <= test.tokens_out[r, j] <= 1100
    ]
    tokens = np.array([t for _, t, _ in long])
    chars = np.array([len(a) for a, _, _ in long])
    print(
        f"e. free-text signals: {len(long)} alpaca-fusechat-test answers of 900-1,100 tokens "
        f"(mean {tokens.mean():.0f} tokens, {chars.mean():.0f} chars) x {reps} repetitions"
    )
    feats = _timed_ms(answer_features, long, reps)
    mean, p50, p99 = percentiles(feats)
    verdict = "within" if p50 < FEATURES_TARGET_MS else "OVER"
    print(
        f"   answer_features: mean {mean:.3f}  p50 {p50:.3f}  p99 {p99:.3f} ms "
        f"(target < {FEATURES_TARGET_MS:.0f} ms: {verdict})"
    )
    # the recorded answers carry no token logprobs: 1,000 drawn ones per answer, as the
    # proxy receives them from an upstream, (token, logprob) pairs
    rng = np.random.default_rng(0)
    logprobs = [[("t", float(x)) for x in -rng.exponential(0.5, 1000)] for _ in range(len(long))]
    summary = _timed_ms(token_logprobs_summary, [(lp,) for lp in logprobs], reps)
    mean, p50, p99 = percentiles(summary)
    print(f"   logprob summary of 1,000 token logprobs: mean {mean:.3f}  p50 {p50:.3f}  "
          f"p99 {p99:.3f} ms")  # fmt: skip

    def features_and_summary(a, t, w, lp) -> None:
        answer_features(a, t, w)
        token_logprobs_summary(lp)

    both = _timed_ms(
        features_and_summary, [(*x, lp) for x, lp in zip(long, logprobs, strict=True)], reps
    )
    mean, p50, p99 = percentiles(both)
    verdict = "within" if p50 < FEATURES_TARGET_MS else "OVER"
    print(
        f"   answer_features + logprob summary: mean {mean:.3f}  p50 {p50:.3f}  p99 {p99:.3f} "
        f"ms (target < {FEATURES_TARGET_MS:.0f} ms: {verdict})"
    )
    pairs = [(long[k][0], long[k + 1][0]) for k in range(len(long) - 1)]
    agree = _timed_ms(agreement, pairs, reps)
    mean, p50, p99 = percentiles(agree)
    verdict = "within" if p50 < AGREEMENT_TARGET_MS else "OVER"
    print(
        f"   agreement (char 3-grams) of two: mean {mean:.3f}  p50 {p50:.3f}  p99 {p99:.3f} ms "
        f"(target < {AGREEMENT_TARGET_MS:.0f} ms: {verdict})"
    )
    word = _timed_ms(lambda a, b: agreement(a, b, "word"), pairs, reps)
    mean, p50, p99 = percentiles(word)
    print(f"   agreement (word bigrams) of two: mean {mean:.3f}  p50 {p50:.3f}  p99 {p99:.3f} ms")
    fitted = FittedIndex(train, recall=True, models=list(train.models))
    art = build_artifact(fitted, DEFAULT_MUS[12], train_path="alpaca-fusechat-train.jsonl")
    policy = art.policy()
    kinds = [c and c.to_dict().get("kind", "length") for c in art.length_calibrators]
    n = len(art.models)
    cols = [test.models.index(m) for m in art.models]
    calls = []
    arrivals = []  # (row, node): the answer arriving after nodes 0..node-1
    for r in range(len(test)):
        words = word_count(test.prompt(r))
        texts = [test.answers[r][c] for c in cols]
        agree = pairwise_agreement([texts])[0].tolist()  # the values the walk computes
        conf = [
            policy.signal(
                k,
                None,
                float(test.tokens_out[r, cols[k]]),
                test.answers[r][cols[k]],
                words,
                test.finish_reason(r, cols[k]),
            )
            for k in range(n)
        ]
        for k in range(1, n + 1):
            explored = list(range(k))
            extracted = [test.extracted[r][cols[j]] if j < k else None for j in range(n)]
            seen = [c if j < k else None for j, c in enumerate(conf)]
            calls.append((explored, extracted, seen, agree if policy.graded else None))
            arrivals.append((r, k - 1))
    step = _timed_ms(policy.step, calls, reps) * 1000.0
    mean, p50, p99 = percentiles(step)
    verdict = "within" if mean < STEP_TARGET_US else "OVER"
    print(
        f"   CascadePolicy.step, policy fitted on alpaca-fusechat-train (calibrators {kinds}, "
        f"agreement {art.agreement_mode}): {len(step)} steps over 1..{n} explored nodes"
    )
    print(
        f"   mean {mean:6.2f}  p50 {p50:6.2f}  p99 {p99:6.2f} us per step, timed one by one "
        f"(target < {STEP_TARGET_US:.0f} us: {verdict})"
    )

    def arrive(r: int, node: int) -> None:
        """A walk that has seen nodes 0..node-1 of row r; the agreement of node's answer."""
        walk = Walk(policy, [0.0] * n)
        for k in range(node):
            text = test.answers[r][cols[k]]
            walk.record(k, True, None, None, 0.0, walk.agreement(k, text))
        t0 = time.perf_counter_ns()
        walk.agreement(node, test.answers[r][cols[node]])
        timed.append(time.perf_counter_ns() - t0)

    for by_seen in range(n):
        timed: list[int] = []
        for _ in range(reps):
            for r, node in arrivals:
                if node == by_seen:
                    arrive(r, node)
        mean, p50, p99 = percentiles(np.asarray(timed) / 1e6)
        print(
            f"   Walk.agreement of an arriving answer with {by_seen} seen: mean {mean:.3f}  "
            f"p50 {p50:.3f}  p99 {p99:.3f} ms (outside the step)"
        )
    signal = _timed_ms(
        lambda k, a, t, w: policy.signal(k, None, t, a, w),
        [(0, a, t, w) for a, t, w in long],
        reps,
    )
    mean, p50, p99 = percentiles(signal)
    print(
        f"   CascadePolicy.signal (features + calibrator) on one answer: mean {mean:.3f}  "
        f"p50 {p50:.3f}  p99 {p99:.3f} ms"
    )
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_traces_option(parser)
    parser.add_argument("--rows", type=int, default=10_000, help="queries in the fit benchmark")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of b, c and d")
    parser.add_argument("--sampled-only", action="store_true", help="run part d only")
    parser.add_argument("--freetext-only", action="store_true", help="run part e only")
    parser.add_argument("--root-only", action="store_true", help="run part c2 only")
    args = parser.parse_args(argv)
    if args.sampled_only:
        bench_sampled(args.reps)
        return 0
    if args.root_only:
        header(args)
        bench_router_root(args.traces, args.reps)
        return 0
    if args.freetext_only:
        header(args)
        bench_freetext(args.traces, args.reps)
        return 0
    if not args.traces.is_dir():
        print(f"error: trace folder not found: {args.traces}", file=sys.stderr)
        return 2
    if args.rows < 1:
        print("error: --rows must be at least 1", file=sys.stderr)
        return 2
    header(args)
    start = time.perf_counter()
    bench_fit(args.traces, args.rows)
    policy, art, test = fit_small_policy(args.traces)
    bench_step(policy, art, test, args.reps)
    bench_walk(policy, art, test, args.reps)
    bench_difficulty(policy, test, args.reps)
    bench_router_root(args.traces, args.reps)
    bench_sampled(args.reps)
    bench_freetext(args.traces, args.reps)
    print(f"benchmark wall time {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
