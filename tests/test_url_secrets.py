"""Passwords in database URLs never reach a message: not the user part (`user:pw@host`), not
a query parameter (`?password=...`, `sslpassword`, tokens and secrets). Checked on the
masking function and on what real `cascade` processes print and serve."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import httpx
import pytest

from proxy.ledger.db import redact, safe_url, url_secrets
from tests.serving import CASCADE, fake_upstream, running_proxy, write_config

SECRETS = ("pw-in-userinfo", "hunter2-in-query", "ssl-key-pass")
URL = (
    "postgresql://bob:pw-in-userinfo@127.0.0.1:1/ledger?connect_timeout=2"
    "&password=hunter2-in-query&sslpassword=ssl-key-pass&sslmode=disable"
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://bob:s3cr3t@db:5432/x", "postgresql://bob:***@db:5432/x"),
        (
            "postgresql://bob@db/x?password=s3cr3t&sslmode=require",
            "postgresql://bob@db/x?password=***&sslmode=require",
        ),
        (
            "postgres://db/x?sslmode=verify-full&sslpassword=k3y&PASSWORD=p",
            "postgres://db/x?sslmode=verify-full&sslpassword=***&PASSWORD=***",
        ),
        (
            "postgresql://db/x?api_key=a&secret=b&token=c",
            "postgresql://db/x?api_key=***&secret=***&token=***",
        ),
        ("postgresql://b:p%40ss@db/x?pass%77ord=z", "postgresql://b:***@db/x?pass%77ord=***"),
        ("sqlite:////var/lib/cascade/ledger.db", "sqlite:////var/lib/cascade/ledger.db"),
        ("not a url?password=s3cr3t", "not a url?password=***"),  # unparseable: masked too
    ],
)
def test_safe_url_masks_the_password_wherever_it_is_written(url: str, shown: str) -> None:
    assert safe_url(url) == shown


def test_redact_masks_every_secret_of_the_url_in_any_text() -> None:
    text = f"could not connect to {URL}: password hunter2-in-query refused for bob"
    masked = redact(text, URL)
    assert not any(s in masked for s in SECRETS), masked
    assert "127.0.0.1:1/ledger" in masked and "sslmode=disable" in masked
    assert set(url_secrets("postgresql://b:p%40ss@db/x")) == {"p%40ss", "p@ss"}


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CASCADE_NO_PROGRESS": "1"}
    env.pop("CASCADE_DATABASE_URL", None)
    return subprocess.run(
        [str(CASCADE), *args], capture_output=True, text=True, timeout=120, cwd=cwd, env=env
    )


@pytest.mark.parametrize(
    "command",
    [
        ("db", "upgrade"),
        ("db", "current"),
        ("db", "prune", "--before", "30d"),
        ("report", "spend"),
        ("report", "errors", "--format", "json"),
    ],
)
def test_cli_errors_show_the_url_without_its_secrets(command: tuple, tmp_path: Path) -> None:
    done = _run(*command, "--database-url", URL, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    out = done.stdout + done.stderr
    assert out.startswith("error: ") and "127.0.0.1:1/ledger" in out, out
    assert "password=***" in out and "bob:***@" in out, out
    assert not any(s in out for s in SECRETS), out


def test_serve_logs_and_health_show_the_url_without_its_secrets(tmp_path: Path) -> None:
    """A proxy whose database is unreachable: its warnings, its writer's log and /health
    name the database, never its password."""
    with fake_upstream("small") as up:
        config = write_config(
            tmp_path,
            {"models": {"small": {"backend": "openai", "base_url": f"{up.url}/v1"}}},
        )
        env = {**os.environ, "CASCADE_DATABASE_URL": URL}
        log = tmp_path / "serve.log"
        with running_proxy(config, env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT) as px:
            r = httpx.post(
                f"{px.url}/v1/chat/completions",
                json={"model": "small", "messages": [{"role": "user", "content": "hi"}]},
                timeout=10.0,
            )
            assert r.status_code == 200
            health = httpx.get(f"{px.url}/health", timeout=5.0).text
    text = log.read_text()
    assert "serving anyway" in text and "bob:***@127.0.0.1:1/ledger" in text, text
    assert "is unreachable" in text and "password=***" in text, text
    assert "database unavailable" in health
    for secret in SECRETS:
        assert secret not in text, text
        assert secret not in health, health
