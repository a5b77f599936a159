"""The load generator of the proxy benchmarks, and the rounds driven with it.

The load generator is a child process of its own (this file, run as a script: the scripts
start it through :class:`LoadGen`), pinned beside the upstream, so that the client's CPU is
not the proxy's: aiohttp on uvloop, one pooled session per target and concurrency. It reads
one JSON command per stdin line (a phase: a warm-up, then a fixed number of small
non-streaming chat completions at a fixed concurrency, with the CPU time of the given
processes read around it) and answers one JSON line per command.

On top of it, for proxy_overhead.py and proxy_bench.py: the targets, interleaved rounds of
phases (the targets' order rotated each round, so that machine drift cancels), their
summaries (requests/s, latency, added latency against direct calls, CPU per request) and
the smoke test. Imported as `loadgen` by the scripts of this folder.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import common
from common import median, pct

# ================================================================== the load generator process


async def _drive(
    session: Any,
    url: str,
    data: bytes,
    headers: dict[str, str],
    n: int,
    concurrency: int,
    deadline: float,
    collect: list[str],
) -> dict[str, Any]:
    """Send `n` requests from `concurrency` workers (stop early at `deadline`)."""
    import aiohttp

    lat: list[float] = []
    got: dict[str, list[str | None]] = {h: [] for h in collect}
    state = {"left": n, "errors": 0, "first_error": None}
    clock = time.perf_counter

    def failed(message: str) -> None:
        state["errors"] += 1
        if state["first_error"] is None:
            state["first_error"] = message

    async def worker() -> None:
        while state["left"] > 0 and time.monotonic() < deadline:
            state["left"] -= 1
            t0 = clock()
            try:
                async with session.post(url, data=data, headers=headers) as resp:
                    raw = await resp.read()
                    status = resp.status
                    values = [resp.headers.get(h) for h in collect]
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                failed(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = clock() - t0
            if status != 200 or b'"choices"' not in raw:
                failed(f"HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")
                continue
            lat.append(elapsed * 1000.0)
            for h, v in zip(collect, values, strict=True):
                got[h].append(v)

    t = clock()
    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
    wall = clock() - t
    return {
        "ok": len(lat),
        "errors": state["errors"],
        "first_error": state["first_error"],
        "wall_s": wall,
        "lat_ms": lat,
        "headers": got,
        "truncated": state["left"] > 0,
    }


async def _phase(sessions: dict, cmd: dict[str, Any]) -> dict[str, Any]:
    import aiohttp

    c = int(cmd["concurrency"])
    key = (cmd["url"], c)
    session = sessions.get(key)
    if session is None:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=c, limit_per_host=c),
            timeout=aiohttp.ClientTimeout(total=30.0),
            trust_env=False,
        )
        sessions[key] = session
    data = cmd["body"].encode()
    headers = {"Content-Type": "application/json", **cmd["headers"]}
    deadline = time.monotonic() + float(cmd["timeout_s"])
    collect = list(cmd.get("collect", []))
    warm = await _drive(session, cmd["url"], data, headers, cmd["warmup"], c, deadline, [])
    groups: dict[str, list[int]] = cmd.get("cpu_pids", {})
    before = {name: common.cpu_seconds(pids) for name, pids in groups.items()}
    self_before = time.process_time()
    ticks = common.cpu_ticks()
    run = await _drive(session, cmd["url"], data, headers, cmd["requests"], c, deadline, collect)
    run["cpus"] = common.cpu_use(ticks, common.cpu_ticks())
    self_cpu = time.process_time() - self_before
    after = {name: common.cpu_seconds(pids) for name, pids in groups.items()}
    run["cpu_s"] = {
        name: None if before[name] is None or after[name] is None else after[name] - before[name]
        for name in groups
    }
    run["cpu_s"]["loadgen"] = self_cpu
    run["warmup_errors"] = warm["errors"]
    run["warmup_sent"] = warm["ok"] + warm["errors"]
    if warm["first_error"] and not run["first_error"]:
        run["first_error"] = warm["first_error"]
    run["truncated"] = run["truncated"] or warm["truncated"]
    return run


async def _loadgen() -> None:
    """Read one JSON command per stdin line, answer one JSON line per command."""
    loop = asyncio.get_running_loop()
    sessions: dict = {}
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            cmd = json.loads(line)
            if cmd.get("op") == "quit":
                break
            result = await _phase(sessions, cmd)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
    finally:
        for session in sessions.values():
            await session.close()


def loadgen_main() -> int:
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_loadgen())
    return 0


# ================================================================== driving the load


@dataclasses.dataclass
class Target:
    name: str
    url: str  # chat completions URL
    model: str
    key: str
    server: common.Server | None  # None: the upstream itself (direct)
    note: str
    own_header: str | None = None  # the proxy's self-reported overhead header, if any

    def body(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": common.PROMPT}],
                "max_tokens": common.MAX_TOKENS,
            }
        )


@dataclasses.dataclass
class Phase:
    rps: float
    lat_ms: list[float]
    ok: int
    errors: int
    proxy_cpu_s: float | None
    others_cpu_s: float | None  # the idle servers (they share CPU 0 with the proxy)
    upstream_cpu_s: float | None
    loadgen_cpu_s: float
    wall_s: float
    truncated: bool
    first_error: str | None
    own_ms: list[float] = dataclasses.field(default_factory=list)  # self-reported overhead
    cpus: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # [busy, steal]


class LoadGen:
    """The load generator process (this file, on CPU 1), one phase at a time."""

    def __init__(self, procs: common.Processes, log: Path, env: dict[str, str]) -> None:
        self.proc = procs.spawn(
            [sys.executable, str(Path(__file__).resolve())],
            cpu=1,
            log=log,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.stdin = self.proc.stdin
        self.last: dict[str, Any] = {}  # the load generator's raw answer to the last phase

    def phase(
        self,
        target: Target,
        requests: int,
        warmup: int,
        concurrency: int,
        timeout_s: float,
        cpu_pids: dict[str, list[int]],
        collect: tuple[str, ...] = (),
    ) -> tuple[Phase, dict]:
        if target.own_header and target.own_header not in collect:
            collect = (*collect, target.own_header)
        cmd = {
            "op": "phase",
            "url": target.url,
            "body": target.body(),
            "headers": {"Authorization": f"Bearer {target.key}"},
            "requests": requests,
            "warmup": warmup,
            "concurrency": concurrency,
            "timeout_s": timeout_s,
            "cpu_pids": cpu_pids,
            "collect": list(collect),
        }
        self.stdin.write(json.dumps(cmd) + "\n")
        self.stdin.flush()
        raw = json.loads(common.read_line(self.proc, timeout_s + 60.0, "the load generator"))
        self.last = raw
        cpu = raw["cpu_s"]
        phase = Phase(
            rps=raw["ok"] / raw["wall_s"] if raw["wall_s"] > 0 else 0.0,
            lat_ms=raw["lat_ms"],
            ok=raw["ok"],
            errors=raw["errors"] + raw["warmup_errors"],
            proxy_cpu_s=cpu.get("proxy"),
            others_cpu_s=cpu.get("others"),
            upstream_cpu_s=cpu.get("upstream"),
            loadgen_cpu_s=cpu["loadgen"],
            wall_s=raw["wall_s"],
            truncated=raw["truncated"],
            first_error=raw["first_error"],
            cpus=raw.get("cpus", {}),
        )
        if target.own_header:
            got = raw["headers"].get(target.own_header, [])
            phase.own_ms = [float(v) for v in got if v is not None]
        return phase, raw["headers"]

    def quit(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stdin.write('{"op": "quit"}\n')
            self.stdin.flush()


def add_round_options(parser: argparse.ArgumentParser) -> None:
    """--rounds and --requests, as proxy_overhead.py and proxy_bench.py take them."""
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--requests", type=int, default=1000, help="measured requests per target and round"
    )


def usage(phase: Phase) -> str:
    """CPU use during a phase: each CPU's busy share (steal if any), and the proxy's."""
    parts = []
    for cpu in ("cpu0", "cpu1"):
        busy, steal = phase.cpus.get(cpu, (float("nan"), 0.0))
        parts.append(f"{cpu} {busy:4.0%}" + (f" (steal {steal:.0%})" if steal >= 0.01 else ""))
    if phase.proxy_cpu_s is not None and phase.wall_s > 0:
        parts.append(f"proxy {phase.proxy_cpu_s / phase.wall_s:4.0%}")
    if phase.others_cpu_s and phase.wall_s > 0 and phase.others_cpu_s / phase.wall_s >= 0.02:
        parts.append(f"idle servers {phase.others_cpu_s / phase.wall_s:.0%}")
    return "  ".join(parts)


def flags(phase: Phase) -> str:
    out = " TRUNCATED (phase time cap)" if phase.truncated else ""
    if phase.errors:
        out += f" {phase.errors} errors, first: {phase.first_error}"
    return out


def run_rounds(
    args: argparse.Namespace,
    loadgen: LoadGen,
    targets: list[Target],
    up: common.Server,
    servers: list[common.Server],
    wall0: float,
    width: int,
    requests_of: Callable[[Target], int],
    warmup_of: Callable[[int, int], int],
    collect_of: Callable[[Target], tuple[str, ...]] = lambda target: (),
    on_phase: Callable[[Target, Phase, dict], None] | None = None,
) -> tuple[dict[tuple[int, str], list[Phase]], bool]:
    """Per --concurrency, --rounds rounds of one phase per target (their order rotated each
    round), a line each; no new round after --budget-s. ({(concurrency, name): phases}, whether
    the budget cut the rounds short)."""
    results: dict[tuple[int, str], list[Phase]] = {}
    budget_hit = False
    print("rounds (per phase: req/s, p50/p99 ms; busy share of each CPU, and of the proxy)")
    for conc in args.concurrency:
        for r in range(args.rounds):
            if time.monotonic() - wall0 > args.budget_s:
                budget_hit = True
                break
            shift = r % len(targets)
            for target in targets[shift:] + targets[:shift]:
                n = requests_of(target)
                pids = {"upstream": [up.pid]}
                if target.server is not None:
                    pids["proxy"] = [target.server.pid, *common.child_pids(target.server.pid)]
                others = [s.pid for s in servers if s is not target.server]
                pids["others"] = [p for p in others if Path(f"/proc/{p}").exists()]
                phase, got = loadgen.phase(
                    target,
                    n,
                    warmup_of(n, conc),
                    conc,
                    args.phase_timeout_s,
                    pids,
                    collect=collect_of(target),
                )
                results.setdefault((conc, target.name), []).append(phase)
                if on_phase is not None:
                    on_phase(target, phase, got)
                print(
                    f"  c={conc:<3} round {r + 1}  {target.name:<{width}} {phase.rps:8.1f} req/s  "
                    f"p50 {pct(phase.lat_ms, 50):7.2f}  p99 {pct(phase.lat_ms, 99):7.2f}  "
                    f"{usage(phase)}{flags(phase)}",
                    flush=True,
                )
        if budget_hit:
            print(f"  time budget of {args.budget_s:.0f} s reached: remaining rounds skipped")
            break
    print()
    return results, budget_hit


def summarize(phases: list[Phase], proxied: bool, base: dict | None) -> dict[str, float]:
    """One target's figures at one concurrency: req/s (common.median over rounds, and its min and
    max), p50/p99 (pooled), added p50/p99 over `base` (direct's; None: this is direct), CPU ms
    per request of a proxy, errors."""
    lat = [x for p in phases for x in p.lat_ms]
    rps = [p.rps for p in phases]
    ok = sum(p.ok for p in phases)
    cpu = [p.proxy_cpu_s for p in phases]
    s = {
        "rps": median(rps),
        "rps_min": min(rps),
        "rps_max": max(rps),
        "p50": pct(lat, 50),
        "p99": pct(lat, 99),
        "cpu_ms": sum(cpu) / ok * 1000.0 if ok and proxied and None not in cpu else float("nan"),
        "errors": float(sum(p.errors for p in phases)),
    }
    base = base or s
    s["add50"], s["add99"] = s["p50"] - base["p50"], s["p99"] - base["p99"]
    return s


def summaries(
    targets: list[Target], results: dict[tuple[int, str], list[Phase]], conc: int
) -> Iterator[tuple[Target, dict[str, float], list[Phase]]]:
    """(target, its figures, its phases) of each target measured at `conc`, in order; added
    latency against the first (direct)."""
    base = None
    for target in targets:
        phases = results.get((conc, target.name), [])
        if not phases:
            continue
        s = summarize(phases, target.server is not None, base)
        base = base or s
        yield target, s, phases


def smoke(target: Target) -> str:
    """One request; a short description of the answer, or RuntimeError."""
    status, headers, raw = common.http(
        "POST",
        target.url,
        json.loads(target.body()),
        {"Authorization": f"Bearer {target.key}"},
        timeout=60.0,
    )
    if status != 200:
        raise RuntimeError(f"{target.name}: HTTP {status}: {raw[:300]!r}")
    data = json.loads(raw)
    text = data["choices"][0]["message"]["content"]
    out = f"answer {text!r} from {data.get('model')}"
    extra = data.get("cascade")
    if extra:
        out += (
            f"; cascade calls {[c['model'] for c in extra['calls']]}, reason "
            f"{extra['reason']!r}, overhead {headers.get('x-cascade-overhead-ms')} ms"
        )
    return out


def smoke_all(
    targets: list[Target], width: int, skipping: str, also: tuple[Target, ...] = ()
) -> tuple[list[Target], str | None]:
    """One request to each of `targets` and `also`, a line each. A failing LiteLLM is left out
    of the targets returned (with the note why); any other failure raises."""
    kept, note = list(targets), None
    print("smoke test (one request each)")
    for target in [*targets, *also]:
        try:
            print(f"  {target.name:<{width}} {smoke(target)}")
        except (RuntimeError, OSError, ValueError, KeyError) as exc:
            if target.name != "litellm":
                raise
            print(f"  {'litellm':<{width}} failed: {exc}; {skipping}")
            note = "skipped: its first request failed"
            kept.remove(target)
    print()
    return kept, note


def main(argv: list[str] | None = None) -> int:
    """The load generator process: no options; JSON commands on stdin (see LoadGen)."""
    argparse.ArgumentParser(
        description="The load generator process of the proxy benchmarks: one JSON command per "
        "stdin line, one JSON answer per stdout line (started by proxy_bench.py and "
        "proxy_overhead.py)."
    ).parse_args(argv)
    return loadgen_main()


if __name__ == "__main__":
    sys.exit(main())
