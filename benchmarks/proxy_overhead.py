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
import asyncio
import contextlib
import dataclasses
import json
import os
import platform
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import common

REPO = common.REPO

TARGET_ADDED_P50_MS = 1.0
TARGET_FRACTION_OF_LITELLM = 0.25
TARGET_THROUGHPUT_X = 2.0
TARGET_RSS_MB = 250.0
STEP_TARGET_US = 20.0  # benchmarks/speed.py's target for one CascadePolicy.step

MODEL = "m1"  # the upstream's model name
ONE_NODE_SOURCE = "llama3.1-8b"  # the trace model whose rows fit the one-node policy
FIVE = ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b", "llama3.1-405b")
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
PROMPT = (
    "Answer the multiple-choice question below by outputting A, B, C, or D. Don't say "
    "anything else.\n\nQuestion: What is 2 + 3?\n\nChoices:\nA: 4\nB: 5\nC: 6\nD: 7\n\nAnswer: "
)
MAX_TOKENS = 8
# what `litellm[proxy]` brings that its proxy needs to start (litellm 1.110's extra also
# pins `litellm-proxy`, which not every package index serves)
LITELLM_PROXY_DEPS = (
    "orjson backoff apscheduler fastapi-sso pyjwt python-multipart cryptography rq gunicorn "
    "litellm-proxy-extras litellm-enterprise restrictedpython tomlkit semver backports-zstd "
    "pynacl expression mcp soundfile polars inquirerpy azure-identity azure-storage-blob hiredis"
)
READY_S = 120.0  # deadline for a server to answer its health check
PROXY_ENV_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY")


# ================================================================== load generator process


def _cpu_seconds(pids: list[int]) -> float | None:
    """utime + stime of the processes (all their threads), in seconds; None if one is gone."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        fields = text[text.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total / os.sysconf("SC_CLK_TCK")


def _cpu_ticks() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    out: dict[str, list[int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *values = line.split()
                out[name] = [int(v) for v in values[:8]]
    return out


def _cpu_use(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, list[float]]:
    """Per CPU: [busy, steal] as fractions of the elapsed jiffies."""
    out: dict[str, list[float]] = {}
    for name, b in before.items():
        a = after.get(name)
        if a is None:
            continue
        d = [x - y for x, y in zip(a, b, strict=True)]
        total = sum(d) or 1
        out[name] = [(d[0] + d[1] + d[2] + d[5] + d[6]) / total, d[7] / total]
    return out


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
    before = {name: _cpu_seconds(pids) for name, pids in groups.items()}
    self_before = time.process_time()
    ticks = _cpu_ticks()
    run = await _drive(session, cmd["url"], data, headers, cmd["requests"], c, deadline, collect)
    run["cpus"] = _cpu_use(ticks, _cpu_ticks())
    self_cpu = time.process_time() - self_before
    after = {name: _cpu_seconds(pids) for name, pids in groups.items()}
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


# ================================================================== orchestration helpers


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if this benchmark dies (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROXY_ENV_VARS}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never an env proxy


def http(
    method: str, url: str, body: Any = None, headers: dict | None = None, timeout: float = 10.0
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("      " + line for line in text[-lines:])


@dataclasses.dataclass
class Server:
    name: str
    proc: subprocess.Popen
    log: Path
    url: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid


class Processes:
    """Every child process of the benchmark; `stop_all` ends them (TERM, then KILL)."""

    def __init__(self, taskset: str | None) -> None:
        self.taskset = taskset
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Any] = []

    def spawn(
        self,
        cmd: list[str],
        cpu: int | None,
        log: Path,
        env: dict[str, str],
        stdin: Any = subprocess.DEVNULL,
        stdout: Any = None,
        text: bool = False,
        cwd: Path | None = None,
    ) -> subprocess.Popen:
        if self.taskset and cpu is not None:
            cmd = [self.taskset, "-c", str(cpu), *cmd]  # taskset execs: same pid
        handle = open(log, "wb")  # noqa: SIM115 - closed in stop_all
        self.logs.append(handle)
        proc = subprocess.Popen(
            cmd,
            stdin=stdin,
            stdout=handle if stdout is None else stdout,
            stderr=handle,
            env=env,
            cwd=cwd or REPO,
            preexec_fn=_die_with_parent,
            text=text,
            bufsize=1 if text else -1,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, wait_s: float = 10.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc)
        for handle in self.logs:
            with contextlib.suppress(Exception):
                handle.close()


def wait_ready(server: Server, path: str, seconds: float = READY_S) -> float:
    """Poll GET url+path until 200; seconds it took. RuntimeError on exit or deadline."""
    start = time.monotonic()
    deadline = start + seconds
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with status {server.proc.returncode} before it was "
                f"ready; log {server.log}:\n{_tail(server.log)}"
            )
        with contextlib.suppress(OSError):
            status, _, _ = http("GET", server.url + path, timeout=2.0)
            if status == 200:
                return time.monotonic() - start
        time.sleep(0.2)
    raise RuntimeError(
        f"{server.name} not ready after {seconds:.0f} s (stalled?); log {server.log}:\n"
        f"{_tail(server.log)}"
    )


def read_line(proc: subprocess.Popen, seconds: float, what: str) -> str:
    """One line from the child's stdout within `seconds`, else RuntimeError."""
    ready, _, _ = select.select([proc.stdout], [], [], seconds)
    if not ready:
        raise RuntimeError(f"no answer from {what} within {seconds:.0f} s")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{what} closed its output (exit status {proc.poll()})")
    return line


