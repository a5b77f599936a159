"""The `replay` backend: answers from recorded traces (demo, tests, offline what-if runs).

A prompt is looked up by its full message list, else by the text of its last user message
(first trace row wins). The recorded answer, confidence, tokens, cost and latency come back
as they were recorded; a missing cost is computed from tokens (recorded, else counted) and
the configured prices or litellm's offline price map. Recorded latency is reported, not
slept, unless `simulate_latency` is set. Errors: "unknown_prompt" (not in the traces),
"no_answer" (the trace records no answer from this model for that prompt).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from policies.errors import InvalidInput
from policies.freetext import summary_from_dict
from policies.traceformat import TraceError, parse_trace_text
from upstreams.base import CallResult, StreamChunk
from upstreams.common import Pricer, count_usage, last_user_text, message_text
from upstreams.settings import ModelConfig

_WORDS = re.compile(r"\s*\S+\s*")
WORDS_PER_CHUNK = 3


@dataclass(frozen=True, slots=True)
class Recorded:
    trace_id: str
    answer: str | None
    confidence: float | None
    tokens_in: int | None
    tokens_out: int | None
    cost_usd: float | None
    latency_ms: float | None
    logprob_summary: tuple[float, float, float, float] | None = None
    finish_reason: str | None = None  # the recorded one (a text calibrator reads "length")


def _read_traces(path: str) -> tuple[tuple[str, ...], list[dict]]:
    """The validated rows of one trace file (the same format check calibration uses)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TraceError(f"{path}: no such trace file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceError(f"{path}: cannot read: {exc}") from None
    return parse_trace_text(text, path)


def messages_key(messages: list[dict]) -> str:
    """A canonical key for a message list: roles and message texts only."""
    return json.dumps(
        [[m.get("role"), message_text(m.get("content"))] for m in messages if isinstance(m, dict)],
        ensure_ascii=False,
        separators=(",", ":"),
    )


class ReplayBackend:
    """Answers the prompts of `cfg.traces` as model column `cfg.model` (default: `name`)."""

    def __init__(self, name: str, cfg: ModelConfig, *, simulate_latency: bool = False) -> None:
        if not cfg.traces:
            raise InvalidInput(f"replay model {name!r}: no trace files (traces: [...])")
        self.name = name
        self.cfg = cfg
        self.model = cfg.model or name
        self.simulate_latency = simulate_latency
        self.pricer = Pricer(cfg, [self.model])
        self.files = list(cfg.traces)
        self._by_messages: dict[str, Recorded] = {}
        self._by_prompt: dict[str, Recorded] = {}
        for path in self.files:
            try:
                models, rows = _read_traces(path)
            except ValueError as exc:  # TraceError: names file and line
                raise InvalidInput(f"replay model {name!r}: bad trace file {path}: {exc}") from exc
            if self.model not in models:
                raise InvalidInput(
                    f"replay model {name!r}: trace file {path} has no model column "
                    f"{self.model!r} (it has {list(models)}); set `model:` to one of them"
                )
            for row in rows:
                entry = row["models"][self.model]
                rec = Recorded(
                    trace_id=row["id"],
                    answer=entry["answer"],
                    confidence=entry["confidence"],
                    tokens_in=None if entry["tokens_in"] is None else int(entry["tokens_in"]),
                    tokens_out=None if entry["tokens_out"] is None else int(entry["tokens_out"]),
                    cost_usd=entry["cost_usd"],
                    latency_ms=entry["latency_ms"],
                    logprob_summary=summary_from_dict(entry.get("logprob_summary")),
                    finish_reason=entry.get("finish_reason"),
                )
                self._by_messages.setdefault(messages_key(row["messages"]), rec)
                prompt = last_user_text(row["messages"])
                if prompt is not None:
                    self._by_prompt.setdefault(prompt, rec)

    def __len__(self) -> int:
        return len(self._by_messages)

    def lookup(self, messages: list[dict]) -> Recorded | None:
        rec = self._by_messages.get(messages_key(messages))
        if rec is None:
            prompt = last_user_text(messages)
            rec = None if prompt is None else self._by_prompt.get(prompt)
        return rec

    async def complete(self, messages: list[dict], params: dict) -> CallResult:
        start = time.perf_counter()
        rec = self.lookup(messages)
        if rec is None:
            prompt = last_user_text(messages) or ""
            return CallResult(
                model=self.name,
                text=None,
                error="unknown_prompt",
                error_detail=(
                    f"{self.name}: the replay backend only answers the prompts of its traces "
                    f"({', '.join(self.files)}); this one is not among them: {prompt[:80]!r}"
                ),
                cost_usd=0.0,  # nothing was called
                attempts=0,
            )
        if rec.answer is None:
            return CallResult(
                model=self.name,
                text=None,
                error="no_answer",
                error_detail=f"{self.name}: trace {rec.trace_id} records no answer from "
                f"{self.model}",
                cost_usd=0.0,  # the recorded model gave nothing to bill
                latency_ms=rec.latency_ms or 0.0,
                served_model=self.model,
                extra={"trace_id": rec.trace_id},
            )
        if self.simulate_latency and rec.latency_ms:
            await asyncio.sleep(rec.latency_ms / 1000.0)
        tokens_in, tokens_out = await count_usage(
            messages, rec.answer, rec.tokens_in, rec.tokens_out
        )
        cost = rec.cost_usd
        if cost is None:
            cost = await self.pricer.cost(tokens_in, tokens_out)
        latency_ms = rec.latency_ms
        if latency_ms is None:
            latency_ms = (time.perf_counter() - start) * 1000.0
        return CallResult(
            model=self.name,
            text=rec.answer,
            confidence=rec.confidence,
            logprob_summary=rec.logprob_summary,
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=cost,
            latency_ms=latency_ms,
            finish_reason=rec.finish_reason or "stop",
            served_model=self.model,
            extra={"trace_id": rec.trace_id},
        )

    async def stream(self, messages: list[dict], params: dict) -> AsyncIterator[StreamChunk]:
        """The recorded answer in chunks of a few words, then the closing chunk."""
        start = time.perf_counter()
        result = await self.complete(messages, params)
        if result.ok and result.text:
            words = _WORDS.findall(result.text) or [result.text]  # they join to the text
            for k in range(0, len(words), WORDS_PER_CHUNK):
                if k == 0:
                    result.ttft_ms = (time.perf_counter() - start) * 1000.0
                yield StreamChunk(delta="".join(words[k : k + WORDS_PER_CHUNK]))
        yield StreamChunk(done=result)

    async def health(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None
