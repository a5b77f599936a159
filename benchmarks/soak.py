"""Soak: `cascade serve` at 70% of its measured maximum for N minutes while 5% of upstream
calls fail, then check that nothing was lost, hung or leaked.

Prints figures and verdicts; asserts nothing (exit status 1 when a check fails). Steps:
  1. start the fake upstream (tests/fake_upstream.py, models m1-m3) and `cascade serve`
     (the three-model cascade of benchmarks/proxy_bench.py, whose index policy calls m1, m2
     and m3 for every request, or --cascade one; SQLite or a fresh PostgreSQL ledger)
  2. measure the maximum throughput: --max-seconds of closed-loop load at concurrency
     --max-concurrency, no faults
  3. switch faults on at the upstream: --fault-rate (default 5%) of all upstream calls fail,
     split evenly between dropped connections, 500s, 429s with Retry-After: 1 and calls that
     hang past the proxy's per-call timeout (--hang-ms > --call-timeout-s), one seeded draw per
     call through /admin/faults
  4. open-loop load at --load (default 70%) of that maximum for --minutes (default 10):
     arrivals at a fixed rate, each request its own task, whatever the answers' latency, over
     a pool of --connections (256) keep-alive connections, as a load balancer keeps (the
     warm-up before step 2 opened as many, so the RSS at the start of the soak already holds
     their buffers); the proxy's RSS sampled every 10 s
  5. stop the faults, let in-flight requests finish, SIGTERM the proxy (its ledger writer
     flushes), then read the ledger
Checks: only 200 or the designed 502 (`upstream_failed`: every node failed) came back; no
request hung (no answer within --client-timeout-s); every request sent (warm-up and maximum
included) is in the ledger exactly once, each answered request under the id the client got,
with the status the client saw, and with its calls; RSS grew less than 10% from the start of
the soak to its end.

With `taskset`, the proxy runs on CPU 0, the upstream and this load generator on CPU 1 (as in
proxy_bench.py); with --workers N > 1 nothing is pinned.

With --kill-frozen-db S it measures instead what a SIGKILL loses while the ledger database
hangs (issue 15): `cascade serve` on a fresh PostgreSQL database through a TCP relay
(tests/tcp_relay.py) under --kill-rate requests/s; first a round with the database up
(--kill-after-s of load, then SIGKILL), then a round where the relay is frozen (SIGSTOP: the
database hangs, it does not refuse) for S seconds before the SIGKILL. After each kill the
relay is thawed and the proxy restarted in the same folder, so it replays its spool; then
the answered requests (200s the client got) missing from the ledger are the loss. Check: the
frozen round loses no more than the round with the database up, plus a flush interval's
records (0.25 s).

Run from the repository root:
  .venv/bin/python benchmarks/soak.py [--minutes 10] [--db sqlite|pg] [--cascade three|one]
      [--workers 1] [--fault-rate 0.05] [--load 0.7]
  .venv/bin/python benchmarks/soak.py --kill-frozen-db 20 [--kill-rate 50] [--cascade one]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common

from tests.tcp_relay import Relay, tcp_relay

KEY = "sk-soak-client"
ALLOWED = {(200, None), (502, "upstream_failed")}
RSS_GROWTH_MAX = 0.10


@dataclasses.dataclass
class Tally:
    """What the clients saw in one phase."""

    sent: int = 0
    statuses: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    hung: int = 0
    client_errors: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    ids: dict[str, int] = dataclasses.field(default_factory=dict)  # request id -> status
    lat_ms: list[float] = dataclasses.field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    shed: int = 0  # arrivals not sent: too many requests in flight


async def ask(session: Any, url: str, body: bytes, tally: Tally) -> None:
    """One request; its outcome into `tally` (a client timeout counts as hung)."""
    import aiohttp

    tally.sent += 1
    tally.in_flight += 1
    tally.max_in_flight = max(tally.max_in_flight, tally.in_flight)
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=body) as resp:
            raw = await resp.read()
            status, rid = resp.status, resp.headers.get("x-request-id")
    except TimeoutError:
        tally.hung += 1
        return
    except (aiohttp.ClientError, OSError) as exc:
        tally.client_errors[type(exc).__name__] += 1
        return
    finally:
        tally.in_flight -= 1
    tally.lat_ms.append((time.perf_counter() - t0) * 1000.0)
    code = None
    if status != 200:
        with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
            code = json.loads(raw)["error"]["code"]
    tally.statuses[(status, code)] += 1
    if rid:
        tally.ids[rid] = status


def session_for(timeout_s: float, limit: int) -> Any:
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
        trust_env=False,
    )


async def closed_loop(url: str, body: bytes, conc: int, seconds: float, timeout_s: float) -> Tally:
    """`conc` clients back to back for `seconds`: the throughput ceiling."""
    tally = Tally()
    deadline = time.monotonic() + seconds
    async with session_for(timeout_s, conc) as session:

        async def client() -> None:
            while time.monotonic() < deadline:
                await ask(session, url, body, tally)

        await asyncio.gather(*(client() for _ in range(conc)))
    return tally


async def open_loop(
    url: str,
    body: bytes,
    rate: float,
    seconds: float,
    timeout_s: float,
    max_in_flight: int,
    connections: int,
    sample: Any,
) -> Tally:
    """Arrivals at `rate` per second for `seconds`, each its own task, over a pool of
    `connections` keep-alive connections (as a load balancer keeps; a request beyond them waits
    for one, its clock running); `sample(elapsed, tally)` every second (progress and RSS)."""
    tally = Tally()
    tasks: set[asyncio.Task] = set()
    async with session_for(timeout_s, connections) as session:
        start = time.monotonic()
        next_sample = 1.0
        due = 0
        while (elapsed := time.monotonic() - start) < seconds:
            target = int(elapsed * rate)
            while due < target:
                due += 1
                if tally.in_flight >= max_in_flight:
                    tally.shed += 1
                    continue
                task = asyncio.ensure_future(ask(session, url, body, tally))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            if elapsed >= next_sample:
                sample(elapsed, tally)
                next_sample += 1.0
            await asyncio.sleep(0.002)
        if tasks:
            await asyncio.wait(tasks)
    return tally


def fault_spec(rate: float, retry_after: float, hang_ms: float, seed: int) -> dict:
    """Equal shares of `rate` for drop, 429, 500 and hang, drawn in the fake upstream's order
    (drop, rate_limit, error, malformed, hang), each conditional on the earlier not firing."""
    a = rate / 4.0
    return {
        "model": "*",
        "drop": a,
        "rate_limit": a / (1 - a),
        "retry_after": retry_after,
        "error_rate": a / (1 - 2 * a),
        "error_status": 500,
        "hang": a / (1 - 3 * a),
        "hang_ms": hang_ms,
        "seed": seed,
    }


def soak_config(upstream: str, kind: str, policy: Path, call_timeout_s: float) -> dict:
    config = common.ladder_config(upstream, KEY, kind, policy)
    for model in config["models"].values():
        model["timeout_s"] = call_timeout_s
    return config


def rss_mb(pid: int) -> float | None:
    pids = [pid, *common.child_pids(pid)]
    values = [common.proc_status_mb(p, "VmRSS") for p in pids]
    return None if None in values else sum(values)


def ledger_rows(url: str) -> tuple[dict[str, int], int, int, int]:
    """({request_id: status}, rows, sum of n_calls, call rows) of the whole ledger."""
    queries = (
        "SELECT request_id, status FROM ledger_requests",
        "SELECT COUNT(*), COALESCE(SUM(n_calls), 0) FROM ledger_requests",
        "SELECT COUNT(*) FROM ledger_calls",
    )
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db:
            out = [db.execute(q).fetchall() for q in queries]
    else:
        import psycopg

        with psycopg.connect(url, connect_timeout=10) as db:
            out = [db.execute(q).fetchall() for q in queries]
    ids = {str(rid): int(status) for rid, status in out[0]}
    return ids, int(out[1][0][0]), int(out[1][0][1]), int(out[2][0][0])


def pct(values: list[float], q: float) -> float:
    return common.pct(values, q)


def run(args: argparse.Namespace) -> int:
    taskset = shutil.which("taskset") if (os.cpu_count() or 1) >= 2 and args.workers == 1 else None
    wall0 = time.monotonic()
    load0 = os.getloadavg()
    print("cascade soak (benchmarks/soak.py)")
    print(f"  date        {common.now_utc()}")
    print(f"  machine     {common.machine()}")
    print(f"  load avg    {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start")
    print(f"  command     {common.command(cwd=False)}")
    print(
        f"  setup       {args.cascade}-model cascade, ledger {args.db}, {args.workers} "
        f"worker(s); per-call timeout {args.call_timeout_s} s, retries 2 (429/5xx/connection, "
        f"honouring Retry-After); client timeout {args.client_timeout_s} s"
    )
    print(
        "  pinning     "
        + (f"{taskset}: proxy on CPU 0; upstream + load on CPU 1" if taskset else "none")
    )
    tmp = Path(tempfile.mkdtemp(prefix="cascade-soak-"))
    procs = common.Processes(taskset)
    env = common.clean_env(PYTHONUNBUFFERED="1")
    pg_name: str | None = None
    failures: list[str] = []
    try:
        upstream = common.start_upstream(procs, tmp, env, common.MODELS, common.THREE_ANSWERS).url

        fitted = common.fit_policies(args.traces, tmp, ("one", "three"))
        policy = fitted[args.cascade][0]
        walked = common.policy_walk(fitted["three"][1], common.THREE_ANSWERS)
        if args.cascade == "three" and walked != list(common.MODELS):
            raise RuntimeError("the three-node policy does not call all three nodes")
        if args.db == "pg":
            pg_name, url = common.pg_create()
        else:
            url = f"sqlite:///{tmp / 'ledger.db'}"
        config = tmp / "cascade.yaml"
        config.write_text(
            json.dumps(soak_config(upstream, args.cascade, policy, args.call_timeout_s))
        )
        server = common.start_cascade(
            procs,
            "cascade",
            config,
            tmp / "serve.log",
            url,
            env,
            cwd=tmp,
            extra=("--workers", str(args.workers)),
        )
        proc = server.proc
        common.wait_ready(server, "/health")
        if taskset:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, {1})
        chat = server.url + common.CHAT
        body = json.dumps(
            {
                "model": args.cascade,
                "messages": [{"role": "user", "content": common.PROMPT}],
                "max_tokens": common.MAX_TOKENS,
            }
        ).encode()
        print(f"  servers     upstream {upstream}; cascade pid {proc.pid} {server.url}")
        print()

        runner = asyncio.Runner(loop_factory=_loop_factory())
        phases: dict[str, Tally] = {}
        # the warm-up opens as many connections as the soak's pool may: the RSS at the start
        # of the soak already holds that many connections' buffers
        phases["warm-up"] = runner.run(
            closed_loop(chat, body, args.connections, 5.0, args.client_timeout_s)
        )
        phases["maximum"] = peak = runner.run(
            closed_loop(chat, body, args.max_concurrency, args.max_seconds, args.client_timeout_s)
        )
        ok_peak = peak.statuses[(200, None)]
        max_rps = ok_peak / args.max_seconds
        rate = args.load * max_rps
        print(
            f"maximum: {max_rps:.0f} requests/s ({ok_peak} answered in {args.max_seconds:.0f} s "
            f"at concurrency {args.max_concurrency}, no faults; statuses {dict(peak.statuses)})"
        )
        if peak.statuses.keys() - {(200, None)} or peak.hung or not ok_peak:
            raise RuntimeError(f"the proxy is not healthy without faults: {peak}")

        spec = fault_spec(args.fault_rate, args.retry_after_s, args.hang_ms, args.seed)
        status, _, raw = common.http("POST", upstream + "/admin/faults", spec)
        if status != 200:
            raise RuntimeError(f"POST /admin/faults: HTTP {status}: {raw[:300]!r}")
        common.http("DELETE", upstream + "/admin/stats")
        rss: list[tuple[float, float]] = []
        start_rss = rss_mb(proc.pid)
        print(
            f"soak: {rate:.0f} requests/s ({args.load:.0%} of the maximum) for "
            f"{args.minutes:g} min with faults {json.dumps(spec)}; RSS at start {start_rss:.1f} MB"
        )
        proxy_pids = [proc.pid, *common.child_pids(proc.pid)]
        last: dict[str, Any] = {
            "t": 0.0,
            "sent": 0,
            "cpu": common.cpu_seconds(proxy_pids),
            "ticks": common.cpu_ticks(),
        }

        def sample(elapsed: float, tally: Tally) -> None:
            if int(elapsed) % 10 == 0:
                now = rss_mb(proc.pid)
                if now is not None:
                    rss.append((elapsed, now))
            if int(elapsed) % args.progress_s == 0:
                got = dict(collections.Counter({f"{s}": n for (s, _), n in tally.statuses.items()}))
                span = max(elapsed - last["t"], 1e-9)
                r = (tally.sent - last["sent"]) / span
                cpu, ticks = common.cpu_seconds(proxy_pids), common.cpu_ticks()
                busy = common.cpu_use(last["ticks"], ticks)
                share = (cpu - last["cpu"]) / span if cpu is not None and last["cpu"] else 0.0
                last.update(t=elapsed, sent=tally.sent, cpu=cpu, ticks=ticks)
                cpus = " ".join(f"{c} {b:.0%}" for c, (b, _) in sorted(busy.items()))
                print(
                    f"  t={elapsed:5.0f}s sent {tally.sent:>7} ({r:5.0f}/s) statuses {got} "
                    f"hung {tally.hung} in flight {tally.in_flight:>4}; proxy CPU {share:4.0%} "
                    f"({cpus}); RSS {rss[-1][1] if rss else float('nan'):.1f} MB",
                    flush=True,
                )

        phases["soak"] = soak = runner.run(
            open_loop(
                chat,
                body,
                rate,
                args.minutes * 60.0,
                args.client_timeout_s,
                args.max_in_flight,
                args.connections,
                sample,
            )
        )
        end_rss = rss_mb(proc.pid)
        runner.close()
        common.http("DELETE", upstream + "/admin/faults")
        _, _, raw = common.http("GET", upstream + "/admin/stats")
        upstream_stats = json.loads(raw)
        health = common.http("GET", server.url + "/health")[2]
        procs.stop(proc, wait_s=60.0)  # SIGTERM: the ledger writer flushes
        ledger, rows, n_calls, call_rows = ledger_rows(url)
    finally:
        procs.stop_all()
        if pg_name is not None and not args.keep:
            with contextlib.suppress(Exception):
                common.pg_drop(pg_name)

    # ---- the report
    print()
    print("=" * 100)
    sent = sum(t.sent for t in phases.values())
    print(
        f"SOAK RESULTS ({args.minutes:g} min at {rate:.0f} requests/s = {args.load:.0%} of "
        f"{max_rps:.0f}; {args.cascade}-model cascade; ledger {args.db}; {args.workers} "
        "worker(s))"
    )
    achieved = soak.sent / (args.minutes * 60.0)
    print(
        f"  sent in the soak {soak.sent} ({achieved:.0f}/s), shed {soak.shed}; max in flight "
        f"{soak.max_in_flight}; latency p50 {pct(soak.lat_ms, 50):.1f} ms, p99 "
        f"{pct(soak.lat_ms, 99):.1f} ms, max {max(soak.lat_ms, default=float('nan')):.0f} ms"
    )
    models = upstream_stats.get("models", {})
    calls = sum(m["calls"] for m in models.values())
    faults: collections.Counter = collections.Counter()
    for m in models.values():
        faults.update({k: v for k, v in m["faults"].items() if v})
    print(
        f"  upstream calls in the soak {calls}; faulted {sum(faults.values())} "
        f"({sum(faults.values()) / max(calls, 1):.2%}): {dict(faults)}"
    )
    statuses = {f"{s} {c or ''}".strip(): n for (s, c), n in soak.statuses.items()}
    bad = {k: n for k, n in soak.statuses.items() if k not in ALLOWED}
    print(f"  status codes {statuses}")
    verdict(failures, not bad, f"only 200 and the designed 502 (other: {bad or 'none'})")
    verdict(
        failures,
        soak.hung == 0 and not soak.client_errors,
        f"hung requests (no answer in {args.client_timeout_s:g} s) {soak.hung}; client "
        f"errors {dict(soak.client_errors) or 0}",
    )
    known = {rid: s for t in phases.values() for rid, s in t.ids.items()}
    missing = [rid for rid in known if rid not in ledger]
    wrong = [rid for rid, s in known.items() if rid in ledger and ledger[rid] != s]
    verdict(
        failures,
        rows == sent and len(ledger) == rows and not missing and not wrong,
        f"ledger: {rows} requests for {sent} sent (warm-up + maximum + soak), distinct ids "
        f"{len(ledger)}, duplicates {rows - len(ledger)}; answered ids missing {len(missing)}, "
        f"with another status {len(wrong)}",
    )
    verdict(failures, n_calls == call_rows, f"ledger calls {call_rows} (sum of n_calls {n_calls})")
    growth = (end_rss - start_rss) / start_rss if start_rss and end_rss else float("nan")
    peak_rss = max((v for _, v in rss), default=float("nan"))
    verdict(
        failures,
        growth < RSS_GROWTH_MAX,
        f"RSS start {start_rss:.1f} MB, end {end_rss:.1f} MB, peak {peak_rss:.1f} MB: growth "
        f"{growth:+.1%} (< {RSS_GROWTH_MAX:.0%})",
    )
    if rss:
        marks = [rss[int(i * (len(rss) - 1) / 5)] for i in range(6)]
        print("  RSS over the soak " + ", ".join(f"{t:.0f}s {v:.1f}" for t, v in marks))
    with contextlib.suppress(ValueError, KeyError):
        print(f"  ledger status before shutdown: {json.loads(health)['database']}")
    load = os.getloadavg()
    print(f"  load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"  logs in {tmp}; wall time {time.monotonic() - wall0:.0f} s")
    print("PASS" if not failures else f"FAIL: {len(failures)} check(s) failed")
    return 0 if not failures else 1


FLUSH_S = 0.25  # the ledger writer's flush interval in `cascade serve`


def kill_round(
    procs: common.Processes,
    folder: Path,
    config: Path,
    env: dict[str, str],
    relay: Relay,
    url: str,
    body: bytes,
    args: argparse.Namespace,
    frozen_s: float,
) -> dict[str, Any]:
    """A proxy whose ledger goes through `relay`: --kill-after-s of load at --kill-rate, the
    relay frozen for `frozen_s` (0: never) with the load going on, SIGKILL; then the relay
    thawed and the proxy restarted in the same folder (it replays its spool). What the
    clients got and what the ledger holds of it."""
    folder.mkdir()
    server = common.start_cascade(
        procs, folder.name, config, folder / "serve.log", url, env, folder
    )
    common.wait_ready(server, "/health")
    chat = server.url + common.CHAT
    seen: dict[str, Any] = {}

    async def scenario() -> Tally:
        async def chaos() -> None:
            await asyncio.sleep(args.kill_after_s)
            if frozen_s:
                relay.freeze()
                await asyncio.sleep(frozen_s)
            _, _, raw = await asyncio.to_thread(common.http, "GET", server.url + "/health")
            seen["health"] = json.loads(raw).get("database")
            server.proc.send_signal(signal.SIGKILL)

        killer = asyncio.ensure_future(chaos())
        seconds = args.kill_after_s + frozen_s + 1.0  # on past the kill: those fail
        tally = await open_loop(
            chat, body, args.kill_rate, seconds, 10.0, args.max_in_flight, 64, lambda *_: None
        )
        await killer
        return tally

    runner = asyncio.Runner(loop_factory=_loop_factory())
    try:
        tally = runner.run(scenario())
    finally:
        runner.close()
        relay.thaw()
    server.proc.wait(timeout=30)
    spool = folder / "cascade-ledger.spool.jsonl"
    spooled = len(spool.read_text().splitlines()) if spool.exists() else 0
    again = common.start_cascade(
        procs, folder.name + "-again", config, folder / "restart.log", url, env, folder
    )
    common.wait_ready(again, "/health")
    deadline = time.monotonic() + 120.0
    while spool.exists() and spool.stat().st_size and time.monotonic() < deadline:
        time.sleep(0.2)
    procs.stop(again.proc, wait_s=60.0)  # SIGTERM: flushed
    ledger, _, _, _ = ledger_rows(url)
    answered = [rid for rid, status in tally.ids.items() if status == 200]
    lost = sum(rid not in ledger for rid in answered)
    return {
        "answered": len(answered),
        "spooled": spooled,
        "lost": lost,
        "health": seen.get("health"),
        "client_errors": dict(tally.client_errors),
    }


def run_kill(args: argparse.Namespace) -> int:
    """--kill-frozen-db: what a SIGKILL loses with the ledger database up, then frozen."""
    print("cascade soak: SIGKILL while the ledger database hangs (benchmarks/soak.py)")
    print(f"  date        {common.now_utc()}")
    print(f"  machine     {common.machine()}")
    print(f"  command     {common.command(cwd=False)}")
    tmp = Path(tempfile.mkdtemp(prefix="cascade-kill-"))
    procs = common.Processes(None)
    env = common.clean_env(PYTHONUNBUFFERED="1")
    pg_name: str | None = None
    try:
        upstream = common.start_upstream(procs, tmp, env, common.MODELS, common.THREE_ANSWERS).url
        fitted = common.fit_policies(args.traces, tmp, ("one", "three"))
        policy = fitted[args.cascade][0]
        config = tmp / "cascade.yaml"
        config.write_text(
            json.dumps(soak_config(upstream, args.cascade, policy, args.call_timeout_s))
        )
        body = json.dumps(
            {
                "model": args.cascade,
                "messages": [{"role": "user", "content": common.PROMPT}],
                "max_tokens": common.MAX_TOKENS,
            }
        ).encode()
        pg_name, _ = common.pg_create()
        with tcp_relay(5432) as relay:
            url = f"postgresql://postgres@127.0.0.1:{relay.port}/{pg_name}"
            print(
                f"  setup       {args.cascade}-model cascade at {args.kill_rate:g} requests/s; "
                f"PostgreSQL ledger {pg_name} through a TCP relay (pid {relay.proc.pid})"
            )
            print()
            up = kill_round(procs, tmp / "up", config, env, relay, url, body, args, 0.0)
            frozen = kill_round(
                procs, tmp / "frozen", config, env, relay, url, body, args, args.kill_frozen_db
            )
    finally:
        procs.stop_all()
        if pg_name is not None and not args.keep:
            with contextlib.suppress(Exception):
                common.pg_drop(pg_name)
    rate = args.kill_rate
    print("=" * 100)
    for name, r in (("database up", up), (f"database frozen {args.kill_frozen_db:g} s", frozen)):
        print(
            f"  SIGKILL, {name:<22}: answered {r['answered']:>5}, in the spool at the kill "
            f"{r['spooled']:>5}, lost {r['lost']:>4} (= {r['lost'] / rate:.2f} s of records)"
        )
        print(f"      ledger in /health just before the kill: {r['health']}")
    failures: list[str] = []
    allowed = up["lost"] + rate * FLUSH_S
    verdict(
        failures,
        frozen["lost"] <= allowed,
        f"frozen database: lost {frozen['lost']} <= {allowed:.0f} (lost with it up + a "
        f"flush interval's {rate * FLUSH_S:.0f})",
    )
    verdict(
        failures,
        (frozen["health"] or {}).get("status") == "degraded",
        "/health said degraded while the database hung",
    )
    print(f"  logs in {tmp}")
    print("PASS" if not failures else f"FAIL: {len(failures)} check(s) failed")
    return 0 if not failures else 1


def verdict(failures: list[str], ok: bool, text: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {text}")
    if not ok:
        failures.append(text)


def _loop_factory() -> Any:
    try:
        import uvloop

        return uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length (default 10)")
    parser.add_argument("--db", choices=("sqlite", "pg"), default="sqlite")
    parser.add_argument("--cascade", choices=("three", "one"), default="three")
    parser.add_argument("--workers", type=int, default=1, help="cascade serve --workers")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of calls failing")
    parser.add_argument("--load", type=float, default=0.7, help="share of the maximum rate")
    parser.add_argument("--max-seconds", type=float, default=10.0, help="maximum's measurement")
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--max-in-flight", type=int, default=2048, help="shed beyond this")
    parser.add_argument(
        "--connections", type=int, default=256, help="client keep-alive connections (pool)"
    )
    parser.add_argument("--call-timeout-s", type=float, default=2.0, help="per upstream call")
    parser.add_argument("--hang-ms", type=float, default=10000.0, help="a hung call's wait")
    parser.add_argument("--retry-after-s", type=float, default=1.0, help="the 429s' Retry-After")
    parser.add_argument("--client-timeout-s", type=float, default=30.0, help="= hung")
    parser.add_argument("--progress-s", type=int, default=60, help="progress line every N s")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL database")
    parser.add_argument(
        "--kill-frozen-db",
        type=float,
        default=None,
        metavar="S",
        help="instead of the soak: SIGKILL loss with the PostgreSQL ledger up, then frozen "
        "for S s (a hung database, through a SIGSTOPped TCP relay)",
    )
    parser.add_argument("--kill-rate", type=float, default=50.0, help="requests/s (kill test)")
    parser.add_argument("--kill-after-s", type=float, default=5.0, help="load before it")
    common.add_traces_option(parser)
    args = parser.parse_args(argv)
    if common.missing_train_traces(args):
        return 2
    if args.kill_frozen_db is not None:
        if not (args.kill_frozen_db > 0 and args.kill_rate > 0 and args.kill_after_s > 0):
            print("error: need --kill-frozen-db, --kill-rate, --kill-after-s > 0", file=sys.stderr)
            return 2
        return common.run_main(run_kill, args)
    if not (0 < args.fault_rate < 0.8 and 0 < args.load <= 1 and args.minutes > 0):
        print("error: need 0 < --fault-rate < 0.8, 0 < --load <= 1, --minutes > 0", file=sys.stderr)
        return 2
    if args.hang_ms / 1000.0 <= args.call_timeout_s:
        print("error: --hang-ms must exceed --call-timeout-s", file=sys.stderr)
        return 2
    args.progress_s = max(1, args.progress_s)
    return common.run_main(run, args)


if __name__ == "__main__":
    sys.exit(main())
