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

Open-ended pairs (alpaca-fusechat; issue 14's target: index AUC at least the singles hull
+ 0.02) get a second table: the index policy, its length-only ablation and the prompt router
(prerouter), each on test and fitted in-sample, against the singles hull and the routing
oracle. A prompt router fitted on the 407 test prompts it is scored on learns those
prompts' best model (in-sample it nears the routing oracle), so that table bounds nothing
about the answers; a third table fits the index policy with a fixed root that does not
memorise prompts (none: the answers' signals alone; difficulty: with the three difficulty
bins) on train and on test, per curve: what the answers' signals allow. With `--only NAME`
just those pairs run.

Run from the repository root:
  .venv/bin/python benchmarks/insample_bound.py [--traces DIR] [--only alpaca-fusechat]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import common

from calibration.bench import Pair, find_pairs, load_pair, run_bench
from calibration.fit import DEFAULT_MUS, FittedIndex

BASELINES = ("threshold", "agreement", "singles")  # the "other" policies (not the ablation)
GOAL_AUC_MARGIN = 0.015
GOAL_COST_1PP = 0.5
OPEN_GOAL_MARGIN = 0.02  # issue 14: index AUC >= singles hull + 0.02 on open-ended pairs
OPEN_POLICIES = ("index", "index-length", "prerouter")
FIXED_ROOTS = ("none", "difficulty")  # roots that cannot memorise the prompts they score


def _c1pp(stats: dict) -> float:
    """cost_to_match_1pp with `never` as 1.0, as bench.md averages it."""
    c = stats["cost_to_match_1pp"]
    return 1.0 if c is None else float(c)


def run(args: argparse.Namespace) -> int:
    pairs, skipped = find_pairs(args.traces)
    if args.only:
        pairs = [p for p in pairs if p.name in args.only]
    if not pairs:
        raise RuntimeError(f"no NAME-train.jsonl / NAME-test.jsonl pair in {args.traces}")
    common.print_run("cascade in-sample bound: every policy fitted on the file it is scored on")
    print(f"  traces    {args.traces} ({len(pairs)} pairs; {'; '.join(skipped) or 'none skipped'})")
    with tempfile.TemporaryDirectory(prefix="cascade-insample-") as tmp:
        work = Path(tmp)
        same = work / "traces"
        same.mkdir()
        for pair in pairs:  # the test file stands as its own training file
            shutil.copyfile(pair.test, same / f"{pair.name}-train.jsonl")
            shutil.copyfile(pair.test, same / f"{pair.name}-test.jsonl")
        print("  running   the bench on train -> test, then on test -> test ...", flush=True)
        names = [p.name for p in pairs]
        real, _ = run_bench(args.traces, work / "real", only=names)
        bound, _ = run_bench(same, work / "bound", only=names)
        fixed = {p.name: fixed_root_areas(p) for p in pairs if p.name in open_names(real)}
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
    open_ended(real, bound, fixed)
    return 0


def open_names(real: dict) -> list[str]:
    """The open-ended pairs: those whose bench ran the index-length ablation."""
    return [n for n, r in real["pairs"].items() if "index-length" in r["policies"]]


def fixed_root_areas(pair: Pair) -> dict[str, dict[str, tuple[float, float]]]:
    """Per curve and fixed root: the index policy's test AUC (fitted on train, fitted on
    test)."""
    train, test = load_pair(pair)
    curves = ["correct", *(["quality"] if train.has_quality and test.has_quality else [])]
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for curve in curves:
        tr, te = (train, test) if curve == "correct" else (
            train.with_label("quality"), test.with_label("quality"),
        )  # fmt: skip
        out[curve] = {root: (_area(tr, te, root), _area(te, te, root)) for root in FIXED_ROOTS}
    return out


def _area(fit_on, score_on, root: str) -> float:
    fitted = FittedIndex(fit_on, True, root=root)
    return common.curve_area(
        score_on, [(mu, fitted.replay(fitted.tables(mu), score_on)) for mu in DEFAULT_MUS]
    )


def open_ended(real: dict, bound: dict, fixed: dict) -> None:
    """The open-ended pairs' tables."""
    names = open_names(real)
    if not names:
        return
    print()
    print("open-ended pairs: AUC on test / fitted on test (in-sample)")
    for name in names:
        test, ins = real["pairs"][name]["policies"], bound["pairs"][name]["policies"]
        hull = test["singles"]["auc"]
        print(
            f"  {name}: singles hull {hull:.4f}, routing oracle {test['oracle-routing']['auc']:.4f}"
        )
        for pol in OPEN_POLICIES:
            print(
                f"    {pol:14s} test {test[pol]['auc']:.4f}  in-sample {ins[pol]['auc']:.4f}"
                f"  cost within 1 pt test {_c1pp(test[pol]):.3f}"
            )
        best_in = max(ins[p]["auc"] for p in OPEN_POLICIES)
        print(
            f"    goal: index >= hull + {OPEN_GOAL_MARGIN} = {hull + OPEN_GOAL_MARGIN:.4f}; "
            f"the best fitted in-sample reaches {best_in:.4f} "
            f"({best_in - hull:+.4f} over the hull)"
        )
        for curve, roots in fixed[name].items():
            hull_c = (test if curve == "correct" else real["pairs"][name]["quality"]["policies"])[
                "singles"
            ]["auc"]
            print(f"    index with a fixed root, {curve} curve (singles hull {hull_c:.4f}):")
            for root, (on_train, on_test) in roots.items():
                print(
                    f"      root {root:10s} fitted on train {on_train:.4f}  fitted on test "
                    f"(in-sample) {on_test:.4f} ({on_test - hull_c:+.4f} over the hull)"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_traces_option(parser)
    parser.add_argument("--only", action="append", help="run only this pair (repeatable)")
    sys.exit(common.run_main(run, parser.parse_args()))


if __name__ == "__main__":
    main()
