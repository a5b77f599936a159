"""The rule for the research traces (tests/conftest.py), checked on inner pytest runs of a few
small tests under this very conftest, with its trace folder pointed at an empty folder that
exists, or at one that does not (a fresh clone with nothing beside it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ("pytester",)

CONFTEST = Path(__file__).with_name("conftest.py").read_text(encoding="utf-8")
TRACES_LINE = 'TRACES_DIR = REPO.parent / "shared" / "data" / "traces"'
INI = """
[pytest]
addopts = --strict-markers -ra
markers =
    research_traces: reads the research traces
"""
# two product tests; four research tests (one a marked param of a parametrized fixture)
TESTS = """
import pytest

def test_product():
    assert True

@pytest.mark.research_traces
def test_marked(traces_dir):
    assert traces_dir.is_dir()

@pytest.mark.research_traces
@pytest.mark.parametrize("k", [1, 2])
def test_marked_params(traces_dir, k):
    assert traces_dir.is_dir()

@pytest.fixture(params=["shipped", pytest.param("research", marks=pytest.mark.research_traces)])
def source(request):
    if request.param == "research":
        return request.getfixturevalue("traces_dir")
    return None

def test_twin(source):
    assert source is None or source.is_dir()
"""
FORGOT_STATIC = """
def test_forgot_the_marker(traces_dir):
    assert traces_dir.is_dir()
"""
FORGOT_DYNAMIC = """
import pytest

@pytest.fixture(params=["shipped", "research"])  # no marker on "research"
def source(request):
    if request.param == "research":
        return request.getfixturevalue("traces_dir")
    return None

def test_twin(source):
    assert source is None or source.is_dir()
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch):
    """`inner(traces, tests, ci)`: run `tests` under this conftest with its trace folder at
    `traces`, CASCADE_CI set or not; the run's result."""

    def run(traces: Path, tests: str, ci: bool = False) -> pytest.RunResult:
        assert TRACES_LINE in CONFTEST
        pytester.makeconftest(CONFTEST.replace(TRACES_LINE, f"TRACES_DIR = Path({str(traces)!r})"))
        pytester.makeini(INI)
        pytester.makepyfile(test_inner=tests)
        if ci:
            monkeypatch.setenv("CASCADE_CI", "1")
        else:
            monkeypatch.delenv("CASCADE_CI", raising=False)
        return pytester.runpytest()

    return run


def test_without_the_traces_research_tests_are_skipped_with_one_line_saying_so(
    inner, tmp_path: Path
) -> None:
    absent = tmp_path / "shared" / "data" / "traces"
    result = inner(absent, TESTS)
    result.assert_outcomes(passed=2, skipped=4)
    out = result.stdout.str()
    summary = f"4 research-trace tests skipped: {absent} not found"
    assert out.count(summary) == 1, out
    # -ra lists them on one folded line, with the reason
    assert len(re.findall(r"^SKIPPED \[4\] .*research traces not found at", out, re.M)) == 1, out
    assert "SKIPPED [" not in out.replace("SKIPPED [4]", ""), out


def test_in_ci_missing_traces_fail_the_research_tests_instead(inner, tmp_path: Path) -> None:
    result = inner(tmp_path / "absent", TESTS, ci=True)
    result.assert_outcomes(passed=2, errors=4)
    out = result.stdout.str()
    # one reason per error, at the start of its line (the summary may repeat it, width allowing)
    reasons = re.findall(
        r"^research traces not found at .*CASCADE_CI is set: CI runs every", out, re.M
    )
    assert len(reasons) == 4, out
    assert "research-trace tests skipped" not in out


def test_with_the_traces_every_test_runs(inner, tmp_path: Path) -> None:
    present = tmp_path / "traces"
    present.mkdir()
    for ci in (False, True):
        result = inner(present, TESTS, ci=ci)
        result.assert_outcomes(passed=6)
        assert "research-trace tests skipped" not in result.stdout.str()


@pytest.mark.parametrize("present", [True, False], ids=["present", "absent"])
def test_an_unmarked_test_asking_for_the_traces_fails(inner, tmp_path: Path, present) -> None:
    traces = tmp_path / "traces"
    if present:
        traces.mkdir()
    result = inner(traces, FORGOT_STATIC)
    result.assert_outcomes(errors=1)
    assert "test_forgot_the_marker reads the research traces (fixture traces_dir) but is not " in (
        result.stdout.str()
    )


def test_an_unmarked_param_reaching_the_traces_fails_after_it_ran(inner, tmp_path: Path) -> None:
    present = tmp_path / "traces"
    present.mkdir()
    result = inner(present, FORGOT_DYNAMIC, ci=True)  # as in CI: the folder is there
    result.assert_outcomes(passed=2, errors=1)  # the error is at its teardown
    assert "test_twin[research] reads the research traces" in result.stdout.str()
