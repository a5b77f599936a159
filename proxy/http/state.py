"""A serving process's state, built once at start from the configuration: the backends, an
engine per cascade (its policy artifact loaded), the keys, the ledger writer, the policy
files to watch and the explorer. Every route reads it from `app.state.proxy`."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.config import Config
from proxy.engine.cascade import CascadeEngine
from proxy.engine.exploration import Explorer
from proxy.engine.reload import RELOAD_SIGNAL_ENV, PolicyFiles, ReloadSignal, read_policy
from proxy.ledger.writer import LedgerWriter
from upstreams.base import Backend
from upstreams.settings import ModelConfig

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from proxy.http.keys import KeyCache, RateLimiter


@dataclass
class ProxyState:
    """Everything the handlers need, built once at startup."""

    config: Config
    backends: dict[str, Backend]
    engines: dict[str, CascadeEngine]
    reference_prices: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    client_keys: set[str] = field(default_factory=set)
    key_names: dict[str, str] = field(default_factory=dict)  # key -> name, for the ledger
    admin_key: str | None = None
    ledger: LedgerWriter | None = None
    secrets: frozenset[str] = frozenset()  # keys never to echo in an error body
    policy_files: PolicyFiles | None = None  # reloaded on POST /admin/reload or file change
    reload_signal: ReloadSignal | None = None  # shared by `serve --workers N`: reload them all
    explorer: Explorer | None = None  # explored requests' traces, judge runs in flight
    reports: Engine | None = None  # the ledger's reports' engine, made on first use
    keys: KeyCache | None = None  # keys of the ledger database (server.database_keys)
    rate_limiter: RateLimiter | None = None
    worst_prices: dict = field(default_factory=dict)  # model -> (price, output limit)

    def worst_price(self, name: str) -> tuple[tuple[float, float] | None, int | None]:
        """A model's USD per input and output token (None: unknown) and its output token
        limit (None: unknown), for budgets' worst cases; looked up once."""
        if name not in self.worst_prices:
            cfg = self.config.models[name]
            self.worst_prices[name] = (model_price(name, cfg), output_limit(cfg.model or name))
        return self.worst_prices[name]

    def database_key(self, secret: str) -> bool:
        """A key of the ledger database (proxy/http/keys.py); its name goes to the ledger."""
        assert self.keys is not None
        if not self.keys.accepts(secret):
            return False
        stored = self.keys.lookup(secret)
        if stored is not None and secret not in self.key_names:
            self.key_names[secret] = stored.name
        return True

    @property
    def key_check(self):
        """What `authenticate` asks about a key it does not know (None: no database keys)."""
        return self.database_key if self.keys is not None else None

    def reports_engine(self) -> Engine:
        """The engine the report endpoint reads the ledger with (one per process)."""
        if self.reports is None:
            from proxy.ledger.db import make_engine

            self.reports = make_engine(self.config.database_url)
        return self.reports


def model_price(name: str, cfg: ModelConfig) -> tuple[float, float] | None:
    """USD per input and output token of a configured model; None if unknown."""
    if cfg.price_in_per_mtok is not None and cfg.price_out_per_mtok is not None:
        return cfg.price_in_per_mtok / 1e6, cfg.price_out_per_mtok / 1e6
    from upstreams.pricing import PricingError, lookup_price

    try:
        _, p_in, p_out = lookup_price(cfg.model or name)
    except PricingError:
        return None
    return p_in, p_out


@functools.cache
def _litellm_map() -> dict:
    """litellm's offline model map (prices, context windows), read as the JSON file it ships:
    a tenth of a second, where importing litellm takes seconds."""
    spec = importlib.util.find_spec("litellm")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        path = Path(folder) / "model_prices_and_context_window_backup.json"
        if path.is_file():
            return json.loads(path.read_text())
    return {}


def output_limit(model: str) -> int | None:
    """The model's output token limit from litellm's offline map, if it is there."""
    info = _litellm_map().get(model) or {}
    limit = info.get("max_output_tokens") or info.get("max_tokens")
    return int(limit) if isinstance(limit, int | float) and limit > 0 else None


