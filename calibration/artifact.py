"""The policy artifact: versioned, hash-identified JSON holding all the proxy needs to decide.

Write with `save_artifact`, read with `load_artifact` (which checks the schema version, the
hash and the fields, and says precisely what is wrong).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np

from calibration.fit import DEFAULT_MUS, FittedIndex, Progress, lambda_of
from calibration.replay import Outcome
from calibration.traces import TraceSet
from policies.artifact import (
    HASH_RULE,
    SCHEMA,
    ArtifactError,
    PolicyArtifact,
    content_hash,
    parse_artifact,
)
from policies.errors import InvalidInput
from policies.rules import encode_threshold
from policies.transitions import describe

__all__ = [
    "SCHEMA",
    "ArtifactError",
    "PolicyArtifact",
    "build_artifact",
    "choose_mu",
    "content_hash",
    "load_artifact",
]


def outcome_summary(outcome: Outcome, reference_cost: float) -> dict:
    return {
        "accuracy": outcome.accuracy,
        "mean_cost_usd": outcome.mean_cost,
        "cost_fraction": outcome.mean_cost / reference_cost,
        "calls_per_query": float(outcome.calls.mean()),
    }


def bootstrap_interval(outcome: Outcome, n: int = 300, seed: int = 0) -> dict:
    """95% bootstrap intervals of accuracy and mean cost over train rows."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(outcome.correct), size=(n, len(outcome.correct)))
    acc = outcome.correct[idx].mean(axis=1)
    cost = outcome.cost[idx].mean(axis=1)
    return {
        "accuracy_95": [float(np.quantile(acc, 0.025)), float(np.quantile(acc, 0.975))],
        "mean_cost_usd_95": [float(np.quantile(cost, 0.025)), float(np.quantile(cost, 0.975))],
    }


def _sweep(fitted: FittedIndex) -> list[dict]:
    """Decision tables for every lambda of the fit grid (bins and values are shared), so the
    proxy can honour a per-request `lambda` without refitting."""
    out, seen = [], set()
    for mu in DEFAULT_MUS:
        decision = [d.tolist() for d in fitted.tables(mu).decision]
        if fitted.router is not None:  # the router's first move depends on mu itself
            out.append({"lambda": lambda_of(mu), "cost_price_mu": mu, "decision": decision})
            continue
        key = json.dumps(decision)
        if key not in seen:
            seen.add(key)
            out.append({"lambda": lambda_of(mu), "decision": decision})
    return out


BASELINE_MAX_ROWS = 2000


def baseline_settings(train: TraceSet) -> dict:
    """The threshold and agreement baselines, tuned on train for every cost price, so the
    proxy can run them per request (`cascade.policy`). Past BASELINE_MAX_ROWS rows a random
    subset tunes them (the search is per row and they are references, not the product)."""
    from calibration.baselines import AgreementFamily, ThresholdFamily

    if len(train) > BASELINE_MAX_ROWS:
        rng = np.random.default_rng(0)
        train = train.subset(np.sort(rng.choice(len(train), BASELINE_MAX_ROWS, replace=False)))
    threshold = [
        {
            "lambda": lambda_of(s.knob),
            "chain": s.params["chain"],
            "thresholds": [encode_threshold(t) for t in s.params["thresholds"]],
        }
        for s in ThresholdFamily().fit_sweep(train)
    ]
    agreement = [
        {"lambda": lambda_of(s.knob), "tiers": s.params["tiers"], "theta": s.params["theta"]}
        for s in AgreementFamily().fit_sweep(train)
    ]
    return {"threshold": threshold, "agreement": agreement}


