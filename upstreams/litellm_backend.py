"""The `litellm` backend: external APIs (OpenAI, Anthropic, Together, ...) through litellm.

litellm is imported on the first call (in a thread: the import takes seconds), with
LITELLM_LOCAL_MODEL_COST_MAP=True so nothing is fetched. `cfg.model` is litellm's model name
("openai/gpt-4o", "anthropic/claude-..."); `cfg.base_url`, when set, is passed as `api_base`.
Retries are litellm's (`num_retries = max_retries`); the circuit breaker is ours.

Errors, as for the openai backend: timeout, connection, malformed, http_<status>,
ttft_timeout (streams), circuit_open; "exception" for anything litellm raises without a status.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from upstreams.base import CallResult, StreamChunk
from upstreams.circuit import CircuitBreaker
from upstreams.common import (
    Pricer,
    assembled_tool_calls,
    charge_partial,
    choice_object,
    count_usage,
    failed_result,
    forward_params,
    merge_tool_deltas,
    tool_delta_text,
)
from upstreams.settings import ModelConfig


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """Attribute or key access (litellm returns objects that are sometimes dicts)."""
    if obj is None:
        return default
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _tool_fragments(delta: Any) -> list[dict[str, Any]] | None:
    """A stream delta's tool-call fragments as OpenAI's JSON (litellm gives objects), None
    when it has none: relayed as the openai backend relays them."""
    out = []
    for tc in _get(delta, "tool_calls") or ():
        frag: dict[str, Any] = {"index": _get(tc, "index", 0)}
        for key in ("id", "type"):
            if _get(tc, key):
                frag[key] = _get(tc, key)
        fn = _get(tc, "function")
        frag["function"] = {k: _get(fn, k) for k in ("name", "arguments") if _get(fn, k)}
        out.append(frag)
    return out or None


def _token_logprobs(choice: Any) -> list[tuple[str, float]] | None:
    content = _get(_get(choice, "logprobs"), "content")
    if not content:
        return None
    try:
        return [(_get(t, "token"), float(_get(t, "logprob"))) for t in content]
    except (TypeError, ValueError):
        return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def map_exception(exc: BaseException, litellm: Any) -> tuple[str, int | None, str]:
    """(error kind, HTTP status or None, detail) for an exception litellm raised."""
    detail = f"{type(exc).__name__}: {str(exc)[:4096]}"
    chain = _chain(exc)
    if any(isinstance(e, litellm.Timeout | TimeoutError) for e in chain):
        return "timeout", None, detail
    if any(isinstance(e, json.JSONDecodeError) for e in chain):
        return "malformed", 200, detail
    if (
        any(
            isinstance(e, litellm.APIConnectionError | ConnectionError)
            or type(e).__name__ in ("APIConnectionError", "RemoteProtocolError", "ConnectError")
            for e in chain
        )
        or "connection error" in str(exc).lower()
    ):
        return "connection", None, detail
    status = getattr(exc, "status_code", None)
    if isinstance(status, int) and 100 <= status <= 599:
        return f"http_{status}", status, detail
    return "exception", None, detail


class LiteLLMBackend:
    """An external API called through `litellm.acompletion`."""

    def __init__(
        self, name: str, cfg: ModelConfig, *, breaker: CircuitBreaker | None = None
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.model = cfg.model or name
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        names = [self.model]
        if "/" in self.model:
            names.append(self.model.split("/", 1)[1])  # "openai/gpt-4o" -> "gpt-4o"
        self.pricer = Pricer(cfg, names)
        self._secret = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self._litellm: Any = None

    async def _lib(self) -> Any:
        if self._litellm is None:
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
            lib = await asyncio.to_thread(importlib.import_module, "litellm")
            lib.suppress_debug_info = True
            self._litellm = lib
        return self._litellm

    def _kwargs(self, messages: list[dict], params: dict) -> dict[str, Any]:
        cfg = self.cfg
        kw: dict[str, Any] = forward_params(params, cfg.logprobs)
        kw.update(
            model=self.model,
            messages=messages,
            timeout=cfg.timeout_s,
            num_retries=cfg.max_retries,
            drop_params=True,  # a provider without logprobs (or top_k...) ignores them
        )
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        if key:
            kw["api_key"] = key
        if cfg.base_url:
            kw["api_base"] = cfg.base_url
        return kw

    def _fail(self, exc: BaseException, lib: Any, start: float, **extra: Any) -> CallResult:
        kind, status, detail = map_exception(exc, lib)
        retried = getattr(exc, "num_retries", None)
        return failed_result(
            self.name,
            kind,
            detail,
            secret=self._secret,
            pricer=self.pricer,
            start=start,
            status=status,
            attempts=1 + retried if isinstance(retried, int) else 1,
            extra=extra,
        )

    def _circuit_open(self, start: float) -> CallResult:
        """No call was made: reported as the OpenAI-compatible backend reports it (cost is
        Pricer.failed_cost: 0 for a priced model, None for one without a known price)."""
        return failed_result(
            self.name,
            "circuit_open",
            f"circuit open after {self.breaker.failures} consecutive failed calls; "
            f"next trial in {self.breaker.retry_in():.1f}s",
            secret=self._secret,
            pricer=self.pricer,
            start=start,
            attempts=0,
        )

    async def _cost(self, lib: Any, response: Any, tin: int, tout: int) -> float | None:
        if self.pricer.configured:
            return await self.pricer.cost(tin, tout)
        cost = None
        try:
            if response is not None:
                cost = lib.completion_cost(completion_response=response)
            else:
                pin, pout = lib.cost_per_token(
                    model=self.model, prompt_tokens=tin, completion_tokens=tout
                )
                cost = pin + pout
        except Exception:  # litellm raises many kinds for an unmapped model
            cost = None
        if cost is None or (cost == 0 and tin + tout > 0):  # 0: litellm does not know it
            cost = await self.pricer.cost(tin, tout)
        return float(cost) if cost is not None else None

    async def complete(self, messages: list[dict], params: dict) -> CallResult:
        start = time.perf_counter()
        if not self.breaker.allow():
            return self._circuit_open(start)
        try:
            result = await self._complete(messages, params)
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.record(result.error, result.status)
        return result

    async def _complete(self, messages: list[dict], params: dict) -> CallResult:
        lib = await self._lib()
        start = time.perf_counter()  # the first call's import is not the upstream's latency
        try:
            resp = await lib.acompletion(**self._kwargs(messages, params))
            latency_ms = (time.perf_counter() - start) * 1000.0
            choice = resp.choices[0]
            text = _get(_get(choice, "message"), "content")
            usage = _get(resp, "usage")
            tin = _get(usage, "prompt_tokens")
            tout = _get(usage, "completion_tokens")
        except Exception as exc:
            return self._fail(exc, lib, start)
        text = text or ""
        counted, extra = text, {}
        tool_calls = _get(_get(choice, "message"), "tool_calls")
        if tool_calls:  # as the openai backend: a passthrough answer returns them
            extra["tool_calls"] = [
                tc.model_dump() if hasattr(tc, "model_dump") else tc for tc in tool_calls
            ]
        if len(resp.choices) > 1:  # a passthrough request's n: every choice goes back
            extra["choices"] = [
                choice_object(
                    _get(c, "index", i),
                    _get(_get(c, "message"), "content"),
                    _get(c, "finish_reason"),
                    _get(_get(c, "message"), "tool_calls"),
                )
                for i, c in enumerate(resp.choices)
            ]
            counted = "".join(c["message"]["content"] or "" for c in extra["choices"])
        tin, tout = await count_usage(messages, counted, tin, tout)
        return CallResult(
            model=self.name,
            text=text,
            token_logprobs=_token_logprobs(choice),
            tokens_in=tin,
            tokens_out=tout,
            cost_usd=await self._cost(lib, resp, tin, tout),
            latency_ms=latency_ms,
            finish_reason=_get(choice, "finish_reason"),
            status=200,
            served_model=_get(resp, "model"),
            extra=extra,
        )

    async def stream(self, messages: list[dict], params: dict) -> AsyncIterator[StreamChunk]:
        start = time.perf_counter()
        if not self.breaker.allow():
            yield StreamChunk(done=self._circuit_open(start))
            return
        recorded = False
        try:
            async with contextlib.aclosing(self._stream(messages, params)) as chunks:
                async for chunk in chunks:
                    if chunk.done is not None:
                        self.breaker.record(chunk.done.error, chunk.done.status)
                        recorded = True
                    yield chunk
        finally:
            if not recorded:
                self.breaker.release()

    async def _stream(self, messages: list[dict], params: dict) -> AsyncIterator[StreamChunk]:
        cfg = self.cfg
        lib = await self._lib()
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        total = loop.time() + cfg.timeout_s
        ttft = loop.time() + cfg.ttft_timeout_s if cfg.ttft_timeout_s else None
        first_deadline = min(total, ttft) if ttft is not None else total
        kw = self._kwargs(messages, params)
        kw["stream"] = True
        kw["stream_options"] = {"include_usage": True}
        parts: list[str] = []  # content, then (for the token count) tool-call text
        text_parts: list[str] = []  # content only: the answer's text
        calls: dict[int, dict[str, Any]] = {}
        logprobs: list[tuple[str, float]] = []
        ttft_ms = finish = served = tin = tout = None
        it = None

        async def charged(result: CallResult) -> StreamChunk:
            """The failed result, with the tokens sent before the failure and their cost:
            they were generated and are billed. litellm's retries (`num_retries`) cover
            the call that opens the stream, never a stream that broke after its first
            token, so such a call is one costed attempt (keys.worst_case counts one)."""
            if parts:
                args = (result, self.pricer, messages, params, "".join(parts))
                result = await asyncio.to_thread(charge_partial, *args)
            return StreamChunk(done=result)

        async def timed_out(first: bool) -> StreamChunk:
            if first and ttft is not None and ttft < total:
                kind, detail = "ttft_timeout", f"no first token within {cfg.ttft_timeout_s}s"
            else:
                kind, detail = "timeout", f"stream not finished within {cfg.timeout_s}s"
            return await charged(
                CallResult(
                    model=self.name,
                    text=None,
                    error=kind,
                    error_detail=f"{self.name}: {detail}",
                    cost_usd=self.pricer.failed_cost((time.perf_counter() - start) * 1000.0),
                    latency_ms=(time.perf_counter() - start) * 1000.0,
                    ttft_ms=ttft_ms,
                )
            )

        try:
            try:
                async with asyncio.timeout_at(first_deadline):
                    it = await lib.acompletion(**kw)
            except TimeoutError:
                yield await timed_out(True)
                return
            except Exception as exc:
                yield StreamChunk(done=self._fail(exc, lib, start))
                return
            while True:
                first = ttft_ms is None
                try:
                    async with asyncio.timeout_at(first_deadline if first else total):
                        chunk = await it.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    yield await timed_out(first)
                    return
                except Exception as exc:
                    failed = self._fail(exc, lib, start)
                    failed.ttft_ms = ttft_ms
                    yield await charged(failed)
                    return
                served = served or _get(chunk, "model")
                usage = _get(chunk, "usage")
                if usage:
                    tin = _get(usage, "prompt_tokens", tin)
                    tout = _get(usage, "completion_tokens", tout)
                choices = _get(chunk, "choices") or []
                if not choices:
                    continue
                choice = choices[0]
                content = _get(_get(choice, "delta"), "content") or ""
                fragments = _tool_fragments(_get(choice, "delta"))
                if content or fragments:  # a tool call is the answer's first token too
                    if ttft_ms is None:
                        ttft_ms = (time.perf_counter() - start) * 1000.0
                    if content:
                        parts.append(content)
                        text_parts.append(content)
                    if fragments:
                        merge_tool_deltas(calls, fragments)
                        parts.append(tool_delta_text(fragments))
                    yield StreamChunk(delta=content, tool_calls=fragments)
                logprobs.extend(_token_logprobs(choice) or ())
                finish = _get(choice, "finish_reason") or finish
        finally:
            if it is not None and hasattr(it, "aclose"):
                with contextlib.suppress(Exception):
                    await it.aclose()
        latency_ms = (time.perf_counter() - start) * 1000.0
        text = "".join(text_parts)
        tin, tout = await count_usage(messages, "".join(parts), tin, tout)
        yield StreamChunk(
            done=CallResult(
                model=self.name,
                text=text,
                token_logprobs=logprobs or None,
                tokens_in=tin,
                tokens_out=tout,
                cost_usd=await self._cost(lib, None, tin, tout),
                latency_ms=latency_ms,
                ttft_ms=latency_ms if ttft_ms is None else ttft_ms,
                finish_reason=finish,
                status=200,
                served_model=served,
                extra={"tool_calls": assembled_tool_calls(calls)} if calls else {},
            )
        )

    async def health(self) -> bool:
        """External APIs have no cheap health check: True unless the circuit is open."""
        return self.breaker.state != "open"

    async def aclose(self) -> None:
        return None
