"""Shared fixtures: the real recorded traces in ../shared/data/traces, the fake upstream and a
policy fitted on them (each module gets its own upstream; a module may define its own)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from calibration.artifact import build_artifact, save_artifact
from tests.policy_walk import fit_small_large, textbook_mu
from tests.serving import fake_upstream

TRACES_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    """The shared trace directory; its absence is a failure, never a skip."""
    if not TRACES_DIR.is_dir():
        pytest.fail(f"shared traces not found at {TRACES_DIR}; CI needs ../shared beside the repo")
    return TRACES_DIR


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The fake upstream serving `small` and `large`; its base URL (without /v1)."""
    with fake_upstream("small,large") as up:
        yield up.url


@pytest.fixture(scope="module")
def traces_upstream(traces_dir: Path, tmp_path_factory) -> Iterator[str]:
    """The fake upstream answering with the real MMLU traces' recorded answers (and a model
    `judge`); its base URL (without /v1)."""
    log = tmp_path_factory.mktemp("upstream") / "stderr.txt"
    with fake_upstream(
        "judge", "--traces", str(traces_dir / "mmlu-llama-train.jsonl"), log=log
    ) as up:
        yield up.url


@pytest.fixture(scope="module")
def policy(traces_dir: Path, tmp_path_factory) -> Path:
    """A policy over `small` -> `large` fitted on real MMLU traces (tests/policy_walk.py):
    a confident `small` answers alone, any other answer escalates to `large`."""
    fitted = fit_small_large(traces_dir)
    mu = textbook_mu(fitted)
    art = build_artifact(fitted, mu, train_path="mmlu-llama-train.jsonl", answer_kind="choice")
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    save_artifact(art, path)
    return path
