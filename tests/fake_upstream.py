"""A local OpenAI/vLLM-compatible upstream with fault injection, for proxy tests and benchmarks.

It speaks the chat-completions protocol as vLLM's OpenAI server does (JSON and Server-Sent
Events, logprobs and top_logprobs, usage, OpenAI error objects) and answers deterministically
from (model, last user message): a canned answer per model, or the answer a recorded trace
(DESIGN.md trace format) gives for that exact prompt, whose `confidence` becomes the logprob
of the answer token and whose `tokens_out` the completion usage. Faults (latency, time to
first token, 5xx, 429 with Retry-After, dropped connections, malformed bodies, hung calls,
stalled streams) are switched at run time through
`/admin/faults`; per-model call counters are at `/admin/stats`.

Endpoints:
    POST   /v1/chat/completions   the chat API (stream or not)
    GET    /v1/models             served models
    GET    /health                200, empty body (as vLLM)
    GET    /admin/faults          current fault specs by key ("*" = every model)
    POST   /admin/faults          set specs: one object or a list; see `FaultSpec`
    DELETE /admin/faults          clear every spec (or only `?model=NAME`)
    GET    /admin/stats           per-model counters
    DELETE /admin/stats           reset the counters
    POST   /admin/answers         set a model's canned answer, or the answer to one prompt;
                                  `samples` (with a canned answer): the answers of further
                                  samples, for controlled disagreement (see below)

Run it: `python -m tests.fake_upstream --host 127.0.0.1 --port 0 [--models a,b] [--traces F]`
prints `listening on http://HOST:PORT` once it accepts connections. In process:
`build_app(...)` returns the `web.Application`, `serve(app)` runs it on a free port.

Logprobs: the content is split into whitespace tokens (each keeps its leading whitespace, so
the tokens concatenate to the content). The last token carries the answer's confidence; every
other token has logprob 0.0, so the sum, the minimum and the last token's logprob all equal the
confidence (for one-token answers, also the first); an answer set with `token_logprobs` (one
number per token, through /admin/answers) sends those instead. Alternatives in `top_logprobs`
share the remaining probability (other letters A-H for a letter token) and are sorted most
likely first, so the chosen token is missing from them when it is not among the k most likely.

Samples: a model given `samples` [s1, s2, ...] with its canned answer a answers from the
cycle [a, s1, s2, ...]: the choices of an `n: k` request are its first k entries, and
successive calls with n = 1 take the next entry each (so k parallel calls get the k answers).

Tool calls: an answer set with `tool_calls` ([{name, arguments}], arguments a JSON string)
answers a request that offers `tools` with those calls (finish_reason `tool_calls`); a
stream sends them as OpenAI does, after any content: per call a delta with its index, id,
type and name, then its arguments in whitespace-token fragments. Each such delta counts as
one token (usage, max_tokens, `stall_stream_after`, `drop_stream_after`). A request without
`tools` gets the content.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from aiohttp import web

from upstreams.common import last_user_text, message_text

DEFAULT_MODELS = ("fake-small", "fake-large")
DEFAULT_ANSWER = "A"
DEFAULT_CONFIDENCE = -0.1
MAX_TOP_LOGPROBS = 20
LOGPROB_FLOOR = -9999.0  # what vLLM sends for -inf
_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
_TOKEN = re.compile(r"\s*\S+")
_LETTERS = "ABCDEFGH"
_ANSWER_FIELDS = frozenset(
    {"model", "answer", "confidence", "prompt", "samples", "token_logprobs", "tool_calls"}
)
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_JSON = "application/json"
MALFORMED_BODY = b'{"id":"chatcmpl-malformed","object":"chat.completion","choices":[{"index"'
MALFORMED_EVENT = b'data: {"id":"chatcmpl-malformed","object":"chat.completion.chunk",\n\n'


def _dumps(obj: Any) -> bytes:
    return _encode(obj).encode("utf-8")


# ---------------------------------------------------------------------------------- answers


def tokenize(content: str) -> list[str]:
    """Whitespace tokens that concatenate back to `content` (leading whitespace kept)."""
    tokens = _TOKEN.findall(content)
    if not tokens:
        return [content] if content else []
    rest = len(content) - sum(map(len, tokens))
    if rest:
        tokens[-1] += content[-rest:]
    return tokens


def _alternatives(token: str, logprob: float, k: int) -> list[dict[str, Any]]:
    """The chosen token plus k-1 alternatives sharing the remaining mass, most likely first."""
    stripped = token.strip()
    lead = token[: len(token) - len(token.lstrip())]
    if len(stripped) == 1 and stripped in _LETTERS:
        others = [lead + c for c in _LETTERS if c != stripped]
    else:
        others = [f"{lead}<alt{i}>" for i in range(1, MAX_TOP_LOGPROBS)]
    rest = max(0.0, 1.0 - math.exp(logprob))
    cands = [(token, logprob)]
    for i, alt in enumerate(others[: k - 1]):
        share = rest / 2.0 ** (i + 1)
        cands.append((alt, math.log(share) if share > 0 else LOGPROB_FLOOR))
    cands.sort(key=lambda c: -c[1])
    return [{"token": t, "logprob": lp, "bytes": list(t.encode("utf-8"))} for t, lp in cands[:k]]


class Answer:
    """One fixed answer: its tokens, their logprobs (cached per k) and the prompt's size."""

    __slots__ = (
        "_lp",
        "completion_tokens",
        "confidence",
        "content",
        "prompt_tokens",
        "token_logprobs",
        "tokens",
        "tool_calls",
    )

    def __init__(
        self,
        content: str,
        confidence: float | None,
        prompt_tokens: int | None = None,
        default: float | None = DEFAULT_CONFIDENCE,
        completion_tokens: int | None = None,
        token_logprobs: list[float] | None = None,
        tool_calls: list[dict[str, str]] | None = None,
    ):
        """`confidence` (null or NaN: `default`) is clamped to [LOGPROB_FLOOR, 0].
        `completion_tokens` (a trace's recorded `tokens_out`) is the usage reported for the
        whole answer; by default its count of whitespace tokens."""
        self.completion_tokens = completion_tokens
        self.content = content
        if default is None or math.isnan(default):
            default = DEFAULT_CONFIDENCE
        conf = default if confidence is None else float(confidence)
        if math.isnan(conf):
            conf = default
        self.confidence = max(LOGPROB_FLOOR, min(0.0, conf))
        self.tokens = tokenize(content)
        self.token_logprobs = token_logprobs  # one per token: sent instead of the default
        self.prompt_tokens = prompt_tokens
        self.tool_calls = tool_calls  # [{name, arguments}]: sent when the request has tools
        self._lp: dict[int, list[dict[str, Any]]] = {}

    def tool_call_objects(self) -> list[dict[str, Any]]:
        """The answer's tool calls as a completion's `message.tool_calls`."""
        return [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for i, c in enumerate(self.tool_calls or ())
        ]  # fmt: skip

    def tool_deltas(self) -> list[dict[str, Any]]:
        """The stream's `delta.tool_calls` fragments (one per list): per call, its head
        (index, id, type, name), then its arguments in whitespace tokens."""
        out: list[dict[str, Any]] = []
        for i, call in enumerate(self.tool_calls or ()):
            head = {"index": i, "id": f"call_{i}", "type": "function"}
            out.append({**head, "function": {"name": call["name"], "arguments": ""}})
            out += [{"index": i, "function": {"arguments": piece}}
                    for piece in tokenize(call["arguments"])]  # fmt: skip
        return out

    def logprobs(self, k: int) -> list[dict[str, Any]]:
        """The `logprobs.content` list with k top alternatives per token (cached; read-only)."""
        cached = self._lp.get(k)
        if cached is None:
            last = len(self.tokens) - 1
            cached = []
            for i, tok in enumerate(self.tokens):
                if self.token_logprobs is not None:
                    lp = float(self.token_logprobs[i])
                else:
                    lp = self.confidence if i == last else 0.0
                cached.append(
                    {
                        "token": tok,
                        "logprob": lp,
                        "bytes": list(tok.encode("utf-8")),
                        "top_logprobs": _alternatives(tok, lp, k) if k else [],
                    }
                )
            self._lp[k] = cached
        return cached


