"""docker-compose.yml is a valid Compose file and tells the truth about the deployment.

The schema is the Compose Specification JSON schema shipped by docker-compose 1.29.2
(Apache-2.0, see deploy/compose-spec.NOTICE), saved as deploy/compose_spec.json.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from proxy.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "deploy" / "compose_spec.json"
CASCADE_YAML = ROOT / "deploy" / "cascade.yaml"
DOCKERFILE = ROOT / "Dockerfile"

_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str) -> str:
    """Compose variable substitution with every variable unset: ${X:-default} -> default."""

    def sub(m: re.Match) -> str:
        name, op, arg = m.groups()
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return f"<{name}>"  # required variable: any value will do here
        return ""

    return _VAR.sub(sub, value).replace("$$", "$")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    schema = json.loads(SCHEMA.read_text())
    # the file says draft 2019-09 under a URI jsonschema does not recognise: name it here
    jsonschema.Draft201909Validator.check_schema(schema)
    return jsonschema.Draft201909Validator(schema)


@pytest.fixture(scope="module")
def cascade_yaml() -> dict:
    return yaml.safe_load(CASCADE_YAML.read_text())


def env(service: dict) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v)) for k, v in raw.items()}


def command_args(service: dict) -> list[str]:
    cmd = service.get("command", [])
    args = shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]
    return [interpolate(a) for a in args]


def flag(args: list[str], name: str) -> str | None:
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def mounts(service: dict) -> list[dict]:
    """Service volumes in long form: {type, source, target}."""
    out = []
    for v in service.get("volumes", []):
        if isinstance(v, dict):
            out.append(v)
            continue
        source, target = v.split(":")[:2]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        out.append({"type": kind, "source": source, "target": target})
    return out


def test_compose_validates_against_the_compose_spec(compose, validator):
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(compose)]
    assert errors == []


def test_validator_rejects_a_bad_key(compose, validator):
    bad = copy.deepcopy(compose)
    bad["services"]["postgres"]["imagez"] = bad["services"]["postgres"].pop("image")
    errors = list(validator.iter_errors(bad))
    assert errors, "a misspelt service key must fail validation"
    assert any("imagez" in e.message for e in errors)
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)


def test_validator_rejects_a_bad_depends_on_condition(compose, validator):
    bad = copy.deepcopy(compose)
    bad["services"]["proxy"]["depends_on"]["postgres"]["condition"] = "service_ready"
    assert list(validator.iter_errors(bad))


def test_expected_services(compose):
    assert {"postgres", "proxy", "vllm-small", "vllm-large"} <= set(compose["services"])
    assert compose["services"]["postgres"]["image"] == "postgres:16"
    assert compose["services"]["proxy"]["build"] == "."
    for name in ("vllm-small", "vllm-large"):
        svc = compose["services"][name]
        assert svc["image"].startswith("vllm/vllm-openai")
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert any(
            d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices
        )
        assert "/health" in " ".join(svc["healthcheck"]["test"])
        assert "HF_TOKEN" in svc["environment"]
    assert "pg_isready" in " ".join(compose["services"]["postgres"]["healthcheck"]["test"])


def test_depends_on_names_existing_services(compose):
    services = set(compose["services"])
    for name, svc in compose["services"].items():
        deps = svc.get("depends_on", [])
        for dep in deps:
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert dep != name
    proxy_deps = compose["services"]["proxy"]["depends_on"]
    assert proxy_deps["postgres"]["condition"] == "service_healthy"
    assert {"vllm-small", "vllm-large"} <= set(proxy_deps)


def test_database_url_points_at_the_postgres_service(compose):
    proxy_env = env(compose["services"]["proxy"])
    url = urlsplit(proxy_env["CASCADE_DATABASE_URL"])
    assert url.scheme in ("postgresql", "postgres")
    assert url.hostname == "postgres" and url.hostname in compose["services"]
    assert (url.port or 5432) == 5432
    pg_env = env(compose["services"]["postgres"])
    assert url.username == pg_env["POSTGRES_USER"]
    assert url.password == pg_env["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == pg_env["POSTGRES_DB"]


def test_cascade_yaml_is_a_valid_config(cascade_yaml):
    config = parse_config(cascade_yaml, str(CASCADE_YAML))
    assert set(config.models) == {"small", "large"}
    (cascade,) = config.cascades.values()
    assert cascade.nodes == ["small", "large"] and cascade.reference == "large"
    assert cascade.policy == "/etc/cascade/policy.json"
    assert all(m.gpu_hourly_usd is not None for m in config.models.values())


def test_base_urls_point_at_vllm_services(compose, cascade_yaml):
    config = parse_config(cascade_yaml, str(CASCADE_YAML))
    seen = set()
    for name, model in config.models.items():
        url = urlsplit(model.base_url or "")
        assert url.hostname in compose["services"], f"models.{name}: no service {url.hostname}"
        svc = compose["services"][url.hostname]
        args = command_args(svc)
        listens = int(flag(args, "--port") or 8000)  # vLLM's default port
        assert url.port == listens, f"models.{name}: port {url.port}, vLLM listens on {listens}"
        assert url.path.rstrip("/") == "/v1"
        # the name the proxy asks for is the one vLLM serves
        assert flag(args, "--served-model-name") == (model.model or name)
        assert flag(args, "--model")
        seen.add(url.hostname)
    assert seen == {"vllm-small", "vllm-large"}
    small = command_args(compose["services"]["vllm-small"])
    large = command_args(compose["services"]["vllm-large"])
    assert flag(small, "--model") == "meta-llama/Llama-3.2-1B-Instruct"
    assert flag(large, "--model") == "meta-llama/Llama-3.1-8B-Instruct"


def test_proxy_mounts_config_and_policy(compose, cascade_yaml):
    proxy = compose["services"]["proxy"]
    by_target = {m["target"]: m for m in mounts(proxy)}
    proxy_env = env(proxy)
    config_mount = by_target[proxy_env["CASCADE_CONFIG"]]
    assert config_mount["type"] == "bind"
    assert (ROOT / config_mount["source"]).resolve() == CASCADE_YAML
    policy_path = cascade_yaml["cascades"]["default"]["policy"]
    policy_mount = by_target[policy_path]
    assert policy_mount["type"] == "bind"
    assert (ROOT / policy_mount["source"]).resolve().parent == ROOT / "deploy"
    assert any(p.split(":")[-1] == "8080" for p in map(interpolate, proxy["ports"]))


def test_volumes_used_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in compose["services"].items():
        for m in mounts(svc):
            if m["type"] == "volume":
                assert m["source"] in declared, f"{name}: volume {m['source']} is not declared"
                used.add(m["source"])
            elif m["type"] == "bind":
                assert interpolate(m["source"]).startswith("./deploy/"), m
    assert used == declared, f"declared but unused: {declared - used}"


def test_dockerfile_entrypoint_upgrades_then_serves(compose):
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^RUN pip install .*", text, re.M)
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    assert re.search(r"^USER (?!root\b|0\b)\S+", text, re.M)
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in text
    assert re.search(r"^HEALTHCHECK .*", text, re.M) and "/health" in text

    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    copy_line = re.search(r"^COPY deploy/entrypoint\.sh (\S+)$", text, re.M)
    assert copy_line and Path(copy_line.group(1)).name == entrypoint[0]
    script = (ROOT / "deploy" / "entrypoint.sh").read_text()
    commands = [line.strip() for line in script.splitlines()]
    commands = [c for c in commands if c and not c.startswith("#")]
    upgrade = next(i for i, c in enumerate(commands) if c.startswith("cascade db upgrade"))
    serve = next(i for i, c in enumerate(commands) if "cascade serve" in c)
    assert upgrade < serve
    assert "set -e" in script.replace("set -eu", "set -e")  # a failed upgrade stops the start
    serve_args = shlex.split(commands[serve])
    assert flag(serve_args, "--host") == "0.0.0.0" and flag(serve_args, "--port") == "8080"
