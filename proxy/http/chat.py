"""`POST /v1/chat/completions`: the path of one chat request.

The key and the body are checked against the contract (proxy/http/contract.py) before
anything is spent. A cascade's engine then walks its policy (proxy/engine/cascade.py), the
answer is sent as JSON or as SSE (proxy/http/responses.py) and the request goes to the
ledger (proxy/engine/recording.py); a configured model's request is passed through. A
client that hangs up, or the request timeout, cancels the upstream calls in flight
(proxy/http/watch.py). Errors are raised; proxy/http/errors.py turns them into responses.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response

from policies.errors import CascadeError
from proxy.engine.cascade import CascadeRun, LoadedPolicy
from proxy.engine.recording import LedgerEntry
from proxy.http import metrics
from proxy.http.contract import ChatRequest, authenticate, check_chat_request, read_json
from proxy.http.errors import ApiError, as_api_error
from proxy.http.keys import WorstCase, admit, hold_judge
from proxy.http.responses import (
    FastJSONResponse,
    all_failed,
    call_failed,
    cascade_headers,
    completion,
    stream_live,
    stream_text,
)
from proxy.http.state import ProxyState
from proxy.http.watch import until_disconnect
from upstreams.base import CallResult
from upstreams.common import FORWARDED_PARAMS
from upstreams.settings import ModelConfig

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Asked:
    """A checked request: the contract's view, and what is forwarded as the client sent it."""

    chat: ChatRequest
    messages: list[dict]
    params: dict  # the OpenAI sampling parameters an upstream may see
    key: str | None


async def chat_completions(request: Request) -> Response:
    """A cascade's decided answer, or a configured model's (passthrough)."""
    state: ProxyState = request.app.state.proxy
    # 96 random bits from the (per-process seeded) Mersenne twister: no syscall per request
    request_id = request.state.request_id = f"chatcmpl-{random.getrandbits(96):024x}"
    key = authenticate(request, state.client_keys, state.admin_key, state.key_check)
    body = await read_json(request, state.config.server.max_body_bytes)
    chat = check_chat_request(body)
    params = {k: v for k, v in body.items() if k in FORWARDED_PARAMS}
    asked = Asked(chat, body["messages"], params, key)
    entry = LedgerEntry(state, request_id, key, chat.model, chat.stream)
    known = chat.model in state.engines or chat.model in state.backends
    # a cascade's policy snapshot: the budget prices it and the engine runs it, so a reload
    # between admission and the run cannot make the request walk a plan that was not priced
    engine = state.engines.get(chat.model)
    loaded = engine.current if engine is not None else None
    worst = admit(request, state, chat, asked.messages, request_id, key, loaded) if known else None
    try:
        if engine is not None:
            response = await _cascade(request, state, asked, entry, loaded, worst)
        elif chat.model in state.backends:
            response = await _passthrough(request, state, asked, entry)
    except BaseException:
        if worst is not None:
            state.keys.release(request_id)  # nothing was ledgered, or it was and ended it
        raise
    if known:
        if worst is not None and worst.unpriced:  # counted 0 in the budget: say so
            response.headers["x-cascade-budget-unpriced"] = ",".join(worst.unpriced)
        return response
    raise ApiError(
        404,
        f"The model '{chat.model}' does not exist: use a cascade "
        f"({', '.join(sorted(state.engines)) or 'none'}) or a configured model "
        f"({', '.join(sorted(state.backends))})",
        param="model",
        code="model_not_found",
    )


async def _cascade(
    request: Request,
    state: ProxyState,
    asked: Asked,
    entry: LedgerEntry,
    loaded: LoadedPolicy | None,
    worst: WorstCase | None,
) -> Response:
    """The engine decides (with the policy snapshot `loaded` admission priced), then
    answers. Every ending is counted once in the metrics under the status the client gets,
    and every run that called a model is ledgered."""
    run = state.engines[asked.chat.model].new_run(loaded)
    try:
        response = await _decide(request, state, asked, entry, run, loaded, worst)
    except CascadeError as exc:
        metrics.record_run(run, as_api_error(exc).status)
        raise
    metrics.record_run(run, 200)
    return response


