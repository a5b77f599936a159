"""Sampled columns for traces: `model@k` (the recorded answer plus k - 1 of the model's
`samples`, answered by their vote) becomes one more column of a TraceSet, so fitting, replay
and the bench treat it as one node. The vote rule is policies/sampling.py, the one the proxy
applies to live samples.

Cost: one `n: k` call bills the prompt once and every sample's output, so a sampled column
costs the recorded call plus the output tokens of the k - 1 samples (counted with tiktoken,
as a missing `usage` is) at the model's output price. That price is read off the recorded
costs (a least-squares fit of cost on prompt and answer tokens, exact when costs are token
counts times prices), else from litellm's price map. Latency is the recorded call's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from calibration.graders import default_grader
from calibration.traces import TraceError, TraceSet, with_columns
from policies.answers import extract_answer
from policies.sampling import (
    Agreement,
    SamplingError,
    check_k,
    is_sampled,
    parse_sampled,
    sampled_name,
    vote,
)
from upstreams.pricing import PricingError, count_tokens, lookup_price

SampleSpec = tuple[str | None, int]  # (model, or None: every model holding samples; k)


def parse_samples(text: str) -> list[SampleSpec]:
    """`3,5` or `small@3,large@5` (the command-line form) -> [(None, 3), (None, 5)] or
    [("small", 3), ("large", 5)]. Any bad item is a TraceError naming it."""
    specs: list[SampleSpec] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            if part.lstrip("-").isdigit():
                specs.append((None, check_k(int(part), f"--samples {part}")))
            elif (parsed := parse_sampled(part)) is not None:
                specs.append(parsed)
            else:
                raise SamplingError(f"{part!r} is neither K nor MODEL@K")
        except SamplingError as exc:
            raise TraceError(f"bad --samples {text!r}: {exc}") from None
    if not specs:
        raise TraceError(f"bad --samples {text!r}: give K or MODEL@K, comma-separated (3,5)")
    return specs


def sampled_models(traces: TraceSet) -> list[str]:
    """The models some row of `traces` holds samples for."""
    if not traces.samples:
        return []
    return [
        m
        for j, m in enumerate(traces.models)
        if any(row[j] for row in traces.samples) and not is_sampled(m)
    ]


def expand(traces: TraceSet, specs: Sequence[SampleSpec]) -> list[tuple[str, int]]:
    """Every (model, k) the specs name: K alone stands for each model holding samples."""
    holders = sampled_models(traces)
    out: list[tuple[str, int]] = []
    for model, k in specs:
        if model is None:
            if not holders:
                raise TraceError(
                    f"{traces.path}: --samples {k}: no model of the traces holds samples"
                )
            out.extend((m, k) for m in holders)
        else:
            out.append((model, k))
    return list(dict.fromkeys(out))


def output_price(traces: TraceSet, j: int) -> float:
    """USD per output token of column `j`: from its recorded costs and tokens when they
    determine it, else from litellm's price map."""
    cost, tin, tout = traces.cost_usd[:, j], traces.tokens_in[:, j], traces.tokens_out[:, j]
    ok = np.isfinite(cost) & np.isfinite(tin) & np.isfinite(tout)
    if ok.sum() >= 2:
        x = np.column_stack([tin[ok], tout[ok]])
        if np.linalg.matrix_rank(x) == 2:
            (p_in, p_out), *_ = np.linalg.lstsq(x, cost[ok], rcond=None)
            fitted = x @ np.array([p_in, p_out])
            if p_out >= 0 and np.allclose(fitted, cost[ok], rtol=1e-6, atol=1e-12):
                return float(p_out)
    try:
        return lookup_price(traces.models[j])[2]
    except PricingError as exc:
        raise TraceError(
            f"{traces.path}: cannot price the samples of {traces.models[j]}: its recorded "
            f"costs are not tokens times prices and {exc}"
        ) from None


def add_sampled(
    traces: TraceSet, specs: Sequence[SampleSpec], agree: Agreement | None = None
) -> TraceSet:
    """`traces` with one `model@k` column per (model, k), then every column ordered by mean
    cost (cheapest first). A row holding fewer than k - 1 samples of the model is a
    TraceError naming it (nothing is built). `agree` is the free-text agreement (default:
    normalised exact match)."""
    if traces.label != "correct":
        raise TraceError(
            f"{traces.path}: sampled nodes are graded on `correct`; --samples with --label "
            f"{traces.label} is not supported yet"
        )
    pairs = expand(traces, specs)
    grader = default_grader(traces.kind)
    n = len(traces)
    models = list(traces.models)
    answers = [list(r) for r in traces.answers]
    extracted = [list(r) for r in traces.extracted]
    samples = [list(r) for r in traces.samples] if traces.samples else [[] for _ in range(n)]
    fields = ("correct", "confidence", "cost_usd", "latency_ms", "tokens_in", "tokens_out")
    cols = {f: [getattr(traces, f)] for f in fields}
    for model, k in pairs:
        name = sampled_name(model, k)
        if name in models:
            continue
        if model not in traces.models:
            raise TraceError(f"{name}: unknown model {model!r}; have {list(traces.models)}")
        j = traces.models.index(model)
        held = [len(traces.samples[i][j]) if traces.samples else 0 for i in range(n)]
        short = [i for i in range(n) if held[i] < k - 1]
        if short:
            i = short[0]
            raise TraceError(
                f"{traces.path}: {name} needs {k - 1} samples of {model} per row; row "
                f"{traces.ids[i]!r} holds {held[i]} ({len(short)} row(s) hold too few)"
            )
        p_out = output_price(traces, j)
        col = {f: np.full(n, np.nan) for f in fields}
        col["correct"] = np.zeros(n, dtype=bool)
        for i in range(n):
            used = traces.samples[i][j][: k - 1]
            texts = [traces.answers[i][j], *used]
            forms = [traces.extracted[i][j], *(extract_answer(t, traces.kind) for t in used)]
            extra_tokens = sum(count_tokens(t) for t in used if t is not None)
            col["cost_usd"][i] = traces.cost_usd[i, j] + extra_tokens * p_out
            col["tokens_in"][i] = traces.tokens_in[i, j]
            col["tokens_out"][i] = traces.tokens_out[i, j] + extra_tokens
            col["latency_ms"][i] = traces.latency_ms[i, j]
            v = vote(forms, traces.kind, agree)
            if v is None:
                answers[i].append(None)
                extracted[i].append(None)
                continue
            answers[i].append(texts[v.index])
            extracted[i].append(forms[v.index])
            col["confidence"][i] = v.confidence
            col["correct"][i] = _correct(traces, i, j, texts[v.index], forms[v.index], grader)
        for f in fields:
            cols[f].append(col[f][:, None])
        for r in samples:
            r.append([])
        models.append(name)
    return with_columns(
        traces,
        models,
        answers,
        extracted,
        {f: np.hstack(parts) for f, parts in cols.items()},
        f"sampled nodes added: {[sampled_name(m, k) for m, k in pairs]}",
        samples,
    )


def _correct(traces: TraceSet, i: int, j: int, text: str | None, form: str | None, grader) -> bool:
    """Is the vote's answer right: the recorded label when it agrees with the recorded
    answer, else graded against the row's reference."""
    if form is not None and form == traces.extracted[i][j]:
        return bool(traces.correct[i, j])
    reference = traces.references[i]
    if reference is None:
        raise TraceError(
            f"{traces.path}: row {traces.ids[i]!r}: the vote of {traces.models[j]}'s samples "
            "differs from its recorded answer and the row has no reference to grade it"
        )
    return bool(grader(text, reference))
