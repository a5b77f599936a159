"""What the backends share: request parameters to forward, pricing, token counting, the
Retry-After header, and the text of a message."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping
from typing import Any

from upstreams.base import CallResult
from upstreams.pricing import PricingError, count_message_tokens, count_tokens, lookup_price
from upstreams.settings import ModelConfig

# OpenAI chat parameters, plus the sampling extras vLLM and SGLang accept, that a client may
# set. Everything else (stream, cascade, model, messages, logprobs, unknown keys) is dropped;
# `n` is forwarded only when the caller sets it (the proxy does for a passthrough model).
FORWARDED_PARAMS = frozenset(
    {
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "reasoning_effort",
        # vLLM / SGLang sampling extras
        "top_k",
        "min_p",
        "repetition_penalty",
        "min_tokens",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "include_stop_str_in_output",
    }
)
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


DETAIL_CHARS = 300  # an upstream's error text kept in a result (and the ledger)


def failed_result(
    name: str,
    kind: str,
    detail: str,
    *,
    secret: str | None,
    pricer: Pricer,
    start: float,
    status: int | None = None,
    attempts: int = 1,
    extra: dict[str, Any] | None = None,
) -> CallResult:
    """A failed call as every backend reports it. The detail has the upstream key masked,
    then is cut: an upstream that echoes the key it was sent (some do, in 401s) must not put
    it in the ledger or a client's error, and masking first means a key cut in half by the
    length limit is not half kept. The cost is what a failure costs (Pricer.failed_cost)."""
    if secret:
        detail = detail.replace(secret, "[redacted]")
    latency_ms = (time.perf_counter() - start) * 1000.0
    return CallResult(
        model=name,
        text=None,
        error=kind,
        error_detail=f"{name}: {detail[:DETAIL_CHARS]}",
        cost_usd=pricer.failed_cost(latency_ms),
        latency_ms=latency_ms,
        status=status,
        attempts=attempts,
        extra=extra or {},
    )


def forward_params(params: Mapping[str, Any] | None, logprobs: bool) -> dict[str, Any]:
    """The client's parameters an upstream may see (None values dropped), `n` as given (a
    passthrough request's; a cascade refuses n > 1 before any call), and
    `logprobs: true, top_logprobs: 1` when the model is configured to return logprobs."""
    out = {k: v for k, v in (params or {}).items() if k in FORWARDED_PARAMS and v is not None}
    if params and params.get("n") is not None:
        out["n"] = params["n"]
    if logprobs:
        out["logprobs"] = True
        out["top_logprobs"] = 1
    return out


def choice_object(index: int, content: str | None, finish_reason: str | None,
                  tool_calls: Any = None) -> dict[str, Any]:  # fmt: skip
    """One choice of a chat completion as the proxy returns it: for the `n` choices of a
    passthrough call (`CallResult.extra["choices"]`)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "index": index,
        "message": message,
        "logprobs": None,
        "finish_reason": finish_reason or "stop",
    }


def tool_delta_text(fragments: list[dict[str, Any]]) -> str:
    """The text streamed tool-call fragments carry (function names and argument pieces):
    what the model generated, to count as tokens when the upstream reports no usage."""
    out = []
    for frag in fragments:
        fn = frag.get("function") or {}
        out.append((fn.get("name") or "") + (fn.get("arguments") or ""))
    return "".join(out)