async def _decide(
    request: Request,
    state: ProxyState,
    asked: Asked,
    entry: LedgerEntry,
    run: CascadeRun,
    loaded: LoadedPolicy | None,
    worst: WorstCase | None,
) -> Response:
    chat, messages, key = asked.chat, asked.messages, asked.key
    name, overrides = chat.model, chat.overrides
    if chat.n is not None and chat.n > 1:
        raise ApiError(
            400,
            f"'{name}' is a cascade: it returns one decided answer, so n must be 1 "
            f"(not {chat.n}); ask a model by name for n choices",
            param="n",
            code="n_not_supported",
        )
    rate = state.config.cascades[name].explore_rate
    explore = rate > 0 and random.random() < rate
    engine = state.engines[name]
    work = engine.run(messages, asked.params, overrides, run, explore=explore, loaded=loaded)
    try:
        await until_disconnect(request, work, state.config.server.request_timeout_s)
    except ApiError as exc:  # hung up or timed out: keep what was spent
        entry.cascade_done(run, exc.status, exc.code)
        raise
    if not run.calls:
        raise ApiError(
            400,
            f"cascade.max_cost_usd={overrides.max_cost_usd} is below the expected "
            "cost of every model of the cascade",
            param="cascade.max_cost_usd",
            code="budget_too_small",
        )
    if run.answer is None:
        error = all_failed(run)  # a 502, or a 400 for a prompt no trace recorded
        entry.cascade_done(run, error.status, error.code)
        raise error
    explorer = state.explorer if run.explored_all else None
    # the judge's part of the reservation outlives the record, which ends the rest of it:
    # the explorer releases it once the judge's calls are recorded (or it failed)
    release = hold_judge(state, entry.request_id, worst) if explorer is not None else None
    try:
        entry.cascade_done(run, 200, None)
        if explorer is not None:
            await explorer.record(entry.request_id, key, name, messages, run, release)
    except BaseException:
        if release is not None:
            release()
        raise
    payload = completion(entry.request_id, run.answer.result, run, state)
    headers = cascade_headers(entry.request_id, run)
    if chat.stream:
        return stream_text(entry.request_id, payload, chat.include_usage, headers)
    return FastJSONResponse(payload, headers=headers)


async def _passthrough(
    request: Request, state: ProxyState, asked: Asked, entry: LedgerEntry
) -> Response:
    """A configured model answers, as it would without the proxy (streams live)."""
    chat, messages, params = asked.chat, asked.messages, asked.params
    model = chat.model
    backend = state.backends[model]
    if chat.n is not None and chat.n > 1:
        params["n"] = _choices_count(model, chat.n, chat.stream, state.config.models[model])
    deadline_s = state.config.server.request_timeout_s
    if chat.stream:
        return stream_live(
            entry.request_id,
            model,
            backend,
            messages,
            params,
            chat.include_usage,
            entry,
            deadline_s,
        )
    try:
        result = await until_disconnect(request, backend.complete(messages, params), deadline_s)
    except ApiError as exc:  # the client hung up, or the deadline passed, mid-call
        gone = CallResult(model=model, text=None, error=exc.code)
        entry.call_done(model, gone, exc.status, exc.code)
        raise
    metrics.record_call(model, result)
    if not result.ok:
        error = call_failed(model, result)
        entry.call_done(model, result, error.status, error.code)
        raise error
    entry.call_done(model, result, 200, None)
    headers = {"x-request-id": entry.request_id, "x-cascade-model": model}
    if result.cost_usd is not None:
        headers["x-cascade-cost-usd"] = f"{result.cost_usd:.8f}"
    return FastJSONResponse(completion(entry.request_id, result, None, state), headers=headers)


def _choices_count(model: str, n: int, stream: bool, cfg: ModelConfig) -> int:
    """`n` for a passthrough call, or why not: a stream relays one choice, and a replayed
    model has one recorded answer per prompt."""
    why = None
    if stream:
        why = "streaming returns one choice: ask without stream for n choices"
    elif cfg.backend == "replay":
        why = f"'{model}' replays recorded traces, which hold one answer per prompt"
    if why is not None:
        message = f"n={n} is not supported here: {why}"
        raise ApiError(400, message, param="n", code="n_not_supported")
    return n
