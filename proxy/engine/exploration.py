"""Explored requests as traces: a live request that called every model becomes one row of
the DESIGN.md trace format, so the policy can be refitted on current traffic without the
selection bias of only seeing the models the policy chose.

Live traffic has no reference answer. By default a row is labelled by agreement with the
cascade's reference model (the model a user would otherwise always call): a model is
"correct" when its extracted answer equals the reference model's. With `explore_grader:
judge:MODEL` an LLM judge labels each answer instead (policies/judging.py, the protocol
`cascade collect` uses). The row says which in `label`; rows that could not be labelled
(reference call failed, judge gave no verdict) are not written.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import threading
from pathlib import Path

from policies.judging import JUDGE_PARAMS, judge_messages, parse_verdict
from proxy.engine.cascade import CascadeRun
from upstreams.base import Backend
from upstreams.common import last_user_text

LABEL_AGREEMENT = "agreement"
LABEL_JUDGE = "judge"


def trace_row(
    request_id: str, cascade: str, messages: list[dict], run: CascadeRun, reference: str
) -> dict | None:
    """The trace row of an explored request, or None when the reference model gave no answer."""
    by_model = {c.model: c for c in run.model_calls}  # a tier's members, one by one
    ref = by_model.get(reference)
    if ref is None or not ref.result.ok:
        return None
    models = {}
    for name, call in by_model.items():
        result = call.result
        entry = {
            "answer": result.text if result.ok else None,
            "correct": bool(result.ok and call.extracted == ref.extracted),
            "confidence": call.confidence,
            "cost_usd": result.cost_usd,
            "latency_ms": result.latency_ms,
            "tokens_in": result.tokens_in,
            "tokens_out": result.tokens_out,
        }
        if not result.ok:
            entry["error"] = result.error or "error"
        models[name] = entry
    return {
        "id": request_id,
        "task": cascade,
        "messages": messages,
        "reference": ref.extracted,
        "label": {"grader": LABEL_AGREEMENT, "against": reference},
        "policy_hash": run.policy_hash,
        "chosen": run.answer.model if run.answer else None,
        "models": models,
    }


async def judge_row(row: dict, messages: list[dict], judge: str, backend: Backend) -> list:
    """Relabel a trace row with an LLM judge's verdict on every model's answer (the
    question and, as a hint, the reference model's answer are in the prompt). Returns the
    judge's CallResults (to be ledgered); sets row["label"] to None when a verdict is
    missing, so the row is not written with a guessed label."""
    question = last_user_text(messages)
    names = [m for m, e in row["models"].items() if e["answer"] is not None]
    results = await asyncio.gather(
        *(
            backend.complete(
                judge_messages(question, row["models"][m]["answer"], None), JUDGE_PARAMS
            )
            for m in names
        )
    )
    verdicts = [parse_verdict(r.text) if r.ok else None for r in results]
    row["label"] = {"grader": LABEL_JUDGE, "model": judge}
    for name, result, verdict in zip(names, results, verdicts, strict=True):
        row["models"][name]["correct"] = bool(verdict)
        row["models"][name]["grader_cost_usd"] = result.cost_usd
    if any(v is None for v in verdicts):
        row["label"] = None
    row["reference"] = None  # the judge decided, not agreement with a reference answer
    return results


class TraceAppender:
    """Appends rows to a trace JSONL file; whole lines only, also across worker processes
    (an exclusive lock around each write)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self.written = 0

    def append(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        with self._lock, open(self.path, "ab") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.write(line)
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            self.written += 1
