"""The `openai` backend: any OpenAI-compatible chat server (vLLM, SGLang, llama.cpp, ...).

One pooled aiohttp session per backend, created lazily inside the running loop (connector
limit = `max_concurrency`). The hot path encodes the request once, decodes the response once,
and logs nothing.

Faults never raise; they come back as `CallResult(error=KIND, error_detail=...)`:
  timeout       no complete response within `timeout_s` (per attempt; not retried)
  http_<status> an error status (429, 500, 502, 503, 504 are retried; 4xx never are)
  connection    refused, reset or dropped connection (retried before any streamed byte)
  malformed     a 200 whose body (or stream event) is not a chat completion (not retried)
  upstream_error an error object inside a 200 stream
  ttft_timeout  streams: no first token within `ttft_timeout_s`
  circuit_open  the circuit breaker is open: no call was made (attempts == 0)
Retries back off exponentially with jitter and wait at least what `retry-after-ms` or
`Retry-After` asks (capped at `max_retry_after_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from upstreams.base import CallResult, StreamChunk
from upstreams.circuit import CircuitBreaker
from upstreams.common import (
    RETRY_STATUSES,
    Pricer,
    assembled_tool_calls,
    charge_partial,
    choice_object,
    count_usage,
    failed_result,
    forward_params,
    merge_tool_deltas,
    parse_retry_after,
    tool_delta_text,
    valid_tool_deltas,
)
from upstreams.jsonbytes import dumps, loads_lenient
from upstreams.settings import ModelConfig

_NO_TIMEOUT = aiohttp.ClientTimeout()
_DATA = b"data:"
_DONE = b"[DONE]"


def _error_message(raw: bytes) -> str:
    """The `error.message` of an OpenAI error body, else the start of the body."""
    try:
        err = json.loads(raw)["error"]
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)[:4096]
    except (ValueError, KeyError, TypeError):
        pass
    return raw[:4096].decode("utf-8", "replace") or "(empty body)"


def _token_logprobs(choice: dict) -> list[tuple[str, float]] | None:
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    if not content:
        return None
    try:
        return [(t["token"], float(t["logprob"])) for t in content]
    except (KeyError, TypeError, ValueError):
        return None


def _choices(choices: list) -> list[dict[str, Any]]:
    """Every choice of a completion with n > 1, as the proxy returns them."""
    out = []
    for i, choice in enumerate(choices):
        message = choice["message"]
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            raise ValueError(f"choices[{i}].message.content is not a string")
        index = choice.get("index", i)
        out.append(
            choice_object(index, content, choice.get("finish_reason"), message.get("tool_calls"))
        )
    return out


class _Deadlines:
    """Loop-time deadlines of one stream attempt: the whole stream, and its first token."""

    __slots__ = ("first", "total", "ttft_binds")

    def __init__(self, total: float, ttft: float | None) -> None:
        self.total = total
        self.ttft_binds = ttft is not None and ttft < total
        self.first = ttft if ttft is not None and self.ttft_binds else total


class OpenAIBackend:
    """An OpenAI-compatible upstream at `cfg.base_url` (e.g. http://127.0.0.1:8000/v1)."""

    def __init__(
        self,
        name: str,
        cfg: ModelConfig,
        *,
        breaker: CircuitBreaker | None = None,
        backoff_base_s: float = 0.25,
        backoff_max_s: float = 8.0,
        max_retry_after_s: float = 30.0,
        health_timeout_s: float = 2.0,
    ) -> None:
        if not cfg.base_url:
            raise ValueError(f"model {name!r}: backend 'openai' needs base_url")
        self.name = name
        self.cfg = cfg
        self.model = cfg.model or name
        base = cfg.base_url.rstrip("/")
        self.base_url = base
        self.url = base + "/chat/completions"
        self.breaker = breaker if breaker is not None else CircuitBreaker()
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.health_timeout_s = health_timeout_s
        self.pricer = Pricer(cfg, [self.model])
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        self._secret = key
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._headers = headers
        self._timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------------ plumbing

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None or session.closed or self._loop is not loop:
            connector = aiohttp.TCPConnector(limit=self.cfg.max_concurrency)
            session = aiohttp.ClientSession(
                connector=connector, headers=self._headers, timeout=_NO_TIMEOUT
            )
            self._session, self._loop = session, loop
        return session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def _body(self, messages: list[dict], params: dict, stream: bool) -> bytes:
        body: dict[str, Any] = {"model": self.model, "messages": messages}
        body.update(forward_params(params, self.cfg.logprobs))
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return dumps(body)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before attempt `attempt + 1`: jittered exponential backoff, at least the
        upstream's Retry-After (capped)."""
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        delay *= random.uniform(0.5, 1.0)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after_s))
        return delay

    def _fail(
        self,
        kind: str,
        detail: str,
        start: float,
        status: int | None = None,
        attempts: int = 1,
        **extra: Any,
    ) -> CallResult:
        return failed_result(
            self.name,
            kind,
            detail,
            secret=self._secret,
            pricer=self.pricer,
            start=start,
            status=status,
            attempts=attempts,
            extra=extra,
        )

    def _circuit_open(self, start: float) -> CallResult:
        b = self.breaker
        return self._fail(
            "circuit_open",
            f"circuit open after {b.failures} consecutive failed calls; "
            f"next trial in {b.retry_in():.1f}s",
            start,
            attempts=0,
        )

    # ------------------------------------------------------------------------ complete

    async def complete(self, messages: list[dict], params: dict) -> CallResult:
        start = time.perf_counter()
        if not self.breaker.allow():
            return self._circuit_open(start)
        try:
            result = await self._complete(messages, params, start)
        except BaseException:
            self.breaker.release()
            raise
        self.breaker.record(result.error, result.status)
        return result

    async def _complete(self, messages: list[dict], params: dict, start: float) -> CallResult:
        body = self._body(messages, params, stream=False)
        session = self._client()
        max_attempts = self.cfg.max_retries + 1
        attempts = 0
        while True:
            attempts += 1
            status: int | None = None
            retry_after = None
            try:
                async with session.post(self.url, data=body, timeout=self._timeout) as resp:
                    status = resp.status
                    raw = await resp.read()
                    headers = resp.headers
            except TimeoutError:
                return self._fail(
                    "timeout", f"no response within {self.cfg.timeout_s}s", start, status, attempts
                )
            except (aiohttp.ClientError, OSError) as exc:
                kind, detail = "connection", f"{type(exc).__name__}: {exc}"
                status = None
            else:
                if status == 200:
                    return await self._parse(raw, messages, start, attempts)
                kind, detail = f"http_{status}", _error_message(raw)
                if status in RETRY_STATUSES:
                    retry_after = parse_retry_after(headers)
            if attempts >= max_attempts or not (kind == "connection" or status in RETRY_STATUSES):
                return self._fail(kind, detail, start, status, attempts)
            await asyncio.sleep(self._backoff(attempts, retry_after))

    async def _parse(
        self, raw: bytes, messages: list[dict], start: float, attempts: int
    ) -> CallResult:
        try:
            data = loads_lenient(raw)
            choice = data["choices"][0]
            message = choice["message"]
            text = message.get("content")
            usage = data.get("usage") or {}
            tokens_in = usage.get("prompt_tokens")
            tokens_out = usage.get("completion_tokens")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            detail = (
                f"200 body is not a chat completion ({type(exc).__name__}: {exc}): {raw[:80]!r}"
            )
            return self._fail("malformed", detail, start, 200, attempts)
        if text is not None and not isinstance(text, str):
            return self._fail("malformed", "message.content is not a string", start, 200, attempts)
        extra: dict[str, Any] = {}
        if message.get("tool_calls"):
            extra["tool_calls"] = message["tool_calls"]
        text = text or ""
        counted = text
        if len(data["choices"]) > 1:  # a passthrough request's n: every choice goes back
            try:
                extra["choices"] = _choices(data["choices"])
            except (KeyError, TypeError, AttributeError, ValueError) as exc:
                return self._fail(
                    "malformed", f"a choice is malformed: {exc}", start, 200, attempts
                )
            # usage covers every choice; without it, count them all
            counted = "".join(c["message"]["content"] or "" for c in extra["choices"])
        latency_ms = (time.perf_counter() - start) * 1000.0  # before any counting or pricing
        tokens_in, tokens_out = await count_usage(messages, counted, tokens_in, tokens_out)
        return CallResult(
            model=self.name,
            text=text,
            token_logprobs=_token_logprobs(choice),
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            cost_usd=await self.pricer.cost(tokens_in, tokens_out, latency_ms),
            latency_ms=latency_ms,
            finish_reason=choice.get("finish_reason"),
            status=200,
            attempts=attempts,
            served_model=data.get("model"),
            extra=extra,
        )

    # ------------------------------------------------------------------------ stream

    async def stream(self, messages: list[dict], params: dict) -> AsyncIterator[StreamChunk]:
        start = time.perf_counter()
        if not self.breaker.allow():
            yield StreamChunk(done=self._circuit_open(start))
            return
        recorded = False
        try:
            async with contextlib.aclosing(self._stream(messages, params, start)) as chunks:
                async for chunk in chunks:
                    if chunk.done is not None:
                        self.breaker.record(chunk.done.error, chunk.done.status)
                        recorded = True
                    yield chunk
        finally:
            if not recorded:
                self.breaker.release()

    async def _stream(
        self, messages: list[dict], params: dict, start: float
    ) -> AsyncIterator[StreamChunk]:
        cfg = self.cfg
        body = self._body(messages, params, stream=True)
        session = self._client()
        loop = asyncio.get_running_loop()
        ttft_deadline = loop.time() + cfg.ttft_timeout_s if cfg.ttft_timeout_s else None
        attempts = 0
        while True:
            attempts += 1
            deadlines = _Deadlines(loop.time() + cfg.timeout_s, ttft_deadline)
            status: int | None = None
            retry_after = None
            kind = detail = None
            resp: aiohttp.ClientResponse | None = None
            try:
                try:
                    async with asyncio.timeout_at(deadlines.first):
                        resp = await session.post(self.url, data=body, timeout=_NO_TIMEOUT)
                        status = resp.status
                        raw = b"" if status == 200 else await resp.read()
                except TimeoutError:
                    kind, detail = self._timeout_kind(deadlines, first=True)
                    yield StreamChunk(done=self._fail(kind, detail, start, status, attempts))
                    return
                except (aiohttp.ClientError, OSError) as exc:
                    kind, detail = "connection", f"{type(exc).__name__}: {exc}"
                else:
                    if status != 200:
                        kind, detail = f"http_{status}", _error_message(raw)
                        if status in RETRY_STATUSES:
                            retry_after = parse_retry_after(resp.headers)
                    else:
                        events = self._events(resp, messages, params, start, attempts, deadlines)
                        async with contextlib.aclosing(events) as chunks:
                            async for chunk in chunks:
                                if chunk is None:  # broke before its first token: retry?
                                    kind, detail = "connection", "stream broke before any token"
                                    break
                                yield chunk
                        if kind is None:
                            return  # the closing chunk went out
            finally:
                if resp is not None:
                    resp.release()
            retryable = kind == "connection" or status in RETRY_STATUSES
            delay = self._backoff(attempts, retry_after)
            too_late = ttft_deadline is not None and loop.time() + delay >= ttft_deadline
            if attempts > cfg.max_retries or not retryable or too_late:
                yield StreamChunk(done=self._fail(kind, detail, start, status, attempts))
                return
            await asyncio.sleep(delay)

    def _timeout_kind(self, deadlines: _Deadlines, first: bool) -> tuple[str, str]:
        if first and deadlines.ttft_binds:
            return "ttft_timeout", f"no first token within {self.cfg.ttft_timeout_s}s"
        return "timeout", f"stream not finished within {self.cfg.timeout_s}s"

    async def _events(
        self,
        resp: aiohttp.ClientResponse,
        messages: list[dict],
        params: dict,
        start: float,
        attempts: int,
        deadlines: _Deadlines,
    ) -> AsyncIterator[StreamChunk | None]:
        """Read one 200 event stream: content and tool-call deltas, then the closing chunk.
        Yields None (and stops) when the stream breaks before its first token (a content or
        tool-call delta: a tool call is the answer, generated and billed), so the caller may
        retry.
        A stream that fails after its first token is not retried (as OpenAI's SDKs do not
        retry a broken stream): the tokens sent were generated and are billed, and its
        failed result carries them and their cost (`charge_partial`), so a call is at most
        one costed attempt, which is what a key's reservation counts (keys.worst_case); a
        retry would cost a second answer that no reservation covers, and counting every
        attempt would reserve 1 + max_retries answers for every ordinary request. The
        response is released before the closing chunk goes out."""
        parts: list[str] = []
        tool_parts: list[str] = []  # the tool-call fragments' text, counted as tokens
        calls: dict[int, dict[str, Any]] = {}
        logprobs: list[tuple[str, float]] = []
        ttft_ms: float | None = None
        finish_reason = served = tokens_in = tokens_out = None
        buf = b""

        async def fail(kind: str, detail: str) -> StreamChunk:
            resp.release()
            result = self._fail(kind, detail, start, 200, attempts)
            result.ttft_ms = ttft_ms
            result.served_model = served
            if parts or tool_parts:  # tokens were sent before the failure: generated
                text = "".join(parts) + "".join(tool_parts)
                args = (result, self.pricer, messages, params, text)
                result = await asyncio.to_thread(charge_partial, *args)
            return StreamChunk(done=result)

        finished = False
        while not finished:
            first = ttft_ms is None
            try:
                async with asyncio.timeout_at(deadlines.first if first else deadlines.total):
                    data = await resp.content.readany()
            except TimeoutError:
                yield await fail(*self._timeout_kind(deadlines, first))
                return
            except (aiohttp.ClientError, OSError) as exc:
                yield None if first else await fail("connection", f"stream broke: {exc!r}")
                return
            if not data:  # EOF without [DONE]
                if finish_reason is not None:
                    break
                yield None if first else await fail("connection", "stream ended before its finish")
                return
            lines = (buf + data).split(b"\n")
            buf = lines.pop()
            for line in lines:
                if not line.startswith(_DATA):
                    continue
                payload = line[5:].strip()
                if payload == _DONE:
                    finished = True
                    break
                try:
                    event = loads_lenient(payload)
                    choices = event.get("choices")
                    if "error" in event and not choices:
                        err = event["error"]
                        msg = err.get("message") if isinstance(err, dict) else err
                        yield await fail("upstream_error", f"error event in the stream: {msg}")
                        return
                    usage = event.get("usage")
                    if usage:
                        tokens_in = usage.get("prompt_tokens")
                        tokens_out = usage.get("completion_tokens")
                    if served is None:
                        served = event.get("model")
                    choice = choices[0] if choices else None
                    delta = (choice.get("delta") or {}) if choice else {}
                    content = delta.get("content")
                    tool_deltas = valid_tool_deltas(delta.get("tool_calls"))
                    if tool_deltas:
                        merge_tool_deltas(calls, tool_deltas)
                    if choice and choice.get("logprobs"):
                        logprobs.extend(_token_logprobs(choice) or ())
                    if choice and choice.get("finish_reason"):
                        finish_reason = choice["finish_reason"]
                except (ValueError, AttributeError, TypeError, IndexError) as exc:
                    detail = f"stream event is not a chat chunk ({exc}): {payload[:80]!r}"
                    yield await fail("malformed", detail)
                    return
                content = content if content and isinstance(content, str) else ""
                if content or tool_deltas:
                    if ttft_ms is None:
                        ttft_ms = (time.perf_counter() - start) * 1000.0
                    if content:
                        parts.append(content)
                    if tool_deltas:
                        tool_parts.append(tool_delta_text(tool_deltas))
                    yield StreamChunk(delta=content, tool_calls=tool_deltas)
        resp.release()
        now_ms = (time.perf_counter() - start) * 1000.0  # before any counting or pricing
        text = "".join(parts)
        counted = text + "".join(tool_parts)
        tokens_in, tokens_out = await count_usage(messages, counted, tokens_in, tokens_out)
        yield StreamChunk(
            done=CallResult(
                model=self.name,
                text=text,
                token_logprobs=logprobs or None,
                tokens_in=tokens_in,
                tokens_out=tokens_out,
                cost_usd=await self.pricer.cost(tokens_in, tokens_out, now_ms),
                latency_ms=now_ms,
                ttft_ms=now_ms if ttft_ms is None else ttft_ms,
                finish_reason=finish_reason,
                status=200,
                attempts=attempts,
                served_model=served,
                extra={"tool_calls": assembled_tool_calls(calls)} if calls else {},
            )
        )

    # ------------------------------------------------------------------------ health

    async def health(self) -> bool:
        """GET {base_url}/models, else the server root's /health (vLLM, llama.cpp, SGLang)."""
        session = self._client()
        timeout = aiohttp.ClientTimeout(total=min(self.health_timeout_s, self.cfg.timeout_s))
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        for url in (self.base_url + "/models", root + "/health"):
            try:
                async with session.get(url, timeout=timeout) as resp:
                    if resp.status == 200:
                        return True
            except (aiohttp.ClientError, OSError):  # TimeoutError is an OSError
                continue
        return False
