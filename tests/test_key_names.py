"""Client keys with names: the config names them (`server.api_keys` as {name, key} objects
or a mapping, `NAME:KEY` in the keys' environment variable), the ledger stores the name, and
`cascade report spend --by key` shows it; a key without a name is still its hash id. Report
tables written to a pipe are not wrapped at 80 columns. Through a real proxy and the real
console script."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from contextlib import closing
from pathlib import Path

import httpx
import pytest

from proxy.config import ConfigError, parse_config
from proxy.ledger.records import key_id
from tests.serving import CASCADE, db_upgrade, running_proxy, sqlite_env, write_config

KEYS = {"bob": "sk-bob-b0b", "carol": "sk-carol-ca401", None: "sk-unnamed-0000"}
MODEL = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1"}


@pytest.fixture(scope="module")
def ledger(upstream: str, tmp_path_factory) -> Path:
    """A proxy whose keys are bob (config), carol (environment) and one unnamed, after
    2 requests with bob's key, 1 with carol's and 1 with the unnamed one."""
    folder = tmp_path_factory.mktemp("keys")
    config = {
        "models": {
            "small": {"backend": "openai", "base_url": f"{upstream}/v1",
                      "price_in_per_mtok": 0.1, "price_out_per_mtok": 0.2},
        },
        "cascades": {"qa": {"nodes": ["small"], "reference": "small"}},
        "server": {
            "api_keys": [KEYS[None], {"name": "bob", "key": KEYS["bob"]}],
            "api_keys_env": "KEY_NAMES_TEST_KEYS",
        },
    }  # fmt: skip
    path = folder / "ledger.db"
    env = sqlite_env(path, KEY_NAMES_TEST_KEYS=f"carol:{KEYS['carol']}")
    db_upgrade(env)
    with running_proxy(write_config(folder, config), env, cwd=folder) as proxy:
        for key in (KEYS["bob"], KEYS["bob"], KEYS["carol"], KEYS[None]):
            reply = httpx.post(
                f"{proxy.url}/v1/chat/completions",
                json={"model": "qa", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {key}"},
                timeout=20.0,
            )
            assert reply.status_code == 200, reply.text
    return path  # stopped: every record flushed


def _report(ledger: Path, *args: str) -> subprocess.CompletedProcess:
    res = subprocess.run(
        [str(CASCADE), "report", "spend", "--since", "1d", "--database-url",
         f"sqlite:///{ledger}", *args],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return res


def test_the_ledger_stores_key_names_and_the_hash_of_an_unnamed_key(ledger: Path) -> None:
    with closing(sqlite3.connect(ledger)) as db:
        stored = dict(db.execute("SELECT api_key, count(*) FROM ledger_requests GROUP BY 1"))
        daily = {r[0] for r in db.execute("SELECT api_key FROM ledger_daily")}
    assert stored == {"bob": 2, "carol": 1, key_id(KEYS[None]): 1}
    assert daily == {"bob", "carol", key_id(KEYS[None])}
    wal = Path(f"{ledger}-wal")
    raw = ledger.read_bytes() + (wal.read_bytes() if wal.exists() else b"")
    assert not any(key.encode() in raw for key in KEYS.values())  # never the keys themselves


def test_spend_by_key_shows_the_names(ledger: Path) -> None:
    doc = json.loads(_report(ledger, "--by", "key", "--format", "json").stdout)
    rows = {r["group"]: (r["requests"], r["calls"]) for r in doc["rows"]}
    assert rows == {"bob": (2, 2), "carol": (1, 1), key_id(KEYS[None]): (1, 1)}


def test_report_tables_on_a_pipe_are_not_wrapped(ledger: Path) -> None:
    by_key = _report(ledger, "--by", "key").stdout.splitlines()
    header = [line for line in by_key if "group" in line]
    assert len(header) == 1, by_key  # one header line, each name whole
    for column in ("requests", "calls", "tokens_in", "tokens_out", "cost_usd", "unpriced_calls"):
        assert f" {column} " in header[0], header
    assert any("│ bob " in line and "│ 2 " in line for line in by_key), by_key
    by_model = _report(ledger).stdout.splitlines()
    header = [line for line in by_model if "group" in line]
    assert len(header) == 1 and " requests_answered " in header[0] and " calls_made " in header[0]
    notes = [line for line in by_model if line.startswith("by model: requests_answered")]
    assert len(notes) == 1 and notes[0].endswith("under the model it called")  # on one line


@pytest.mark.parametrize(
    ("api_keys", "names"),
    [
        ({"alice": "sk-a", "batch": "sk-b"}, {"sk-a": "alice", "sk-b": "batch"}),
        (["sk-a", {"name": "bob", "key": "sk-b"}], {"sk-a": None, "sk-b": "bob"}),
    ],
)
def test_keys_are_named_as_a_mapping_or_as_name_key_objects(api_keys, names) -> None:
    config = parse_config({"models": {"m": MODEL}, "server": {"api_keys": api_keys}})
    assert config.key_names() == names
    assert config.client_keys() == set(names)


@pytest.mark.parametrize(
    ("api_keys", "message"),
    [
        ([{"name": "a", "key": "k1"}, {"name": "a", "key": "k2"}], "'a' is given to two keys"),
        ([{"name": "a", "key": "k1"}, {"name": "b", "key": "k1"}], "named 'a' is also named 'b'"),
        ({"x" * 65: "k1"}, "a name is a string of 1-64 characters"),
        ({"alice": ""}, "[0] (alice): the key must be a non-empty string"),
        ([{"name": "a"}], "[0]: expected a non-empty key or {name, key}"),
        ("sk-one", "a list of keys and {name, key} objects, or a mapping name -> key"),
    ],
)
def test_bad_key_names_are_config_errors(api_keys, message) -> None:
    with pytest.raises(ConfigError, match=r"server\.api_keys") as err:
        parse_config({"models": {"m": MODEL}, "server": {"api_keys": api_keys}})
    assert message in str(err.value)
