"""Proxy benchmark: direct, a thin forwarder, cascade (1 and 3 models; SQLite and PostgreSQL
ledgers) and LiteLLM's proxy, at concurrency 1, 32 and 128, in one run.

Prints figures and the proxy issue's targets as ratios beside them; asserts nothing about
timings. Every target is driven by the same load generator against the same local fake
upstream (tests/fake_upstream.py, models m1, m2, m3):
  direct        the upstream itself (the baseline of every "added" figure)
  thin          benchmarks/thin_forwarder.py: Starlette + one pooled aiohttp session, the body
                forwarded as bytes, nothing parsed (the yardstick of the throughput and CPU
                targets)
  cascade-1-DB  `cascade serve`, a one-model cascade over m1 with a fitted policy (FittedIndex
                on mmlu-llama-train restricted to llama3.1-8b, renamed m1): the index path
  cascade-3-DB  `cascade serve`, a three-model cascade m1 -> m2 -> m3 with an index policy
                fitted on llama3.2-1b, llama3.1-8b and llama3.1-405b (renamed m1-m3) at
                mu 0.05 (lambda 0.95: cost barely matters), which calls all three nodes for
                any answers; the upstream's m1 and m2 answer unconfidently and disagree. Every
                answer's `x-cascade-calls` is collected: the report says if one was not 3
  litellm       LiteLLM's proxy (`litellm --config`, `openai/m1`; skipped with a message when
                its proxy dependencies are missing); --litellm-requests caps its phases (it
                serves ~50-100 requests/s)
DB is `sqlite` (a file per server) or `pg` (one fresh PostgreSQL database, created and dropped
by the run): the ledger is on, as in production. Cascade and the forwarder get the same
upstream connection limit (256).

With `taskset`, the proxies run on CPU 0, the upstream and the load generator (a separate
aiohttp process, benchmarks/loadgen.py) on CPU 1. Per concurrency, rounds interleave the
targets (their order rotated each round) so machine drift cancels. Per target:
requests/s (median over rounds), p50/p99 latency (pooled), added p50/p99 against direct,
proxy CPU time per request (/proc utime+stime of the server over the measured requests,
ledger thread included), RSS after the run; then the ledger rows each cascade server wrote
against the requests it was sent (after SIGTERM, which flushes the writer).

Run from the repository root (about 2-3 minutes with the defaults on this 2-core machine):
  .venv/bin/python benchmarks/proxy_bench.py [--rounds 3] [--requests 1000]
      [--litellm-requests 300] [--concurrency 1 32 128] [--db sqlite pg] [--no-litellm]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import common
from common import CHAT, MODELS, REPO, THREE_ANSWERS, THREE_MU, pg_create, pg_drop
from loadgen import LoadGen, Phase, Target, add_round_options, run_rounds, smoke_all, summaries

# the issue's targets
ADDED_P50_MS = 1.0  # one-model cascade, concurrency 1
RPS_FRACTION_OF_THIN = 0.5  # one-model cascade at concurrency 32
CPU_X_THIN = 2.0  # one-model cascade's CPU per request over the forwarder's
RSS_MB = 250.0
CPU_THREE_X_ONE = 3.5  # three-model cascade's CPU per request over the one-model's


# ================================================================== the ledgers


def ledger_counts(url: str, cascade: str) -> tuple[int, int, int, int]:
    """(rows, distinct request ids, sum of n_calls, call rows) of one cascade's requests."""
    q_req = (
        "SELECT COUNT(*), COUNT(DISTINCT request_id), COALESCE(SUM(n_calls), 0) "
        "FROM ledger_requests WHERE cascade = {p}"
    )
    q_calls = (
        "SELECT COUNT(*) FROM ledger_calls c JOIN ledger_requests r "
        "ON r.request_id = c.request_id WHERE r.cascade = {p}"
    )
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            a, b, c = db.execute(q_req.format(p="?"), (cascade,)).fetchone()
            (d,) = db.execute(q_calls.format(p="?"), (cascade,)).fetchone()
    else:
        import psycopg

        with psycopg.connect(url, connect_timeout=5) as db:
            a, b, c = db.execute(q_req.format(p="%s"), (cascade,)).fetchone()
            (d,) = db.execute(q_calls.format(p="%s"), (cascade,)).fetchone()
    return int(a), int(b), int(c), int(d)


