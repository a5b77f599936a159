"""Load and validate trace JSONL (the DESIGN.md format) into column arrays.

Every problem is reported with file and line; nothing is silently dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class TraceError(ValueError):
    """A trace file is malformed; the message names the file and line."""


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
    cost_source: str = "trace"  # where cost_usd came from (trace | price map: ...)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_models(self) -> int:
        return len(self.models)

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
            notes=list(self.notes),
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
            notes=list(self.notes),
        )


def load_traces(path: str) -> TraceSet:
    """Read and validate one trace JSONL file. Raises TraceError naming file:line."""
    raise NotImplementedError  # implemented by the traces work package
