"""Proxy overhead: direct upstream calls vs `cascade serve` vs LiteLLM's proxy, in one run.

Prints figures; asserts nothing about timings. Every target is driven by the same load
generator against the same local fake upstream (tests/fake_upstream.py, one model `m1`):
  direct          the upstream itself (the baseline every "added" figure is measured against)
  cascade-single  `cascade serve`, a one-model cascade over `m1` without a policy artifact
                  (the engine's "single" path: call the reference model, answer)
  cascade-policy  `cascade serve`, the same cascade with a policy artifact fitted over that one
                  node (FittedIndex on mmlu-llama-train restricted to llama3.1-8b, renamed m1)
  litellm         LiteLLM's proxy (`litellm --config`), model_list entry `openai/m1` with
                  api_base the upstream's /v1 and a dummy key (needs `pip install
                  'litellm[proxy]'`; the column is skipped, with a message, when it cannot run)

With `taskset`, the proxy under test runs on CPU 0, the upstream and the load generator on
CPU 1. The load generator is a separate Python process (aiohttp, one pooled session per target
and concurrency) that sends small non-streaming chat completions at a fixed concurrency: per
round and target a warm-up, then a fixed number of requests; rounds interleave the targets
(rotating their order) so machine drift cancels. Per target: requests/s (median over rounds),
p50/p99 latency (pooled over rounds), added p50/p99 against direct calls, proxy CPU time per
request (/proc/PID/stat utime+stime over the measured requests) and proxy RSS after the run
(/proc/PID/status VmRSS). Also the decision overhead of a FIVE-model cascade: CascadePolicy.step
timed in process (as benchmarks/speed.py does), and `x-cascade-overhead-ms` read from a served
5-model cascade whose small models answer unconfidently (set through POST /admin/answers), so
that it escalates.

Targets of the proxy issue, printed beside the figures: added p50 at most 1 ms and at most a
quarter of LiteLLM proxy's (judged at concurrency 1); throughput at least twice LiteLLM
proxy's (judged at concurrency 32: the highest sustained rate measured here); RSS < 250 MB.

Run from the repository root:
  .venv/bin/python benchmarks/proxy_overhead.py [--rounds 3] [--requests 1000]
      [--concurrency 32 1] [--no-litellm]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import common
from common import (
    FIVE,
    LITELLM_PROXY_DEPS,
    MODEL,
    ONE_NODE_SOURCE,
    PROMPT,
    Processes,
    Server,
    cascade_config,
    child_pids,
    clean_env,
    cpus_of,
    fit_policies,
    litellm_missing_reason,
    median,
    pct,
    policy_walk,
    print_header,
    print_memory,
    rss_of,
    spawn_litellm,
    start_cascade,
    start_upstream,
    wait_ready,
)

if TYPE_CHECKING:
    from policies.artifact import PolicyArtifact
from loadgen import LoadGen, Phase, Target, add_round_options, run_rounds, smoke_all, summaries

TARGET_ADDED_P50_MS = 1.0
TARGET_FRACTION_OF_LITELLM = 0.25
TARGET_THROUGHPUT_X = 2.0
TARGET_RSS_MB = 250.0
STEP_TARGET_US = 20.0  # benchmarks/speed.py's target for one CascadePolicy.step

# USD per million tokens (in = out), about what the traces charge
FIVE_PRICES = {
    "llama3.2-1b": 0.1,
    "llama3.2-3b": 0.1,
    "llama3.1-8b": 0.2,
    "llama3.1-70b": 0.9,
    "llama3.1-405b": 3.0,
}
# canned answers for the 5-model cascade: unconfident, disagreeing small models, so the
# policy escalates to the largest (checked in process before the run: it calls all five)
FIVE_ANSWERS = {
    "llama3.2-1b": ("A", -3.0),
    "llama3.2-3b": ("C", -3.0),
    "llama3.1-8b": ("D", -2.5),
    "llama3.1-70b": ("A", -2.0),
    "llama3.1-405b": ("B", -0.05),
}


def time_steps(art5: PolicyArtifact, traces: Path, reps: int) -> dict[str, float]:
    """CascadePolicy.step over mmlu-llama-test rows x explored prefixes 1..5, one by one."""
    import numpy as np

    from calibration.traces import load_traces

    policy = art5.policy()
    test = load_traces(traces / "mmlu-llama-test.jsonl")
    calls = common.prefix_calls(test, art5.models)
    step = policy.step
    loop_us = common.loop_us(step, calls, reps)
    clock = time.perf_counter_ns
    each = np.empty(reps * len(calls))
    i = 0
    for _ in range(reps):
        for args in calls:
            t0 = clock()
            step(*args)
            each[i] = clock() - t0
            i += 1
    root = policy.root_state
    t = time.perf_counter_ns()
    for _ in range(2000):
        root(PROMPT)
    root_us = (time.perf_counter_ns() - t) / 2000 / 1e3
    return {
        "steps": float(len(each)),
        "rows": float(len(test)),
        "loop_mean_us": loop_us,
        "p50_us": float(np.percentile(each, 50)) / 1e3,
        "p99_us": float(np.percentile(each, 99)) / 1e3,
        "root_state_us": root_us,
    }


NETWORK_HINTS = (
    "ConnectError",
    "Name or service not known",
    "Temporary failure in name resolution",
    "fetch attempt",
    "Failed to fetch",
    "telemetry",
)


def network_attempts(log: Path) -> list[str]:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line.strip()[:160] for line in lines if any(h in line for h in NETWORK_HINTS)]


# ================================================================== the run


def header(args: argparse.Namespace, taskset: str | None) -> None:
    print_header(
        "cascade proxy overhead benchmark",
        taskset,
        "proxy under test on CPU 0; upstream + load generator 1",
        ("aiohttp", "fastapi", "uvicorn", "uvloop", "litellm"),
        f"{args.rounds} round(s) x {args.requests} requests per target and concurrency "
        f"{args.concurrency}, after {warmup_of(args)} warm-up requests; targets interleaved, "
        "order rotated each round",
        bottom=(("traces", str(args.traces)),),
    )


def warmup_of(args: argparse.Namespace) -> int:
    return max(20, 2 * max(args.concurrency), args.requests // 10)


def run(args: argparse.Namespace) -> int:
    taskset = shutil.which("taskset") if (os.cpu_count() or 1) >= 2 else None
    header(args, taskset)
    wall0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="cascade-overhead-"))
    procs = Processes(taskset)
    client_key = "sk-bench-" + secrets.token_hex(16)
    master_key = "sk-bench-" + secrets.token_hex(32)
    env = clean_env(PYTHONUNBUFFERED="1")
    try:
        # ---- the upstream
        up = start_upstream(procs, tmp, env, (MODEL, *FIVE), FIVE_ANSWERS)
        upstream = up.url

        # ---- LiteLLM's proxy boots slowly: start it first, fit while it boots
        litellm: Server | None = None
        litellm_note = "skipped (--no-litellm)"  # short form for the tables
        litellm_detail = ""  # printed once
        if not args.no_litellm:
            from importlib.util import find_spec

            if find_spec("litellm") is None:
                litellm_note = "skipped: litellm is not installed"
                litellm_detail = (
                    "install it with `.venv/bin/pip install 'litellm[proxy]'` to measure it"
                )
            else:
                litellm = spawn_litellm(procs, tmp, env, upstream, master_key)

        print("policies (fitted on mmlu-llama-train, saved with calibration.artifact)")
        t = time.perf_counter()
        fitted = fit_policies(args.traces, tmp, ("one", "five"))
        fit_s = time.perf_counter() - t
        (path1, art1), (path5, art5) = fitted["one"], fitted["five"]
        print(
            f"  one node  : {ONE_NODE_SOURCE} rows renamed {MODEL}; lambda "
            f"{art1.lam:.4f}; {art1.hash[:19]}"
        )
        nodes5 = " -> ".join(art5.models)
        print(
            f"  five nodes: {nodes5}; target accuracy 0.97; lambda {art5.lam:.4f}; {art5.hash[:19]}"
        )
        walk = policy_walk(art5, FIVE_ANSWERS)
        print(f"  fitted both in {fit_s:.1f} s; in process, the 5-node policy calls {walk}")
        print(f"  for the benchmark prompt with answers {FIVE_ANSWERS}")
        print()

        # ---- cascade serve: single path, one-node policy, five-node policy
        servers: dict[str, Server] = {}
        configs = {
            "cascade-single": cascade_config(
                upstream,
                client_key,
                {MODEL: 0.2},
                {"single": {"nodes": [MODEL], "reference": MODEL}},
            ),
            "cascade-policy": cascade_config(
                upstream,
                client_key,
                {MODEL: 0.2},
                {"qa": {"nodes": [MODEL], "reference": MODEL, "policy": str(path1)}},
            ),
            "cascade-5": cascade_config(
                upstream,
                client_key,
                FIVE_PRICES,
                {"five": {"nodes": list(FIVE), "reference": FIVE[-1], "policy": str(path5)}},
            ),
        }
        for name, config in configs.items():
            path = tmp / f"{name}.yaml"
            path.write_text(json.dumps(config, indent=1))
            servers[name] = start_cascade(
                procs, name, path, tmp / f"{name}.log", f"sqlite:///{tmp / (name + '.db')}", env
            )

        print("servers")
        print(
            f"  upstream        pid {up.pid:>7}  CPUs {cpus_of(up.pid):<4} {upstream}  "
            "(python -m tests.fake_upstream)"
        )
        for name, server in servers.items():
            took = wait_ready(server, "/health")
            print(
                f"  {name:<15} pid {server.pid:>7}  CPUs {cpus_of(server.pid):<4} {server.url}  "
                f"ready in {took:.1f} s (cascade serve)"
            )
        if litellm is not None:
            try:
                took = wait_ready(litellm, "/health/liveliness")
            except RuntimeError as exc:
                missing = litellm_missing_reason(litellm.log)
                if missing:
                    litellm_note = "skipped: the LiteLLM proxy extra is missing"
                    litellm_detail = (
                        f"{missing}\n    install it with `.venv/bin/pip install "
                        "'litellm[proxy]'` (where that extra does not resolve, install its "
                        f"dependencies by name:\n    {LITELLM_PROXY_DEPS})"
                    )
                else:
                    litellm_note = "skipped: LiteLLM's proxy did not start"
                    litellm_detail = str(exc)
                procs.stop(litellm.proc)
                litellm = None
            else:
                kids = child_pids(litellm.pid)
                print(
                    f"  {'litellm':<15} pid {litellm.pid:>7}  CPUs {cpus_of(litellm.pid):<4} "
                    f"{litellm.url}  ready in {took:.1f} s (litellm --config; child "
                    f"processes: {kids or 'none'})"
                )
        if litellm is None:
            print(f"  litellm         {litellm_note}")
            if litellm_detail:
                print(f"    {litellm_detail}")
        print()

        chat = "/v1/chat/completions"
        targets = [
            Target("direct", upstream + chat, MODEL, client_key, None, "the upstream itself"),
            Target(
                "cascade-single",
                servers["cascade-single"].url + chat,
                "single",
                client_key,
                servers["cascade-single"],
                "cascade serve, 1-model cascade, no policy",
                "x-cascade-overhead-ms",
            ),
            Target(
                "cascade-policy",
                servers["cascade-policy"].url + chat,
                "qa",
                client_key,
                servers["cascade-policy"],
                "cascade serve, 1-model cascade + fitted policy",
                "x-cascade-overhead-ms",
            ),
        ]
        if litellm is not None:
            targets.append(
                Target(
                    "litellm",
                    litellm.url + chat,
                    MODEL,
                    master_key,
                    litellm,
                    "LiteLLM proxy, openai/m1",
                    "x-litellm-overhead-duration-ms",
                )
            )
        five = Target(
            "cascade-5",
            servers["cascade-5"].url + chat,
            "five",
            client_key,
            servers["cascade-5"],
            "cascade serve, 5-model cascade + fitted policy",
        )
        targets, failed = smoke_all(targets, 15, "skipping the litellm column", also=(five,))
        litellm_note = failed or litellm_note

        # ---- the load
        if taskset:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {1})  # keep this (idle) process off the proxy's CPU
        loadgen = LoadGen(procs, tmp / "loadgen.log", env)
        all_servers = [*servers.values(), *([litellm] if litellm else [])]
        print(
            f"load generator pid {loadgen.proc.pid}, CPUs {cpus_of(loadgen.proc.pid)} (aiohttp, "
            "uvloop, one pooled session per target and concurrency)"
        )
        warmup = warmup_of(args)
        results, budget_hit = run_rounds(
            args,
            loadgen,
            targets,
            up,
            all_servers,
            wall0,
            15,
            requests_of=lambda target: args.requests,
            warmup_of=lambda n, conc: warmup,
        )

        # ---- five-model decision overhead, served
        n5 = min(args.requests, 300)
        phase5, got = loadgen.phase(
            five,
            n5,
            min(50, n5),
            1,
            args.phase_timeout_s,
            {"proxy": [five.server.pid], "upstream": [up.pid]},
            collect=("x-cascade-overhead-ms", "x-cascade-calls"),
        )
        overhead = [float(v) for v in got["x-cascade-overhead-ms"] if v is not None]
        calls = [int(v) for v in got["x-cascade-calls"] if v is not None]
        per_decision = [o / (c + 1) for o, c in zip(overhead, calls, strict=True)]

        rss = rss_of(all_servers)
        net = network_attempts(litellm.log) if litellm else []
        loadgen.quit()
    finally:
        procs.stop_all()

    # ---- in process, on a quiet machine now
    steps = time_steps(art5, args.traces, reps=args.step_reps)

    report(args, targets, results, rss, phase5, overhead, calls, per_decision, steps, litellm_note)
    if net:
        print()
        print(f"LiteLLM's log mentions the network ({len(net)} line(s)); first: {net[0]}")
    if budget_hit:
        print()
        print("NOTE: the time budget cut the rounds short; figures cover the rounds run")
    print()
    print(f"logs and configs were in {tmp} (kept: they are small)")
    print(f"benchmark wall time {time.monotonic() - wall0:.1f} s")
    return 0


def report(
    args: argparse.Namespace,
    targets: list[Target],
    results: dict[tuple[int, str], list[Phase]],
    rss: dict[str, tuple[float | None, float | None, int]],
    phase5: Phase,
    overhead: list[float],
    calls: list[int],
    per_decision: list[float],
    steps: dict[str, float],
    litellm_note: str,
) -> None:
    summary: dict[tuple[int, str], dict[str, float]] = {}
    print("=" * 100)
    print("RESULTS")
    for conc in args.concurrency:
        if (conc, "direct") not in results:
            continue
        rounds = len(results[(conc, "direct")])
        print()
        print(
            f"concurrency {conc}: {rounds} round(s) x {args.requests} requests per target; "
            "req/s = median over rounds [min-max]; latency pooled over rounds; "
            "+ = against direct"
        )
        print(
            f"  {'target':<15} {'req/s':>8} {'[min-max]':>17} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'+p50 ms':>8} {'+p99 ms':>8} {'CPU ms/req':>10} {'own ms':>7} {'errors':>6}"
        )
        for target, s, phases in summaries(targets, results, conc):
            summary[(conc, target.name)] = s
            spread = f"[{s['rps_min']:.0f}-{s['rps_max']:.0f}]"
            add50 = "-" if target.name == "direct" else f"{s['add50']:+8.2f}"
            add99 = "-" if target.name == "direct" else f"{s['add99']:+8.2f}"
            cpu_txt = "-" if target.server is None else f"{s['cpu_ms']:10.3f}"
            own = [x for p in phases for x in p.own_ms]
            own_txt = f"{median(own):7.3f}" if own else "-"
            print(
                f"  {target.name:<15} {s['rps']:8.1f} {spread:>17} {s['p50']:8.2f} "
                f"{s['p99']:8.2f} {add50:>8} {add99:>8} {cpu_txt:>10} {own_txt:>7} "
                f"{int(s['errors']):>6}"
            )
        if not any(t.name == "litellm" for t in targets):
            print(f"  {'litellm':<15} {litellm_note}")

    print()
    print(
        "  CPU ms/req: the proxy process's utime+stime over the measured requests / requests. "
        "own ms: median of\n  the proxy's self-reported overhead header (cascade: "
        "x-cascade-overhead-ms, deciding and reading signals;\n  LiteLLM: "
        "x-litellm-overhead-duration-ms, its own processing). A proxy whose core is ~100% busy "
        "in the\n  round lines above is CPU-bound: its req/s is its ceiling on one core."
    )
    print()
    print("memory after the run (/proc/PID/status; summed over the process and its children)")
    print_memory(rss, 15)

    print()
    print("decision overhead of a FIVE-model cascade (policy fitted on mmlu-llama-train, 5 nodes)")
    print(
        f"  in process: CascadePolicy.step over {int(steps['rows'])} mmlu-llama-test rows x "
        f"prefixes of 1..5 nodes, {int(steps['steps'])} steps: mean {steps['loop_mean_us']:.2f} "
        f"us (tight loop), one by one p50 {steps['p50_us']:.2f} p99 {steps['p99_us']:.2f} us "
        f"(speed.py's target < {STEP_TARGET_US:.0f} us); root_state(prompt) "
        f"{steps['root_state_us']:.1f} us"
    )
    if overhead:
        dist = {c: calls.count(c) for c in sorted(set(calls))}
        print(
            f"  served: {len(overhead)} requests at concurrency 1 to `cascade serve` (5 models "
            f"on the fake upstream; calls per request {dist}); x-cascade-overhead-ms per request "
            f"p50 {pct(overhead, 50):.3f} p99 {pct(overhead, 99):.3f} ms; per decision "
            f"(overhead / (calls + 1): root + one step per call) p50 "
            f"{pct(per_decision, 50) * 1000:.1f} p99 {pct(per_decision, 99) * 1000:.1f} us; "
            f"end-to-end p50 {pct(phase5.lat_ms, 50):.2f} ms for {median(calls):.0f} upstream "
            f"calls; errors {phase5.errors}"
        )
    else:
        print(f"  served: no answer carried x-cascade-overhead-ms ({phase5.first_error})")

    # ---- targets
    print()
    lat_c = 1 if 1 in args.concurrency else min(args.concurrency)
    thr_c = max(args.concurrency)
    print(
        f"targets of the proxy issue (latency at concurrency {lat_c}, throughput at "
        f"concurrency {thr_c}: the highest sustained rate measured here)"
    )

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("MET" if ok else "NOT MET")

    lite_lat = summary.get((lat_c, "litellm"))
    lite_thr = summary.get((thr_c, "litellm"))
    for name in ("cascade-single", "cascade-policy"):
        s_lat = summary.get((lat_c, name))
        s_thr = summary.get((thr_c, name))
        if s_lat is None or s_thr is None:
            continue
        print(f"  {name}")
        print(
            f"    added p50 {s_lat['add50']:+.3f} ms (p99 {s_lat['add99']:+.3f})"
            f"{'':<14} target <= {TARGET_ADDED_P50_MS:.1f} ms: "
            f"{verdict(s_lat['add50'] <= TARGET_ADDED_P50_MS)}"
        )
        if lite_lat is not None:
            limit = TARGET_FRACTION_OF_LITELLM * lite_lat["add50"]
            print(
                f"    added p50 {s_lat['add50']:+.3f} ms vs LiteLLM's {lite_lat['add50']:+.3f} ms"
                f"   target <= 1/4 of it ({limit:.3f} ms): {verdict(s_lat['add50'] <= limit)}"
            )
        else:
            print(f"    added p50 vs LiteLLM's: n/a (litellm {litellm_note})")
        if lite_thr is not None:
            ratio = s_thr["rps"] / lite_thr["rps"] if lite_thr["rps"] else float("inf")
            print(
                f"    throughput {s_thr['rps']:.0f} req/s = {ratio:.2f} x LiteLLM's "
                f"{lite_thr['rps']:.0f}      target >= {TARGET_THROUGHPUT_X:.0f} x: "
                f"{verdict(ratio >= TARGET_THROUGHPUT_X)}"
            )
        else:
            print(
                f"    throughput {s_thr['rps']:.0f} req/s; vs LiteLLM's: n/a (litellm "
                f"{litellm_note})"
            )
        now = rss.get(name, (None, None, 1))[0]
        print(
            f"    RSS {'?' if now is None else f'{now:.0f}'} MB{'':<33} target < "
            f"{TARGET_RSS_MB:.0f} MB: {verdict(None if now is None else now < TARGET_RSS_MB)}"
        )
    best = max(
        ((s["rps"], name, conc) for (conc, name), s in summary.items() if name != "direct"),
        default=None,
    )
    if best:
        print(
            f"  highest sustained req/s through a proxy: {best[0]:.0f} ({best[1]}, concurrency "
            f"{best[2]}; the concurrency-{thr_c} median over rounds is that figure)"
        )
    if lite_lat is not None:
        print(
            f"  LiteLLM proxy for reference: added p50 {lite_lat['add50']:+.3f} ms at "
            f"concurrency {lat_c}; {lite_thr['rps'] if lite_thr else float('nan'):.0f} req/s at "
            f"concurrency {thr_c}; RSS {rss.get('litellm', (None,))[0] or float('nan'):.0f} MB"
        )
    print(
        "  note: both cascade variants ask the upstream for logprobs (the confidence signal), "
        "so their upstream responses are larger than the direct and LiteLLM ones"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_round_options(parser)
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[32, 1],
        help="concurrency levels, each run for every round (default: 32 1)",
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")
    common.add_traces_option(parser)
    parser.add_argument(
        "--phase-timeout-s",
        type=float,
        default=60.0,
        help="cap on one target's warm-up + requests in one round (default 60)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="no new round starts after this many seconds (default 420)",
    )
    parser.add_argument("--step-reps", type=int, default=3, help="repetitions of the step timing")
    args = parser.parse_args(argv)
    if common.missing_train_traces(args):
        return 2
    if args.rounds < 1 or args.requests < 1 or args.step_reps < 1:
        print("error: --rounds, --requests and --step-reps must be at least 1", file=sys.stderr)
        return 2
    if any(c < 1 or c > 1024 for c in args.concurrency):
        print("error: each --concurrency must be in 1..1024", file=sys.stderr)
        return 2
    if args.requests > 100_000:
        print("error: --requests is capped at 100000", file=sys.stderr)
        return 2
    return common.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
