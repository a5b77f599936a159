"""How strong an answer signal the open-ended targets need: the bench on planted confidences.

Issue 14 asks, on `alpaca-fusechat`, for an index AUC at least 0.02 above the hull of single
models and a cost to come within a point of the best model of at most 0.75. The recorded
answers carry no logprobs, and what the answers themselves show separates the judge's good
answers from the others with an AUROC of 0.52-0.62 per model on train (length, structure,
agreement; `benchmarks/freetext_signals.py`). This script asks the converse question: how
good would a per-answer signal have to be?

For each strength d of --strengths it writes a copy of the pair in which every model's
`confidence` is planted, on train and test alike, as log sigmoid(d * correct + e - d / 2),
e standard normal (seeded per model and row): a signal whose AUROC for `correct` is
Phi(d / sqrt 2) in expectation (0.64 at d = 0.5, 0.76 at 1, 0.86 at 1.5, 0.92 at 2), and
nothing else about the rows changes. It then runs the bench protocol on the copy (fit on
train, score on test; the fit calibrates the planted confidence with the answers' own
features, per node, out of fold) and prints, per strength, the measured AUROC on train, the
index policy's AUC and cost within a point, and the singles hull and prompt router, which
read no confidence and do not move. d = 0 plants pure noise: the index policy as it stands.
Both curves (correct; quality where the rows carry it) are shown. One planting per strength
(--seed); prints figures, asserts nothing. About a minute per strength here.

Run from the repository root:
  .venv/bin/python benchmarks/signal_needed.py [--traces DIR] [--pair alpaca-fusechat]
                                               [--strengths 0,0.5,1,1.5,2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import common
import numpy as np

from calibration.bench import find_pairs, run_bench

OPEN_GOAL_MARGIN = 0.02  # issue 14: index AUC >= singles hull + 0.02
OPEN_GOAL_COST_1PP = 0.75  # issue 14: cost to come within a point <= 0.75


def plant(src: Path, dst: Path, strength: float, rng: np.random.Generator) -> None:
    """Copy a trace file with every model's confidence replaced by the planted signal."""
    with src.open() as fin, dst.open("w") as fout:
        for line in fin:
            row = json.loads(line)
            for entry in row["models"].values():
                z = strength * float(bool(entry["correct"])) + rng.standard_normal() - strength / 2
                entry["confidence"] = -math.log1p(math.exp(-z)) if z > -30 else z
            fout.write(json.dumps(row) + "\n")


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUROC (ties count one half)."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def train_aurocs(path: Path) -> list[float]:
    """Per model (file order), the planted confidence's AUROC for `correct`."""
    rows = [json.loads(line) for line in path.open()]
    models = list(rows[0]["models"])
    out = []
    for m in models:
        conf = np.array([r["models"][m]["confidence"] for r in rows], dtype=float)
        right = np.array([bool(r["models"][m]["correct"]) for r in rows])
        out.append(auroc(conf, right))
    return out


def _c1pp(stats: dict) -> float:
    c = stats["cost_to_match_1pp"]
    return 1.0 if c is None else float(c)


def run(args: argparse.Namespace) -> int:
    pairs, _ = find_pairs(args.traces)
    pair = next((p for p in pairs if p.name == args.pair), None)
    if pair is None:
        raise RuntimeError(f"no pair {args.pair} (train and test files) in {args.traces}")
    strengths = [float(s) for s in args.strengths.split(",")]
    common.print_run("cascade signal needed: the bench on planted answer confidences")
    print(f"  pair      {pair.name} ({args.traces}); strengths {strengths}; seed {args.seed}")
    print()
    head = f"{'d':>4s} {'AUROC train':>22s}  curve    {'index':>7s} {'hull':>7s} {'prerouter':>9s} "
    print(head + f"{'index-hull':>10s} {'cost 1pt':>8s}")
    with tempfile.TemporaryDirectory(prefix="cascade-signal-") as tmp:
        for d in strengths:
            folder = Path(tmp) / f"d{d}"
            folder.mkdir()
            rng = np.random.default_rng(args.seed)
            for part, src in (("train", pair.train), ("test", pair.test)):
                plant(src, folder / f"{pair.name}-{part}.jsonl", d, rng)
            aucs = train_aurocs(folder / f"{pair.name}-train.jsonl")
            result, _ = run_bench(folder, folder / "out", only=[pair.name])
            entry = result["pairs"][pair.name]
            curves = [("correct", entry["policies"])]
            if "quality" in entry:
                curves.append(("quality", entry["quality"]["policies"]))
            for curve, pol in curves:
                index, hull = pol["index"]["auc"], pol["singles"]["auc"]
                router = pol["prerouter"]["auc"] if "prerouter" in pol else float("nan")
                print(
                    f"{d:4.1f} {' '.join(f'{a:.2f}' for a in aucs):>22s}  {curve:8s} "
                    f"{index:7.4f} {hull:7.4f} {router:9.4f} {index - hull:+10.4f} "
                    f"{_c1pp(pol['index']):8.3f}",
                    flush=True,
                )
    print()
    print(
        f"goals: index AUC >= hull + {OPEN_GOAL_MARGIN}; cost to come within 1 point <= "
        f"{OPEN_GOAL_COST_1PP} (1.000 = never within a point)"
    )
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_traces_option(parser)
    parser.add_argument("--pair", default="alpaca-fusechat", help="the open-ended pair")
    parser.add_argument("--strengths", default="0,0.5,1,1.5,2", help="planted signal strengths d")
    parser.add_argument("--seed", type=int, default=0)
    sys.exit(common.run_main(run, parser.parse_args()))


if __name__ == "__main__":
    main()
