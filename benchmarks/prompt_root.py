"""Can the index policy read the prompt as well as the prompt router does? Re-split measures.

Issue 14 asks that the index policy's prompt-aware root do at least as well as `prerouter`,
the RouteLLM-style baseline that picks one model per query from the prompt alone
(calibration/prerouter.py). On the short-answer pairs it does; on `alpaca-fusechat` the
bench's one split and the re-splits of `benchmarks/resplits.py` put it a few thousandths
below. This script measures, on random re-splits of one pair (each fitted on its own train
half, scored on its own test half, as the bench does), the ways of giving the index policy
the router's information that were tried:

  index            the policy as shipped: a hashed-word ridge predicts the share of models
                   right, and its three bins are the root states (policies/difficulty.py)
  index-noroot     the same without a prompt root (one root state)
  index-routeroot  per cost price mu, the root state is the router's own pick at that
                   price (its out-of-fold pick on train), so the backward induction learns
                   a first move, and what follows, per pick: the router as a root
  index-prior      the router's out-of-fold P(correct | prompt) given to every answer as
                   its confidence, so the per-node calibrators (and the states, kernels and
                   root built on them) read prompt and answer together
  prerouter        the router itself, as the bench runs it
  singles          the hull of single models

It prints, per curve (correct; quality where the rows carry it), each policy's mean AUC
over the re-splits with its standard deviation, and each variant's paired difference from
the router (mean and standard deviation over the re-splits). The variants reuse the fit's
own pieces (calibration/fit.py); none of them ships. Prints figures, asserts nothing.
About 25 s per re-split and curve here.

Run from the repository root:
  .venv/bin/python benchmarks/prompt_root.py [--traces DIR] [--pair alpaca-fusechat]
                                             [--splits 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

import common
import numpy as np

from calibration.baselines import SinglesFamily
from calibration.bench import Pair, load_pair
from calibration.fit import (
    DEFAULT_MUS,
    FittedIndex,
    IndexFamily,
    fit_states,
    replay_tables,
    solve_tables,
)
from calibration.prerouter import (
    ENCODINGS,
    PrerouterFamily,
    PromptRouter,
    cost_fraction,
    held_out_area,
    route,
)
from calibration.traces import TraceSet

VARIANTS = (
    "index",
    "index-noroot",
    "index-routeroot",
    "index-routerfirst",
    "index-prior",
    "prerouter",
    "singles",
)
FOLDS = 5


def family_area(family, train: TraceSet, test: TraceSet) -> float:
    return common.curve_area(test, [(s.knob, s.replay(test)) for s in family.fit_sweep(train)])


def router_encoding(train: TraceSet) -> str:
    """The prompt encoding the bench's prerouter would choose on this train half."""
    return max(ENCODINGS, key=lambda kind: (held_out_area(train, kind), kind == "tfidf"))


