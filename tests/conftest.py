"""Shared fixtures: the real recorded traces in ../shared/data/traces."""

from __future__ import annotations

from pathlib import Path

import pytest

TRACES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    """The shared trace directory; its absence is a failure, never a skip."""
    if not TRACES_DIR.is_dir():
        pytest.fail(f"shared traces not found at {TRACES_DIR}; CI needs ../shared beside the repo")
    return TRACES_DIR
