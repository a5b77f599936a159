"""`cascade serve` and `cascade demo` starting and stopping, as real processes: a busy port is
an error at once (before anything is loaded or fitted), the port can be taken again right
after a crash, and the server says what it does on stderr (one line at start, one per
policy reload, one at shutdown; an access log only when asked)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from calibration.artifact import build_artifact, save_artifact
from proxy.config import parse_config
from proxy.http.announce import start_line
from proxy.http.state import ProxyState
from tests.policy_walk import fit_small_large
from tests.serving import (
    CASCADE,
    QUESTION,
    db_upgrade,
    free_port,
    running_proxy,
    sqlite_env,
    start_proxy,
    stop,
    wait_ready,
    write_config,
)

ADMIN = "sk-admin-serve-start"


@pytest.fixture()
def busy_port() -> Iterator[int]:
    """A port of 127.0.0.1 another program listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}


def test_demo_on_a_busy_port_fails_before_fitting_and_prints_no_example(
    busy_port: int, tmp_path: Path
) -> None:
    res = subprocess.run(
        [str(CASCADE), "demo", "--port", str(busy_port)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_clean_env(),
    )  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert res.stderr == (
        f"error: cannot listen: port {busy_port} on 127.0.0.1 is in use "
        "(choose another with --port)\n"
    )
    assert res.stdout == ""  # no curl or openai example for a server that never ran
    assert list(tmp_path.iterdir()) == []  # nor a ledger


def test_serve_on_a_busy_port_fails_before_loading_its_config(
    busy_port: int, tmp_path: Path
) -> None:
    config = {  # a policy and a ledger that do not exist: loading would fail on them
        "models": {"small": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}},
        "cascades": {"qa": {"nodes": ["small"], "reference": "small", "policy": "none.json"}},
    }
    for workers in ("1", "2"):
        res = subprocess.run(
            [str(CASCADE), "serve", "--config", str(write_config(tmp_path, config)),
             "--port", str(busy_port), "--workers", workers],
            capture_output=True, text=True, timeout=120, cwd=tmp_path, env=_clean_env(),
        )  # fmt: skip
        assert res.returncode == 2, res.stderr
        assert f"port {busy_port} on 127.0.0.1 is in use" in res.stderr
        assert "none.json" not in res.stderr and "warning" not in res.stderr


