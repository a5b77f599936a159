"""benchmarks/resplits.py's report of the root each re-split's index fit chose, on a
synthetic bench result: running the protocol itself on the shipped traces (tests/data's
alpaca-fusechat) takes about a minute, so run_bench and the re-split files are stubbed and
only the report is checked."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def resplits(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the scripts import `common` so
    return importlib.import_module("resplits")


def _curve(seed: int, roots: dict[str, str]) -> dict:
    """One curve's entry of bench.json: every shown policy's AUC, the index fits' roots."""
    shown = ("index", "index-norecall", "threshold", "agreement", "prerouter", "singles")
    policies = {h: {"auc": 0.8 + 0.01 * seed, "cost_to_match_1pp": 0.5} for h in shown}
    return {
        "policies": policies,
        "root_choice": {
            h: {"kind": k, "requested": "auto", "held_out_area": {k: 0.5}} for h, k in roots.items()
        },
    }


def test_root_choice_counted_per_pair_and_listed_per_resplit(resplits, monkeypatch, capsys):
    kinds = [
        "router",
        "difficulty",
        "router",
        "router",
        "difficulty",
        "router",
        "router",
        "difficulty",
        "router",
        "router",
        "router",
    ]  # fmt: skip  (s0 .. s10)
    pairs = {}
    for seed, kind in enumerate(kinds):
        entry = _curve(seed, {"index": kind, "index-norecall": "router"})
        entry["quality"] = _curve(seed, {"index": "difficulty", "index-norecall": "router"})
        pairs[f"pp_s{seed}"] = entry
    pairs["mc_s0"] = _curve(0, {"index": "none", "index-norecall": "difficulty"})
    monkeypatch.setattr(resplits.common, "write_resplits", lambda *a: ["mc", "pp"])
    monkeypatch.setattr(resplits, "run_bench", lambda *a: ({"pairs": pairs}, []))
    args = argparse.Namespace(traces=Path("unused"), splits=len(kinds), only=None)
    assert resplits.run(args) == 0
    out = capsys.readouterr().out
    correct, quality = out.split("mean-quality curve (graded pairs)")
    assert "mean AUC" in correct and "index - best baseline" in correct  # the usual report
    assert "  mc root choice (index): none 1 (s0 none)\n" in correct
    assert (
        "  pp root choice (index): router 8, difficulty 3 (s0 router, s1 difficulty, s2 router,"
        " s3 router, s4 difficulty, s5 router, s6 router, s7 difficulty, s8 router, s9 router,"
        " s10 router)\n"
    ) in correct
    assert "  pp root choice (index-norecall): router 11 (s0 router, " in correct
    assert "  pp root choice (index): difficulty 11 (s0 difficulty, " in quality
    assert "mc root choice" not in quality  # no graded labels
