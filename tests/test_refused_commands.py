"""Commands that refuse write nothing: a refused `report`, `serve` or `db` command leaves no
empty ledger file (nor its folder) behind, and does not touch a SQLite file that is not a
ledger. Each runs as a real process in an empty working directory."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from tests.serving import CASCADE, free_port

MODELS = {"small": {"backend": "openai", "base_url": "http://127.0.0.1:9/v1",
                    "price_in_per_mtok": 0.1, "price_out_per_mtok": 0.2}}  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CASCADE_")}
    return {**env, "CASCADE_NO_PROGRESS": "1"}


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CASCADE), *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120
    )


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _config(folder: Path, data: dict) -> Path:
    path = folder / "conf" / "cascade.yaml"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    "args",
    [
        ["report", "spend"],
        ["report", "exits", "--by", "cascade"],
        ["db", "prune", "--before", "30d"],
        ["report", "spend", "--database-url", "sqlite:///sub/dir/ledger.db"],
    ],
    ids=["report-spend", "report-exits", "db-prune", "report-in-a-missing-folder"],
)
def test_a_command_on_a_missing_ledger_refuses_and_creates_nothing(tmp_path, args) -> None:
    res = _run(tmp_path, *args)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("error:") and "does not exist" in res.stderr, res.stderr
    assert "cascade db upgrade" in res.stderr
    assert _files(tmp_path) == []


def test_db_current_on_a_missing_ledger_reads_only(tmp_path) -> None:
    res = _run(tmp_path, "db", "current")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("current None;")
    assert _files(tmp_path) == []


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"models": MODELS, "cascades": {"qa": {"nodes": ["small"], "reference": "small"}}},
         "sqlite:///cascade.db does not exist"),
        ({"models": MODELS, "cascades": {"qa": {"nodes": ["gone"], "reference": "small"}}},
         "unknown model(s) ['gone']"),
    ],
    ids=["missing-ledger", "invalid-config"],
)  # fmt: skip
def test_serve_that_refuses_creates_no_ledger(tmp_path, config, message) -> None:
    path = _config(tmp_path, config)
    res = _run(tmp_path, "serve", "--config", str(path), "--port", str(free_port()))
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert _files(tmp_path) == ["conf", "conf/cascade.yaml"]


def test_report_with_a_missing_config_creates_nothing(tmp_path) -> None:
    res = _run(tmp_path, "report", "spend", "--config", "nowhere.yaml")
    assert res.returncode == 2 and "no such configuration file" in res.stderr
    assert _files(tmp_path) == []


def test_a_sqlite_file_that_is_not_a_ledger_is_left_as_it_was(tmp_path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE notes (text TEXT)")
    before = hashlib.sha256(other.read_bytes()).hexdigest()
    for args in (["report", "spend"], ["db", "prune", "--before", "30d"], ["db", "current"]):
        res = _run(tmp_path, *args, "--database-url", f"sqlite:///{other}")
        assert "cascade db upgrade" in res.stderr or res.stdout.startswith("current None")
        assert hashlib.sha256(other.read_bytes()).hexdigest() == before, args
    assert _files(tmp_path) == ["other.db"]
