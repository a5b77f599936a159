"""Ledger database plumbing: engines, Alembic migrations driven from code, schema checks.

``cascade db upgrade`` calls :func:`upgrade`; the proxy calls :func:`check_schema` at
startup and refuses to serve when it raises :class:`SchemaError` (when it raises
:class:`DatabaseUnavailable`, it serves and spools; its ledger writer checks the schema
once the database answers). :func:`safe_url` and :func:`redact` keep a URL's passwords out
of every message.
"""

from __future__ import annotations

import re
import sqlite3
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script.revision import RevisionError
from alembic.util.exc import CommandError
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.pool import NullPool

from policies.errors import LedgerError

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"
VERSION_TABLE = "cascade_alembic_version"
UPGRADE_HINT = "run `cascade db upgrade`"


class SchemaError(LedgerError):
    """The ledger database's schema is missing, behind, or unknown to this version."""


class DatabaseUnavailable(LedgerError):
    """The ledger database could not be reached."""


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; ``postgres://`` and ``postgresql://`` select the psycopg 3 driver."""
    u = make_url(str(url)) if not isinstance(url, URL) else url
    if u.drivername in ("postgres", "postgresql"):
        u = u.set(drivername="postgresql+psycopg")
    return u


MASK = "***"
# Query parameters whose values are secrets (libpq's `password` and `sslpassword`, and the
# tokens, keys and secrets other drivers take): masked wherever a URL is shown.
_SECRET_PARAM = re.compile(r"pass|pwd|secret|token|api[-_]?key|credential", re.IGNORECASE)
_USERINFO = re.compile(r"^(?P<head>[^:/?#]*://[^:/?#@]*):(?P<pw>[^/?#]*)@")
_QUERY_PARAM = re.compile(r"(?P<head>[?&;](?P<name>[^=&;#]+)=)(?P<value>[^&;#]*)")


def _masked(url: str) -> str:
    """``url`` as written, the password of its user part and secret query values masked."""
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", url, count=1)
    return _QUERY_PARAM.sub(
        lambda m: m["head"] + MASK if _SECRET_PARAM.search(unquote(m["name"])) else m[0], text
    )


def url_secrets(url: str | URL) -> list[str]:
    """The secrets written in ``url`` (the user's password, secret query values), as written
    and decoded: what must never appear in a message."""
    raw = url.render_as_string(hide_password=False) if isinstance(url, URL) else str(url)
    found: list[str] = []
    m = _USERINFO.match(raw)
    if m and m["pw"]:
        found.append(m["pw"])
    found += [
        q["value"]
        for q in _QUERY_PARAM.finditer(raw)
        if q["value"] and _SECRET_PARAM.search(unquote(q["name"]))
    ]
    with_decoded = found + [unquote(s) for s in found]
    return sorted({s for s in with_decoded if s}, key=len, reverse=True)


def safe_url(url: str | URL) -> str:
    """The URL for messages and logs: its password masked, in the user part
    (``user:***@host``) and in query parameters (``?password=***``, ``sslpassword``, tokens,
    secrets). A URL that does not parse is masked the same way, as written."""
    if isinstance(url, URL):
        url = url.render_as_string(hide_password=False)
    return _masked(str(url))


def redact(text: str, url: str | URL) -> str:
    """``text`` (an error message, say) with every secret of ``url`` masked: drivers and
    SQLAlchemy may quote the URL, or parts of it, in their errors."""
    raw = url.render_as_string(hide_password=False) if isinstance(url, URL) else str(url)
    text = text.replace(raw, safe_url(raw))
    for secret in url_secrets(raw):
        if len(secret) >= 3:  # a shorter one would mask unrelated letters; the URL is done
            text = text.replace(secret, MASK)
    return text


def sqlite_file(url: str | URL) -> Path | None:
    """The file of a file-backed SQLite URL (as SQLite opens it: relative to the working
    directory); None for PostgreSQL, in-memory and `file:` URI databases."""
    u = normalize_url(url)
    database = u.database or ""
    if u.get_backend_name() != "sqlite" or database in ("", ":memory:"):
        return None
    if database.startswith("file:") or "uri" in u.query or "mode" in u.query:
        return None
    return Path(database)


def _existing_file_engine(path: Path) -> Engine:
    """An engine on the SQLite file at `path` that never creates it (mode=rw) and sets no
    pragma: checking a ledger must not turn a file that is not one into a WAL database, as
    make_engine's pragma would. (Not mode=ro: the last connection to close must be able to
    fold a WAL ledger's -wal file back in and remove it, as every other one does.)"""
    uri = f"file:{urllib.request.pathname2url(str(path.resolve()))}?mode=rw"
    return create_engine(
        "sqlite://",
        creator=lambda: sqlite3.connect(uri, uri=True, timeout=30.0),
        poolclass=NullPool,
    )


