"""Real processes for the end-to-end tests: the fake upstream and `cascade serve`.

Not a test module: the plumbing the tests share (free ports, readiness, config files, the
ledger's schema, starting and stopping the processes). What a test checks stays in the test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
CASCADE = Path(sys.executable).with_name("cascade")
QUESTION = "Which letter? (A) one (B) two"
# the real MMLU traces' models, USD per million tokens in and out; listed out of price order
TRACE_PRICES = {"llama3.1-405b": (3.0, 3.0), "llama3.2-1b": (0.1, 0.1), "llama3.1-8b": (0.2, 0.4)}

Output = int | IO[Any] | Path | None  # as Popen's stdout/stderr, or a file to write


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 30.0) -> None:
    """Until `url` answers at all (any status); an error if `proc` exits first."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited: {proc.stderr.read() if proc.stderr else ''}")
        try:
            httpx.get(url, timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {seconds} s")


def stop(proc: subprocess.Popen, seconds: float = 10.0) -> int:
    """SIGTERM, as a process manager would, and its exit code (killed if it hangs)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def write_config(folder: Path, config: dict) -> Path:
    """`folder`/cascade.yaml holding `config` (JSON is YAML)."""
    path = folder / "cascade.yaml"
    path.write_text(json.dumps(config))
    return path


def sqlite_env(ledger: Path, **extra: str) -> dict[str, str]:
    """This environment with the ledger in the SQLite file `ledger`, and `extra`."""
    return {**os.environ, "CASCADE_DATABASE_URL": f"sqlite:///{ledger}", **extra}


def db_upgrade(env: dict[str, str]) -> None:
    """`cascade db upgrade` on the ledger `env` names."""
    done = subprocess.run(
        [str(CASCADE), "db", "upgrade"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


@contextmanager
def upstream_admin(url: str) -> Iterator[httpx.Client]:
    """An httpx client on the fake upstream at `url`, its faults cleared, counters at zero."""
    with httpx.Client(base_url=url, timeout=5.0) as client:
        client.delete("/admin/faults").raise_for_status()
        client.delete("/admin/stats").raise_for_status()
        yield client


@dataclasses.dataclass
class Running:
    """A running process and the base URL it serves (no trailing slash, no /v1)."""

    url: str
    proc: subprocess.Popen


def _first_line(proc: subprocess.Popen, seconds: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(timeout=seconds)
    return proc.stdout.readline() if ready else ""


@contextmanager
def fake_upstream(
    models: str, *args: str, log: Path | None = None, start_s: float = 30.0
) -> Iterator[Running]:
    """tests/fake_upstream.py on a free port of 127.0.0.1 serving `models` (comma-separated),
    with more command-line `args`; its stderr goes to `log` (else a temporary file) and is
    shown if it does not start. Stopped (SIGTERM) at exit."""
    cmd = [sys.executable, "-m", "tests.fake_upstream", "--host", "127.0.0.1", "--port", "0"]
    cmd += ["--models", models, *args]
    with log.open("w+", encoding="utf-8") if log else tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=errors, text=True)
        try:
            line = _first_line(proc, start_s)
            if not line.startswith("listening on http://127.0.0.1:"):
                proc.kill()
                proc.wait()
                errors.seek(0)
                pytest.fail(f"fake upstream did not start: {line!r} {errors.read()!r}")
            yield Running(line.split()[-1].strip(), proc)
        finally:
            stop(proc)
            proc.stdout.close()


def start_proxy(
    config: Path,
    env: dict[str, str],
    *,
    port: int | None = None,
    workers: int | None = None,
    cwd: Path | None = None,
    stdout: Output = subprocess.PIPE,
    stderr: Output = subprocess.PIPE,
    args: tuple[str, ...] = (),
) -> Running:
    """`cascade serve --config config` on `port` (else a free one), with more command-line
    `args`, not yet waited for. `stdout`/`stderr` are as Popen's (pipes in text mode) or
    the path of a file to write."""
    port = port or free_port()
    cmd = [str(CASCADE), "serve", "--config", str(config), "--port", str(port), *args]
    if workers is not None:
        cmd += ["--workers", str(workers)]
    opened: list[IO[Any]] = []

    def target(output: Output) -> int | IO[Any] | None:
        if isinstance(output, Path):
            opened.append(output.open("w"))
            return opened[-1]
        return output

    try:
        proc = subprocess.Popen(
            cmd, stdout=target(stdout), stderr=target(stderr), text=True, env=env, cwd=cwd
        )
    finally:
        for f in opened:  # the child has its own copies
            f.close()
    return Running(f"http://127.0.0.1:{port}", proc)


@contextmanager
def running_proxy(
    config: Path, env: dict[str, str], *, ready_s: float = 30.0, stop_s: float = 10.0, **start: Any
) -> Iterator[Running]:
    """`cascade serve` (start_proxy, with its options `start`), answering on /health; SIGTERM
    at exit (which also flushes its ledger writer), waiting up to `stop_s` for it to end."""
    running = start_proxy(config, env, **start)
    try:
        wait_ready(f"{running.url}/health", running.proc, ready_s)
        yield running
    finally:
        stop(running.proc, stop_s)
