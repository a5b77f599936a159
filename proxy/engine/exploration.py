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
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from policies.freetext import summary_as_dict
from policies.judging import JUDGE_PARAMS, judge_messages, parse_verdict
from policies.sampling import is_sampled
from proxy.engine.cascade import EXPLORE_SAMPLES, CascadeRun, NodeCall
from proxy.engine.recording import LedgerEntry, Recording
from upstreams.base import Backend
from upstreams.common import last_user_text

if TYPE_CHECKING:
    from proxy.config import Config

LABEL_AGREEMENT = "agreement"
LABEL_JUDGE = "judge"


def trace_row(
    request_id: str, cascade: str, messages: list[dict], run: CascadeRun, reference: str
) -> dict | None:
    """The trace row of an explored request, or None when the reference model gave no answer.
    A sampled node's model carries the further answers sampled for the row in `samples`:
    `fit --samples k` votes over its answer and the first k - 1 of them (DESIGN.md)."""
    # a tier's members, one by one; a sampled node's `n: k` call (`model@k`) is no model of
    # the trace: every explored request also calls its model alone, which the row records
    # (its first such call), and samples it further for `samples`
    by_model: dict[str, NodeCall] = {}
    for c in run.model_calls:
        if not is_sampled(c.model) and c.decision != EXPLORE_SAMPLES:
            by_model.setdefault(c.model, c)
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
        if call.logprob_summary is not None:
            entry["logprob_summary"] = summary_as_dict(call.logprob_summary)
        if result.finish_reason is not None:  # a refit's text calibrators read "length"
            entry["finish_reason"] = result.finish_reason
        if not result.ok:
            entry["error"] = result.error or "error"
        if name in run.explore_samples:
            entry["samples"] = run.explore_samples[name]
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
    # a task group, not gather: if one call raises, the others are cancelled and awaited,
    # so no judge call is still running (unreserved) once this returns or raises
    async with asyncio.TaskGroup() as group:
        calls = [
            group.create_task(
                backend.complete(
                    judge_messages(question, row["models"][m]["answer"], None), JUDGE_PARAMS
                )
            )
            for m in names
        ]
    results = [c.result() for c in calls]
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


class Explorer:
    """Where the explored requests of a serving process go: each cascade's trace file, and
    the LLM judge runs still going in the background (awaited at shutdown, so their calls
    reach the ledger)."""

    def __init__(self, config: Config, backends: dict[str, Backend], recording: Recording):
        self.config, self.backends, self.recording = config, backends, recording
        self.appenders = {
            name: TraceAppender(cascade.explore_out or f"explore-{name}.jsonl")
            for name, cascade in config.cascades.items()
            if cascade.explore_rate > 0
        }
        self.background: set[asyncio.Task] = set()

    async def record(
        self,
        request_id: str,
        key: str | None,
        cascade: str,
        messages: list[dict],
        run: CascadeRun,
        release: Callable[[], None] | None = None,
    ) -> None:
        """Append an explored request to its cascade's trace file. Agreement labels are
        written at once (off the event loop); an LLM judge runs in the background after the
        response, each of its calls ledgered as a request of its own. Failures are logged,
        never the client's problem. `release` ends the judge's part of the key's
        reservation (keys.hold_judge); it is called exactly when nothing of the judge is
        left to spend: once its calls are recorded, when it fails or is cancelled (even
        before it started), or at once when no judge runs."""
        handed = False
        try:
            appender = self.appenders.get(cascade)
            config = self.config.cascades[cascade]
            row = trace_row(request_id, cascade, messages, run, config.reference)
            if appender is None or row is None:
                return
            if config.explore_grader.startswith("judge:"):
                judge = config.explore_grader.removeprefix("judge:")
                judging = self._judge_and_write(appender, row, messages, judge, key, release)
                task = asyncio.create_task(judging)
                self.background.add(task)
                task.add_done_callback(self.background.discard)
                if release is not None:  # also when cancelled before it ran its finally
                    task.add_done_callback(lambda _task: release())
                handed = True
                return
            await _append(appender, row)
        finally:
            if release is not None and not handed:
                release()

    async def _judge_and_write(
        self,
        appender: TraceAppender,
        row: dict,
        messages: list[dict],
        judge: str,
        key: str | None,
        release: Callable[[], None] | None = None,
    ) -> None:
        try:
            results = await judge_row(row, messages, judge, self.backends[judge])
            for i, result in enumerate(results):
                entry = LedgerEntry(
                    self.recording, f"{row['id']}-judge-{i}", key, f"judge:{judge}", False
                )
                entry.call_done(judge, result, 200 if result.ok else 502, result.error)
        finally:  # recorded (their spend counts as the ledger's now), or failed: release
            if release is not None:
                release()
        if row["label"] is not None:
            await _append(appender, row)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait (a while) for the judge runs in flight: their calls belong in the ledger."""
        if self.background:
            await asyncio.wait(self.background, timeout=timeout_s)


async def _append(appender: TraceAppender, row: dict) -> None:
    try:
        await asyncio.to_thread(appender.append, row)
    except OSError as exc:
        logging.getLogger("cascade.explore").warning(
            "cannot write the explored trace to %s: %s", appender.path, exc
        )
