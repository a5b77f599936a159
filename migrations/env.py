"""Alembic environment for the cascade ledger.

Driven programmatically by :mod:`proxy.ledger.db` (``cascade db upgrade``), which passes an
open connection in ``config.attributes["connection"]``. The same revisions run on SQLite
(batch mode, so ALTERs become table copies) and PostgreSQL.

To write a new revision: ``proxy.ledger.db.revision(url, "message")`` (autogenerates
against a database at the current head; review the file before committing it).
"""

from __future__ import annotations

from alembic import context

from proxy.ledger.db import VERSION_TABLE, make_engine
from proxy.ledger.schema import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    url = config.get_main_option("sqlalchemy.url")
    _configure(
        url=url,
        literal_binds=True,
        render_as_batch=str(url).startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    _configure(connection=connection, render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url"), foreign_keys=False)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
