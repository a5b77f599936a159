"""Replay a saved policy artifact on traces: what `cascade evaluate` prints."""

from __future__ import annotations

import numpy as np

from calibration.fit import Signals, replay_tables, score_sets
from calibration.replay import Outcome
from calibration.sampling import add_sampled
from calibration.textfit import calibrated_trace_columns
from calibration.tiers import add_tiers
from calibration.traces import TraceError, TraceSet
from policies.artifact import PolicyArtifact
from policies.sampling import parse_sampled
from policies.tiers import tier_members


def with_artifact_tiers(art: PolicyArtifact, traces: TraceSet) -> TraceSet:
    """`traces` plus a column for every tier node of the artifact (from its members) and
    every sampled node (`model@k`, from the model's samples)."""
    sampled = [
        parsed
        for name in art.models
        if name not in traces.models and (parsed := parse_sampled(name)) is not None
    ]
    if sampled:
        traces = add_sampled(traces, sampled)
    tiers = [
        members
        for name in art.models
        if (members := tier_members(name)) is not None and name not in traces.models
    ]
    return add_tiers(traces, tiers) if tiers else traces


def replay_artifact(art: PolicyArtifact, traces: TraceSet) -> Outcome:
    """Decisions of the artifact's tables on every row of `traces` (same code as fitting);
    `traces` must hold the artifact's tier columns (with_artifact_tiers)."""
    names = art.models
    missing = [m for m in names if m not in traces.models]
    if missing:
        raise TraceError(
            f"{traces.path}: the policy needs model(s) {missing}, "
            f"the traces have {list(traces.models)}"
        )
    nodes = [traces.models.index(m) for m in names]
    conf = calibrated_trace_columns(art.length_calibrators, traces, nodes)
    graded = art.agreement_mode == "graded"
    scores = score_sets(art.posterior, Signals.of(traces, nodes, conf, graded=graded))
    scores = scores.with_margin(art.recall_margin)
    root = None
    if art.router is not None:  # the first call: the router's pick at the artifact's price
        router = art.router
        root = np.array([router.root_state(traces.prompt(i)) for i in range(len(traces))])
    elif art.difficulty is not None:
        difficulty = art.difficulty
        root = np.array([difficulty.root_state(traces.prompt(i)) for i in range(len(traces))])
    return replay_tables(art.tables, scores, art.recall, nodes, traces, root_state=root)


def evaluate_artifact(art: PolicyArtifact, traces: TraceSet) -> dict:
    """The artifact replayed on `traces`, scored on the label it was fitted on (`accuracy`
    is mean quality for a `--label quality` policy)."""
    label = art.label
    traces = with_artifact_tiers(art, traces.with_label(label))
    o = replay_artifact(art, traces)
    n = len(traces)
    stops = {
        m: float((o.stop_model == j).sum() / n)
        for j, m in enumerate(traces.models)
        if (o.stop_model == j).any()
    }
    answers = {
        m: float((o.answer_model == j).sum() / n)
        for j, m in enumerate(traces.models)
        if (o.answer_model == j).any()
    }
    ref_cost = traces.reference_cost
    ref = traces.reference
    return {
        "policy_hash": art.hash,
        "traces": traces.path,
        "rows": n,
        "label": label,
        "accuracy": o.accuracy,
        "mean_cost_usd": o.mean_cost,
        "cost_fraction_of_reference": o.mean_cost / ref_cost,
        "reference_model": traces.models[ref],
        "reference_accuracy": float(traces.correct[:, ref].mean()),
        "mean_latency_ms": float(np.nanmean(o.latency)) if np.isfinite(o.latency).any() else None,
        "calls_per_query": float(o.calls.mean()),
        "stops_at": stops,
        "answer_from": answers,
        "returned_not_last": float(o.recalled.mean()),
    }