def _time_wait_on(port: int) -> bool:
    """Whether a TCP connection on local port `port` is in TIME_WAIT (/proc/net/tcp)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "06":
            return True
    return False


def _one_min_config(folder: Path) -> Path:
    return write_config(
        folder,
        {
            "models": {
                "small": {
                    "backend": "openai",
                    "base_url": "http://127.0.0.1:9/v1",
                    "price_in_per_mtok": 0.1,
                    "price_out_per_mtok": 0.2,
                }
            },
            "cascades": {"qa": {"nodes": ["small"], "reference": "small"}},
        },
    )


def test_serve_takes_its_port_again_right_after_a_crash(tmp_path: Path) -> None:
    env = sqlite_env(tmp_path / "ledger.db")
    db_upgrade(env)
    config, port = _one_min_config(tmp_path), free_port()
    first = start_proxy(config, env, port=port, cwd=tmp_path)
    try:
        wait_ready(f"{first.url}/health", first.proc)
        client = socket.create_connection(("127.0.0.1", port))  # a connection the crash cuts
        client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert client.recv(100).startswith(b"HTTP/1.1 200")
    finally:
        first.proc.kill()  # a crash: the server's end is closed first ...
        first.proc.wait()
    while client.recv(65536):  # (read to its end, so that closing sends no reset)
        pass
    client.close()  # ... so that end lingers in TIME_WAIT
    assert _time_wait_on(port)
    second = start_proxy(config, env, port=port, cwd=tmp_path)
    try:
        wait_ready(f"{second.url}/health", second.proc)
        assert httpx.get(f"{second.url}/health", timeout=5).json()["status"] in ("ok", "degraded")
    finally:
        stop(second.proc)


def test_the_start_line_masks_the_database_password() -> None:
    config = parse_config(
        {
            "models": {"small": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}},
            "database_url": "postgresql://cascade:s3cret-pw@db.internal:5432/ledger",
        }
    )
    state = ProxyState(config=config, backends={}, engines={})
    line = start_line(state, "http://0.0.0.0:8080")
    assert "s3cret-pw" not in line
    assert "database postgresql://cascade:***@db.internal:5432/ledger" in line
    assert line.startswith("serving on http://0.0.0.0:8080 (pid ")


@pytest.fixture(scope="module")
def two_policies(synthetic: tuple[Path, Path], tmp_path_factory) -> tuple[Path, Path]:
    """Two artifacts over small -> large with different tables (so different hashes)."""
    fitted = fit_small_large(synthetic[0])
    folder = tmp_path_factory.mktemp("policies")
    paths = []
    for name, mu in (("accurate", 0.0), ("cheap", 50.0)):
        paths.append(folder / f"{name}.json")
        art = build_artifact(fitted, mu, train_path="synthetic", answer_kind="choice")
        save_artifact(art, paths[-1])
    return paths[0], paths[1]


def _policy_config(folder: Path, upstream: str, policy: Path, watch_s: float) -> Path:
    shutil.copy(policy, folder / "policy.json")
    models = {
        name: {"backend": "openai", "base_url": f"{upstream}/v1", "price_in_per_mtok": price,
               "price_out_per_mtok": price}
        for name, price in (("small", 0.1), ("large", 10.0))
    }  # fmt: skip
    return write_config(
        folder,
        {
            "models": models,
            "cascades": {
                "qa": {"nodes": ["small", "large"], "reference": "large", "policy": "policy.json"}
            },
            "server": {"admin_key_env": "SERVE_START_ADMIN", "policy_watch_s": watch_s},
        },
    )


def _chat(url: str) -> None:
    reply = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "qa", "messages": [{"role": "user", "content": QUESTION}]},
        timeout=20.0,
    )
    assert reply.status_code == 200, reply.text


def _reload(url: str) -> None:
    done = httpx.post(
        f"{url}/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10.0
    )
    assert done.status_code == 200, done.text


def _until(predicate, seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


def _hash(path: Path) -> str:
    return json.loads(path.read_text())["hash"][:19]


def test_serve_logs_its_start_reloads_requests_and_shutdown(
    upstream: str, two_policies: tuple[Path, Path], tmp_path: Path
) -> None:
    accurate, cheap = two_policies
    config = _policy_config(tmp_path, upstream, accurate, watch_s=0.2)
    ledger = tmp_path / "ledger.db"
    env = sqlite_env(ledger, SERVE_START_ADMIN=ADMIN)
    db_upgrade(env)
    log = tmp_path / "stderr.log"
    proxy = start_proxy(config, env, cwd=tmp_path, stderr=log, args=("--access-log",))
    url, proc = proxy.url, proxy.proc
    try:
        wait_ready(f"{url}/health", proc)
        for _ in range(3):
            _chat(url)
        _reload(url)
        os.replace(shutil.copy(cheap, tmp_path / "new.json"), tmp_path / "policy.json")
        assert _until(lambda: "its file changed" in log.read_text())
    finally:
        assert stop(proc) in (0, -signal.SIGTERM)
    lines = log.read_text().splitlines()
    starts = [line for line in lines if " INFO cascade: serving on " in line]
    assert len(starts) == 1, lines
    assert f"serving on {url} (pid {proc.pid}): cascade qa policy {_hash(accurate)} " in starts[0]
    assert "(small -> large)" in starts[0]
    assert f"database sqlite:///{ledger};" in starts[0]
    assert f"spool {tmp_path / 'ledger.spool.jsonl'}" in starts[0]
    by_admin = [line for line in lines if "policy reloaded (POST /admin/reload)" in line]
    assert len(by_admin) == 1
    assert f"cascade qa {_hash(accurate)} -> {_hash(accurate)} (unchanged)" in by_admin[0]
    by_file = [line for line in lines if "policy reloaded (its file changed)" in line]
    assert len(by_file) == 1 and f"cascade qa {_hash(accurate)} -> {_hash(cheap)}" in by_file[0]
    access = [line for line in lines if '"POST /v1/chat/completions HTTP/1.1" 200' in line]
    assert len(access) == 3, lines
    stops = [line for line in lines if " INFO cascade: stopped " in line]
    assert len(stops) == 1, lines
    assert re.search(r"ledger: 3 request\(s\) written, 0 replayed from the spool, 0 left", stops[0])
    assert lines.index(starts[0]) < lines.index(by_admin[0]) < lines.index(stops[0])


def test_workers_each_log_their_start_the_reload_and_their_shutdown_without_access_log(
    upstream: str, two_policies: tuple[Path, Path], tmp_path: Path
) -> None:
    accurate, _ = two_policies
    config = _policy_config(tmp_path, upstream, accurate, watch_s=0)
    env = sqlite_env(tmp_path / "ledger.db", SERVE_START_ADMIN=ADMIN)
    db_upgrade(env)
    log = tmp_path / "stderr.log"
    with running_proxy(config, env, workers=2, cwd=tmp_path, stderr=log, stop_s=30) as proxy:
        assert _until(lambda: log.read_text().count("INFO cascade: serving on ") == 2)
        for _ in range(4):
            _chat(proxy.url)
        _reload(proxy.url)
        assert _until(lambda: "another worker was asked to" in log.read_text())
    lines = log.read_text().splitlines()
    starts = [line for line in lines if "INFO cascade: serving on " in line]
    pids = {re.search(r"\(pid (\d+)\)", line).group(1) for line in starts}
    spools = {re.search(r"spool (\S+)$", line).group(1) for line in starts}
    assert len(starts) == 2 and len(pids) == 2 and len(spools) == 2, starts
    assert all(f"serving on {proxy.url} (pid " in line for line in starts)
    assert sum("policy reloaded (POST /admin/reload)" in line for line in lines) == 1
    assert sum("policy reloaded (another worker was asked to)" in line for line in lines) == 1
    stops = [line for line in lines if "INFO cascade: stopped (pid " in line]
    assert len(stops) == 2, lines
    written = sum(int(re.search(r"ledger: (\d+) request", line).group(1)) for line in stops)
    assert written == 4
    assert not any("HTTP/1.1" in line for line in lines)  # no access log unless asked
