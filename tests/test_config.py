"""The proxy configuration: YAML validated with pydantic, errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from proxy.config import (
    CascadeConfig,
    Config,
    ConfigError,
    LedgerConfig,
    ServerConfig,
    load_config,
    parse_config,
)
from tests.serving import free_port
from upstreams.settings import ModelConfig

README = Path(__file__).resolve().parents[1] / "README.md"
MINIMAL = {
    "models": {"small": {"backend": "openai", "base_url": "http://127.0.0.1:1/v1"}},
    "cascades": {"qa": {"nodes": ["small"], "reference": "small"}},
}


def test_the_readme_example_is_a_valid_config() -> None:
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), re.S)
    assert block, "README has a yaml example"
    config = parse_config(yaml.safe_load(block.group(1)), "README")
    assert config.cascades["qa"].nodes == ["llama-8b", "llama-70b", "gpt-4o"]
    assert config.models["gpt-4o"].backend == "litellm"


def _every_key() -> set[str]:
    """Every key the config takes, dotted (NAME: any model or cascade name)."""
    assert set(Config.model_fields) == {"models", "cascades", "server", "database_url", "ledger"}
    return (
        {"database_url"}
        | {f"ledger.{k}" for k in LedgerConfig.model_fields}
        | {f"models.NAME.{k}" for k in ModelConfig.model_fields}
        | {f"cascades.NAME.{k}" for k in CascadeConfig.model_fields}
        | {f"server.{k}" for k in ServerConfig.model_fields}
    )


def test_the_readme_configuration_reference_lists_every_key() -> None:
    text = README.read_text()
    section = text.split("### Configuration reference", 1)[1].split("\n### ", 1)[0]
    listed = set()
    for row in re.findall(r"^\| `([^|]+)` \|", section, re.M):
        first, *more = [k.strip(" `") for k in row.split(",")]
        listed.add(first)
        listed |= {first.rsplit(".", 1)[0] + "." + k for k in more}  # `a.b.x`, `y`
    assert listed == _every_key()
    for env in ("CASCADE_CONFIG", "CASCADE_DATABASE_URL"):
        assert f"`{env}`" in section
    assert "postgresql://user:pw@host:5432/db" in section


def test_the_readme_local_trial_config_is_valid() -> None:
    trial = README.read_text().split("<<'YAML'\n", 1)[1].split("\nYAML\n", 1)[0]
    config = parse_config(yaml.safe_load(trial), "README trial")
    assert config.cascades["mmlu"].policy == "policy.json"
    assert set(config.cascades["mmlu"].nodes) <= set(config.models)


@pytest.mark.parametrize(
    ("patch", "key"),
    [
        ({"models": {"small": {"backend": "grpc"}}}, "models.small.backend"),
        ({"models": {"small": {"backend": "openai"}}}, "models.small"),
        ({"models": {"small": {"backend": "openai", "base_url": "x", "timeout_s": -1}}},
         "models.small.timeout_s"),
        ({"models": {"small": {"backend": "openai", "base_url": "x", "colour": "red"}}},
         "models.small.colour"),
        ({"cascades": {"qa": {"nodes": ["small", "huge"], "reference": "small"}}},
         "cascades.qa: unknown model(s) ['huge']"),
        ({"cascades": {"qa": {"nodes": [], "reference": "small"}}}, "cascades.qa.nodes"),
        ({"server": {"max_body_bytes": "lots"}}, "server.max_body_bytes"),
    ],
)  # fmt: skip
def test_every_error_names_its_key(patch: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({**MINIMAL, **patch}, "cfg.yaml")
    assert key in str(err.value) and "cfg.yaml" in str(err.value)


def test_env_vars_choose_the_file_and_the_database(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "database_url": "sqlite:///a.db"}))
    monkeypatch.setenv("CASCADE_CONFIG", str(path))
    assert load_config().database_url == "sqlite:///a.db"
    monkeypatch.setenv("CASCADE_DATABASE_URL", "postgresql://127.0.0.1/test")
    assert load_config().database_url == "postgresql://127.0.0.1/test"
    monkeypatch.delenv("CASCADE_CONFIG")
    with pytest.raises(ConfigError, match="CASCADE_CONFIG"):
        load_config()


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    data = {
        "models": {"r": {"backend": "replay", "traces": ["t.jsonl"]}},
        "cascades": {"qa": {"nodes": ["r"], "reference": "r", "policy": "p/policy.json"}},
    }
    path = tmp_path / "sub" / "c.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    assert config.models["r"].traces == [str(path.parent / "t.jsonl")]
    assert config.cascades["qa"].policy == str(path.parent / "p" / "policy.json")


def test_unreadable_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed")
    with pytest.raises(ConfigError, match="cannot read YAML"):
        load_config(bad)
    bad.write_text("- a list")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**MINIMAL, "models": {"small": {"backend": "openai"}}}, "models.small"),
        (
            {**MINIMAL, "cascades": {"qa": {"nodes": ["small"], "reference": "small",
                                            "policy": "missing.json"}}},
            "missing.json does not exist",
        ),
    ],
)  # fmt: skip
def test_serve_refuses_a_bad_config_or_a_missing_policy(tmp_path: Path, data, message) -> None:
    import subprocess
    import sys

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    cascade = Path(sys.executable).with_name("cascade")
    res = subprocess.run(
        [str(cascade), "serve", "--config", str(path), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2
    assert "\nerror:" in "\n" + res.stderr  # an error line (warnings may come first)
    assert message in res.stderr.split("error:", 1)[1]


def test_serve_refuses_a_ledger_without_the_current_schema(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cascade = Path(sys.executable).with_name("cascade")
    env = {**os.environ, "CASCADE_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    res = subprocess.run(
        [str(cascade), "serve", "--config", str(path), "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert res.returncode == 2 and "cascade db upgrade" in res.stderr
    assert "'small' has no known price" in res.stderr  # MINIMAL's model has none
    up = subprocess.run(
        [str(cascade), "db", "upgrade"], capture_output=True, text=True, timeout=60, env=env
    )
    assert up.returncode == 0 and "ledger at revision" in up.stdout