def _usage_tokens(ans: Answer, sent: list[str]) -> int:
    """Completion tokens of one choice: the recorded count for a whole answer, if any."""
    whole = len(sent) == len(ans.tokens)
    return ans.completion_tokens if whole and ans.completion_tokens else len(sent)


def load_trace_answers(
    path: str | os.PathLike[str], default_confidence: float | None = DEFAULT_CONFIDENCE
) -> dict[tuple[str, str], Answer]:
    """Map (model, last user message) -> Answer from a trace JSONL file (first row wins).

    A null confidence becomes `default_confidence`. Models without an answer are skipped;
    a line that is not a JSON object with `messages` and `models` raises ValueError naming
    the file and line.
    """
    table: dict[tuple[str, str], Answer] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompt = last_user_text(row["messages"]) or ""
                models = row["models"]
                if not isinstance(models, dict):
                    raise TypeError("models is not an object")
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a trace row ({exc})") from exc
            for model, rec in models.items():
                if not isinstance(rec, dict) or not isinstance(rec.get("answer"), str):
                    continue
                key = (model, prompt)
                if key not in table:
                    tin, tout = rec.get("tokens_in"), rec.get("tokens_out")
                    table[key] = Answer(
                        rec["answer"],
                        rec.get("confidence"),
                        int(tin) if tin else None,
                        default_confidence,
                        int(tout) if tout else None,
                    )
    return table


