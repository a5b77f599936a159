"""The proxy's configuration: YAML validated with pydantic; every error names its key.

```yaml
models:
  small: {backend: openai, base_url: http://127.0.0.1:8001/v1, model: meta-llama/Llama-3.2-1B,
          price_in_per_mtok: 0.05, price_out_per_mtok: 0.08, timeout_s: 30}
  gpt4o: {backend: litellm, model: openai/gpt-4o, api_key_env: OPENAI_API_KEY}
cascades:
  default: {nodes: [small, gpt4o], transitions: skips, reference: gpt4o, policy: policy.json}
server: {api_keys: {alice: sk-alice-1, batch-jobs: sk-batch-2},   # name: key
         api_keys_env: CASCADE_API_KEYS, admin_key_env: CASCADE_ADMIN_KEY}
database_url: sqlite:///cascade.db
ledger: {write_timeout_s: 2, max_pending: 20000}
```

`CASCADE_CONFIG` names the file when no path is given; `CASCADE_DATABASE_URL` overrides
`database_url`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from policies.errors import InvalidInput
from policies.sampling import SamplingError, parse_sampled
from policies.tiers import tier_members, tier_name
from policies.transitions import TransitionError, allowed_edges
from upstreams.settings import ModelConfig

DEFAULT_DATABASE_URL = "sqlite:///cascade.db"


def node_models(node: str) -> list[str]:
    """The configured models behind a node name: a tier's members, a sampled node's model,
    or the model itself."""
    sampled = parse_sampled(node)
    return tier_members(node) or [sampled[0] if sampled else node]


class ConfigError(InvalidInput):
    """The configuration is unreadable or invalid; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CascadeConfig(_Strict):
    """A named cascade: its nodes (cheapest first), the transitions allowed between them
    (`skips`, `line`, or a map such as {start: [small], small: [medium, large]}; see
    policies/transitions.py), reference model and policy artifact."""

    # a list is a tier: [a, b, c]; `model@k` is a sampled node (the model sampled k times)
    nodes: list[str | list[str]] = Field(min_length=1)
    transitions: Literal["skips", "line"] | dict[str, list[str]] = "skips"
    reference: str
    policy: str | None = None  # artifact path; None: always call the reference model
    explore_rate: float = Field(default=0.0, ge=0, le=1)  # share of requests calling every model
    explore_out: str | None = None  # trace JSONL of explored requests (default explore-NAME.jsonl)
    # how explored (unlabelled) traffic is labelled: agreement with the reference model, or
    # an LLM judge (any configured model; its calls are ledgered and counted)
    explore_grader: str = Field(default="agreement", pattern=r"^(agreement|judge:.+)$")

    @field_validator("nodes", mode="after")
    @classmethod
    def _tiers(cls, nodes: list[str | list[str]]) -> list[str]:
        """A tier (models called in parallel, majority answer) becomes node `tier:a+b+c`; a
        sampled node `model@k` must have a valid k and name no tier."""
        names = [n if isinstance(n, str) else tier_name(n) for n in nodes]
        for name in names:
            try:
                parse_sampled(name)
            except SamplingError as exc:
                raise ValueError(str(exc)) from None
        return names

    @model_validator(mode="after")
    def _transitions(self) -> CascadeConfig:
        try:
            allowed_edges(self.transitions, self.nodes)
        except TransitionError as exc:
            raise ValueError(str(exc)) from None
        return self


KEY_NAME_MAX = 64  # the ledger's api_key column


class NamedKey(_Strict):
    """A client key with the name the ledger and `cascade report --by key` show for it."""

    name: str = Field(min_length=1, max_length=KEY_NAME_MAX)
    key: str = Field(min_length=1)


class ServerConfig(_Strict):
    # client keys (empty: no client auth): a list of keys and/or {name, key} objects, or a
    # mapping name -> key; a key without a name is ledgered as a hash of it
    api_keys: list[str | NamedKey] = Field(default_factory=list)
    api_keys_env: str | None = None  # comma-separated keys in this env var, each KEY or NAME:KEY
    admin_key_env: str | None = None
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    policy_watch_s: float = Field(default=2.0, ge=0)  # reload changed artifacts; 0: never
    request_timeout_s: float = Field(default=300.0, gt=0)
    # keys made by `cascade keys` in the ledger database, read every keys_refresh_s seconds
    database_keys: bool = False
    keys_refresh_s: float = Field(default=2.0, gt=0, le=300)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: object) -> list[str | NamedKey]:
        """Keys as given (a mapping name -> key, or a list of keys and {name, key}), each
        checked here so that a mistake is one plain message, not a union's every branch."""
        if isinstance(value, dict):
            value = [{"name": name, "key": key} for name, key in value.items()]
        if not isinstance(value, list):
            raise ValueError("a list of keys and {name, key} objects, or a mapping name -> key")
        out: list[str | NamedKey] = []
        for i, item in enumerate(value):
            if isinstance(item, dict) and set(item) == {"name", "key"}:
                name, key = item["name"], item["key"]
                if not isinstance(name, str) or not 0 < len(name) <= KEY_NAME_MAX:
                    raise ValueError(f"[{i}]: a name is a string of 1-{KEY_NAME_MAX} characters")
                if not isinstance(key, str) or not key:
                    raise ValueError(f"[{i}] ({name}): the key must be a non-empty string")
                out.append(NamedKey(name=name, key=key))
            elif isinstance(item, str) and item:
                out.append(item)
            else:
                raise ValueError(f"[{i}]: expected a non-empty key or {{name, key}}")
        return out


