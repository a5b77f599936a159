"""The trace format of DESIGN.md: validate the text of a trace JSONL file into row dicts.

Pure (text in, rows out) so that both readers of traces share one definition: calibration
(calibration/traces.py, into column arrays) and the proxy's `replay` backend. Every problem
is reported with the source and line; nothing is silently dropped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from policies.errors import InvalidInput
from policies.freetext import LOGPROB_SUMMARY


class TraceError(InvalidInput):
    """A trace file is malformed; the message names the file and line."""


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


def messages_problems(msgs: object) -> list[str]:
    """What is wrong with a row's `messages` (traces and collect datasets share the form)."""
    if not isinstance(msgs, list) or not msgs:
        return ["missing or empty field 'messages' (a list of {role, content})"]
    errors = []
    for k, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            errors.append(f"messages[{k}] must be an object with a string 'role'")
        elif m.get("content") is not None and not isinstance(m["content"], str):
            errors.append(f"messages[{k}].content must be a string or null")
    return errors


def check_row(row: object, models: tuple[str, ...] | None) -> list[str]:
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
    if row.get("subset") is not None and not isinstance(row["subset"], str):
        errors.append("field 'subset' must be a string or null")
    errors.extend(messages_problems(row.get("messages")))
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
        samples = entry.get("samples")
        if samples is not None and (
            not isinstance(samples, list) or not all(isinstance(s, str | None) for s in samples)
        ):
            errors.append(f"models.{name}.samples must be a list of answer strings (or null)")
        errors.extend(_optional_problems(name, entry))
    return errors


def _optional_problems(name: str, entry: dict) -> list[str]:
    """The optional per-model fields: `quality`, a graded label in [0, 1] (an LLM judge's
    score), `finish_reason`, why the answer ended (`stop`, `length`, ...), and
    `logprob_summary`, the mean, minimum, 5% and 25% quantiles of its token logprobs."""
    errors = []
    q = entry.get("quality")
    if q is not None and not (_number(q) and 0.0 <= q <= 1.0):
        errors.append(f"models.{name}.quality must be a number in [0, 1] or null, got {q!r}")
    reason = entry.get("finish_reason")
    if reason is not None and not isinstance(reason, str):
        errors.append(f"models.{name}.finish_reason must be a string or null, got {reason!r}")
    summary = entry.get("logprob_summary")
    if summary is not None and not _is_logprob_summary(summary):
        keys = ", ".join(LOGPROB_SUMMARY)
        errors.append(
            f"models.{name}.logprob_summary must be an object of finite numbers <= 0 with "
            f"exactly the keys {keys}, or null; got {summary!r}"
        )
    return errors


def _is_logprob_summary(value: object) -> bool:
    """`logprob_summary`: the answer's token logprobs summarised (policies/freetext.py)."""
    return (
        isinstance(value, dict)
        and set(value) == set(LOGPROB_SUMMARY)
        and all(_number(value[k]) and value[k] <= 0 for k in LOGPROB_SUMMARY)
    )


def parse_jsonl(
    text: str,
    source: str,
    check: Callable[[object], list[str]],
    error: type[ValueError] = TraceError,
    what: str = "rows",
) -> list[tuple[int, dict]]:
    """(line number, row) of every line of a JSONL text, each checked by `check` (its
    problems) and for a unique `id`. Blank lines are allowed; any other bad line fails the
    whole text: `error` lists the first MAX_REPORTED problems as `source:line: problem`."""
    rows: list[tuple[int, dict]] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{source}:{lineno}: malformed JSON: {exc.msg} (column {exc.colno})")
            continue
        problems = check(row)
        if not problems:
            first = seen.setdefault(str(row["id"]), lineno)
            if first != lineno:
                problems.append(f"duplicate id {str(row['id'])!r} (first on line {first})")
        errors.extend(f"{source}:{lineno}: {p}" for p in problems)
        if not problems:
            rows.append((lineno, row))
    if errors:
        shown = "\n".join(errors[:MAX_REPORTED])
        more = len(errors) - MAX_REPORTED
        tail = f"\n... and {more} more error(s)" if more > 0 else ""
        raise error(f"{len(errors)} error(s) in {source}:\n{shown}{tail}")
    if not rows:
        raise error(f"{source}: no {what} (the file is empty)")
    return rows


def parse_trace_text(text: str, source: str) -> tuple[tuple[str, ...], list[dict]]:
    """Validate the text of one trace JSONL file: (model names in order, valid rows).

    The first valid row fixes the model set and order; every row must have the same models
    and a unique id. Blank lines are allowed; any other bad line fails the whole file
    (TraceError listing the first MAX_REPORTED problems as `source:line: problem`).
    """
    models: list[tuple[str, ...]] = []  # the first valid row's, once seen

    def check(row: object) -> list[str]:
        problems = check_row(row, models[0] if models else None)
        if not problems and not models:
            models.append(tuple(row["models"]))  # type: ignore[index]
        return problems

    rows = parse_jsonl(text, source, check, what="trace rows")
    return models[0], [row for _, row in rows]
