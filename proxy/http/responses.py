"""What the proxy answers: a ChatCompletion with the `cascade` object, the x-cascade-*
headers, the SSE events of a stream (a decided answer sent in pieces, or a passthrough
relayed live), and the error bodies of failed upstream calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.responses import JSONResponse, StreamingResponse

from policies.freetext import summary_as_dict
from proxy.engine.cascade import CascadeRun, NodeCall
from proxy.engine.recording import LedgerEntry
from proxy.http import metrics
from proxy.http.errors import ApiError
from upstreams.base import Backend, CallResult, StreamChunk
from upstreams.common import Pricer, charge_partial, choice_object, tool_delta_text
from upstreams.jsonbytes import dumps

if TYPE_CHECKING:
    from proxy.http.state import ProxyState


class FastJSONResponse(JSONResponse):
    """A 200 JSON response encoded by orjson (a tenth of the stdlib's time; NaN becomes
    null), its header list built directly (the handler's headers are ASCII, lower-case)."""

    def __init__(self, content: Any, headers: dict[str, str]) -> None:
        self.status_code = 200
        self.background = None
        self.body = dumps(content)
        self.raw_headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()),
        ]


def usage_of(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def completion(
    request_id: str, result: CallResult, run: CascadeRun | None, state: ProxyState
) -> dict:
    if run is None:
        tokens = usage_of(result.tokens_in or 0, result.tokens_out or 0)
    else:
        tokens = usage_of(*run.tokens)
    payload: dict[str, Any] = {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.model,
        "choices": (run is None and result.extra.get("choices"))  # a passthrough's n > 1
        or [
            choice_object(
                0,
                result.text,
                result.finish_reason,
                result.extra.get("tool_calls") if run is None else None,
            )
        ],
        "usage": tokens,
    }
    if run is not None:
        payload["cascade"] = cascade_object(run, state)
    return payload


def cascade_object(run: CascadeRun, state: ProxyState) -> dict:
    reference_cost = run.reference_cost(state.reference_prices.get(run.cascade))
    return {
        "name": run.cascade,
        "policy_hash": run.policy_hash,
        "calls": [
            {
                "model": c.model,
                "status": "ok" if c.result.ok else c.result.error,
                "latency_ms": round(c.result.latency_ms, 3),
                "cost_usd": c.result.cost_usd,
                "confidence": c.confidence,
                **(
                    {"logprob_summary": summary_as_dict(c.logprob_summary)}
                    if c.logprob_summary is not None
                    else {}
                ),
                "p_correct": None if c.p_correct is None else round(c.p_correct, 6),
                "decision": c.decision,
                "attempts": c.result.attempts,
                **({"members": [_member(m) for m in c.members]} if c.members else {}),
                **(
                    {"vote": {**c.vote.as_dict(), "answers": c.sample_answers}}
                    if c.vote is not None
                    else {}
                ),
            }
            for c in run.calls
        ],
        "answer_from": run.answer.model if run.answer else None,
        "answer_is_last": any(run.answer is m for m in run.calls[-1].model_calls())
        if run.answer
        else None,
        "reason": run.reason,
        "cost_usd": run.cost_usd,
        "reference_model": state.engines[run.cascade].reference,
        "reference_cost_usd": reference_cost,
        "overhead_ms": round(run.overhead_ms, 3),
    }


def _member(call: NodeCall) -> dict:
    """One model of a tier node, as listed under that node in the `cascade` object."""
    return {
        "model": call.model,
        "status": "ok" if call.result.ok else call.result.error,
        "latency_ms": round(call.result.latency_ms, 3),
        "cost_usd": call.result.cost_usd,
        "confidence": call.confidence,
        "answer": call.extracted,
    }


def cascade_headers(request_id: str, run: CascadeRun) -> dict[str, str]:
    cost = run.cost_usd
    return {
        "x-request-id": request_id,
        "x-cascade-model": run.answer.model if run.answer else "",
        "x-cascade-cost-usd": "unknown" if cost is None else f"{cost:.8f}",
        "x-cascade-calls": str(len(run.model_calls)),
        "x-cascade-overhead-ms": f"{run.overhead_ms:.3f}",
    }


def _sse(data: dict | str) -> bytes:
    text = data.encode() if isinstance(data, str) else dumps(data)
    return b"data: " + text + b"\n\n"


def _chunk(request_id: str, model: str, delta: dict, finish: str | None = None) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def _pieces(text: str, size: int = 4) -> list[str]:
    words = text.split(" ")
    return [" ".join(words[i : i + size]) + (" " if i + size < len(words) else "")
            for i in range(0, len(words), size)]  # fmt: skip


def stream_text(
    request_id: str, payload: dict, include_usage: bool, headers: dict[str, str]
) -> StreamingResponse:
    """A decided cascade answer, sent as OpenAI chat.completion.chunk events."""
    model = payload["model"]
    text = payload["choices"][0]["message"]["content"] or ""

    async def events() -> AsyncIterator[bytes]:
        first = _chunk(request_id, model, {"role": "assistant", "content": ""})
        first["cascade"] = payload["cascade"]
        yield _sse(first)
        for piece in _pieces(text):
            yield _sse(_chunk(request_id, model, {"content": piece}))
        yield _sse(_chunk(request_id, model, {}, payload["choices"][0]["finish_reason"]))
        if include_usage:
            last = _chunk(request_id, model, {})
            last["choices"] = []
            last["usage"] = payload["usage"]
            yield _sse(last)
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def stream_live(
    request_id: str,
    model: str,
    backend: Backend,
    messages: list[dict],
    params: dict,
    include_usage: bool,
    entry: LedgerEntry,
    idle_s: float,
) -> StreamingResponse:
    """Passthrough streaming: upstream deltas as they arrive, content and tool-call
    fragments (`delta.tool_calls`, as OpenAI streams them, so a client's SDK assembles the
    calls); an upstream failure after the stream started ends it with an error event (the
    status line is already sent).

    The server's request_timeout_s (`idle_s`) bounds every silence of the upstream, the
    wait for its first delta included: a stream that sends nothing for that long ends with
    a `request_timeout` error event, ledgered as a 504. A stream that keeps sending runs on
    (a long answer is not cut; the model's own timeout_s still bounds it). A stream ended
    by the proxy after some deltas (its timeout, or the client hanging up) is ledgered with
    the tokens relayed and their cost, as a backend's broken stream is: they were generated."""
    relayed: list[str] = []  # the deltas sent on: what the upstream generated so far
    pricer: Pricer | None = getattr(backend, "pricer", None)

    def charged(result: CallResult) -> CallResult:
        """`result` with the relayed tokens charged (synchronous: a hung-up client's
        stream is being cancelled and may not await)."""
        if relayed and pricer is not None:
            return charge_partial(result, pricer, messages, params, "".join(relayed))
        return result

    async def events() -> AsyncIterator[bytes]:
        try:
            async for event in _live_events():
                yield event
        finally:  # the client hung up mid-stream: still one ledger record
            if not entry.written:
                gone = charged(CallResult(model=model, text=None, error="client_disconnected"))
                entry.call_done(model, gone, 499, "client_disconnected")

    async def _live_events() -> AsyncIterator[bytes]:
        yield _sse(_chunk(request_id, model, {"role": "assistant", "content": ""}))
        done: CallResult | None = None
        chunk: StreamChunk
        started = time.perf_counter()
        chunks = backend.stream(messages, params)
        try:
            while True:
                try:
                    async with asyncio.timeout(idle_s):  # a silence, not the whole stream
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:  # the upstream call was cancelled (and released)
                    silent = ApiError(
                        504,
                        f"Model '{model}' sent nothing for {idle_s:g} s (the proxy's "
                        "request timeout); the stream is ended",
                        code="request_timeout",
                    )
                    timed_out = CallResult(
                        model=model,
                        text=None,
                        error="request_timeout",
                        error_detail=f"{model}: {silent.message}",
                        latency_ms=(time.perf_counter() - started) * 1000.0,
                    )
                    timed_out = await asyncio.to_thread(charged, timed_out)  # counts tokens
                    metrics.record_call(model, timed_out)
                    entry.call_done(model, timed_out, silent.status, silent.code)
                    yield _sse(silent.to_json(entry.state.secrets))
                    yield _sse("[DONE]")
                    return
                if chunk.done is not None:
                    done = chunk.done
                    break
                if chunk.delta or chunk.tool_calls:
                    delta: dict[str, Any] = {}
                    if chunk.delta:
                        relayed.append(chunk.delta)
                        delta["content"] = chunk.delta
                    if chunk.tool_calls:
                        relayed.append(tool_delta_text(chunk.tool_calls))
                        delta["tool_calls"] = chunk.tool_calls
                    yield _sse(_chunk(request_id, model, delta))
        finally:
            await chunks.aclose()
        if done is None or not done.ok:
            if done is not None:
                metrics.record_call(model, done)
                failure = call_failed(model, done)
                entry.call_done(model, done, failure.status, failure.code)
                yield _sse(failure.to_json(entry.state.secrets))
            else:
                ended = charged(CallResult(model=model, text=None, error="stream_ended"))
                entry.call_done(model, ended, 502, "stream_ended")
                yield _sse({"error": {"message": "the upstream stream ended", "code": None}})
            yield _sse("[DONE]")
            return
        metrics.record_call(model, done)
        entry.call_done(model, done, 200, None)
        yield _sse(_chunk(request_id, model, {}, done.finish_reason or "stop"))
        if include_usage:
            last = _chunk(request_id, model, {})
            last["choices"] = []
            last["usage"] = usage_of(done.tokens_in or 0, done.tokens_out or 0)
            yield _sse(last)
        yield _sse("[DONE]")

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"x-request-id": request_id, "x-cascade-model": model},
    )


def _attempt(call_model: str, result: CallResult) -> dict:
    return {
        "model": call_model,
        "error": result.error,
        "detail": result.error_detail,
        "status": result.status,
        "attempts": result.attempts,
        "latency_ms": round(result.latency_ms, 3),
    }


def all_failed(run: CascadeRun) -> ApiError:
    if all(c.result.error == "unknown_prompt" for c in run.calls):
        return ApiError(
            400,
            f"Cascade '{run.cascade}' replays recorded traces and this prompt is not among "
            "them: send one of the recorded questions",
            param="messages",
            code="prompt_not_recorded",
        )
    return ApiError(
        502,
        f"Every model of cascade '{run.cascade}' failed ({run.reason})",
        code="upstream_failed",
        extra={"attempts": [_attempt(c.model, c.result) for c in run.model_calls]},
    )


def call_failed(model: str, result: CallResult) -> ApiError:
    return ApiError(
        502,
        f"Model '{model}' failed: {result.error}",
        code="upstream_failed",
        extra={"attempts": [_attempt(model, result)]},
    )
