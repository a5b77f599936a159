"""Shared fixtures, and the rule for the research traces.

Product tests use only what the repository ships (`proxy/demo`, `tests/data`) or what they
write themselves (`tests/synthetic.py`): the synthetic traces, the fake upstream answering from
them and a policy fitted on them (each module gets its own upstream; a module may define its
own).

The recorded research traces in ../shared/data/traces (MMLU, MedMCQA, TriviaQA, the Llama
GSM8K set, RouterBench) may not be redistributed. A test that reads them asks for the
`traces_dir` fixture and carries the marker `research_traces`:
- without that folder, it is skipped, and the summary says in one line how many and why;
- with CASCADE_CI=1 (set by .ci/run) a missing folder fails it instead: CI skips nothing;
- a test that asks for `traces_dir` without the marker fails, folder or not, so nobody can
  forget the marker: before it runs when it declares the fixture (or a fixture that does),
  after it ran when it reached it through `request.getfixturevalue` (how a parametrized
  fixture gives only its marked params the research traces).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from calibration.artifact import build_artifact, save_artifact
from tests.policy_walk import fit_small_large, textbook_mu
from tests.serving import fake_upstream
from tests.synthetic import write_choice_pair

REPO = Path(__file__).resolve().parents[1]
TRACES_DIR = REPO.parent / "shared" / "data" / "traces"
RESEARCH = "research_traces"
MISSING = f"research traces not found at {TRACES_DIR}"


def _in_ci() -> bool:
    return os.environ.get("CASCADE_CI", "") not in ("", "0")


def _is_research(item: pytest.Item) -> bool:
    return item.get_closest_marker(RESEARCH) is not None


def _unmarked(nodeid: str) -> str:
    return (
        f"{nodeid} reads the research traces (fixture traces_dir) but is not marked "
        f"@pytest.mark.{RESEARCH}"
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture: refuse an unmarked reader of the research traces; skip (or, in CI,
    fail) a marked test when the traces are absent. The skip is raised here, not added as a
    mark, so the `-ra` summary folds every such skip into one line."""
    if "traces_dir" in item.fixturenames and not _is_research(item):
        pytest.fail(_unmarked(item.nodeid), pytrace=False)
    if _is_research(item) and not TRACES_DIR.is_dir():
        if _in_ci():
            pytest.fail(f"{MISSING}; CASCADE_CI is set: CI runs every research test", False)
        pytest.skip(f"{MISSING} (CI runs them)")


def pytest_terminal_summary(terminalreporter) -> None:
    """One line: how many research-trace tests were skipped, and why."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if MISSING in str(r.longrepr)]
    if skipped:
        terminalreporter.write_line(
            f"{len(skipped)} research-trace tests skipped: {TRACES_DIR} not found "
            "(../shared beside the checkout; CI runs them)"
        )


@pytest.fixture(autouse=True)
def _research_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test: fail it if it reached `traces_dir` unmarked, dynamically (the setup
    check above sees only the fixtures a test declares)."""
    yield
    if "traces_dir" in request.fixturenames and not _is_research(request.node):
        pytest.fail(_unmarked(request.node.nodeid), pytrace=False)


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    """The research trace directory (for tests marked research_traces only)."""
    if not TRACES_DIR.is_dir():
        pytest.fail(f"{MISSING}; CI needs ../shared beside the repo")
    return TRACES_DIR


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> tuple[Path, Path]:
    """A synthetic train/test pair of multiple-choice traces over tests/synthetic.py's ladder
    (tiny, small, medium, big, large), written once per session; do not modify."""
    return write_choice_pair(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def upstream() -> Iterator[str]:
    """The fake upstream serving `small` and `large`; its base URL (without /v1)."""
    with fake_upstream("small,large") as up:
        yield up.url


@pytest.fixture(scope="module")
def traces_upstream(synthetic: tuple[Path, Path], tmp_path_factory) -> Iterator[str]:
    """The fake upstream answering the synthetic train traces' prompts with their recorded
    answers (and a model `judge`); its base URL (without /v1)."""
    log = tmp_path_factory.mktemp("upstream") / "stderr.txt"
    with fake_upstream("judge", "--traces", str(synthetic[0]), log=log) as up:
        yield up.url


@pytest.fixture(scope="session")
def policy(synthetic: tuple[Path, Path], tmp_path_factory) -> Path:
    """A policy over `small` -> `large` fitted on the synthetic traces (tests/policy_walk.py):
    a confident `small` answers alone, any other answer escalates to `large`."""
    fitted = fit_small_large(synthetic[0])
    mu = textbook_mu(fitted)
    art = build_artifact(fitted, mu, train_path=synthetic[0].name, answer_kind="choice")
    path = tmp_path_factory.mktemp("policy") / "policy.json"
    save_artifact(art, path)
    return path
