"""Load and validate trace JSONL (the DESIGN.md format) into column arrays.

Every problem is reported with file and line; nothing is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from policies.answers import detect_kind, extract_answer
from policies.sampling import is_sampled
from policies.tiers import TIER_PREFIX
from policies.traceformat import TraceError, parse_trace_text

__all__ = ["RECORDED_COSTS", "TraceError", "TraceSet", "load_traces"]

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
        """The text of every message of one row, joined (input of the difficulty estimate)."""
        return "\n".join(str(m.get("content") or "") for m in self.messages[row])

    def subset(self, rows: np.ndarray) -> TraceSet:
        """Rows `rows` (indices or mask), same models."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows)
        pick = [int(i) for i in idx]
        return TraceSet(
            path=self.path,
            models=self.models,
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
            cost_source=self.cost_source,
            kind=self.kind,
            notes=list(self.notes),
            samples=[self.samples[i] for i in pick] if self.samples else [],
        )

    def select_models(self, names: list[str]) -> TraceSet:
        """Same rows, only the models `names` (kept in the given order)."""
        missing = [n for n in names if n not in self.models]
        if missing:
            raise TraceError(f"{self.path}: unknown model(s) {missing}; have {list(self.models)}")
        cols = [self.models.index(n) for n in names]
        return TraceSet(
            path=self.path,
            models=tuple(names),
            ids=self.ids,
            tasks=self.tasks,
            messages=self.messages,
            references=self.references,
            answers=[[r[c] for c in cols] for r in self.answers],
            extracted=[[r[c] for c in cols] for r in self.extracted],
            correct=self.correct[:, cols],
            confidence=self.confidence[:, cols],
            cost_usd=self.cost_usd[:, cols],
            latency_ms=self.latency_ms[:, cols],
            tokens_in=self.tokens_in[:, cols],
            tokens_out=self.tokens_out[:, cols],
            cost_source=self.cost_source,
            kind=self.kind,
            notes=list(self.notes),
            samples=[[r[c] for c in cols] for r in self.samples] if self.samples else [],
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
                [np.nan if r["models"][m][field] is None else r["models"][m][field] for m in models]
                for r in rows
            ],
            dtype=float,
        )

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
    )