# ----------------------------------------------------------------------------------- faults


class FaultError(ValueError):
    """A fault spec that does not validate."""


def _prob(name: str, v: Any) -> float:
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float) and 0.0 <= v <= 1.0:
        return float(v)
    raise FaultError(f"{name} must be true/false or a probability in [0, 1]")


def _nonneg(name: str, v: Any) -> float:
    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 and math.isfinite(v):
        return float(v)
    raise FaultError(f"{name} must be a non-negative number")


def _opt_int(name: str, v: Any, low: int) -> int | None:
    if v is None:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v >= low:
        return v
    raise FaultError(f"{name} must be null or an integer >= {low}")


@dataclass
class FaultSpec:
    """What goes wrong for the calls a spec applies to. Every field is optional.

    Timing: `latency_ms` before any response (also before error responses), `ttft_ms`
    between the stream's headers and its first chunk, `inter_token_ms` between stream chunks.
    Outcomes, drawn in this order with one seeded draw each (none at probability 1), the
    first that fires wins: `drop` (close the connection, no response), `rate_limit` (429 with
    `Retry-After`: `retry_after` seconds, rounded up, and `retry-after-ms`), `error_rate`
    (`error_status`, default 500), `malformed` (200 whose body is not JSON; for streams, an
    event that is not JSON), `hang` (wait `hang_ms`, default 30000, then answer normally: a
    client with a shorter timeout sees a timeout on a random share of calls, which
    `latency_ms` cannot give). Those five take a probability or true/false. Streams only:
    `stall_stream_after` N sends the role chunk and N content chunks, then nothing more,
    without closing, until the client goes away; `drop_stream_after` N sends as many, then
    closes the connection.
    `count` N: the spec covers only the next N calls to its model(s) (every call counts,
    faulted or not), then it is removed. `seed` makes the draws reproducible (default 0).
    """

    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    inter_token_ms: float = 0.0
    drop: float = 0.0
    rate_limit: float = 0.0
    retry_after: float = 1.0
    error_rate: float = 0.0
    error_status: int = 500
    malformed: float = 0.0
    hang: float = 0.0
    hang_ms: float = 30000.0
    stall_stream_after: int | None = None
    drop_stream_after: int | None = None
    count: int | None = None
    seed: int | None = None
    remaining: int | None = field(default=None, init=False, compare=False)
    rng: random.Random = field(default_factory=random.Random, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.remaining = self.count
        self.rng = random.Random(0 if self.seed is None else self.seed)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> FaultSpec:
        """Validate a JSON object (without its `model` key); unknown keys are errors."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise FaultError(f"unknown fault field(s): {', '.join(unknown)}")
        kw: dict[str, Any] = {}
        for name in ("latency_ms", "ttft_ms", "inter_token_ms", "retry_after", "hang_ms"):
            if name in obj:
                kw[name] = _nonneg(name, obj[name])
        for name in ("drop", "rate_limit", "error_rate", "malformed", "hang"):
            if name in obj:
                kw[name] = _prob(name, obj[name])
        if "error_status" in obj:
            st = obj["error_status"]
            if not (isinstance(st, int) and not isinstance(st, bool) and 400 <= st <= 599):
                raise FaultError("error_status must be an HTTP status in 400-599")
            kw["error_status"] = st
        for name in ("stall_stream_after", "drop_stream_after"):
            if name in obj:
                kw[name] = _opt_int(name, obj[name], 0)
        if "count" in obj:
            kw["count"] = _opt_int("count", obj["count"], 1)
        if "seed" in obj:
            kw["seed"] = _opt_int("seed", obj["seed"], -(2**63))
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        out["remaining"] = self.remaining
        return out

    def is_noop(self) -> bool:
        """No fault and no count: setting it clears its key (with a count it shields)."""
        return self.count is None and self == FaultSpec(seed=self.seed)

    def draw(self) -> str | None:
        """The outcome of one call: drop, rate_limit, error, malformed, hang or None."""
        rng = self.rng
        for outcome, p in (
            ("drop", self.drop),
            ("rate_limit", self.rate_limit),
            ("error", self.error_rate),
            ("malformed", self.malformed),
            ("hang", self.hang),
        ):
            if p and (p >= 1.0 or rng.random() < p):
                return outcome
        return None


# ------------------------------------------------------------------------------------ stats

_OUTCOMES = ("error", "rate_limit", "drop", "malformed", "hang", "stall", "drop_stream")


class ModelStats:
    __slots__ = ("calls", "faults", "in_flight", "last_request", "max_in_flight", "ok", "stream")

    def __init__(self) -> None:
        self.calls = 0
        self.stream = 0
        self.ok = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.faults = dict.fromkeys(_OUTCOMES, 0)
        self.last_request: dict[str, Any] | None = None

    def reset(self) -> None:
        in_flight = self.in_flight
        self.__init__()
        self.in_flight = self.max_in_flight = in_flight

    def to_json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "stream": self.stream,
            "ok": self.ok,
            "faults": dict(self.faults),
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "last_request": self.last_request,
        }


# ----------------------------------------------------------------------------------- server


def error_body(message: str, type_: str, param: str | None = None, code: Any = None) -> bytes:
    return _dumps({"error": {"message": message, "type": type_, "param": param, "code": code}})


def _error(status: int, message: str, type_: str, param=None, code=None, headers=None):
    return web.Response(
        status=status,
        body=error_body(message, type_, param, code),
        content_type=_JSON,
        headers=headers,
    )


def _bad(message: str, param: str | None = None, code: str | None = None) -> web.Response:
    return _error(400, message, "invalid_request_error", param, code)


UPSTREAM_KEY: web.AppKey[FakeUpstream] = web.AppKey("fake_upstream")


class FakeUpstream:
    """The server's state: models and answers, fault specs, counters; `app()` serves it."""

    def __init__(
        self,
        models: Iterable[str] | None = None,
        *,
        answer: str = DEFAULT_ANSWER,
        confidence: float | None = DEFAULT_CONFIDENCE,
        answers: Mapping[str, str | tuple[str, float | None]] | None = None,
        traces: Iterable[str | os.PathLike[str]] = (),
        faults: Any = None,
    ) -> None:
        self.default_answer = answer
        self.default_confidence = confidence
        self.table: dict[tuple[str, str], Answer] = {}
        for path in traces:
            for key, ans in load_trace_answers(path, confidence).items():
                self.table.setdefault(key, ans)
        names = list(models or ())
        names += [m for m, _ in self.table if m not in names]
        names += [m for m in answers or () if m not in names]
        if not names:
            names = list(DEFAULT_MODELS)
        self.canned: dict[str, Answer] = {}
        self.stats: dict[str, ModelStats] = {}
        self.created = int(time.time())
        for name in names:
            self.add_model(name)
        for name, spec in (answers or {}).items():
            text, conf = (spec, confidence) if isinstance(spec, str) else spec
            self.canned[name] = Answer(text, conf, default=confidence)
        self.cycles: dict[str, list[Answer]] = {}  # a model's answer and its samples
        self.turns: dict[str, int] = {}  # n = 1 calls served from a model's cycle so far
        self.faults: dict[str, FaultSpec] = {}
        self.bad_requests = 0
        self.closing = asyncio.Event()
        self._ids = itertools.count(1)
        self._id_prefix = f"chatcmpl-{os.getpid():x}{random.getrandbits(24):06x}-"
        if faults is not None:
            self.set_faults(faults)

    # ---- configuration (also used by the admin endpoints)

    @property
    def models(self) -> list[str]:
        return list(self.canned)

    def add_model(self, name: str) -> None:
        if name not in self.canned:
            self.canned[name] = Answer(
                self.default_answer, self.default_confidence, default=self.default_confidence
            )
            self.stats[name] = ModelStats()

    def set_answer(
        self,
        model: str,
        answer: str,
        confidence: float | None,
        prompt: str | None = None,
        samples: list[str] | None = None,
        token_logprobs: list[float] | None = None,
        tool_calls: list[dict[str, str]] | None = None,
    ) -> None:
        """Set the canned answer of `model` (added if new), or its answer to one prompt;
        `samples` (canned only) makes it answer from the cycle [answer, *samples];
        `token_logprobs` are the logprobs of the answer's tokens; `tool_calls` the calls
        it makes when offered tools."""
        self.add_model(model)
        ans = Answer(
            answer,
            confidence,
            default=self.default_confidence,
            token_logprobs=token_logprobs,
            tool_calls=tool_calls,
        )
        if prompt is None:
            self.canned[model] = ans
            self.cycles.pop(model, None)
            self.turns[model] = 0
            if samples:
                extra = [Answer(s, confidence, default=self.default_confidence) for s in samples]
                self.cycles[model] = [ans, *extra]
        else:
            self.table[(model, prompt)] = ans

    def set_faults(self, body: Any) -> None:
        """Set fault specs from a JSON object or a list of them (validated all first).

        Each object may name `model` (a string or a list; "*" or absent = every model); its
        spec replaces the one of that key. A call uses its model's spec if there is one, else
        the "*" spec (never both). An object with neither a fault nor a count clears its key.
        """
        items = body if isinstance(body, list) else [body]
        staged: list[tuple[str, FaultSpec]] = []
        for item in items:
            if not isinstance(item, dict):
                raise FaultError("a fault spec must be a JSON object")
            item = dict(item)
            target = item.pop("model", "*")
            keys = target if isinstance(target, list) else [target]
            for key in keys:
                if not isinstance(key, str) or (key != "*" and key not in self.canned):
                    raise FaultError(f"model {key!r} is not served here")
            spec = FaultSpec.from_json(item)
            staged += [(k, spec if len(keys) == 1 else FaultSpec.from_json(item)) for k in keys]
        for key, spec in staged:
            if spec.is_noop():
                self.faults.pop(key, None)
            else:
                self.faults[key] = spec

    def clear_faults(self, model: str | None = None) -> None:
        if model is None:
            self.faults.clear()
        else:
            self.faults.pop(model, None)

    def stats_json(self) -> dict[str, Any]:
        models = {m: s.to_json() for m, s in self.stats.items()}
        return {
            "calls": sum(s.calls for s in self.stats.values()),
            "bad_requests": self.bad_requests,
            "models": models,
        }

    def reset_stats(self) -> None:
        self.bad_requests = 0
        for s in self.stats.values():
            s.reset()

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024**2)
        app[UPSTREAM_KEY] = self
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/admin/faults", self.get_faults)
        app.router.add_post("/admin/faults", self.post_faults)
        app.router.add_delete("/admin/faults", self.delete_faults)
        app.router.add_get("/admin/stats", self.get_stats)
        app.router.add_delete("/admin/stats", self.delete_stats)
        app.router.add_post("/admin/answers", self.post_answers)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.closing.set()

    async def _sleep(self, ms: float) -> None:
        """Sleep, but wake up at once when the server shuts down."""
        if ms > 0 and not self.closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.closing.wait(), ms / 1000.0)

    # ---- plain endpoints

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def list_models(self, _request: web.Request) -> web.Response:
        data = [
            {
                "id": m,
                "object": "model",
                "created": self.created,
                "owned_by": "fake-upstream",
                "root": m,
                "parent": None,
            }
            for m in self.canned
        ]
        return web.Response(body=_dumps({"object": "list", "data": data}), content_type=_JSON)

    # ---- admin endpoints

    async def _admin_json(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise FaultError("the body is not valid JSON") from exc

    def _faults_response(self) -> web.Response:
        body = {k: s.to_json() for k, s in self.faults.items()}
        return web.Response(body=_dumps(body), content_type=_JSON)

    async def get_faults(self, _request: web.Request) -> web.Response:
        return self._faults_response()

    async def post_faults(self, request: web.Request) -> web.Response:
        try:
            self.set_faults(await self._admin_json(request))
        except FaultError as exc:
            return _bad(str(exc), code="invalid_fault")
        return self._faults_response()

    async def delete_faults(self, request: web.Request) -> web.Response:
        self.clear_faults(request.query.get("model"))
        return self._faults_response()

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.Response(body=_dumps(self.stats_json()), content_type=_JSON)

    async def delete_stats(self, _request: web.Request) -> web.Response:
        self.reset_stats()
        return web.Response(body=_dumps(self.stats_json()), content_type=_JSON)

    async def post_answers(self, request: web.Request) -> web.Response:
        try:
            body = await self._admin_json(request)
        except FaultError as exc:
            return _bad(str(exc))
        items = body if isinstance(body, list) else [body]
        for it in items:
            ok = (
                isinstance(it, dict)
                and isinstance(it.get("model"), str)
                and isinstance(it.get("answer"), str)
                and isinstance(it.get("prompt", ""), str)
                and (
                    it.get("confidence") is None
                    or (
                        isinstance(it["confidence"], int | float)
                        and not isinstance(it["confidence"], bool)
                    )
                )
                and (
                    it.get("samples") is None
                    or (
                        "prompt" not in it
                        and isinstance(it["samples"], list)
                        and all(isinstance(s, str) for s in it["samples"])
                    )
                )
                and (
                    it.get("token_logprobs") is None
                    or (
                        isinstance(it["token_logprobs"], list)
                        and len(it["token_logprobs"]) == len(tokenize(it["answer"]))
                        and all(
                            isinstance(x, int | float) and not isinstance(x, bool) and x <= 0
                            for x in it["token_logprobs"]
                        )
                    )
                )
                and (
                    it.get("tool_calls") is None
                    or (
                        isinstance(it["tool_calls"], list)
                        and all(
                            isinstance(c, dict)
                            and set(c) == {"name", "arguments"}
                            and isinstance(c["name"], str)
                            and isinstance(c["arguments"], str)
                            for c in it["tool_calls"]
                        )
                    )
                )
                and not set(it) - _ANSWER_FIELDS
            )
            if not ok:
                return _bad(
                    "each item needs model and answer (strings), optional confidence "
                    "(number or null), prompt (string) or samples (strings, without a "
                    "prompt), token_logprobs (numbers <= 0, one per whitespace token of "
                    "the answer), tool_calls ([{name, arguments}], strings), nothing else"
                )
        for it in items:
            conf = it.get("confidence", self.default_confidence)
            self.set_answer(
                it["model"],
                it["answer"],
                conf,
                it.get("prompt"),
                it.get("samples"),
                it.get("token_logprobs"),
                it.get("tool_calls"),
            )
        return web.Response(body=_dumps({"models": self.models}), content_type=_JSON)

    # ---- the chat API

    def _parse(self, body: Any) -> web.Response | tuple:
        """Validate a chat request as vLLM does; an error response or the parsed fields."""
        if not isinstance(body, dict):
            return _bad("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _bad("you must provide a model parameter", "model", "missing_required_parameter")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _bad(
                "'messages' must be a non-empty array", "messages", "missing_required_parameter"
            )
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                return _bad(f"messages[{i}] must be an object with a valid role", "messages")
            c = m.get("content")
            if c is not None and not isinstance(c, str | list):
                return _bad(f"messages[{i}].content must be a string or an array", "messages")
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            return _bad("'stream' must be a boolean", "stream")
        logprobs = body.get("logprobs") or False
        if not isinstance(logprobs, bool):
            return _bad("'logprobs' must be a boolean", "logprobs")
        top = body.get("top_logprobs")
        if top is not None:
            if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= 20:
                return _bad("'top_logprobs' must be an integer in [0, 20]", "top_logprobs")
            if not logprobs:
                return _bad("when using `top_logprobs`, `logprobs` must be true", "top_logprobs")
        n = body.get("n")
        n = 1 if n is None else n
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 128:
            return _bad("'n' must be an integer in [1, 128]", "n")
        max_tokens = body.get("max_completion_tokens")
        if max_tokens is None:
            max_tokens = body.get("max_tokens")
        if max_tokens is not None and (
            not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1
        ):
            return _bad("'max_tokens' must be a positive integer", "max_tokens")
        opts = body.get("stream_options")
        if opts is not None:
            if not isinstance(opts, dict):
                return _bad("'stream_options' must be an object", "stream_options")
            if not stream:
                return _bad("Stream options can only be defined when `stream=True`.")
        include_usage = bool(opts and opts.get("include_usage"))
        return model, messages, stream, logprobs, top or 0, n, max_tokens, include_usage

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            self.bad_requests += 1
            return _bad(
                "We could not parse the JSON body of your request. (HINT: This likely means "
                "you aren't using your HTTP library correctly.)",
                code="invalid_json",
            )
        parsed = self._parse(body)
        if isinstance(parsed, web.Response):
            self.bad_requests += 1
            return parsed
        model, messages, stream, logprobs, top, n, max_tokens, include_usage = parsed
        st = self.stats.get(model)
        if st is None:
            self.bad_requests += 1
            return _error(
                404,
                f"The model `{model}` does not exist.",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        st.calls += 1
        st.last_request = body
        if stream:
            st.stream += 1
        st.in_flight += 1
        if st.in_flight > st.max_in_flight:
            st.max_in_flight = st.in_flight
        try:
            spec = None
            if self.faults:
                spec = self.faults.get(model) or self.faults.get("*")
                if spec is not None and spec.remaining is not None:
                    spec.remaining -= 1
                    if spec.remaining <= 0:
                        key = model if self.faults.get(model) is spec else "*"
                        del self.faults[key]
            if spec is not None:
                if spec.latency_ms:
                    await self._sleep(spec.latency_ms)
                outcome = spec.draw()
                if outcome is not None:
                    st.faults[outcome] += 1
                    if outcome != "hang":
                        return self._fault(request, outcome, spec, stream)
                    await self._sleep(spec.hang_ms)  # then the normal answer, late
            prompt = last_user_text(messages) or ""
            ans = self.table.get((model, prompt)) or self.canned[model]
            cycle = None if (model, prompt) in self.table else self.cycles.get(model)
            if cycle is not None:
                turn = self.turns.get(model, 0)
                self.turns[model] = turn + n
                if n == 1:
                    ans = cycle[turn % len(cycle)]
                else:
                    st.ok += 1
                    body = self._completion(model, ans, 0, logprobs, top, n, max_tokens, cycle)
                    body["usage"]["prompt_tokens"] = sum(
                        len(message_text(m.get("content")).split()) for m in messages
                    )
                    body["usage"]["total_tokens"] += body["usage"]["prompt_tokens"]
                    return web.Response(body=_dumps(body), content_type=_JSON)
            if ans.prompt_tokens is not None:
                prompt_tokens = ans.prompt_tokens
            else:
                prompt_tokens = sum(len(message_text(m.get("content")).split()) for m in messages)
            args = (model, ans, prompt_tokens, logprobs, top, n, max_tokens)
            tools = bool(body.get("tools"))  # the answer's tool calls are made when offered
            if stream:
                return await self._stream(request, st, spec, include_usage, *args, tools=tools)
            st.ok += 1
            answer = self._completion(*args, tools=tools)
            return web.Response(body=_dumps(answer), content_type=_JSON)
        finally:
            st.in_flight -= 1

    def _fault(
        self, request: web.Request, outcome: str, spec: FaultSpec, stream: bool
    ) -> web.Response:
        if outcome == "drop":
            self._close(request)
            return web.Response(status=500)  # never sent: the connection is gone
        if outcome == "rate_limit":
            secs = spec.retry_after
            headers = {
                "Retry-After": str(math.ceil(secs)),
                "retry-after-ms": str(round(secs * 1000)),
            }
            return _error(
                429,
                "Rate limit reached for requests. Please try again later.",
                "requests",
                None,
                "rate_limit_exceeded",
                headers,
            )
        if outcome == "error":
            status = spec.error_status
            msg = "The server is overloaded." if status == 503 else "The server had an error."
            return _error(status, msg, "server_error" if status >= 500 else "invalid_request_error")
        # malformed
        if stream:
            return web.Response(
                body=MALFORMED_EVENT + b"data: [DONE]\n\n", content_type="text/event-stream"
            )
        return web.Response(body=MALFORMED_BODY, content_type=_JSON)

    @staticmethod
    def _close(request: web.Request) -> None:
        transport = request.transport
        if transport is not None:
            transport.abort()

    def _next_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    def _completion(self, model, ans: Answer, prompt_tokens, logprobs, top, n, max_tokens,
                    cycle: list[Answer] | None = None, tools: bool = False):  # fmt: skip
        """A completion of n choices: each `ans`, or the first n entries of `cycle`; with
        `tools` offered, an answer's tool calls too."""
        choices, completion_tokens = [], 0
        for i in range(n):
            one = cycle[i % len(cycle)] if cycle else ans
            tokens = one.tokens
            finish = "stop"
            content = one.content
            lps = one.logprobs(top) if logprobs else None
            if max_tokens is not None and len(tokens) > max_tokens:
                tokens = tokens[:max_tokens]
                content = "".join(tokens)
                finish = "length"
                if lps is not None:
                    lps = lps[:max_tokens]
            calls = one.tool_call_objects() if tools else []
            if calls:
                content, finish = content or None, "tool_calls"
                completion_tokens += len(one.tool_deltas())
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": content, "tool_calls": calls},
                    "logprobs": {"content": lps} if logprobs else None,
                    "finish_reason": finish,
                    "stop_reason": None,
                }
            )
            completion_tokens += _usage_tokens(one, tokens)
        return {
            "id": self._next_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    async def _stream(
        self,
        request: web.Request,
        st: ModelStats,
        spec: FaultSpec | None,
        include_usage: bool,
        model: str,
        ans: Answer,
        prompt_tokens: int,
        logprobs: bool,
        top: int,
        n: int,
        max_tokens: int | None,
        *,
        tools: bool = False,
    ) -> web.StreamResponse:
        """The answer's deltas: its content tokens, then (with `tools` offered) its tool
        call fragments, each one token."""
        deltas: list[dict[str, Any]] = [{"content": tok} for tok in ans.tokens]
        finish = "stop"
        if tools and ans.tool_calls:
            deltas += [{"tool_calls": [frag]} for frag in ans.tool_deltas()]
            finish = "tool_calls"
        if max_tokens is not None and len(deltas) > max_tokens:
            deltas = deltas[:max_tokens]
            finish = "length"
        tokens = [d.get("content") or "" for d in deltas]
        lps = ans.logprobs(top) if logprobs else None
        head = {"id": self._next_id(), "object": "chat.completion.chunk"}
        head["created"] = int(time.time())
        head["model"] = model

        def event(index: int, delta: dict, lp: Any, fr: str | None) -> bytes:
            chunk = dict(head)
            chunk["choices"] = [
                {"index": index, "delta": delta, "logprobs": lp, "finish_reason": fr}
            ]
            if include_usage:
                chunk["usage"] = None
            return b"data: " + _dumps(chunk) + b"\n\n"

        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        ttft = spec.ttft_ms if spec else 0.0
        gap = spec.inter_token_ms if spec else 0.0
        stall = spec.stall_stream_after if spec else None
        cut = spec.drop_stream_after if spec else None
        if ttft:
            await self._sleep(ttft)
        buf = [event(i, {"role": "assistant", "content": ""}, None, None) for i in range(n)]
        for t in range(len(deltas)):
            if t in (stall, cut):
                await resp.write(b"".join(buf))
                return await self._break_stream(request, st, resp, stall=t == stall)
            if gap and t:
                await resp.write(b"".join(buf))
                buf.clear()
                await self._sleep(gap)
            lp = {"content": [lps[t]]} if lps is not None and t < len(lps) else None
            buf.extend(event(i, deltas[t], lp, None) for i in range(n))
        if stall is not None or cut is not None:  # past the last token: before the finish
            await resp.write(b"".join(buf))
            return await self._break_stream(request, st, resp, stall=stall is not None)
        buf.extend(event(i, {}, None, finish) for i in range(n))
        if include_usage:
            completion_tokens = _usage_tokens(ans, tokens) * n
            usage = {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            }
            buf.append(b"data: " + _dumps({**head, "choices": [], "usage": usage}) + b"\n\n")
        buf.append(b"data: [DONE]\n\n")
        await resp.write(b"".join(buf))
        await resp.write_eof()
        st.ok += 1
        return resp

    async def _break_stream(
        self, request: web.Request, st: ModelStats, resp: web.StreamResponse, *, stall: bool
    ) -> web.StreamResponse:
        """Stall (hold the connection open, silent) or cut a stream; never finish it."""
        st.faults["stall" if stall else "drop_stream"] += 1
        if stall:
            while not self.closing.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), 0.05)
        self._close(request)
        return resp


