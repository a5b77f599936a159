"""What every backend returns and promises: one upstream call, answered or failed.

A backend never raises for an upstream fault: a timeout, a 5xx after retries, a 429, a
dropped connection or a malformed body all come back as a `CallResult` with `error` set, so
the cascade engine can treat a failed node as explored-without-answer and go on (DESIGN.md,
request path). Only programming errors raise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class CallResult:
    """One call to one model. `text` is None when the call failed (see `error`)."""

    model: str
    text: str | None
    confidence: float | None = None  # raw signal, <= 0: recorded (replay) or from logprobs
    token_logprobs: list[tuple[str, float]] | None = None  # (token, logprob) as returned
    # mean, min, q05, q25 of the token logprobs, when recorded (replay) rather than returned
    logprob_summary: tuple[float, float, float, float] | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    cost_usd: float | None = None  # None: no known price (never silently 0)
    latency_ms: float = 0.0
    ttft_ms: float | None = None  # streams only
    finish_reason: str | None = None
    status: int | None = None  # last upstream HTTP status (None: no response)
    error: str | None = None  # short machine-readable kind: timeout, http_500, ...
    error_detail: str | None = None
    attempts: int = 1  # upstream attempts, retries included
    served_model: str | None = None  # the name the upstream reported
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


@dataclass
class StreamChunk:
    """A piece of a live (passthrough) stream: a content delta and/or tool-call fragments,
    or the closing result. The fragments are OpenAI's `delta.tool_calls` as the upstream
    sent them ({index, id?, type?, function: {name?, arguments?}}), relayed so a client
    assembles them as from OpenAI; the closing result carries them assembled in
    `extra["tool_calls"]`, as a non-streamed call does."""

    delta: str = ""
    done: CallResult | None = None  # set on the last chunk only
    tool_calls: list[dict[str, Any]] | None = None


class Backend(Protocol):
    """One configured model."""

    name: str

    async def complete(self, messages: list[dict], params: dict) -> CallResult:
        """Answer `messages`; `params` are the client's OpenAI sampling parameters
        (temperature, max_tokens, ...) to forward. Never raises for upstream faults."""
        ...

    def stream(self, messages: list[dict], params: dict) -> AsyncIterator[StreamChunk]:
        """Stream the answer live; the last chunk carries the CallResult (error set if the
        stream failed or its first token did not arrive within the TTFT timeout)."""
        ...

    async def health(self) -> bool:
        """True when the upstream answers its health or models endpoint."""
        ...

    async def aclose(self) -> None: ...
