"""Tier columns for traces: each tier (models called in parallel, answered by majority vote)
becomes one more column of a TraceSet, so fitting, replay and the bench treat it as one
node. The vote rule is policies/tiers.py, the one the proxy applies to live calls."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calibration.traces import TraceError, TraceSet, with_columns
from policies.tiers import tier_name, tier_vote


def parse_tiers(text: str) -> list[list[str]]:
    """`a+b+c,d+e` (the command-line form) -> [[a, b, c], [d, e]]."""
    tiers = [[m.strip() for m in part.split("+") if m.strip()] for part in text.split(",")]
    tiers = [t for t in tiers if t]
    bad = [t for t in tiers if len(t) < 2]
    if bad or not tiers:
        raise TraceError(f"bad --tiers {text!r}: give tiers as a+b[+c...], comma-separated")
    return tiers


def add_tiers(traces: TraceSet, tiers: Sequence[Sequence[str]]) -> TraceSet:
    """`traces` with one column per tier appended, then every column ordered by mean cost
    (cheapest first). A tier's cost and tokens are its members' sums (null if any is null),
    its latency the slowest member's."""
    models = list(traces.models)
    n = len(traces)
    answers = [list(r) for r in traces.answers]
    extracted = [list(r) for r in traces.extracted]
    graded = ("quality",) if traces.quality is not None else ()
    fields = ("correct", "confidence", "cost_usd", "latency_ms", "tokens_in", "tokens_out")
    cols = {f: [getattr(traces, f)] for f in (*fields, *graded)}
    reasons = None if traces.finish_reasons is None else [list(r) for r in traces.finish_reasons]
    for members in tiers:
        missing = [m for m in members if m not in traces.models]
        if missing:
            raise TraceError(f"tier {list(members)}: unknown model(s) {missing}")
        name = tier_name(members)
        if name in models:
            continue
        idx = [traces.models.index(m) for m in members]
        chosen = np.full(n, -1)
        conf = np.full(n, np.nan)
        for i in range(n):
            k, c = tier_vote(
                [traces.extracted[i][j] for j in idx],
                [_opt(traces.confidence[i, j]) for j in idx],
            )
            if k is not None:
                chosen[i], conf[i] = idx[k], c
        rows = np.arange(n)
        answered = chosen >= 0
        pick = np.maximum(chosen, 0)
        for i in range(n):
            answers[i].append(traces.answers[i][chosen[i]] if answered[i] else None)
            extracted[i].append(traces.extracted[i][chosen[i]] if answered[i] else None)
            if reasons is not None:
                reasons[i].append(reasons[i][chosen[i]] if answered[i] else None)
        for f in ("correct", *graded):  # the voted answer's label; none if no member answered
            label = getattr(traces, f)[rows, pick]
            cols[f].append(np.where(answered, label, np.zeros_like(label))[:, None])
        cols["confidence"].append(conf[:, None])
        for f in ("cost_usd", "tokens_in", "tokens_out"):
            cols[f].append(getattr(traces, f)[:, idx].sum(axis=1)[:, None])  # nan if any nan
        cols["latency_ms"].append(traces.latency_ms[:, idx].max(axis=1)[:, None])
        models.append(name)
    return with_columns(
        traces,
        models,
        answers,
        extracted,
        {f: np.hstack(parts) for f, parts in cols.items()},
        f"tiers added: {[tier_name(t) for t in tiers]}",
        [[*r, *[[]] * (len(models) - len(r))] for r in traces.samples],
        reasons,
    )


def _opt(x: float) -> float | None:
    return None if np.isnan(x) else float(x)