class LedgerConfig(_Strict):
    """The ledger writer's bounds: a database write that takes longer than write_timeout_s
    counts as an outage (records go to the spool), and at most max_pending records wait in
    memory for the database."""

    write_timeout_s: float = Field(default=2.0, gt=0)
    max_pending: int = Field(default=20_000, ge=1)


class Config(_Strict):
    models: dict[str, ModelConfig] = Field(min_length=1)
    cascades: dict[str, CascadeConfig] = Field(default_factory=dict)
    server: ServerConfig = ServerConfig()
    database_url: str = DEFAULT_DATABASE_URL
    ledger: LedgerConfig = LedgerConfig()

    @model_validator(mode="after")
    def _references(self) -> Config:
        clash = sorted(set(self.models) & set(self.cascades))
        if clash:
            raise ValueError(f"names used for both a model and a cascade: {clash}")
        for name, cascade in self.cascades.items():
            named = [m for n in cascade.nodes for m in node_models(n)]
            unknown = [n for n in [*named, cascade.reference] if n not in self.models]
            if unknown:
                raise ValueError(f"cascades.{name}: unknown model(s) {unknown}")
            replayed = [
                n
                for n in cascade.nodes
                if (s := parse_sampled(n)) and self.models[s[0]].backend == "replay"
            ]
            if replayed:
                raise ValueError(
                    f"cascades.{name}: sampled node(s) {replayed} name a replay model, which "
                    "holds one recorded answer per prompt"
                )
            judge = cascade.explore_grader.removeprefix("judge:")
            if cascade.explore_grader.startswith("judge:") and judge not in self.models:
                raise ValueError(
                    f"cascades.{name}.explore_grader: judge model {judge!r} is not configured"
                )
        self.key_names()  # a name given to two keys, or two names to one key
        return self

    def client_keys(self) -> set[str]:
        return set(self.key_names())

    def key_names(self) -> dict[str, str | None]:
        """Every client key with its name (None: unnamed), from `server.api_keys` and the
        variable `server.api_keys_env` names. ConfigError for a name given to two keys or
        two names given to one key."""
        pairs: list[tuple[str, str | None, str]] = []  # key, name, where it was given
        for i, item in enumerate(self.server.api_keys):
            where = f"server.api_keys[{i}]"
            named = isinstance(item, NamedKey)
            pairs.append((item.key, item.name, where) if named else (item, None, where))
        env = self.server.api_keys_env
        if env:
            for entry in (e.strip() for e in os.environ.get(env, "").split(",")):
                name, sep, key = entry.partition(":")
                if not sep:
                    name, key = "", entry
                name, key = name.strip(), key.strip()
                if len(name) > KEY_NAME_MAX:
                    raise ConfigError(f"${env}: key name {name[:20]!r}... is too long")
                if key:
                    pairs.append((key, name or None, f"${env}"))
        names: dict[str, str | None] = {}
        owner: dict[str, str] = {}
        for key, name, where in pairs:
            if key in names and names[key] is not None and name not in (None, names[key]):
                raise ConfigError(f"{where}: a key named {names[key]!r} is also named {name!r}")
            if name is not None and owner.setdefault(name, key) != key:
                raise ConfigError(f"{where}: the key name {name!r} is given to two keys")
            if names.get(key) is None:
                names[key] = name
        return names

    def admin_key(self) -> str | None:
        env = self.server.admin_key_env
        return os.environ.get(env) or None if env else None


def _location(error: dict) -> str:
    return ".".join(str(p) for p in error["loc"]) or "(top level)"


def parse_config(data: object, source: str = "config") -> Config:
    """Validate a parsed YAML document; apply CASCADE_DATABASE_URL."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        lines = [f"{_location(e)}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(lines)) from None
    url = os.environ.get("CASCADE_DATABASE_URL")
    return config.model_copy(update={"database_url": url}) if url else config


def load_config(path: str | Path | None = None) -> Config:
    """Read and validate the YAML config at `path` (default: $CASCADE_CONFIG)."""
    import yaml

    path = path or os.environ.get("CASCADE_CONFIG")
    if not path:
        raise ConfigError("no configuration: give --config FILE or set CASCADE_CONFIG")
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such configuration file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{p}: cannot read YAML: {exc}") from None
    return _resolve_paths(parse_config(data, str(p)), p.resolve().parent)


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative trace and policy paths are relative to the configuration file's folder."""

    def resolve(path: str) -> str:
        return str(path if Path(path).is_absolute() else base / path)

    models = {
        name: m.model_copy(update={"traces": [resolve(t) for t in m.traces]})
        for name, m in config.models.items()
    }
    cascades = {
        name: c.model_copy(
            update={
                "policy": resolve(c.policy) if c.policy else None,
                "explore_out": resolve(c.explore_out) if c.explore_out else None,
            }
        )
        for name, c in config.cascades.items()
    }
    return config.model_copy(update={"models": models, "cascades": cascades})
