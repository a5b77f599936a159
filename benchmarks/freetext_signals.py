"""How well each free-text signal separates good open-ended answers from the others.

On an open-ended pair (default alpaca-fusechat), per model: the AUROC of each answer feature
of policies/freetext.py alone on train, of each feature group's calibrator out of fold on
train (calibration/textfit.py; what the fit chooses by) and fitted on train, scored on test;
the AUROC of the graded agreement (character 3-grams and word bigrams) of the model's answer
with each other model's, on train; and the held-out curve area on train of the two prompt
encodings of the prerouter (calibration/prerouter.py). 0.5 = no information. Prints
figures; asserts nothing. About a minute here.

Run from the repository root:
  .venv/bin/python benchmarks/freetext_signals.py [--traces DIR] [--pair alpaca-fusechat]
"""

from __future__ import annotations

import argparse
import sys

import common
import numpy as np

from calibration.bench import Pair, load_pair
from calibration.prerouter import ENCODINGS, held_out_area
from calibration.textfit import fit_group, held_out, trace_features
from policies.freetext import FEATURES, agreement
from policies.textcal import GROUPS, reads_logprobs


def auroc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count half); nan without both classes or any spread."""
    ok = ~np.isnan(score)
    y, score = y[ok].astype(bool), score[ok]
    if y.all() or not y.any() or len(np.unique(score)) < 2:
        return float("nan")
    from scipy.stats import rankdata

    r = rankdata(score)
    n1 = y.sum()
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * (len(y) - n1)))


def run(args: argparse.Namespace) -> int:
    pair = Pair(
        args.pair,
        args.traces / f"{args.pair}-train.jsonl",
        args.traces / f"{args.pair}-test.jsonl",
    )
    train, test = load_pair(pair)
    common.print_run(
        f"cascade free-text signals on {args.pair} (train {len(train)}, test {len(test)})"
    )
    cols = list(range(train.n_models))
    f_tr = trace_features(train, cols)  # as the fit computes them (and the proxy live)
    f_te = trace_features(test, cols)
    fold = np.random.default_rng(0).permutation(len(train)) % 5
    short = [m.removeprefix("FuseChat-").removesuffix("-Instruct") for m in train.models]
    print()
    print("AUROC of each answer feature alone, train (higher value = judged good)")
    print(f"  {'model':16s} {'P(good)':>8s} " + " ".join(f"{f[:14]:>14s}" for f in FEATURES))
    for j in cols:
        y = train.correct[:, j]
        cells = [auroc(y, f_tr[:, j, k]) for k in range(len(FEATURES))]
        print(f"  {short[j]:16s} {y.mean():8.3f} " + " ".join(f"{c:14.3f}" for c in cells))
    print()
    print("AUROC of each feature group's calibrator: out of fold on train / fitted on train, test")
    # the traces hold no token logprobs: the groups reading their summary have nothing to fit
    groups = [g for g in GROUPS if not reads_logprobs(GROUPS[g])]
    print(f"  {'model':16s} " + " ".join(f"{g:>22s}" for g in groups))
    nan = np.full(len(train), np.nan)
    for j in cols:
        y, yt = train.correct[:, j], test.correct[:, j]
        cells = []
        for g in groups:
            oof = held_out(f_tr[:, j], nan, y.astype(float), GROUPS[g], False, fold)
            cal = fit_group(f_tr[:, j], nan, y.astype(float), GROUPS[g])
            on_test = cal.log_p(f_te[:, j], np.full(len(test), np.nan))
            cells.append(f"{auroc(y, oof):.3f} / {auroc(yt, on_test):.3f}")
        print(f"  {short[j]:16s} " + " ".join(f"{c:>22s}" for c in cells))
    print()
    for method, label in (("char", "character 3-grams"), ("word", "word bigrams")):
        print(f"AUROC of agreement ({label}) with each other model's answer, train")
        print(f"  {'model':16s} " + " ".join(f"{'with ' + s[:11]:>16s}" for s in short))
        for j in cols:
            cells = []
            for k in cols:
                if k == j:
                    cells.append(f"{'-':>16s}")
                    continue
                a = np.array(
                    [
                        np.nan if (v := agreement(r[j], r[k], method)) is None else v
                        for r in train.answers
                    ]
                )
                cells.append(f"{auroc(train.correct[:, j], a):16.3f}")
            print(f"  {short[j]:16s} " + " ".join(cells))
        print()
    areas = {kind: held_out_area(train, kind) for kind in ENCODINGS}
    print(
        "prerouter: held-out curve area on train (5 folds): "
        + ", ".join(f"{k} {v:.4f}" for k, v in areas.items())
        + f" -> {max(ENCODINGS, key=lambda k: (areas[k], k == 'tfidf'))}"
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_traces_option(parser)
    parser.add_argument("--pair", default="alpaca-fusechat", help="the open-ended pair")
    sys.exit(common.run_main(run, parser.parse_args()))


if __name__ == "__main__":
    main()
