"""`cascade db` and `cascade report`: the ledger's migrations, retention and reports. The
database URL's secrets are masked in every message (the driver's errors may quote it)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from cli.app import app, console, fail
from policies.errors import CascadeError, LedgerError

db_app = typer.Typer(help="The ledger database: migrations and retention.")
app.add_typer(db_app, name="db")


def _database_url(config: Path | None, url: str | None) -> str:
    """--database-url, else $CASCADE_DATABASE_URL, else the config's, else SQLite in ."""
    from proxy.config import DEFAULT_DATABASE_URL, load_config

    if url:
        return url
    if os.environ.get("CASCADE_DATABASE_URL"):
        return os.environ["CASCADE_DATABASE_URL"]
    if config or os.environ.get("CASCADE_CONFIG"):
        return load_config(config).database_url
    return DEFAULT_DATABASE_URL


@db_app.command("upgrade")
def db_upgrade(
    config: Annotated[Path | None, typer.Option(help="Cascade config (YAML).")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the ledger.")] = None,
) -> None:
    """Apply every ledger migration (SQLite or PostgreSQL); safe to run again."""
    from proxy.ledger.db import current_revision, upgrade

    url = _database_url(config, database_url)
    with _on_ledger("cannot upgrade the ledger at", url):
        upgrade(url)
        typer.echo(f"ledger at revision {current_revision(url)} ({_redact(url)})")


@db_app.command("current")
def db_current(
    config: Annotated[Path | None, typer.Option(help="Cascade config (YAML).")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the ledger.")] = None,
) -> None:
    """Print the ledger's migration revision and the newest one this version knows."""
    from proxy.ledger.db import current_revision, head_revision

    url = _database_url(config, database_url)
    with _on_ledger("cannot read the ledger at", url):
        typer.echo(f"current {current_revision(url)}; head {head_revision()} ({_redact(url)})")


@db_app.command("prune")
def db_prune(
    before: Annotated[
        str,
        typer.Option(
            help="Delete requests (and their calls) older than this: an ISO date or datetime "
            "(UTC), or Nd for N days ago."
        ),
    ],
    config: Annotated[Path | None, typer.Option(help="Cascade config (YAML).")] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of the ledger.")] = None,
    batch_size: Annotated[int, typer.Option(help="Requests deleted per transaction.")] = 5000,
    dry_run: Annotated[
        bool, typer.Option(help="Count what would be deleted; delete nothing.")
    ] = False,
) -> None:
    """Delete old request and call rows in batches; the daily rollups are kept.

    Spend by day, model, cascade and key stays available from the rollups (`cascade report
    spend --since DATE`); the other reports only see the requests that remain.
    """
    from proxy.ledger.db import check_schema, make_engine
    from proxy.ledger.retention import parse_before, prune

    cutoff = parse_before(before)
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, not {batch_size}")
    url = _database_url(config, database_url)
    with _on_ledger("cannot prune the ledger at", url):
        check_schema(url)
        engine = make_engine(url)
        try:
            result = prune(engine, cutoff, batch_size=batch_size, dry_run=dry_run)
        finally:
            engine.dispose()
    when = cutoff.isoformat()
    if result.dry_run:
        typer.echo(
            f"would remove {result.rows} rows: {result.requests} requests and {result.calls} "
            f"calls recorded before {when} ({_redact(url)}); nothing deleted"
        )
        return
    typer.echo(
        f"removed {result.rows} rows: {result.requests} requests and {result.calls} calls "
        f"recorded before {when}, in {result.batches} batch(es) ({_redact(url)}); "
        "ledger_daily rollups kept"
    )


report_app = typer.Typer(
    help="Reports over the ledger: spend, savings, exits, latency, errors.",
    no_args_is_help=True,
)
app.add_typer(report_app, name="report")

REPORT_FORMATS = ("table", "csv", "json")


def _report(
    name: str, since: str, by: str | None, fmt: str, config: Path | None, url: str | None
) -> None:
    from proxy.ledger.db import check_schema, make_engine
    from proxy.ledger.reports import parse_since, run_report

    if fmt not in REPORT_FORMATS:
        fail(f"--format {fmt!r} is not one of {', '.join(REPORT_FORMATS)}")
    parse_since(since)
    db_url = _database_url(config, url)
    with _on_ledger("cannot read the ledger at", db_url):
        check_schema(db_url)
        engine = make_engine(db_url)
        try:
            report = run_report(engine, name, since, by)
        finally:
            engine.dispose()
    if fmt == "json":
        typer.echo(json.dumps(report.to_dict(), indent=1))
        return
    if fmt == "csv":
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=report.columns, lineterminator="\n")
        writer.writeheader()
        for row in report.rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in report.columns})
        for note in report.notes:
            typer.echo(note, err=True)
        return
    from rich.table import Table

    table = Table(
        title=f"cascade {name} since {report.since:%Y-%m-%d %H:%M} UTC by {report.by} "
        f"({report.source})"
    )
    for col in report.columns:
        table.add_column(col, overflow="fold")
    for row in report.rows:
        table.add_row(*("n/a" if row[c] is None else str(row[c]) for c in report.columns))
    out = console()
    out.print(table)
    if not report.rows:
        out.print("no requests in the window")
    for note in report.notes:
        out.print(note)