def build_state(config: Config) -> ProxyState:
    """Backends for every model and an engine per cascade (policy artifacts loaded)."""
    from upstreams.factory import make_backend

    if any(
        c.price_in_per_mtok is None or c.price_out_per_mtok is None for c in config.models.values()
    ):
        from upstreams.pricing import warm_up

        warm_up()  # litellm's price map and tokenizer now, not on the first request
    for name, cfg in config.models.items():
        if cfg.gpu_hourly_usd is None and model_price(name, cfg) is None:
            print(
                f"warning: model {name!r} has no known price (set price_in_per_mtok/"
                "price_out_per_mtok or gpu_hourly_usd): its cost is ledgered as NULL and "
                "flagged in every report",
                file=sys.stderr,
            )
    backends = {name: make_backend(name, cfg) for name, cfg in config.models.items()}
    engines = {}
    prices = {}
    for name, cascade in config.cascades.items():
        artifact = read_policy(cascade.policy) if cascade.policy else None
        engines[name] = CascadeEngine(
            name,
            cascade.nodes,
            backends,
            cascade.reference,
            artifact=artifact,
            transitions=cascade.transitions,
        )
        prices[name] = model_price(cascade.reference, config.models[cascade.reference])
    policy_paths = {name: cascade.policy for name, cascade in config.cascades.items()}
    upstream_keys = {os.environ.get(m.api_key_env) for m in config.models.values() if m.api_key_env}
    shared_signal = os.environ.get(RELOAD_SIGNAL_ENV)  # set for the workers of `serve --workers`
    admin_key = config.admin_key()
    state = ProxyState(
        config=config,
        backends=backends,
        engines=engines,
        reference_prices=prices,
        client_keys=config.client_keys(),
        key_names={k: name for k, name in config.key_names().items() if name},
        admin_key=admin_key,
        ledger=make_ledger(config),
        secrets=frozenset(k for k in {*upstream_keys, *config.client_keys(), admin_key} if k),
        policy_files=PolicyFiles.of(engines, policy_paths),
        reload_signal=ReloadSignal(shared_signal) if shared_signal else None,
    )
    state.explorer = Explorer(config, backends, state)
    if config.server.database_keys:
        from functools import partial

        from proxy.http.keys import KeyCache, RateLimiter
        from proxy.ledger.db import make_engine

        state.keys = KeyCache(
            partial(make_engine, config.database_url),
            refresh_s=config.server.keys_refresh_s,
            reserved_names=frozenset(n for n in config.key_names().values() if n),
        )
        state.rate_limiter = RateLimiter(Path(shared_signal).parent if shared_signal else None)
        if state.ledger is not None:
            state.ledger.on_submit = state.keys.note
        for name in config.models:  # prices and output limits now, not on a request
            state.worst_price(name)
    return state


def make_ledger(config: Config) -> LedgerWriter:
    """The ledger writer, after checking the database schema is current: an outdated one
    raises SchemaError, which says the command to run. A database that cannot be reached
    does not stop the proxy: records spool, and the writer checks the schema, then replays
    them, once it is back. Records spool beside a SQLite file, or in the working directory."""
    from proxy.ledger.db import DatabaseUnavailable, check_schema

    url = config.database_url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        spool = Path(url.removeprefix("sqlite:///")).with_suffix(".spool.jsonl")
    else:
        spool = Path("cascade-ledger.spool.jsonl")
    writer = LedgerWriter(
        url,
        spool,
        write_timeout_s=config.ledger.write_timeout_s,
        max_pending=config.ledger.max_pending,
        check_schema=True,
    )
    try:
        check_schema(url)
    except DatabaseUnavailable as exc:
        print(
            f"warning: {exc}\nwarning: serving anyway: ledger records spool to {spool} and "
            "go to the database once it is back (its schema is checked then)",
            file=sys.stderr,
        )
        writer.mark_unavailable(str(exc.__cause__ or exc))
    return writer


def ledger_status(state: ProxyState) -> dict:
    """The ledger's part of /health: `degraded`, with the reason, while records are not
    going straight to the database (it is down or too slow, its schema is outdated, or the
    spool is being replayed)."""
    if state.ledger is None:
        return {"status": "off"}
    stats = state.ledger.stats()
    return {
        "status": "degraded" if stats["degraded"] else "ok",
        "reason": stats["reason"],
        "outage_s": stats["outage_s"],
        "written": stats["written"],
        "pending": stats["pending"],
        "spooled": stats["spool_backlog"],
    }
