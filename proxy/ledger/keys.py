"""Client keys stored in the ledger database (`cascade keys`), and the spend the budgets are
checked against.

A key's secret is shown once, when it is made, and stored only as its SHA-256; the ledger
records requests under the key's name, so a key's spend for its period is read from the
same daily rollups as `cascade report spend` (whole UTC days: a period always starts at a
UTC midnight). Periods are calendar periods in UTC: a day, a week from Monday, a month.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import secrets
from dataclasses import dataclass

from sqlalchemy import Engine, func, insert, select, update

from policies.errors import InvalidInput
from proxy.ledger.schema import daily_table, keys_table, requests_table

PERIODS = ("day", "week", "month")
NAME_MAX = 64
SECRET_PREFIX = "sk-cascade-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_DURATION = re.compile(r"^\s*(\d+)\s*([dhm])\s*$")
_K = keys_table.c


class KeysError(InvalidInput):
    """A bad `keys` option, or a key name that is taken or unknown."""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class StoredKey:
    """One row of `api_keys`, as the proxy's key cache and `keys list` use it."""

    name: str
    key_hash: str
    key_prefix: str
    budget_usd: float | None
    period: str | None
    rpm: int | None
    cascades: tuple[str, ...] | None
    expires_at: dt.datetime | None
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    def usable(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)


# ------------------------------------------------------------------ option checks


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise KeysError(
            f"--name {name!r}: 1-{NAME_MAX} characters, letters, digits and . _ @ -, "
            "starting with a letter or digit"
        )
    return name


def check_budget(value: float | None) -> float | None:
    if value is not None and (value != value or value <= 0 or value == float("inf")):
        raise KeysError(f"--budget-usd {value}: must be a positive number of dollars")
    return value


def check_period(value: str | None) -> str | None:
    if value is not None and value not in PERIODS:
        raise KeysError(f"--period {value!r} is not one of {', '.join(PERIODS)}")
    return value


def check_rpm(value: int | None) -> int | None:
    if value is not None and value < 1:
        raise KeysError(f"--rpm {value}: must be at least 1 request per minute")
    return value


def check_cascades(value: str | None, known: set[str] | None) -> tuple[str, ...] | None:
    """`qa,chat` as a tuple; with a config at hand, every name must be a cascade or model."""
    if value is None:
        return None
    names = tuple(n.strip() for n in value.split(","))
    if not names or any(not n for n in names):
        raise KeysError(f"--cascades {value!r}: a comma-separated list of cascade names")
    if known is not None:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeysError(
                f"--cascades: {', '.join(unknown)} not in the config "
                f"(its cascades and models: {', '.join(sorted(known))})"
            )
    return names


def parse_expires(value: str | None, now: dt.datetime) -> dt.datetime | None:
    """`30d`, `12h`, `45m` from now, or an ISO date or datetime (UTC) in the future."""
    if value is None:
        return None
    m = _DURATION.match(value)
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        if int(m.group(1)) < 1:
            raise KeysError(f"--expires {value!r}: must be at least 1{m.group(2)}")
        try:
            return now + dt.timedelta(**{unit: int(m.group(1))})
        except OverflowError:
            raise KeysError(f"--expires {value!r} is out of range") from None
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise KeysError(
            f"--expires {value!r} is neither a duration (30d, 12h, 45m) nor an ISO date"
        ) from None
    when = when.astimezone(dt.UTC) if when.tzinfo else when.replace(tzinfo=dt.UTC)
    if when <= now:
        raise KeysError(f"--expires {value!r} is in the past")
    return when


# ------------------------------------------------------------------ periods


def period_start(period: str, now: dt.datetime) -> dt.datetime:
    midnight = now.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return midnight
    if period == "week":
        return midnight - dt.timedelta(days=midnight.weekday())
    return midnight.replace(day=1)