SinceOpt = Annotated[str, typer.Option(help="Window start: 7d, 24h, 30m or an ISO date (UTC).")]
ByOpt = Annotated[
    str | None, typer.Option(help="Group by day, model, cascade or key (default per report).")
]
FormatOpt = Annotated[str, typer.Option("--format", help="table, csv or json.")]
ConfigOpt = Annotated[Path | None, typer.Option(help="Cascade config (YAML).")]
UrlOpt = Annotated[str | None, typer.Option(help="SQLAlchemy URL of the ledger.")]


REPORTS = {
    "spend": "Requests, calls, tokens and cost per model (default), day, cascade or key. By "
    "model: requests_answered under the model that answered, calls_made under the one called.",
    "savings": "Actual cost against always calling the reference model, per cascade (default).",
    "exits": "Where queries stop: calls per request, the model returned, and the recall rate.",
    "latency": "p50/p95/p99 latency of requests overall and per model (from the calls).",
    "errors": "Failure rates of calls per model and the requests' HTTP statuses.",
}


def _add_report_command(name: str, doc: str) -> None:
    def command(
        since: SinceOpt = "7d",
        by: ByOpt = None,
        fmt: FormatOpt = "table",
        config: ConfigOpt = None,
        database_url: UrlOpt = None,
    ) -> None:
        _report(name, since, by, fmt, config, database_url)

    command.__doc__ = doc
    report_app.command(name)(command)


for _name, _doc in REPORTS.items():
    _add_report_command(_name, _doc)


def _redact(url: str) -> str:
    """The URL for messages: its password masked, in the user part and in query parameters."""
    from proxy.ledger.db import safe_url

    return safe_url(url)


def _masked(text: str, url: str) -> str:
    """`text` with every secret of the database URL `url` masked."""
    from proxy.ledger.db import redact

    return redact(text, url) if url else text


@contextmanager
def _on_ledger(what: str, url: str) -> Iterator[None]:
    """The boundary of a ledger command: its errors with every secret of the database URL
    `url` masked (the driver's message may quote the URL, or a part of it), and an error of
    the database itself (refused, dropped, not a ledger) as a LedgerError naming `what`."""
    from alembic.util.exc import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except CascadeError as exc:
        raise type(exc)(_masked(str(exc), url)) from None
    except (SQLAlchemyError, CommandError, OSError) as exc:
        raise LedgerError(f"{what} {_redact(url)}: {_masked(str(exc), url)}") from None
