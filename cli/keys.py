"""`cascade keys create|list|revoke|update`: client keys kept in the ledger database, with
budgets, rate limits, cascades and expiry. Every option is checked before the database is
touched, so a refused command writes nothing."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer

from cli.app import app, console
from cli.ledger import _database_url, _on_ledger, _redact

keys_app = typer.Typer(
    help="Client keys in the ledger database: budgets, rate limits, cascades, expiry.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")

ConfigOpt = Annotated[Path | None, typer.Option(help="Cascade config (YAML).")]
UrlOpt = Annotated[str | None, typer.Option(help="SQLAlchemy URL of the ledger.")]
BudgetOpt = Annotated[
    float | None, typer.Option(help="Spend allowed per period, in USD (known costs).")
]
PeriodOpt = Annotated[
    str | None, typer.Option(help="Budget period, calendar UTC: day, week or month (month).")
]
RpmOpt = Annotated[int | None, typer.Option(help="Requests per minute allowed.")]
CascadesOpt = Annotated[
    str | None, typer.Option(help="Comma-separated cascades (or models) the key may call.")
]
ExpiresOpt = Annotated[
    str | None, typer.Option(help="Expiry: 30d, 12h, 45m from now, or an ISO date (UTC).")
]
CLEARABLE = ("budget", "rpm", "cascades", "expires")


def _context(config: Path | None, url: str | None) -> tuple[str, set[str] | None, set[str]]:
    """The database URL, the config's cascade and model names (None without a config) and
    the names of its own keys (server.api_keys, api_keys_env)."""
    import os

    from proxy.config import load_config

    db_url = _database_url(config, url)
    if config or (not url and os.environ.get("CASCADE_CONFIG")):
        cfg = load_config(config)
        known = set(cfg.cascades) | set(cfg.models)
        return db_url, known, {n for n in cfg.key_names().values() if n}
    return db_url, None, set()


def _engine(url: str):
    from proxy.ledger.db import check_schema, make_engine

    check_schema(url)
    return make_engine(url)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="The key's name (ledger, reports, budgets).")],
    budget_usd: BudgetOpt = None,
    period: PeriodOpt = None,
    rpm: RpmOpt = None,
    cascades: CascadesOpt = None,
    expires: ExpiresOpt = None,
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
) -> None:
    """Make a key; its secret is printed once and stored only as a hash."""
    from proxy.ledger import keys

    now = dt.datetime.now(dt.UTC)
    keys.check_name(name)
    keys.check_budget(budget_usd)
    keys.check_period(period)
    if period is not None and budget_usd is None:
        raise keys.KeysError("--period needs --budget-usd (the period is the budget's)")
    keys.check_rpm(rpm)
    url, known, config_names = _context(config, database_url)
    names = keys.check_cascades(cascades, known)
    expires_at = keys.parse_expires(expires, now)
    if name in config_names:
        raise keys.KeysError(f"the name {name!r} is a key of the config already")
    with _on_ledger("cannot write keys to the ledger at", url):
        engine = _engine(url)
        try:
            secret = keys.create_key(
                engine,
                name,
                budget_usd=budget_usd,
                period=period,
                rpm=rpm,
                cascades=names,
                expires_at=expires_at,
                now=now,
            )
        finally:
            engine.dispose()
    typer.echo(f"created key {name!r} ({_redact(url)}); its secret, shown only this once:")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, database_url: UrlOpt = None) -> None:
    """Every key of the database: limits, state and spend in the current period."""
    from rich.table import Table

    from proxy.ledger import keys

    url, _, _ = _context(config, database_url)
    now = dt.datetime.now(dt.UTC)
    with _on_ledger("cannot read keys from the ledger at", url):
        engine = _engine(url)
        try:
            stored = keys.list_keys(engine)
            first = min((keys.period_start(k.period, now) for k in stored if k.period), default=now)
            spend = keys.spend_since(engine, [k.name for k in stored], first.date())
        finally:
            engine.dispose()
    table = Table(title=f"cascade keys ({_redact(url)})")
    for col in ("name", "prefix", "state", "budget_usd", "period", "spent_usd", "rpm"):
        table.add_column(col)
    table.add_column("cascades")
    table.add_column("expires (UTC)")
    for k in stored:
        state = "revoked" if k.revoked_at else ("expired" if not k.usable(now) else "active")
        spent = None
        if k.period:
            start = keys.period_start(k.period, now).date()
            spent = sum(c for (n, day), c in spend.items() if n == k.name and day >= start)
        table.add_row(
            k.name,
            k.key_prefix + "...",
            state,
            "-" if k.budget_usd is None else f"{k.budget_usd:g}",
            k.period or "-",
            "-" if spent is None else f"{spent:.6f}",
            "-" if k.rpm is None else str(k.rpm),
            ",".join(k.cascades) if k.cascades else "all",
            f"{k.expires_at:%Y-%m-%d %H:%M}" if k.expires_at else "never",
        )
    console().print(table)
    if not stored:
        console().print("no keys (create one with `cascade keys create --name NAME`)")


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
) -> None:
    """Revoke a key: proxies refuse it within their key refresh interval."""
    from proxy.ledger import keys

    keys.check_name(name)
    url, _, _ = _context(config, database_url)
    with _on_ledger("cannot write keys to the ledger at", url):
        engine = _engine(url)
        try:
            keys.revoke_key(engine, name, dt.datetime.now(dt.UTC))
        finally:
            engine.dispose()
    typer.echo(f"revoked key {name!r}; proxies refuse it within server.keys_refresh_s")


@keys_app.command("update")
def keys_update(
    name: Annotated[str, typer.Argument(help="The key's name.")],
    budget_usd: BudgetOpt = None,
    period: PeriodOpt = None,
    rpm: RpmOpt = None,
    cascades: CascadesOpt = None,
    expires: ExpiresOpt = None,
    clear: Annotated[
        list[str] | None,
        typer.Option(help="Remove a limit: budget, rpm, cascades or expires (repeatable)."),
    ] = None,
    config: ConfigOpt = None,
    database_url: UrlOpt = None,
) -> None:
    """Change a key's budget, period, rate limit, cascades or expiry."""
    from proxy.ledger import keys

    now = dt.datetime.now(dt.UTC)
    keys.check_name(name)
    values: dict = {}
    for item in clear or []:
        if item not in CLEARABLE:
            raise keys.KeysError(f"--clear {item!r} is not one of {', '.join(CLEARABLE)}")
    cleared = set(clear or [])
    given = {"budget": budget_usd, "rpm": rpm, "cascades": cascades, "expires": expires}
    both = [c for c in cleared if given[c] is not None]
    if both:
        raise keys.KeysError(f"--clear {both[0]} and a new value for it: give one")
    if budget_usd is not None:
        values["budget_usd"] = keys.check_budget(budget_usd)
    if period is not None:
        values["period"] = keys.check_period(period)
    if rpm is not None:
        values["rpm"] = keys.check_rpm(rpm)
    url, known, _ = _context(config, database_url)
    if cascades is not None:
        values["cascades"] = keys.check_cascades(cascades, known)
    if expires is not None:
        values["expires_at"] = keys.parse_expires(expires, now)
    if "budget" in cleared:
        values["budget_usd"] = values["period"] = None
        if period is not None:
            raise keys.KeysError("--period with --clear budget: the period is the budget's")
    for item, column in (("rpm", "rpm"), ("cascades", "cascades"), ("expires", "expires_at")):
        if item in cleared:
            values[column] = None
    if not values:
        raise keys.KeysError("nothing to change: give a new limit or --clear")
    with _on_ledger("cannot write keys to the ledger at", url):
        engine = _engine(url)
        try:
            if budget_usd is not None and period is None:
                current = {k.name: k for k in keys.list_keys(engine)}.get(name)
                if current is not None and current.period is None:
                    values["period"] = "month"
            keys.update_key(engine, name, values)
        finally:
            engine.dispose()
    typer.echo(f"updated key {name!r}: {', '.join(sorted(values))}")