def make_engine(url: str | URL, *, foreign_keys: bool = True, **kwargs: Any) -> Engine:
    """An engine for the ledger.

    SQLite: WAL journal, ``synchronous=NORMAL``, foreign keys on (off for migrations, which
    copy tables in batch mode), a 30 s busy timeout; the file's directory is created.
    PostgreSQL: psycopg 3, ``pool_pre_ping`` and a 10 s connect timeout unless the URL says
    otherwise.
    """
    u = normalize_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("timeout", 30.0)
        database = u.database or ""
        in_memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if not in_memory and "mode=memory" not in str(u.query):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, connect_args=connect_args, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            try:
                if not in_memory:
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
            finally:
                cur.close()

        return engine
    if backend == "postgresql":
        connect_args = dict(kwargs.pop("connect_args", {}))
        if "connect_timeout" not in u.query:
            connect_args.setdefault("connect_timeout", 10)
        kwargs.setdefault("pool_pre_ping", True)
        return create_engine(u, connect_args=connect_args, **kwargs)
    return create_engine(u, **kwargs)


def _config(url: str | URL | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        cfg.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return cfg


def _migrate(url: str | URL, fn, *args: Any) -> None:
    engine = make_engine(url, foreign_keys=False)
    try:
        with engine.begin() as conn:
            cfg = _config(url)
            cfg.attributes["connection"] = conn
            fn(cfg, *args)
    finally:
        engine.dispose()


def upgrade(url: str | URL, revision: str = "head") -> str | None:
    """Apply migrations up to ``revision`` (default: the newest). Returns the new revision."""
    _migrate(url, command.upgrade, revision)
    return current_revision(url)


def downgrade(url: str | URL, revision: str) -> str | None:
    """Revert migrations down to ``revision`` (``"base"`` removes the ledger tables)."""
    _migrate(url, command.downgrade, revision)
    return current_revision(url)


def revision(url: str | URL, message: str, *, autogenerate: bool = True) -> None:
    """Write a new revision file into ``migrations/versions`` (a development helper)."""
    _migrate(url, command.revision, message, autogenerate)


def head_revision() -> str:
    """The newest revision this version of cascade knows."""
    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:
        raise SchemaError(f"no ledger migrations found under {MIGRATIONS_DIR}")
    return head


def read_revision(conn: Any) -> str | None:
    """The ledger revision recorded in the database behind the open connection ``conn``."""
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def current_revision(url: str | URL) -> str | None:
    """The database's ledger revision, or ``None`` when it has no ledger schema. Only reads:
    a SQLite file that does not exist is not created (connecting would), nor its folder."""
    path = sqlite_file(url)
    if path is not None and not path.is_file():
        return None
    engine = make_engine(url) if path is None else _existing_file_engine(path)
    try:
        with engine.connect() as conn:
            return read_revision(conn)
    finally:
        engine.dispose()


def verify_revision(current: str | None, url: str | URL) -> str:
    """``current`` if it is the newest revision this version of cascade knows; otherwise
    :class:`SchemaError` saying what to do (``cascade db upgrade``, or upgrade cascade)."""
    where = safe_url(url)
    head = head_revision()
    if current == head:
        return current
    if current is None:
        path = sqlite_file(url)
        if path is not None and not path.is_file():
            raise SchemaError(f"ledger database {where} does not exist; {UPGRADE_HINT}")
        raise SchemaError(f"ledger database {where} has no ledger schema; {UPGRADE_HINT}")
    script = ScriptDirectory.from_config(_config())
    try:
        known = script.get_revision(current) is not None
    except (CommandError, RevisionError):
        known = False
    if not known:
        raise SchemaError(
            f"ledger database {where} is at revision {current}, which this version of "
            f"cascade does not know (its newest is {head}); upgrade cascade, or downgrade "
            "the database with the version that wrote it"
        )
    raise SchemaError(
        f"ledger database {where} is at revision {current} but this version of cascade "
        f"needs {head}; {UPGRADE_HINT}"
    )


def check_schema(url: str | URL) -> str:
    """Return the current revision if the ledger schema is up to date; raise otherwise.

    Raises :class:`SchemaError` (whose message says to run ``cascade db upgrade``) when the
    database has no ledger schema or an older one, :class:`SchemaError` when its revision is
    unknown to this version of cascade (written by a newer one),
    :class:`DatabaseUnavailable` when it cannot be reached, and ValueError when the driver
    refuses the URL itself.
    """
    try:
        current = current_revision(url)
    except (OperationalError, InterfaceError) as exc:  # refused, timed out, dropped
        detail = redact(str(exc.orig or exc), url)
        raise DatabaseUnavailable(
            f"ledger database {safe_url(url)} is unreachable: {detail}"
        ) from exc
    except DBAPIError as exc:  # the URL itself is wrong (an unknown option, say)
        detail = redact(str(exc.orig or exc), url)
        raise SchemaError(f"ledger database {safe_url(url)}: {detail}") from exc
    return verify_revision(current, url)