def merge_tool_deltas(calls: dict[int, dict[str, Any]], fragments: list[dict[str, Any]]) -> None:
    """Fold streamed `delta.tool_calls` fragments into `calls` (by index), as OpenAI's SDKs
    accumulate them: id and type set, name and arguments concatenated."""
    for frag in fragments:
        index = frag.get("index")
        call = calls.setdefault(
            index if isinstance(index, int) else len(calls),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if frag.get("id"):
            call["id"] = frag["id"]
        if frag.get("type"):
            call["type"] = frag["type"]
        fn = frag.get("function") or {}
        call["function"]["name"] += fn.get("name") or ""
        call["function"]["arguments"] += fn.get("arguments") or ""


def assembled_tool_calls(calls: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """The merged calls in index order: a completion's `message.tool_calls`."""
    return [calls[i] for i in sorted(calls)]


def valid_tool_deltas(value: Any) -> list[dict[str, Any]] | None:
    """A delta's `tool_calls` when it holds fragments (None or [] when absent, as some
    servers send); a TypeError when it is not a list of objects with object functions."""
    if not value:
        return None
    if not isinstance(value, list) or not all(
        isinstance(f, dict) and isinstance(f.get("function") or {}, dict) for f in value
    ):
        raise TypeError("delta.tool_calls is not a list of tool-call objects")
    return value


def message_text(content: Any) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


def last_user_text(messages: list[dict]) -> str | None:
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            return message_text(m.get("content"))
    return None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `Retry-After` (seconds or an HTTP date);
    None when absent or unreadable. `headers` must be case-insensitive (as aiohttp's)."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
            if value >= 0:
                return value
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if not ra:
        return None
    try:
        value = float(ra)
        return value if value >= 0 else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


async def count_usage(
    messages: list[dict], text: str | None, tokens_in: int | None, tokens_out: int | None
) -> tuple[int, int]:
    """Fill missing token counts with tiktoken (in a thread: the first use loads litellm)."""
    if tokens_in is not None and tokens_out is not None:
        return tokens_in, tokens_out

    def count() -> tuple[int, int]:
        tin = tokens_in if tokens_in is not None else count_message_tokens(messages)
        tout = tokens_out if tokens_out is not None else count_tokens(text)
        return tin, tout

    return await asyncio.to_thread(count)


_UNRESOLVED = object()


class Pricer:
    """What one call costs: the configured prices per million tokens; else, for a self-hosted
    model with a GPU hourly rate, that rate times the call's busy time; else litellm's
    offline price map under any of `names`; None (never 0) when unknown."""

    def __init__(self, cfg: ModelConfig, names: list[str]):
        self.names = names
        self.gpu_hourly_usd = cfg.gpu_hourly_usd
        self.price_in = None if cfg.price_in_per_mtok is None else cfg.price_in_per_mtok / 1e6
        self.price_out = None if cfg.price_out_per_mtok is None else cfg.price_out_per_mtok / 1e6
        self._looked_up: Any = _UNRESOLVED

    @property
    def configured(self) -> bool:
        return self.price_in is not None and self.price_out is not None

    def _lookup(self) -> tuple[float, float] | None:
        for name in self.names:
            try:
                _, pin, pout = lookup_price(name)
                return pin, pout
            except PricingError:
                continue
        return None

    async def prices(self) -> tuple[float, float] | None:
        if self._looked_up is _UNRESOLVED and (self.price_in is None or self.price_out is None):
            # litellm's import takes seconds: keep it off the event loop
            self._looked_up = await asyncio.to_thread(self._lookup)
        return self._merged()

    def _merged(self) -> tuple[float, float] | None:
        """The configured prices, each missing one from the looked-up pair."""
        if self.price_in is not None and self.price_out is not None:
            return self.price_in, self.price_out
        found = self._looked_up
        if found is None or found is _UNRESOLVED:
            return None
        pin = self.price_in if self.price_in is not None else found[0]
        pout = self.price_out if self.price_out is not None else found[1]
        return pin, pout

    def failed_cost(self, busy_ms: float) -> float | None:
        """What a failed call that returned no token cost: nothing for a token-priced model
        (no tokens were billed), the busy time for a GPU-hourly one, None when the price is
        unknown (a failure must not make a priced model look unpriced in the reports). A
        call that broke after some tokens is priced by `charge_partial`."""
        if not self.configured and self.gpu_hourly_usd is not None:
            return self.gpu_hourly_usd * busy_ms / 3_600_000.0
        if self.configured:
            return 0.0
        if self._looked_up is _UNRESOLVED:
            self._looked_up = self._lookup()  # litellm was imported at startup (warm_up)
        return None if self._looked_up is None else 0.0

    def token_prices_now(self) -> tuple[float, float] | None:
        """`prices()` without awaiting (litellm was imported at startup, by warm_up): for a
        failure path that may not await (a stream whose client hung up is being cancelled).
        None for a GPU-hourly model (its busy time is its cost) or an unknown price."""
        if not self.configured and self.gpu_hourly_usd is not None:
            return None
        if self._looked_up is _UNRESOLVED and (self.price_in is None or self.price_out is None):
            self._looked_up = self._lookup()
        return self._merged()

    async def cost(
        self, tokens_in: int | None, tokens_out: int | None, busy_ms: float | None = None
    ) -> float | None:
        if not self.configured and self.gpu_hourly_usd is not None and busy_ms is not None:
            return self.gpu_hourly_usd * busy_ms / 3_600_000.0
        if tokens_in is None or tokens_out is None:
            return None
        prices = await self.prices()
        if prices is None:
            return None
        return tokens_in * prices[0] + tokens_out * prices[1]


def charge_partial(
    result: CallResult, pricer: Pricer, messages: list[dict], params: dict | None, text: str
) -> CallResult:
    """Give a failed call that returned `text` before it broke (a stream cut, timed out or
    ended by an error event after its first token) the tokens it returned and their cost:
    a provider bills the tokens it generated and a self-hosted model spent the compute, so
    a $0 row would under-count the spend the budgets follow. The error stays recorded.
    Counted as every estimate here is: the prompt as `count_message_tokens`, the text with
    tiktoken, capped at the request's `max_tokens` (nothing more is generated or billed).
    A GPU-hourly model keeps its busy-time cost; an unknown price stays None. Synchronous
    (tiktoken is loaded at startup): run it in a thread where the prompt may be long."""
    if not text:
        return result
    tokens_in = count_message_tokens(messages)
    tokens_out = count_tokens(text)
    cap = (params or {}).get("max_completion_tokens") or (params or {}).get("max_tokens")
    if isinstance(cap, int) and cap > 0:
        tokens_out = min(tokens_out, cap)
    result.tokens_in, result.tokens_out = tokens_in, tokens_out
    result.extra["partial_text"] = text
    prices = pricer.token_prices_now()
    if prices is not None:
        result.cost_usd = tokens_in * prices[0] + tokens_out * prices[1]
    return result
