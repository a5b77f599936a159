"""Ledger schema revisions (Alembic skips this file)."""
