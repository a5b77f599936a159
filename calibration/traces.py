"""Load and validate trace JSONL (the DESIGN.md format) into column arrays.

Every problem is reported with file and line; nothing is silently dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from policies.answers import detect_kind, extract_answer
from policies.freetext import LOGPROB_SUMMARY, prompt_text, summary_from_dict, word_count
from policies.sampling import is_sampled
from policies.tiers import TIER_PREFIX
from policies.traceformat import TraceError, parse_trace_text

__all__ = ["LABELS", "RECORDED_COSTS", "TraceError", "TraceSet", "load_traces"]

# What a policy is fitted and scored on: `correct` (bool) or `quality` (graded, in [0, 1]).
LABELS = ("correct", "quality")

RECORDED_COSTS = "recorded in the traces (cost_usd)"  # cost_source of untouched traces


@dataclass(frozen=True)
class TraceSet:
    """One trace file as arrays indexed [row] or [row, model]; models cheapest first."""

    path: str
    models: tuple[str, ...]
    ids: list[str]
    tasks: list[str]
    messages: list[list[dict]]
    references: list[str | None]
    answers: list[list[str | None]]  # raw answer text, [row][model]
    extracted: list[list[str | None]]  # normalised extracted answer, [row][model]
    correct: np.ndarray  # bool (N, M)
    confidence: np.ndarray  # float (N, M), nan where null
    cost_usd: np.ndarray  # float (N, M), nan where null
    latency_ms: np.ndarray  # float (N, M), nan where null
    tokens_in: np.ndarray  # float (N, M), nan where null
    tokens_out: np.ndarray  # float (N, M), nan where null
    cost_source: str = RECORDED_COSTS  # or how the costs were computed (pricing.fill_costs)
    kind: str = "text"  # answer kind used for `extracted` (choice | number | text)
    notes: list[str] = field(default_factory=list)
    # further sampled answers to the same prompt, [row][model] (DESIGN.md `samples`); empty
    # when the traces hold none
    samples: list[list[list[str | None]]] = field(default_factory=list)
    # Optional fields of the format: graded labels (float (N, M), nan where absent), why
    # each answer ended ([row][model]) and each row's subset.
    quality: np.ndarray | None = None
    finish_reasons: list[list[str | None]] | None = None
    subsets: list[str | None] | None = None
    # (N, M, 4) token-logprob summaries (mean, min, q05, q25 of policies/freetext.py), nan
    # where an answer carries none; None when no answer does.
    logprob_summaries: np.ndarray | None = None
    # Which label `correct` holds: the recorded booleans, or `quality` (see with_label).
    label: str = "correct"

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_models(self) -> int:
        return len(self.models)

    @property
    def reference(self) -> int:
        """Column of the reference model: the most expensive single model (the one a user
        would otherwise always call; a tier or sampled column is never the reference)."""
        cost = np.nanmean(self.cost_usd, axis=0)
        singles = [
            j
            for j, m in enumerate(self.models)
            if not m.startswith(TIER_PREFIX) and not is_sampled(m)
        ]
        return max(singles, key=lambda j: (np.nan_to_num(cost[j], nan=-np.inf), -j))

    @property
    def reference_cost(self) -> float:
        """Mean cost per query of the reference model: the unit of every cost fraction."""
        return float(np.nanmean(self.cost_usd[:, self.reference]))

    def prompt(self, row: int) -> str:
        """The text of every message of one row, joined (input of the difficulty estimate
        and of the answers' relative length): freetext.prompt_text, as the proxy reads a
        request."""
        return prompt_text(self.messages[row])

    def prompts(self) -> list[str]:
        """Every row's prompt (TraceSet.prompt)."""
        return [self.prompt(i) for i in range(len(self))]

    def prompt_words(self, row: int) -> int:
        """The prompt's word count, as the proxy passes it to rule.signal."""
        return word_count(self.prompt(row))

    def finish_reason(self, row: int, col: int) -> str | None:
        """Why model `col`'s answer of `row` ended (None where the traces do not say)."""
        return None if self.finish_reasons is None else self.finish_reasons[row][col]

    @property
    def has_quality(self) -> bool:
        """True if every answer carries a graded `quality` (a `--label quality` fit needs it)."""
        return self.quality is not None and bool(np.isfinite(self.quality).all())

    def with_label(self, label: str) -> TraceSet:
        """The same traces scored on `label`: for `quality`, `correct` holds the graded
        labels (floats in [0, 1]), so every fit, replay and curve reads mean quality where it
        read accuracy, and a loss 1 - P(correct) becomes 1 - E[quality]."""
        if label not in LABELS:
            raise TraceError(f"unknown label {label!r}: choose one of {list(LABELS)}")
        if label == self.label:
            return self
        if label == "correct":
            raise TraceError(f"{self.path}: traces scored on {self.label} have no booleans")
        if not self.has_quality:
            missing = 0 if self.quality is None else int(np.isnan(self.quality).sum())
            what = "no model records" if self.quality is None else f"{missing} answer(s) lack"
            raise TraceError(
                f"{self.path}: --label quality needs a quality for every answer; {what} `quality`"
            )
        return dataclasses.replace(self, correct=np.array(self.quality, dtype=float), label=label)

    def subset(self, rows: np.ndarray) -> TraceSet:
        """Rows `rows` (indices or mask), same models."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        pick = [int(i) for i in idx]
        return dataclasses.replace(
            self,
            ids=[self.ids[i] for i in pick],
            tasks=[self.tasks[i] for i in pick],
            messages=[self.messages[i] for i in pick],
            references=[self.references[i] for i in pick],
            answers=[self.answers[i] for i in pick],
            extracted=[self.extracted[i] for i in pick],
            correct=self.correct[idx],
            confidence=self.confidence[idx],
            cost_usd=self.cost_usd[idx],
            latency_ms=self.latency_ms[idx],
            tokens_in=self.tokens_in[idx],
            tokens_out=self.tokens_out[idx],
            notes=list(self.notes),
            samples=[self.samples[i] for i in pick] if self.samples else [],
            quality=None if self.quality is None else self.quality[idx],
            finish_reasons=None
            if self.finish_reasons is None
            else [self.finish_reasons[i] for i in pick],
            subsets=None if self.subsets is None else [self.subsets[i] for i in pick],
            logprob_summaries=None
            if self.logprob_summaries is None
            else self.logprob_summaries[idx],
        )

    def select_models(self, names: list[str]) -> TraceSet:
        """Same rows, only the models `names` (kept in the given order)."""
        missing = [n for n in names if n not in self.models]
        if missing:
            raise TraceError(f"{self.path}: unknown model(s) {missing}; have {list(self.models)}")
        cols = [self.models.index(n) for n in names]
        return dataclasses.replace(
            self,
            models=tuple(names),
            answers=[[r[c] for c in cols] for r in self.answers],
            extracted=[[r[c] for c in cols] for r in self.extracted],
            correct=self.correct[:, cols],
            confidence=self.confidence[:, cols],
            cost_usd=self.cost_usd[:, cols],
            latency_ms=self.latency_ms[:, cols],
            tokens_in=self.tokens_in[:, cols],
            tokens_out=self.tokens_out[:, cols],
            notes=list(self.notes),
            samples=[[r[c] for c in cols] for r in self.samples] if self.samples else [],
            quality=None if self.quality is None else self.quality[:, cols],
            finish_reasons=None
            if self.finish_reasons is None
            else [[r[c] for c in cols] for r in self.finish_reasons],
            logprob_summaries=None
            if self.logprob_summaries is None
            else self.logprob_summaries[:, cols],
        )


def with_columns(
    traces: TraceSet,
    models: list[str],
    answers: list[list[str | None]],
    extracted: list[list[str | None]],
    arrays: dict[str, np.ndarray],
    note: str,
    samples: list[list[list[str | None]]],
    finish_reasons: list[list[str | None]] | None = None,
) -> TraceSet:
    """`traces` with columns added (tier or sampled nodes): `models`, `answers`, `extracted`,
    the (N, M) `arrays` and `samples` hold the old columns and the new ones; every column is
    then ordered by mean cost, cheapest first, as a trace's models are."""
    mean_cost = np.nan_to_num(np.nanmean(arrays["cost_usd"], axis=0), nan=0.0)
    order = np.argsort(mean_cost, kind="stable")
    summaries = traces.logprob_summaries
    if summaries is not None:  # the added columns carry none
        added = np.full((len(traces), len(models) - traces.n_models, summaries.shape[2]), np.nan)
        summaries = np.concatenate([summaries, added], axis=1)[:, order]
    return TraceSet(
        path=traces.path,
        models=tuple(models[j] for j in order),
        ids=traces.ids,
        tasks=traces.tasks,
        messages=traces.messages,
        references=traces.references,
        answers=[[r[j] for j in order] for r in answers],
        extracted=[[r[j] for j in order] for r in extracted],
        **{f: a[:, order] for f, a in arrays.items()},
        cost_source=traces.cost_source,
        kind=traces.kind,
        notes=[*traces.notes, note],
        samples=[[r[j] for j in order] for r in samples],
        finish_reasons=None
        if finish_reasons is None
        else [[r[j] for j in order] for r in finish_reasons],
        subsets=traces.subsets,
        label=traces.label,
        logprob_summaries=summaries,
    )


def load_traces(path: str | Path, kind: str | None = None) -> TraceSet:
    """Read and validate one trace JSONL file. Raises TraceError naming file:line.

    The first row fixes the model set and order; every row must have the same models.
    Blank lines are allowed; any other bad line fails the whole load (nothing is dropped).
    `kind` forces the answer kind (choice/number/text); by default it is detected.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from None
    models, rows = parse_trace_text(text, str(path))
    return _build(str(path), models, rows, kind)


def _build(path: str, models: tuple[str, ...], rows: list[dict], kind: str | None) -> TraceSet:
    def column(field: str) -> np.ndarray:
        return np.array(
            [
                [
                    np.nan if r["models"][m].get(field) is None else r["models"][m][field]
                    for m in models
                ]
                for r in rows
            ],
            dtype=float,
        )

    graded = any(r["models"][m].get("quality") is not None for r in rows for m in models)
    reasons = [[r["models"][m].get("finish_reason") for m in models] for r in rows]
    subsets = [r.get("subset") for r in rows]
    summaries = [[r["models"][m].get("logprob_summary") for m in models] for r in rows]

    tasks = [str(r.get("task") or "") for r in rows]
    references = [r.get("reference") for r in rows]
    answers = [[r["models"][m]["answer"] for m in models] for r in rows]
    if kind is None:
        flat = [a for row in answers[:200] for a in row]
        kind = detect_kind(tasks[0] if tasks else None, references, flat)
    extracted = [[extract_answer(a, kind) for a in row] for row in answers]
    return TraceSet(
        path=path,
        models=models,
        ids=[r["id"] for r in rows],
        tasks=tasks,
        messages=[r["messages"] for r in rows],
        references=references,
        answers=answers,
        extracted=extracted,
        correct=np.array([[r["models"][m]["correct"] for m in models] for r in rows], dtype=bool),
        confidence=column("confidence"),
        cost_usd=column("cost_usd"),
        latency_ms=column("latency_ms"),
        tokens_in=column("tokens_in"),
        tokens_out=column("tokens_out"),
        kind=kind,
        samples=[[list(r["models"][m].get("samples") or []) for m in models] for r in rows]
        if any(r["models"][m].get("samples") for r in rows for m in models)
        else [],
        quality=column("quality") if graded else None,
        finish_reasons=reasons if any(x is not None for r in reasons for x in r) else None,
        subsets=subsets if any(x is not None for x in subsets) else None,
        logprob_summaries=_summary_column(summaries),
    )


def _summary_column(summaries: list[list[dict | None]]) -> np.ndarray | None:
    """The rows' `logprob_summary` objects as (N, M, 4) floats in LOGPROB_SUMMARY order, nan
    where absent; None when no answer carries one."""
    if not any(s is not None for row in summaries for s in row):
        return None
    out = np.full((len(summaries), len(summaries[0]), len(LOGPROB_SUMMARY)), np.nan)
    for i, row in enumerate(summaries):
        for j, s in enumerate(row):
            if s is not None:
                out[i, j] = summary_from_dict(s)
    return out
