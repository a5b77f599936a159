"""Load and validate trace JSONL (the DESIGN.md format) into column arrays.

Every problem is reported with file and line; nothing is silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from policies.answers import detect_kind, extract_answer

RECORDED_COSTS = "recorded in the traces (cost_usd)"  # cost_source of untouched traces


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
    cost_source: str = RECORDED_COSTS  # or how the costs were computed (pricing.fill_costs)
    kind: str = "text"  # answer kind used for `extracted` (choice | number | text)
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
            kind=self.kind,
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
            kind=self.kind,
            notes=list(self.notes),
        )


MODEL_FIELDS = (
    "answer",
    "correct",
    "confidence",
    "cost_usd",
    "latency_ms",
    "tokens_in",
    "tokens_out",
)
_NUMERIC = ("confidence", "cost_usd", "latency_ms", "tokens_in", "tokens_out")
MAX_REPORTED = 20  # errors listed in one TraceError; the rest are counted


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_row(row: object, models: tuple[str, ...] | None) -> list[str]:
    """Everything wrong with one parsed line (empty if it is valid)."""
    if not isinstance(row, dict):
        return [f"expected a JSON object, got {type(row).__name__}"]
    errors = []
    if not isinstance(row.get("id"), str) or not row.get("id"):
        errors.append("missing or non-string field 'id'")
    if "task" in row and row["task"] is not None and not isinstance(row["task"], str):
        errors.append("field 'task' must be a string")
    if row.get("reference") is not None and not isinstance(row["reference"], str):
        errors.append("field 'reference' must be a string or null")
    msgs = row.get("messages")
    if not isinstance(msgs, list) or not msgs:
        errors.append("missing or empty field 'messages' (a list of {role, content})")
    else:
        for k, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                errors.append(f"messages[{k}] must be an object with a string 'role'")
            elif m.get("content") is not None and not isinstance(m["content"], str):
                errors.append(f"messages[{k}].content must be a string or null")
    entries = row.get("models")
    if not isinstance(entries, dict) or not entries:
        errors.append("missing or empty field 'models' (an object keyed by model name)")
        return errors
    if models is not None:
        missing = [m for m in models if m not in entries]
        extra = [m for m in entries if m not in models]
        if missing:
            errors.append(f"model(s) {missing} missing (every row must have {list(models)})")
        if extra:
            errors.append(f"model(s) {extra} not in the first row's models {list(models)}")
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            errors.append(f"models.{name} must be an object")
            continue
        absent = [f for f in MODEL_FIELDS if f not in entry]
        if absent:
            errors.append(f"models.{name}: missing field(s) {absent}")
        if (
            "answer" in entry
            and entry["answer"] is not None
            and not isinstance(entry["answer"], str)
        ):
            errors.append(f"models.{name}.answer must be a string or null")
        if "correct" in entry and not isinstance(entry["correct"], bool):
            errors.append(f"models.{name}.correct must be true or false")
        for f in _NUMERIC:
            v = entry.get(f)
            if v is not None and not _number(v):
                errors.append(f"models.{name}.{f} must be a finite number or null, got {v!r}")
        for f in ("cost_usd", "latency_ms", "tokens_in", "tokens_out"):
            v = entry.get(f)
            if _number(v) and v < 0:
                errors.append(f"models.{name}.{f} must not be negative, got {v!r}")
    return errors


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
    rows: list[dict] = []
    lines: list[int] = []
    errors: list[str] = []
    models: tuple[str, ...] | None = None
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{path}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})")
            continue
        problems = _check_row(row, models)
        if models is None and not problems:
            models = tuple(row["models"])
        if not problems:
            first = seen.setdefault(row["id"], lineno)
            if first != lineno:
                problems.append(f"duplicate id {row['id']!r} (first on line {first})")
        errors.extend(f"{path}:{lineno}: {p}" for p in problems)
        if not problems:
            rows.append(row)
            lines.append(lineno)
    if errors:
        shown = "\n".join(errors[:MAX_REPORTED])
        more = len(errors) - MAX_REPORTED
        tail = f"\n... and {more} more error(s)" if more > 0 else ""
        raise TraceError(f"{len(errors)} error(s) in {path}:\n{shown}{tail}")
    if not rows or models is None:
        raise TraceError(f"{path}: no trace rows (the file is empty)")
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
    )
