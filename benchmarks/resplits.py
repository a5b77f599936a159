"""How much of the bench's verdict is the luck of one split: the protocol on random re-splits.

Each dev pair is one train/test split of a few hundred training rows, and a policy's AUC on
it moves by several thousandths with the split (and with the fold seed of its own fit). This
script pools each pair's rows (train and test), shuffles them with --splits seeds, cuts each
shuffle into a training half of the original train size and a test half of the rest, and runs
the bench protocol on every re-split pair (each still fitted on its own train half only and
scored on its own test half). A file without its test half (gsm8k-llama) is re-split from
its train file alone, two thirds for training. It prints per pair the means over its
re-splits, then the means over every re-split pair beside the decision-core goals, and the
re-split pairs where the index policy is more than 0.005 below the best other policy, and
the root kind each index policy's fit chose by cross-validation on its train half (how many
re-splits chose each kind, and which re-split chose which); for pairs with graded labels
(`quality`), the same again for the mean-quality curve. `--only NAME`
re-splits only the pairs named (e.g. `--only alpaca-fusechat`; its index-length ablation is
shown where the pairs have it).

Use it to judge a change to the decision core: a difference smaller than the spread printed
here is not evidence. It is not the issue's measurement, which is `cascade bench` on the dev
pairs as they are. Prints figures; asserts nothing. About 2 minutes here with 3 splits.

Run from the repository root:  .venv/bin/python benchmarks/resplits.py [--traces DIR] [--splits 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import common

from calibration.bench import run_bench

OTHERS = ("index-norecall", "threshold", "agreement", "prerouter", "singles")
BASELINES = ("threshold", "agreement", "prerouter", "singles")  # the issues' "other" policies
SHOWN = ("index", *OTHERS, "index-length")  # index-length: open-ended pairs only
GOAL_AUC_MARGIN = 0.015
GOAL_COST_1PP = 0.5
WORST_GAP = -0.005


def _c1pp(stats: dict) -> float:
    c = stats["cost_to_match_1pp"]
    return 1.0 if c is None else float(c)


def run(args: argparse.Namespace) -> int:
    if args.splits < 1:
        raise RuntimeError("--splits must be at least 1")
    common.print_run(
        "cascade re-splits: the bench protocol on random re-splits of every pair's rows"
    )
    with tempfile.TemporaryDirectory(prefix="cascade-resplits-") as tmp:
        folder = Path(tmp) / "traces"
        folder.mkdir()
        names = common.write_resplits(args.traces, folder, args.splits, args.only)
        print(
            f"  traces    {args.traces}: {len(names)} pairs x {args.splits} re-splits", flush=True
        )
        bench, skipped = run_bench(folder, Path(tmp) / "out")
    for line in skipped:
        print(f"  {line}")
    for curve in ("correct", "quality"):
        curves = {
            name: entry if curve == "correct" else entry["quality"]
            for name, entry in sorted(bench["pairs"].items())
            if curve == "correct" or "quality" in entry
        }
        if curves:
            report({name: c["policies"] for name, c in curves.items()}, curve)
            report_roots({name: c.get("root_choice") or {} for name, c in curves.items()})
    return 0


def report(pairs: dict[str, dict], curve: str) -> None:
    """Per source pair the means over its re-splits, then over every re-split pair, for
    one curve (`correct`: accuracy against cost; `quality`: mean quality against cost)."""
    print()
    print("accuracy curve" if curve == "correct" else "mean-quality curve (graded pairs)")
    by_source: dict[str, list[dict]] = defaultdict(list)
    for name, policies in pairs.items():
        by_source[name.rsplit("_s", 1)[0]].append(policies)
    every = list(pairs.values())
    shown = [h for h in SHOWN if all(h in e for e in every)]
    print(f"{'AUC, mean over re-splits':30s} " + " ".join(f"{h:>14s}" for h in shown))
    for source, entries in by_source.items():
        cells = []
        for h in shown:
            aucs = [e[h]["auc"] for e in entries]
            spread = max(aucs) - min(aucs)
            cells.append(f"{statistics.mean(aucs):.4f} ±{spread / 2:.3f}")
        print(f"{source:30s} " + " ".join(f"{c:>14s}" for c in cells))
    auc = {h: statistics.mean(e[h]["auc"] for e in every) for h in shown}
    c1 = {h: statistics.mean(_c1pp(e[h]) for e in every) for h in shown}
    print(f"{'mean AUC':30s} " + " ".join(f"{auc[h]:14.4f}" for h in shown))
    print(f"{'mean cost within 1 point':30s} " + " ".join(f"{c1[h]:14.3f}" for h in shown))
    best_base = max(BASELINES, key=lambda h: auc[h])
    print()
    print(
        f"index - best baseline ({best_base}): {auc['index'] - auc[best_base]:+.4f} "
        f"(goal +{GOAL_AUC_MARGIN}); index - index-norecall: "
        f"{auc['index'] - auc['index-norecall']:+.4f}; index - singles (hull of single "
        f"models): {auc['index'] - auc['singles']:+.4f}"
    )
    print(f"mean cost to come within 1 point: index {c1['index']:.3f} (goal <= {GOAL_COST_1PP})")
    worst = []
    for name, p in pairs.items():
        best_other = max(OTHERS, key=lambda h: p[h]["auc"])
        gap = p["index"]["auc"] - p[best_other]["auc"]
        if gap < WORST_GAP:
            worst.append(f"{name} {gap:+.4f} ({best_other})")
    print(
        f"re-split pairs where index is more than {-WORST_GAP} below the best other policy: "
        f"{len(worst)} of {len(every)}" + ("".join(f"\n  {w}" for w in worst))
    )


def _seed(name: str) -> int:
    """The seed of a re-split pair NAME_sSEED, to list re-splits in seed order (s2 < s10)."""
    tail = name.rsplit("_s", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def report_roots(roots: dict[str, dict[str, dict | None]]) -> None:
    """Per source pair and index policy, how many of its re-splits' fits chose each root
    kind (the fit's cross-validated choice on its own train half, bench.json `root_choice`),
    then the kind each re-split chose: whether a root's gain is the split's luck shows here."""
    by_source: dict[str, list[str]] = defaultdict(list)
    for name in roots:
        by_source[name.rsplit("_s", 1)[0]].append(name)
    policies = [h for h in SHOWN if any(h in r for r in roots.values())]
    policies += sorted({h for r in roots.values() for h in r} - set(policies))
    if not policies:
        return
    print("root choice of the index fits (cross-validated on each re-split's train half):")
    for source, names in by_source.items():
        names.sort(key=_seed)
        for h in policies:
            kinds = {
                n: (roots[n].get(h) or {}).get("kind") or "n/a" for n in names if h in roots[n]
            }
            if not kinds:
                continue
            counts = sorted(Counter(kinds.values()).items(), key=lambda kc: (-kc[1], kc[0]))
            per_split = ", ".join(f"{n[len(source) + 1 :]} {k}" for n, k in kinds.items())
            print(
                f"  {source} root choice ({h}): "
                + ", ".join(f"{k} {c}" for k, c in counts)
                + f" ({per_split})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_traces_option(parser)
    parser.add_argument("--splits", type=int, default=3, help="re-splits per pair (default 3)")
    parser.add_argument(
        "--only", action="append", metavar="NAME", help="re-split only this pair (repeatable)"
    )
    sys.exit(common.run_main(run, parser.parse_args()))


if __name__ == "__main__":
    main()