# ================================================================== the run


@dataclasses.dataclass
class Cascade:
    """A `cascade serve` target: its kind (one, three), ledger (sqlite, pg) and URL."""

    kind: str
    db: str
    url: str
    server: common.Server | None = None
    sent: int = 0  # requests sent to it (smoke + warm-ups + measured)
    not_three: int = 0  # three-model answers that did not call three nodes

    @property
    def name(self) -> str:
        return f"cascade-{1 if self.kind == 'one' else 3}-{self.db}"


def header(args: argparse.Namespace, taskset: str | None) -> None:
    load = os.getloadavg()
    top = [("load avg", f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1, 5, 15 min) at start")]
    if load[0] > 1.0:
        top.append(("WARNING", "the machine is busy with other work: the figures will be noisy"))
    common.print_header(
        "cascade proxy benchmark (benchmarks/proxy_bench.py)",
        taskset,
        "proxies on CPU 0; upstream + load generator on CPU 1",
        ("aiohttp", "fastapi", "starlette", "uvicorn", "uvloop", "litellm"),
        f"{args.rounds} round(s) x {args.requests} requests per target and concurrency "
        f"{args.concurrency} (LiteLLM: {args.litellm_requests}), after a warm-up of max(20, "
        "2 x concurrency, requests / 10); targets interleaved, order rotated each round",
        top=tuple(top),
    )


def warmup_of(requests: int, concurrency: int) -> int:
    return max(20, 2 * concurrency, requests // 10)


def run(args: argparse.Namespace) -> int:
    taskset = shutil.which("taskset") if (os.cpu_count() or 1) >= 2 else None
    header(args, taskset)
    wall0 = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="cascade-bench-"))
    procs = common.Processes(taskset)
    client_key = "sk-bench-" + secrets.token_hex(16)
    master_key = "sk-bench-" + secrets.token_hex(32)
    env = common.clean_env(PYTHONUNBUFFERED="1")
    pg_name: str | None = None
    try:
        # ---- the upstream
        up = common.start_upstream(procs, tmp, env, MODELS, THREE_ANSWERS)
        upstream = up.url

        # ---- LiteLLM boots slowly: start it first
        litellm, litellm_note = start_litellm(args, procs, tmp, env, upstream, master_key)

        # ---- policies
        t = time.perf_counter()
        fitted = common.fit_policies(args.traces, tmp, ("one", "three"))
        (path1, art1), (path3, art3) = fitted["one"], fitted["three"]
        walked = common.policy_walk(art3, THREE_ANSWERS)
        print(
            f"policies fitted on mmlu-llama-train in {time.perf_counter() - t:.1f} s: one node "
            f"(lambda {art1.lam:.3f}, {art1.hash[:19]}); three nodes "
            f"{art3.models} (mu {THREE_MU}, lambda "
            f"{art3.lam:.3f}, {art3.hash[:19]}) calls {walked} in process for "
            f"answers {THREE_ANSWERS}"
        )
        if walked != list(MODELS):
            raise RuntimeError(f"the three-node policy calls {walked}, not all three nodes")

        # ---- servers: the forwarder and every cascade
        thin_port = common.free_port()
        thin = common.Server(
            "thin",
            procs.spawn(
                [
                    *(sys.executable, str(REPO / "benchmarks" / "thin_forwarder.py")),
                    *("--upstream", upstream, "--port", str(thin_port)),
                ],
                cpu=0,
                log=tmp / "thin.log",
                env=env,
            ),
            tmp / "thin.log",
            f"http://127.0.0.1:{thin_port}",
        )
        urls: dict[str, str | None] = {"sqlite": None}
        if "pg" in args.db:
            pg_name, urls["pg"] = pg_create()
        cascades: list[Cascade] = []
        for db in args.db:
            for kind, policy in (("one", path1), ("three", path3)):
                c = Cascade(kind, db, urls[db] or f"sqlite:///{tmp / f'{kind}-{db}.db'}")
                folder = tmp / c.name  # its working folder: spool slots live here
                folder.mkdir()
                config = folder / "cascade.yaml"
                config.write_text(
                    json.dumps(common.ladder_config(upstream, client_key, kind, policy))
                )
                c.server = common.start_cascade(
                    procs, c.name, config, folder / "serve.log", c.url, env, cwd=folder
                )
                cascades.append(c)

        print()
        print("servers")
        print(f"  {'upstream':<16} pid {up.pid:>7}  CPUs {common.cpus_of(up.pid):<4} {upstream}")
        for server in [thin, *(c.server for c in cascades)]:
            took = common.wait_ready(server, "/health")
            print(
                f"  {server.name:<16} pid {server.pid:>7}  CPUs {common.cpus_of(server.pid):<4} "
                f"{server.url}  ready in {took:.1f} s"
            )
        if litellm is not None:
            litellm, litellm_note = wait_litellm(litellm, procs)
        if litellm is None:
            print(f"  {'litellm':<16} {litellm_note}")
        print()

        targets = [
            Target("direct", upstream + CHAT, "m1", client_key, None, "the upstream"),
            Target("thin", thin.url + CHAT, "m1", client_key, thin, "thin forwarder"),
        ]
        by_name = {c.name: c for c in cascades}
        for c in cascades:
            targets.append(
                Target(c.name, c.server.url + CHAT, c.kind, client_key, c.server, c.name)
            )
        if litellm is not None:
            targets.append(
                Target("litellm", litellm.url + CHAT, "m1", master_key, litellm, "LiteLLM")
            )

        targets, failed = smoke_all(targets, 16, "skipping LiteLLM")
        litellm_note = failed or litellm_note
        for c in cascades:  # each answered its smoke request
            c.sent += 1

        # ---- the load
        if taskset:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {1})  # keep this (idle) process off the proxies' CPU
        loadgen = LoadGen(procs, tmp / "loadgen.log", env)
        servers = [t.server for t in targets if t.server is not None]

        def tally(target: Target, phase: Phase, got: dict) -> None:
            c = by_name.get(target.name)
            if c is not None:
                c.sent += loadgen.last["warmup_sent"] + phase.ok + phase.errors
                c.not_three += sum(v != "3" for v in got.get("x-cascade-calls", []))

        results, budget_hit = run_rounds(
            args,
            loadgen,
            targets,
            up,
            servers,
            wall0,
            16,
            requests_of=lambda t: args.litellm_requests if t.name == "litellm" else args.requests,
            warmup_of=warmup_of,
            collect_of=lambda t: ("x-cascade-calls",) if t.model == "three" else (),
            on_phase=tally,
        )
        rss = common.rss_of(servers)
        loadgen.quit()
        for c in cascades:  # SIGTERM: the ledger writer flushes before the process ends
            procs.stop(c.server.proc, wait_s=30.0)
        ledger = {c.name: ledger_counts(c.url, c.kind) for c in cascades}
    finally:
        procs.stop_all()
        if pg_name is not None:
            with contextlib.suppress(Exception):
                pg_drop(pg_name)

    summary = report(args, targets, results, rss, litellm_note)
    report_ledger(cascades, ledger)
    report_targets(args, summary, rss, cascades)
    load = os.getloadavg()
    print()
    print(f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if budget_hit:
        print("NOTE: the time budget cut the rounds short; figures cover the rounds run")
    print(f"logs and configs in {tmp}; wall time {time.monotonic() - wall0:.0f} s")
    return 0


def start_litellm(
    args: argparse.Namespace,
    procs: common.Processes,
    tmp: Path,
    env: dict[str, str],
    upstream: str,
    master_key: str,
) -> tuple[common.Server | None, str]:
    """LiteLLM's proxy on CPU 0 (not yet ready), or None and why not."""
    if args.no_litellm:
        return None, "skipped (--no-litellm)"
    from importlib.util import find_spec

    if find_spec("litellm") is None:
        return None, "skipped: litellm is not installed (pip install 'litellm[proxy]')"
    return common.spawn_litellm(procs, tmp, env, upstream, master_key), ""


def wait_litellm(
    litellm: common.Server, procs: common.Processes
) -> tuple[common.Server | None, str]:
    try:
        took = common.wait_ready(litellm, "/health/liveliness")
    except RuntimeError as exc:
        missing = common.litellm_missing_reason(litellm.log)
        procs.stop(litellm.proc)
        if missing:
            return None, (
                f"skipped: the LiteLLM proxy extra is missing ({missing}); install "
                f"'litellm[proxy]' or by name: {common.LITELLM_PROXY_DEPS}"
            )
        return None, f"skipped: LiteLLM's proxy did not start ({exc})"
    print(
        f"  {'litellm':<16} pid {litellm.pid:>7}  CPUs {common.cpus_of(litellm.pid):<4} "
        f"{litellm.url}  ready in {took:.1f} s "
        f"(children: {common.child_pids(litellm.pid) or 'none'})"
    )
    return litellm, ""


# ================================================================== report


def report(
    args: argparse.Namespace,
    targets: list[Target],
    results: dict[tuple[int, str], list[Phase]],
    rss: dict[str, tuple[float | None, float | None, int]],
    litellm_note: str,
) -> dict[tuple[int, str], dict[str, float]]:
    summary: dict[tuple[int, str], dict[str, float]] = {}
    print("=" * 100)
    print("RESULTS")
    for conc in args.concurrency:
        if (conc, "direct") not in results:
            continue
        print()
        print(
            f"concurrency {conc}: {len(results[(conc, 'direct')])} round(s); req/s = median "
            "over rounds [min-max]; latency pooled over rounds; + = against direct"
        )
        print(
            f"  {'target':<16} {'req/s':>8} {'[min-max]':>15} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'+p50 ms':>8} {'+p99 ms':>8} {'CPU ms/req':>10} {'errors':>6}"
        )
        for target, s, _ in summaries(targets, results, conc):
            summary[(conc, target.name)] = s
            direct = target.name == "direct"
            spread = f"[{s['rps_min']:.0f}-{s['rps_max']:.0f}]"
            print(
                f"  {target.name:<16} {s['rps']:8.1f} {spread:>15} "
                f"{s['p50']:8.2f} {s['p99']:8.2f} "
                f"{'-' if direct else format(s['add50'], '+8.2f'):>8} "
                f"{'-' if direct else format(s['add99'], '+8.2f'):>8} "
                f"{'-' if direct else format(s['cpu_ms'], '10.3f'):>10} {int(s['errors']):>6}"
            )
        if not any(t.name == "litellm" for t in targets):
            print(f"  {'litellm':<16} {litellm_note}")
    print()
    print(
        "  CPU ms/req: the server process's utime+stime over the measured requests / requests "
        "(cascade: its ledger\n  writer thread included; PostgreSQL's own processes are not)."
    )
    print()
    print("memory after the run (/proc/PID/status, summed over the process and its children)")
    common.print_memory(rss, 16)
    return summary


def report_ledger(cascades: list[Cascade], ledger: dict[str, tuple[int, int, int, int]]) -> None:
    print()
    print("ledger (after SIGTERM): rows each cascade server wrote vs requests it was sent")
    for c in cascades:
        rows, distinct, n_calls, calls = ledger[c.name]
        ok = rows == distinct == c.sent and n_calls == calls
        three = f"; answers not calling 3 nodes: {c.not_three}" if c.kind == "three" else ""
        print(
            f"  {c.name:<16} sent {c.sent:>6}  rows {rows:>6}  distinct ids {distinct:>6}  "
            f"calls {calls:>6} (sum of n_calls {n_calls})  "
            f"{'exactly once' if ok else 'MISMATCH'}{three}"
        )


def report_targets(
    args: argparse.Namespace,
    summary: dict[tuple[int, str], dict[str, float]],
    rss: dict[str, tuple[float | None, float | None, int]],
    cascades: list[Cascade],
) -> None:
    print()
    lat_c = 1 if 1 in args.concurrency else min(args.concurrency)
    thr_c = 32 if 32 in args.concurrency else max(args.concurrency)
    print(
        f"targets of the issue, as ratios in this run (latency at concurrency {lat_c}; "
        f"throughput and CPU at {thr_c}; CPU ratios at every concurrency in brackets)"
    )

    def verdict(ok: bool) -> str:
        return "MET" if ok else "NOT MET"

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    thin = {c: summary.get((c, "thin")) for c in args.concurrency}
    for db in args.db:
        one, three = f"cascade-1-{db}", f"cascade-3-{db}"
        s_lat, s_thr = summary.get((lat_c, one)), summary.get((thr_c, one))
        t_thr = thin.get(thr_c)
        if s_lat is None or s_thr is None or t_thr is None:
            continue
        print(f"  ledger {db}")
        add = s_lat["add50"]
        print(
            f"    one-model added p50 at c={lat_c}: {add:+.3f} ms = "
            f"{ratio(add, ADDED_P50_MS):.2f} x the {ADDED_P50_MS:g} ms allowed{'':<12}"
            f"{verdict(add <= ADDED_P50_MS)}"
        )
        r = ratio(s_thr["rps"], t_thr["rps"])
        print(
            f"    one-model req/s at c={thr_c}: {s_thr['rps']:.0f} / thin's {t_thr['rps']:.0f} "
            f"= {r:.2f} (>= {RPS_FRACTION_OF_THIN}){'':<14}{verdict(r >= RPS_FRACTION_OF_THIN)}"
        )
        every = ", ".join(
            f"c={c} {ratio(summary[(c, one)]['cpu_ms'], thin[c]['cpu_ms']):.2f}"
            for c in args.concurrency
            if (c, one) in summary and thin.get(c)
        )
        r = ratio(s_thr["cpu_ms"], t_thr["cpu_ms"])
        print(
            f"    one-model CPU/request: {s_thr['cpu_ms']:.3f} / thin's {t_thr['cpu_ms']:.3f} ms "
            f"= {r:.2f} (<= {CPU_X_THIN}) [{every}]  {verdict(r <= CPU_X_THIN)}"
        )
        mb = rss.get(one, (None,))[0]
        if mb is not None:
            print(
                f"    one-model RSS {mb:.0f} MB = {ratio(mb, RSS_MB):.2f} x {RSS_MB:.0f} MB "
                f"(three-model {rss.get(three, (None,))[0] or float('nan'):.0f} MB){'':<16}"
                f"{verdict(mb < RSS_MB)}"
            )
        s3 = summary.get((thr_c, three))
        if s3 is not None:
            every = ", ".join(
                f"c={c} {ratio(summary[(c, three)]['cpu_ms'], summary[(c, one)]['cpu_ms']):.2f}"
                for c in args.concurrency
                if (c, three) in summary and (c, one) in summary
            )
            r = ratio(s3["cpu_ms"], s_thr["cpu_ms"])
            print(
                f"    three-model CPU/request: {s3['cpu_ms']:.3f} / one-model's "
                f"{s_thr['cpu_ms']:.3f} ms = {r:.2f} (<= {CPU_THREE_X_ONE}) [{every}]  "
                f"{verdict(r <= CPU_THREE_X_ONE)}"
            )
    lite = summary.get((thr_c, "litellm"))
    if lite is not None:
        lat = summary.get((lat_c, "litellm"))
        print(
            f"  LiteLLM for reference: {lite['rps']:.0f} req/s at c={thr_c}, "
            f"{lite['cpu_ms']:.2f} ms CPU/request, added p50 at c={lat_c} "
            f"{lat['add50'] if lat else float('nan'):+.2f} ms, RSS "
            f"{rss.get('litellm', (None,))[0] or float('nan'):.0f} MB"
        )
    print(
        "  note: cascade asks the upstream for logprobs (its confidence signal), so its "
        "upstream answers are larger than\n  the forwarder's and LiteLLM's; the three-model "
        "cascade makes three upstream calls per request."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_round_options(parser)
    parser.add_argument(
        "--litellm-requests",
        type=int,
        default=300,
        help="measured requests per round for LiteLLM's proxy (slow; default 300)",
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32, 128], help="default: 1 32 128"
    )
    parser.add_argument(
        "--db",
        nargs="+",
        choices=("sqlite", "pg"),
        default=["sqlite", "pg"],
        help="ledger databases, one pair of cascade servers each (default: sqlite pg)",
    )
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")
    common.add_traces_option(parser)
    parser.add_argument(
        "--phase-timeout-s", type=float, default=60.0, help="cap on one phase (default 60)"
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=900.0,
        help="no new round starts after this many seconds (default 900)",
    )
    args = parser.parse_args(argv)
    if common.missing_train_traces(args):
        return 2
    if min(args.rounds, args.requests, args.litellm_requests) < 1:
        print("error: --rounds and --*requests must be at least 1", file=sys.stderr)
        return 2
    if any(c < 1 or c > 1024 for c in args.concurrency):
        print("error: each --concurrency must be in 1..1024", file=sys.stderr)
        return 2
    args.db = list(dict.fromkeys(args.db))
    return common.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