def build_app(
    models: Iterable[str] | None = None,
    *,
    answer: str = DEFAULT_ANSWER,
    confidence: float | None = DEFAULT_CONFIDENCE,
    answers: Mapping[str, str | tuple[str, float | None]] | None = None,
    traces: Iterable[str | os.PathLike[str]] = (),
    faults: Any = None,
) -> web.Application:
    """The aiohttp application; its state is `app[UPSTREAM_KEY]` (a `FakeUpstream`).

    `answers` maps a model to its canned answer, or to (answer, confidence); models
    default to the ones named anywhere (models, traces, answers), else DEFAULT_MODELS.
    """
    return FakeUpstream(
        models, answer=answer, confidence=confidence, answers=answers, traces=traces, faults=faults
    ).app()


@dataclass
class RunningUpstream:
    url: str  # http://host:port (no /v1)
    port: int
    app: web.Application
    runner: web.AppRunner

    @property
    def state(self) -> FakeUpstream:
        return self.app[UPSTREAM_KEY]


async def start(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> RunningUpstream:
    """Serve `app` (port 0: a free one); stop it with `await running.runner.cleanup()`."""
    # handler_cancellation: a caller that hangs up cancels the handler, as in a real server
    # that stops generating, so in_flight shows whether a proxy really cancelled its call
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    url_host = f"[{host}]" if ":" in host else host
    return RunningUpstream(f"http://{url_host}:{bound}", bound, app, runner)


@contextlib.asynccontextmanager
async def serve(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningUpstream]:
    """`async with serve(build_app()) as up:` then talk to `up.url`."""
    running = await start(app, host, port)
    try:
        yield running
    finally:
        await running.runner.cleanup()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tests.fake_upstream",
        description="A local OpenAI/vLLM-compatible chat server with fault injection.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--models", default="", help="comma-separated model names")
    p.add_argument(
        "--traces",
        action="append",
        default=[],
        metavar="FILE",
        help="trace JSONL (DESIGN.md format) to answer from; repeatable",
    )
    p.add_argument("--answer", default=DEFAULT_ANSWER, help="canned answer for other prompts")
    p.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE)
    p.add_argument("--faults", default=None, help="initial faults (JSON, as POST /admin/faults)")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> None:
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    faults = json.loads(args.faults) if args.faults else None
    app = build_app(
        models, answer=args.answer, confidence=args.confidence, traces=args.traces, faults=faults
    )
    running = await start(app, args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {running.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await running.runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        asyncio.run(_main(args))
    except (ValueError, FaultError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
