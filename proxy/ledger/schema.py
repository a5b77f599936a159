"""Ledger tables (SQLAlchemy 2 declarative). Changes only through Alembic in ``migrations/``.

- ``ledger_requests``: one row per request through the proxy.
- ``ledger_calls``: one row per upstream call, linked to its request by ``request_id``.
- ``ledger_daily``: per (UTC day, cascade, model, key) rollups, kept when detail rows are
  pruned. ``''`` stands for "none" in the key columns so the unique constraint holds.
- ``api_keys``: client keys made by `cascade keys create` (only a hash of each secret), with
  their budget, period, rate limit, cascades and expiry; the ledger's ``api_key`` column
  holds the key's name.

Rollup semantics: each request is counted once, under the model whose answer was returned
(``''`` when none was); each call is counted once, under the model it called. So summing a
column over rows of any grouping gives the true total. ``cost_usd`` sums the priced calls and
is NULL when none of them was priced; ``unpriced_calls`` / ``unpriced_requests`` say how many
had no known cost, so a report can flag an incomplete figure instead of showing it as exact.

Timestamps are stored in UTC and read back as timezone-aware UTC datetimes on every backend.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# BIGINT primary keys that still autoincrement on SQLite (only INTEGER PRIMARY KEY does).
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[dt.datetime]):
    """A timezone-aware UTC datetime on PostgreSQL (timestamptz) and SQLite (naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("ledger timestamps must be timezone-aware")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class LedgerRequest(Base):
    __tablename__ = "ledger_requests"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(String(64), nullable=False)
    ts: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    day: Mapped[dt.date] = mapped_column(Date, nullable=False)
    api_key: Mapped[str | None] = mapped_column(String(64))
    cascade: Mapped[str | None] = mapped_column(String(128))
    model_requested: Mapped[str] = mapped_column(String(256), nullable=False)
    policy_hash: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[int] = mapped_column(Integer, nullable=False)
    chosen_model: Mapped[str | None] = mapped_column(String(256))
    n_calls: Mapped[int] = mapped_column(Integer, nullable=False)
    tokens_in: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_out: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_usd: Mapped[float | None] = mapped_column(Double)
    reference_cost_usd: Mapped[float | None] = mapped_column(Double)
    latency_ms: Mapped[float] = mapped_column(Double, nullable=False)
    overhead_ms: Mapped[float] = mapped_column(Double, nullable=False)
    stream: Mapped[bool] = mapped_column(Boolean, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("request_id"),
        Index(None, "ts"),
        Index(None, "cascade", "ts"),
        Index(None, "chosen_model", "ts"),
        Index(None, "api_key", "ts"),
    )


class LedgerCall(Base):
    __tablename__ = "ledger_calls"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(
        String(64),
        ForeignKey("ledger_requests.request_id", ondelete="CASCADE"),
        nullable=False,
    )
    call_order: Mapped[int] = mapped_column(Integer, nullable=False)
    ts: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)  # the request's
    node: Mapped[int | None] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(256), nullable=False)
    backend: Mapped[str | None] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(64), nullable=False)
    http_status: Mapped[int | None] = mapped_column(Integer)
    tokens_in: Mapped[int | None] = mapped_column(BigInteger)
    tokens_out: Mapped[int | None] = mapped_column(BigInteger)
    cost_usd: Mapped[float | None] = mapped_column(Double)
    latency_ms: Mapped[float | None] = mapped_column(Double)
    ttft_ms: Mapped[float | None] = mapped_column(Double)
    confidence: Mapped[float | None] = mapped_column(Double)
    p_correct: Mapped[float | None] = mapped_column(Double)
    agreement: Mapped[bool | None] = mapped_column(Boolean)
    decision: Mapped[str | None] = mapped_column(String(256))
    error: Mapped[str | None] = mapped_column(Text)
    samples: Mapped[int | None] = mapped_column(Integer)  # a sampled node's k (migration 0003)
    vote_share: Mapped[float | None] = mapped_column(Double)
    # the answer's token-logprob summary (policies/freetext.py: mean, minimum, 5% and 25%
    # nearest-rank quantiles), NULL when none was read (migration 0004)
    lp_mean: Mapped[float | None] = mapped_column(Double)
    lp_min: Mapped[float | None] = mapped_column(Double)
    lp_q05: Mapped[float | None] = mapped_column(Double)
    lp_q25: Mapped[float | None] = mapped_column(Double)

    __table_args__ = (
        UniqueConstraint("request_id", "call_order"),
        Index(None, "ts"),
        Index(None, "model", "ts"),
    )


class LedgerDaily(Base):
    __tablename__ = "ledger_daily"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    day: Mapped[dt.date] = mapped_column(Date, nullable=False)
    cascade: Mapped[str] = mapped_column(String(128), nullable=False)
    model: Mapped[str] = mapped_column(String(256), nullable=False)
    api_key: Mapped[str] = mapped_column(String(64), nullable=False)
    requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    requests_failed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unpriced_requests: Mapped[int] = mapped_column(BigInteger, nullable=False)
    calls: Mapped[int] = mapped_column(BigInteger, nullable=False)
    calls_failed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    unpriced_calls: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_in: Mapped[int] = mapped_column(BigInteger, nullable=False)
    tokens_out: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_usd: Mapped[float | None] = mapped_column(Double)
    reference_cost_usd: Mapped[float | None] = mapped_column(Double)
    reference_unpriced: Mapped[int] = mapped_column(BigInteger, nullable=False)

    __table_args__ = (
        UniqueConstraint("day", "cascade", "model", "api_key"),
        Index(None, "cascade", "day"),
        Index(None, "model", "day"),
        Index(None, "api_key", "day"),
    )


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), nullable=False)
    key_hash: Mapped[str] = mapped_column(String(64), nullable=False)  # sha256 hex
    key_prefix: Mapped[str] = mapped_column(String(16), nullable=False)  # shown by `keys list`
    budget_usd: Mapped[float | None] = mapped_column(Double)
    period: Mapped[str | None] = mapped_column(String(8))  # day, week or month (UTC)
    rpm: Mapped[int | None] = mapped_column(Integer)
    cascades: Mapped[str | None] = mapped_column(Text)  # comma-separated; NULL: every model
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), nullable=False)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())

    __table_args__ = (UniqueConstraint("name"), UniqueConstraint("key_hash"))


requests_table = LedgerRequest.__table__
calls_table = LedgerCall.__table__
daily_table = LedgerDaily.__table__
keys_table = ApiKey.__table__