def build_artifact(
    fitted: FittedIndex,
    mu: float,
    *,
    train_path: str,
    answer_kind: str | None = None,
    target: dict | None = None,
    progress: Progress | None = None,
) -> PolicyArtifact:
    """The artifact of `fitted` at cost price `mu`, hashed, and checked by the loader."""
    if progress is not None:
        progress("baselines and decision tables", 0, 1)
    tables = fitted.tables(mu)
    train = fitted.train
    outcome = fitted.replay(tables, train)  # out-of-fold posteriors: an honest estimate
    ref = train.reference
    art = {
        "hash": "",  # first, where a reader looks; content_hash leaves it and `created` out
        "schema": SCHEMA,
        "hash_rule": HASH_RULE,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "nodes": [
            {"model": train.models[j], "cost_usd": float(c), "cost_fraction": float(f)}
            for j, c, f in zip(fitted.nodes, fitted.node_cost_usd, fitted.costs, strict=True)
        ],
        "reference_model": train.models[ref],
        "reference_cost_usd": fitted.reference_cost,
        "answer_kind": answer_kind,
        # what p and "accuracy" mean: P(correct), or E[quality] (`fit --label quality`)
        "label": train.label,
        "recall": fitted.recall,
        "recall_margin": fitted.recall_margin,
        # how the posterior reads agreement; absent: exact answer classes
        **({"agreement": "graded"} if fitted.graded else {}),
        "lambda": lambda_of(mu),
        "cost_price_mu": mu,
        "posterior": fitted.posterior.to_dict(),
        "length_calibration": [
            None if c is None else c.to_dict() for c in fitted.length_calibrators
        ],
        "difficulty": None if fitted.difficulty is None else fitted.difficulty.to_dict(),
        # the other root kind: the prompt router's pick at this price is the first call
        "router": None if fitted.router is None else fitted.router.at_price(mu).to_dict(),
        "transitions": describe(fitted.allowed, [train.models[j] for j in fitted.nodes]),
        "tables": tables.to_dict(),
        "sweep": _sweep(fitted),
        "baselines": baseline_settings(train),
        "training": {
            "path": train_path,
            "rows": len(train),
            "models": list(train.models),
            "cost_source": train.cost_source,
            "reference_accuracy": float(train.correct[:, ref].mean()),
            "bins": [len(v) for v in tables.values],
            "shrinkage_kappa": fitted.kappa,  # chosen by cross-validation (fit.HeldOutCurve)
            # the root kind and the held-out curve areas on train it was chosen by
            "root_choice": fitted.root_choice,
            "warnings": fitted.warnings,
            "target": target,
        },
        "expected": {
            **outcome_summary(outcome, fitted.reference_cost),
            **bootstrap_interval(outcome),
            "note": "replayed on the training traces with out-of-fold posteriors",
        },
    }
    art["hash"] = content_hash(art)
    return PolicyArtifact.from_dict(json.loads(json.dumps(art)), "(just fitted)")


def save_artifact(art: PolicyArtifact, path: str | Path) -> None:
    Path(path).write_text(art.to_json())


def load_artifact(path: str | Path) -> PolicyArtifact:
    """Read and check a policy artifact file (policies/artifact.py says what is checked)."""
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"policy artifact {p} does not exist (create one with `cascade fit`)")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"policy artifact {p} cannot be read: {exc}") from None
    return parse_artifact(text, str(p))


def choose_mu(
    fitted: FittedIndex,
    *,
    lam: float | None,
    target_accuracy: float | None,
    max_cost_usd: float | None,
    mus: tuple[float, ...],
    progress: Progress | None = None,
) -> tuple[float, dict]:
    """The cost price mu from exactly one of: lambda, a relative accuracy target, a budget.

    Targets are met on the training traces (out-of-fold replay): the cheapest setting whose
    accuracy reaches target x reference accuracy, or the most accurate within the budget.
    """
    given = [x is not None for x in (lam, target_accuracy, max_cost_usd)]
    if sum(given) != 1:
        raise InvalidInput("give exactly one of --lambda, --target-accuracy, --max-cost-usd")
    if lam is not None:
        if not 0.0 < lam <= 1.0:
            raise InvalidInput(f"--lambda must be in (0, 1], got {lam}")
        return (1.0 - lam) / lam, {"lambda": lam}
    train = fitted.train
    ref = train.reference
    ref_acc = float(train.correct[:, ref].mean())
    points = []
    for mu in mus:
        if progress is not None:
            progress("lambda search", len(points), len(mus))
        o = fitted.replay(fitted.tables(mu), train)
        points.append((mu, o.accuracy, o.mean_cost))
    if target_accuracy is not None:
        if not 0.0 < target_accuracy <= 1.5:
            raise InvalidInput(
                f"--target-accuracy is relative to the reference model, got {target_accuracy}"
            )
        goal = target_accuracy * ref_acc
        ok = [p for p in points if p[1] >= goal - 1e-12]
        if not ok:
            best = max(points, key=lambda p: p[1])
            raise InvalidInput(
                f"no setting reaches {target_accuracy:.3f} x reference accuracy {ref_acc:.3f} "
                f"on train (best is {best[1]:.3f})"
            )
        mu = min(ok, key=lambda p: (p[2], -p[1]))[0]
        return mu, {"target_accuracy": target_accuracy, "reference_accuracy": ref_acc}
    assert max_cost_usd is not None
    ok = [p for p in points if p[2] <= max_cost_usd + 1e-15]
    if not ok:
        cheapest = min(points, key=lambda p: p[2])
        raise InvalidInput(
            f"no setting costs at most ${max_cost_usd:g} per query on train "
            f"(cheapest is ${cheapest[2]:.3g})"
        )
    mu = max(ok, key=lambda p: (p[1], -p[2]))[0]
    return mu, {"max_cost_usd": max_cost_usd}