def proc_status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return None


def cpus_of(pid: int) -> str:
    """The CPUs a process may run on (Cpus_allowed_list of /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def child_pids(pid: int) -> list[int]:
    """Descendants of `pid` (workers a server may fork), from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                text = (entry / "stat").read_text()
                parents[int(entry.name)] = int(text[text.rindex(")") + 2 :].split()[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        out += kids
        frontier += kids
    return out


def version_of(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def start_upstream(
    procs: Processes,
    tmp: Path,
    env: dict[str, str],
    models: tuple[str, ...],
    answers: dict[str, tuple[str, float]],
) -> Server:
    """The fake upstream on CPU 1 serving `models`, its canned `answers` set
    ({model: (answer, confidence)}); its log is tmp/upstream.log."""
    log = tmp / "upstream.log"
    proc = procs.spawn(
        [
            *(sys.executable, "-m", "tests.fake_upstream"),
            *("--host", "127.0.0.1", "--port", "0", "--models", ",".join(models)),
        ],
        cpu=1,
        log=log,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    line = read_line(proc, 30.0, "the fake upstream")
    if not line.startswith("listening on http://127.0.0.1:"):
        raise RuntimeError(f"unexpected first line from the fake upstream: {line!r}")
    url = line.split()[-1].strip()
    status, _, raw = http(
        "POST",
        url + "/admin/answers",
        [{"model": m, "answer": a, "confidence": c} for m, (a, c) in answers.items()],
    )
    if status != 200:
        raise RuntimeError(f"POST /admin/answers: HTTP {status}: {raw[:200]!r}")
    return Server("upstream", proc, log, url)


def cascade_command() -> list[str]:
    """`cascade` from this Python's environment (or the CLI through `python -c`)."""
    exe = Path(sys.executable).with_name("cascade")
    return [str(exe)] if exe.is_file() else [
        sys.executable, "-c", "from cli.main import app; app()",
    ]  # fmt: skip


def start_cascade(
    procs: Processes,
    name: str,
    config: Path,
    log: Path,
    db_url: str,
    env: dict[str, str],
    cwd: Path | None = None,
    extra: tuple[str, ...] = (),
) -> Server:
    """`cascade serve --config config` on CPU 0 (not yet ready), with its ledger at `db_url`
    (on, as in production: `cascade db upgrade` creates its schema first)."""
    cmd = cascade_command()
    cenv = dict(env, CASCADE_DATABASE_URL=db_url)
    done = subprocess.run([*cmd, "db", "upgrade"], env=cenv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"cascade db upgrade ({name}): {done.stderr[-500:]}")
    port = _free_port()
    proc = procs.spawn(
        [*cmd, "serve", "--config", str(config), "--port", str(port), *extra],
        cpu=0,
        log=log,
        env=cenv,
        cwd=cwd,
    )
    return Server(name, proc, log, f"http://127.0.0.1:{port}")


def spawn_litellm(
    procs: Processes, tmp: Path, env: dict[str, str], upstream: str, master_key: str
) -> Server:
    """LiteLLM's proxy (`openai/m1` at the upstream) on CPU 0, not yet ready."""
    cfg = tmp / "litellm.yaml"
    cfg.write_text(litellm_config(upstream, master_key))
    port = _free_port()
    lenv = {k: v for k, v in env.items() if not k.startswith(("DATABASE_", "REDIS_"))}
    lenv.update(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",  # also silences uvicorn's per-request access log
        DISABLE_ADMIN_UI="True",
    )
    log = tmp / "litellm.log"
    proc = procs.spawn(
        [
            *litellm_command(),
            *("--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)),
        ],
        cpu=0,
        log=log,
        env=lenv,
    )
    return Server("litellm", proc, log, f"http://127.0.0.1:{port}")


def rss_of(servers: list[Server]) -> dict[str, tuple[float | None, float | None, int]]:
    """{name: (VmRSS MB, VmHWM MB, processes)}, each summed over the server's process tree."""
    rss: dict[str, tuple[float | None, float | None, int]] = {}
    for server in servers:
        pids = [server.pid, *child_pids(server.pid)]
        now = [proc_status_mb(p, "VmRSS") for p in pids]
        peak = [proc_status_mb(p, "VmHWM") for p in pids]
        rss[server.name] = (
            None if None in now else sum(now),
            None if None in peak else sum(peak),
            len(pids),
        )
    return rss


# ================================================================== policies


def fit_policies(traces: Path, folder: Path) -> tuple[Path, Path, dict, dict, float]:
    """The one-node artifact (m1) and the five-node artifact (the trace names), saved."""
    from calibration.artifact import build_artifact, choose_mu, save_artifact
    from calibration.fit import DEFAULT_MUS, FittedIndex
    from calibration.traces import load_traces

    t = time.perf_counter()
    train = load_traces(traces / "mmlu-llama-train.jsonl")
    one = train.select_models([ONE_NODE_SOURCE])
    one = dataclasses.replace(one, models=(MODEL,))
    fitted = FittedIndex(one, recall=True, models=[MODEL])
    art1 = build_artifact(fitted, 0.2, train_path="mmlu-llama-train.jsonl", answer_kind=one.kind)
    path1 = folder / "policy-1node.json"
    save_artifact(art1, path1)
    fitted5 = FittedIndex(train, recall=True, models=list(FIVE))
    mu, target = choose_mu(
        fitted5, lam=None, target_accuracy=0.97, max_cost_usd=None, mus=DEFAULT_MUS
    )
    art5 = build_artifact(
        fitted5, mu, train_path="mmlu-llama-train.jsonl", answer_kind=train.kind, target=target
    )
    path5 = folder / "policy-5node.json"
    save_artifact(art5, path5)
    return path1, path5, art1, art5, time.perf_counter() - t


def policy_walk(art: dict, answers: dict[str, tuple[str, float]]) -> list[str]:
    """The nodes the policy calls for PROMPT under `answers` ({model: (answer, confidence)};
    no I/O)."""
    from policies.policy import policy_from_artifact

    policy = policy_from_artifact(art)
    names = [n["model"] for n in art["nodes"]]
    step = policy.first(policy.root_state(PROMPT))
    explored: list[int] = []
    extracted: list[str | None] = [None] * len(names)
    conf: list[float | None] = [None] * len(names)
    while step.next_node is not None and step.next_node not in explored:
        k = step.next_node
        explored.append(k)
        extracted[k], conf[k] = answers[names[k]]
        step = policy.step(explored, extracted, conf)
    return [names[k] for k in explored]


def time_steps(art5: dict, traces: Path, reps: int) -> dict[str, float]:
    """CascadePolicy.step over mmlu-llama-test rows x explored prefixes 1..5, one by one."""
    import numpy as np

    from calibration.traces import load_traces
    from policies.policy import policy_from_artifact

    policy = policy_from_artifact(art5)
    test = load_traces(traces / "mmlu-llama-test.jsonl")
    cols = [test.models.index(n["model"]) for n in art5["nodes"]]
    n = len(cols)
    calls = []
    for r in range(len(test)):
        for k in range(1, n + 1):
            extracted = [test.extracted[r][cols[j]] if j < k else None for j in range(n)]
            conf = [float(test.confidence[r, cols[j]]) if j < k else None for j in range(n)]
            calls.append((list(range(k)), extracted, conf))
    step = policy.step
    for args in calls[:200]:
        step(*args)
    t = time.perf_counter_ns()
    for _ in range(reps):
        for args in calls:
            step(*args)
    loop_us = (time.perf_counter_ns() - t) / (reps * len(calls)) / 1e3
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


# ================================================================== configs


def cascade_config(upstream: str, key: str, models: dict[str, float], cascade: dict) -> dict:
    return {
        "models": {
            name: {
                "backend": "openai",
                "base_url": f"{upstream}/v1",
                "price_in_per_mtok": price,
                "price_out_per_mtok": price,
                "timeout_s": 30.0,
            }
            for name, price in models.items()
        },
        "cascades": cascade,
        "server": {"api_keys": [key]},
    }


def litellm_config(upstream: str, master_key: str) -> str:
    # JSON is YAML; no callbacks, no telemetry, no database, no spend or error logs
    return json.dumps(
        {
            "model_list": [
                {
                    "model_name": MODEL,
                    "litellm_params": {
                        "model": f"openai/{MODEL}",
                        "api_base": f"{upstream}/v1",
                        "api_key": "sk-dummy-upstream-key",
                    },
                }
            ],
            "litellm_settings": {
                "telemetry": False,
                "callbacks": [],
                "success_callback": [],
                "failure_callback": [],
                "set_verbose": False,
            },
            "general_settings": {
                "master_key": master_key,
                "disable_spend_logs": True,
                "disable_error_logs": True,
            },
        },
        indent=1,
    )


def litellm_command() -> list[str]:
    exe = Path(sys.executable).with_name("litellm")
    if exe.is_file():
        return [str(exe)]
    code = "import sys; from litellm_cli.main import proxy_server; sys.exit(proxy_server())"
    return [sys.executable, "-c", code]


def litellm_missing_reason(log: Path) -> str | None:
    """The import error in LiteLLM's log, if it died of a missing proxy extra."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for line in reversed(text.splitlines()):
        if "ModuleNotFoundError" in line or "ImportError" in line:
            return line.strip()
    return None


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


@dataclasses.dataclass
class Target:
    name: str
    url: str  # chat completions URL
    model: str
    key: str
    server: Server | None  # None: the upstream itself (direct)
    note: str
    own_header: str | None = None  # the proxy's self-reported overhead header, if any

    def body(self) -> str:
        return json.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": MAX_TOKENS,
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
    def __init__(self, procs: Processes, log: Path, env: dict[str, str]) -> None:
        self.proc = procs.spawn(
            [sys.executable, str(Path(__file__).resolve()), "--loadgen"],
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
        raw = json.loads(read_line(self.proc, timeout_s + 60.0, "the load generator"))
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


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def median(values: list[float]) -> float:
    import numpy as np

    return float(np.median(values)) if values else float("nan")


def print_header(
    title: str,
    taskset: str | None,
    pinned: str,
    packages: tuple[str, ...],
    load: str,
    top: tuple[tuple[str, str], ...] = (),
    bottom: tuple[tuple[str, str], ...] = (),
) -> None:
    """The run's description, a `label  value` line each; `top` rows follow the machine's,
    `bottom` rows precede the command's."""
    if taskset:
        pinning = f"{taskset}: {pinned}"
    else:
        pinning = "none (taskset missing or fewer than 2 CPUs): figures are noisier"
    rows = (
        ("date", common.now_utc()),
        ("machine", common.machine()),
        *top,
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("packages", ", ".join(f"{d} {version_of(d)}" for d in packages)),
        ("pinning", pinning),
        ("load", load),
        (
            "request",
            f"non-streaming chat completion, one user message ({len(PROMPT)} chars), "
            f"max_tokens {MAX_TOKENS}; the upstream answers one token",
        ),
        *bottom,
        ("command", common.command()),
    )
    print(title)
    for label, value in rows:
        print(f"  {label:<11} {value}")
    print()


def run_rounds(
    args: argparse.Namespace,
    loadgen: LoadGen,
    targets: list[Target],
    up: Server,
    servers: list[Server],
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
                    pids["proxy"] = [target.server.pid, *child_pids(target.server.pid)]
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
    """One target's figures at one concurrency: req/s (median over rounds, and its min and
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


def print_memory(rss: dict[str, tuple[float | None, float | None, int]], width: int) -> None:
    print(f"  {'server':<{width}} {'VmRSS MB':>9} {'VmHWM MB (peak)':>16}")
    for name, (now, peak, n) in rss.items():
        kids = f"  ({n} processes)" if n > 1 else ""
        now_txt = "?" if now is None else f"{now:9.1f}"
        peak_txt = "?" if peak is None else f"{peak:16.1f}"
        print(f"  {name:<{width}} {now_txt:>9} {peak_txt:>16}{kids}")


def smoke(target: Target) -> str:
    """One request; a short description of the answer, or RuntimeError."""
    status, headers, raw = http(
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
    env = _clean_env(PYTHONUNBUFFERED="1")
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
        path1, path5, art1, art5, fit_s = fit_policies(args.traces, tmp)
        print(
            f"  one node  : {ONE_NODE_SOURCE} rows renamed {MODEL}; lambda "
            f"{art1['lambda']:.4f}; {art1['hash'][:19]}"
        )
        nodes5 = " -> ".join(n["model"] for n in art5["nodes"])
        print(
            f"  five nodes: {nodes5}; target accuracy 0.97; lambda {art5['lambda']:.4f}; "
            f"{art5['hash'][:19]}"
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


def add_round_options(parser: argparse.ArgumentParser) -> None:
    """--rounds and --requests, as this script and proxy_bench.py take them."""
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument(
        "--requests", type=int, default=1000, help="measured requests per target and round"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loadgen", action="store_true", help=argparse.SUPPRESS)
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
    if args.loadgen:
        return loadgen_main()
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