def router_p(train: TraceSet, test: TraceSet, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The router's P(correct | prompt) per row and model: out of fold on train (as the
    fit's other train-side signals are), from the full-train router on test."""
    fold = np.random.default_rng(1).permutation(len(train)) % FOLDS
    p_train = np.zeros((len(train), train.n_models))
    for f in range(FOLDS):
        held = np.flatnonzero(fold == f)
        router = PromptRouter(train, kind, np.flatnonzero(fold != f))
        p_train[held] = router.p_correct(train, held)
    return p_train, PromptRouter(train, kind).p_correct(test)


def noroot_area(train: TraceSet, test: TraceSet) -> float:
    fitted = FittedIndex(train, True, use_difficulty=False)
    return common.curve_area(
        test, [(mu, fitted.replay(fitted.tables(mu), test)) for mu in DEFAULT_MUS]
    )


def routeroot_area(train: TraceSet, test: TraceSet, p_train: np.ndarray, p_test: np.ndarray):
    """Per price, root state = the router's pick; the states and kernels are refitted with
    it (the fit's own fit_states), the tables solved at that price."""
    fitted = FittedIndex(train, True, use_difficulty=False)
    correct = train.correct[:, fitted.nodes]
    cost = cost_fraction(train)
    scores = fitted.scores(test)
    outcomes = []
    for mu in DEFAULT_MUS:
        pick_train, pick_test = route(p_train, cost, mu), route(p_test, cost, mu)
        seen = sorted(set(pick_train.tolist()))  # root states: the picks train makes
        state = {m: i for i, m in enumerate(seen)}
        states = fit_states(
            fitted.oof,
            correct,
            True,
            n_bins=fitted.n_bins,
            kappa=fitted.kappa,
            root_state=np.array([state[m] for m in pick_train]),
            allowed=fitted.allowed,
        )
        nearest = [state[min(seen, key=lambda s, m=m: abs(s - m))] for m in pick_test]
        tables = solve_tables(states, fitted.costs, mu)
        outcome = replay_tables(
            tables, scores, True, fitted.nodes, test, root_state=np.array(nearest)
        )
        outcomes.append((mu, outcome))
    return common.curve_area(test, outcomes)


def routerfirst_area(train: TraceSet, test: TraceSet, p_train: np.ndarray, p_test: np.ndarray):
    """Per price, the first call is the router's pick itself; the index tables (no prompt
    root) decide what follows it."""
    del p_train  # the first move is the router's: nothing to fit on train
    fitted = FittedIndex(train, True, use_difficulty=False)
    cost = cost_fraction(train)
    scores = fitted.scores(test)
    n = len(fitted.nodes)
    outcomes = []
    for mu in DEFAULT_MUS:
        tables = fitted.tables(mu)
        first = dataclasses.replace(tables, decision=[np.arange(n), *tables.decision[1:]])
        pick = route(p_test[:, fitted.nodes], cost[fitted.nodes], mu)  # a node per row
        outcomes.append((mu, replay_tables(first, scores, True, fitted.nodes, test, pick)))
    return common.curve_area(test, outcomes)


def with_prior(rows: list[str], p: np.ndarray, path: Path) -> None:
    """A copy of trace rows whose every answer's confidence is log P(correct | prompt)."""
    out = []
    for i, line in enumerate(rows):
        row = json.loads(line)
        for j, entry in enumerate(row["models"].values()):
            entry["confidence"] = math.log(min(max(float(p[i, j]), 1e-6), 1 - 1e-6))
        out.append(json.dumps(row))
    path.write_text("\n".join(out) + "\n")


def measure_split(train_path: Path, test_path: Path, tmp: Path) -> dict[str, dict[str, float]]:
    """Every variant's AUC on one re-split, per curve."""
    train, test = load_pair(Pair(train_path.stem, train_path, test_path))
    curves = ["correct", *(["quality"] if train.has_quality and test.has_quality else [])]
    out: dict[str, dict[str, float]] = {}
    for curve in curves:
        tr, te = (train, test) if curve == "correct" else (
            train.with_label("quality"), test.with_label("quality"),
        )  # fmt: skip
        p_train, p_test = router_p(tr, te, router_encoding(tr))
        rows_tr = [line for line in train_path.read_text().split("\n") if line.strip()]
        rows_te = [line for line in test_path.read_text().split("\n") if line.strip()]
        with_prior(rows_tr, p_train, tmp / "prior-train.jsonl")
        with_prior(rows_te, p_test, tmp / "prior-test.jsonl")
        ptr, pte = load_pair(Pair("prior", tmp / "prior-train.jsonl", tmp / "prior-test.jsonl"))
        if curve == "quality":
            ptr, pte = ptr.with_label("quality"), pte.with_label("quality")
        out[curve] = {
            "index": family_area(IndexFamily(), tr, te),
            "index-noroot": noroot_area(tr, te),
            "index-routeroot": routeroot_area(tr, te, p_train, p_test),
            "index-routerfirst": routerfirst_area(tr, te, p_train, p_test),
            "index-prior": family_area(IndexFamily(), ptr, pte),
            "prerouter": family_area(PrerouterFamily(), tr, te),
            "singles": family_area(SinglesFamily(), tr, te),
        }
    return out


def report(curve: str, runs: list[dict[str, float]]) -> None:
    print()
    print("accuracy curve" if curve == "correct" else "mean-quality curve")
    print(f"  {'policy':16s} {'mean AUC':>9s} {'sd':>7s} {'- prerouter':>12s} {'sd':>7s}")
    for name in VARIANTS:
        aucs = [r[name] for r in runs]
        diff = [r[name] - r["prerouter"] for r in runs]
        sd = statistics.stdev(aucs) if len(aucs) > 1 else float("nan")
        dsd = statistics.stdev(diff) if len(diff) > 1 else float("nan")
        print(
            f"  {name:16s} {statistics.mean(aucs):9.4f} {sd:7.4f} "
            f"{statistics.mean(diff):+12.4f} {dsd:7.4f}"
        )


def run(args: argparse.Namespace) -> int:
    if args.splits < 1:
        raise RuntimeError("--splits must be at least 1")
    common.print_run("cascade prompt root: the index policy and the prompt router on re-splits")
    print(f"  traces    {args.traces}: {args.pair} x {args.splits} re-splits", flush=True)
    runs: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="cascade-prompt-root-") as tmp:
        folder = Path(tmp)
        common.write_resplits(args.traces, folder, args.splits, [args.pair])
        for seed in range(args.splits):
            stem = folder / f"{args.pair}_s{seed}"
            found = measure_split(Path(f"{stem}-train.jsonl"), Path(f"{stem}-test.jsonl"), folder)
            for curve, aucs in found.items():
                runs.setdefault(curve, []).append(aucs)
            cells = "  ".join(f"{k} {v:.4f}" for k, v in found["correct"].items())
            print(f"  re-split {seed}: {cells}", flush=True)
    for curve, found in runs.items():
        report(curve, found)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_traces_option(parser)
    parser.add_argument("--pair", default="alpaca-fusechat", help="the pair to re-split")
    parser.add_argument("--splits", type=int, default=8, help="re-splits (default 8)")
    sys.exit(common.run_main(run, parser.parse_args()))


if __name__ == "__main__":
    main()