def period_end(period: str, now: dt.datetime) -> dt.datetime:
    """When the period containing `now` ends: the budget's reset time."""
    start = period_start(period, now)
    if period == "day":
        return start + dt.timedelta(days=1)
    if period == "week":
        return start + dt.timedelta(days=7)
    return (start + dt.timedelta(days=32)).replace(day=1)


# ------------------------------------------------------------------ the store


def _row(r) -> StoredKey:
    return StoredKey(
        name=r.name,
        key_hash=r.key_hash,
        key_prefix=r.key_prefix,
        budget_usd=r.budget_usd,
        period=r.period,
        rpm=r.rpm,
        cascades=tuple(r.cascades.split(",")) if r.cascades else None,
        expires_at=r.expires_at,
        created_at=r.created_at,
        revoked_at=r.revoked_at,
    )


def list_keys(engine: Engine) -> list[StoredKey]:
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(select(keys_table).order_by(_K.name))]


def create_key(
    engine: Engine,
    name: str,
    *,
    budget_usd: float | None,
    period: str | None,
    rpm: int | None,
    cascades: tuple[str, ...] | None,
    expires_at: dt.datetime | None,
    now: dt.datetime,
) -> str:
    """Store a new key; returns its secret (the only time it exists outside the client)."""
    secret = new_secret()
    with engine.begin() as conn:
        if conn.execute(select(_K.id).where(_K.name == name)).first() is not None:
            raise KeysError(f"a key named {name!r} exists already (revoked keys keep their name)")
        conn.execute(
            insert(keys_table).values(
                name=name,
                key_hash=hash_secret(secret),
                key_prefix=secret[: len(SECRET_PREFIX) + 4],
                budget_usd=budget_usd,
                period=period or ("month" if budget_usd is not None else None),
                rpm=rpm,
                cascades=",".join(cascades) if cascades else None,
                expires_at=expires_at,
                created_at=now,
            )
        )
    return secret


def revoke_key(engine: Engine, name: str, now: dt.datetime) -> None:
    with engine.begin() as conn:
        done = conn.execute(
            update(keys_table)
            .where(_K.name == name, _K.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        if done.rowcount == 0:
            _unknown(conn, name)
            raise KeysError(f"the key {name!r} is revoked already")


def update_key(engine: Engine, name: str, values: dict) -> None:
    """Change a key's budget, period, rpm, cascades or expiry (None in `values` clears it)."""
    row = dict(values)
    if "cascades" in row:
        row["cascades"] = ",".join(row["cascades"]) if row["cascades"] else None
    with engine.begin() as conn:
        done = conn.execute(update(keys_table).where(_K.name == name).values(**row))
        if done.rowcount == 0:
            _unknown(conn, name)


def _unknown(conn, name: str) -> None:
    if conn.execute(select(_K.id).where(_K.name == name)).first() is None:
        raise KeysError(f"no key named {name!r} (`cascade keys list` shows them)")


# ------------------------------------------------------------------ spend


def spend_since(
    engine: Engine, names: list[str], first_day: dt.date
) -> dict[tuple[str, dt.date], float]:
    """Known cost per (key name, UTC day) from `first_day` on, from the daily rollups (the
    figures `cascade report spend --by key` shows); unpriced calls count 0."""
    if not names:
        return {}
    d = daily_table.c
    query = (
        select(d.api_key, d.day, func.sum(d.cost_usd))
        .where(d.day >= first_day, d.api_key.in_(names))
        .group_by(d.api_key, d.day)
    )
    with engine.connect() as conn:
        return {(k, day): float(cost or 0.0) for k, day, cost in conn.execute(query)}


def written_request_ids(engine: Engine, ids: list[str]) -> set[str]:
    """Which of `ids` are in the ledger's database already (the rest are queued or spooled)."""
    found: set[str] = set()
    r = requests_table.c
    with engine.connect() as conn:
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            found.update(
                conn.execute(select(r.request_id).where(r.request_id.in_(chunk))).scalars()
            )
    return found
