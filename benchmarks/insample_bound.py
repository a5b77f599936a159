"""How much the recorded signals allow: every policy fitted on the test file it is scored on.

The decision-core issue asks the index policy for a mean AUC 0.015 above the best other
policy and a mean cost to come within a point of the best model of at most 0.5. This script
runs the bench protocol twice on every train/test pair of --traces: once as it is (fit on
train, score on test), once with each pair's test file as its own training file. The second
run is not an evaluation (it sees the answers it is scored on); it bounds what better
estimation alone could add, since each policy's fit then has no train/test gap to bridge.
Per pair it prints the index policy on test, the index policy and the threshold cascade
fitted in-sample, the better of those two, and the best baseline on test (threshold,
agreement, singles; the no-recall ablation is the issue's separate comparison). Prints
figures; asserts nothing. About two minutes here.

Run from the repository root:  .venv/bin/python benchmarks/insample_bound.py [--traces DIR]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import common

from calibration.bench import find_pairs, run_bench

BASELINES = ("threshold", "agreement", "singles")  # the "other" policies (not the ablation)
GOAL_AUC_MARGIN = 0.015
GOAL_COST_1PP = 0.5


def _c1pp(stats: dict) -> float:
    """cost_to_match_1pp with `never` as 1.0, as bench.md averages it."""
    c = stats["cost_to_match_1pp"]
    return 1.0 if c is None else float(c)


def run(args: argparse.Namespace) -> int:
    pairs, skipped = find_pairs(args.traces)
    if not pairs:
        raise RuntimeError(f"no NAME-train.jsonl / NAME-test.jsonl pair in {args.traces}")
    print("cascade in-sample bound: every policy fitted on the file it is scored on")
    print(f"  date      {common.now_utc()}")
    print(f"  machine   {common.machine()}")
    print(f"  command   {common.command()}")
    print(f"  traces    {args.traces} ({len(pairs)} pairs; {'; '.join(skipped) or 'none skipped'})")
    with tempfile.TemporaryDirectory(prefix="cascade-insample-") as tmp:
        work = Path(tmp)
        same = work / "traces"
        same.mkdir()
        for pair in pairs:  # the test file stands as its own training file
            shutil.copyfile(pair.test, same / f"{pair.name}-train.jsonl")
            shutil.copyfile(pair.test, same / f"{pair.name}-test.jsonl")
        print("  running   the bench on train -> test, then on test -> test ...", flush=True)
        real, _ = run_bench(args.traces, work / "real")
        bound, _ = run_bench(same, work / "bound")
    print()
    head = ("index", "index in", "thresh in", "best in", "best base")
    print(f"{'AUC':28s} " + " ".join(f"{h:>10s}" for h in head))
    sums = dict.fromkeys(head, 0.0)
    c1 = dict.fromkeys(("index", "index in", "thresh in"), 0.0)
    for name in real["pairs"]:
        test = real["pairs"][name]["policies"]
        ins = bound["pairs"][name]["policies"]
        row = {
            "index": test["index"]["auc"],
            "index in": ins["index"]["auc"],
            "thresh in": ins["threshold"]["auc"],
            "best in": max(ins["index"]["auc"], ins["threshold"]["auc"]),
            "best base": max(test[o]["auc"] for o in BASELINES),
        }
        for h in head:
            sums[h] += row[h]
        c1["index"] += _c1pp(test["index"])
        c1["index in"] += _c1pp(ins["index"])
        c1["thresh in"] += _c1pp(ins["threshold"])
        print(f"{name:28s} " + " ".join(f"{row[h]:10.4f}" for h in head))
    n = len(real["pairs"])
    print(f"{'mean':28s} " + " ".join(f"{sums[h] / n:10.4f}" for h in head))
    best_other_mean = max(real["summary"][o]["auc"] for o in BASELINES)
    print()
    print(
        f"goal: index mean AUC >= best baseline's mean + {GOAL_AUC_MARGIN} = "
        f"{best_other_mean + GOAL_AUC_MARGIN:.4f}"
    )
    print(
        f"mean cost to come within 1 point (goal <= {GOAL_COST_1PP}): "
        + ", ".join(f"{k} {v / n:.3f}" for k, v in c1.items())
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_traces_option(parser)
    sys.exit(common.run_main(run, parser.parse_args()))


if __name__ == "__main__":
    main()
