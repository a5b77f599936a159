"""Alembic migrations of the cascade ledger; driven by :mod:`proxy.ledger.db`."""
