"""Backends over real HTTP against the in-process fake upstream (tests/fake_upstream.py):
the openai backend (retries, Retry-After, timeouts, drops, malformed bodies, circuit breaker,
streaming with TTFT and stall timeouts), the replay backend, and the litellm backend through
litellm's OpenAI-compatible route."""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web

from proxy import demo
from tests.fake_upstream import FakeUpstream, build_app, serve
from upstreams.base import Backend, CallResult, StreamChunk
from upstreams.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from upstreams.common import forward_params, parse_retry_after
from upstreams.factory import make_backend
from upstreams.litellm_backend import LiteLLMBackend
from upstreams.openai_compat import OpenAIBackend
from upstreams.pricing import count_message_tokens, count_tokens, lookup_price
from upstreams.replay import ReplayBackend
from upstreams.settings import ModelConfig

pytestmark = pytest.mark.anyio

ANSWER = "The answer is B"  # fake-small: tokens "The", " answer", " is", " B"
CONF = -0.7
PROMPT = "Which letter comes after A?"  # the fake counts prompt tokens as words: 5
MSGS = [{"role": "user", "content": PROMPT}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Fake:
    url: str  # http://host:port, without /v1
    state: FakeUpstream
    auth: list[str | None]  # Authorization header of every request

    def calls(self, model: str = "fake-small") -> int:
        return self.state.stats[model].calls

    def last_request(self, model: str = "fake-small") -> dict:
        return self.state.stats[model].last_request


@pytest.fixture
async def fake() -> AsyncIterator[Fake]:
    app = build_app(
        ["fake-small", "gpt-4o-mini"],
        answers={"fake-small": (ANSWER, CONF), "gpt-4o-mini": ("Paris", -0.2)},
    )
    auth: list[str | None] = []

    @web.middleware
    async def record_auth(request: web.Request, handler):
        auth.append(request.headers.get("Authorization"))
        return await handler(request)

    app.middlewares.append(record_auth)
    async with serve(app) as up:
        yield Fake(up.url, up.state, auth)


@pytest.fixture
async def made() -> AsyncIterator[list]:
    """Backends created by a test, closed after it."""
    backends: list = []
    yield backends
    for b in backends:
        await b.aclose()


def openai(made: list, fake: Fake, model: str = "fake-small", **kw) -> OpenAIBackend:
    """An openai backend on the fake upstream with tiny backoff; `kw` mixes ModelConfig fields
    and OpenAIBackend keyword arguments."""
    extra = {k: kw.pop(k) for k in ("breaker", "backoff_base_s", "max_retry_after_s") if k in kw}
    extra.setdefault("backoff_base_s", 0.001)
    kw.setdefault("timeout_s", 5.0)
    cfg = ModelConfig(backend="openai", base_url=fake.url + "/v1", model=model, **kw)
    backend = OpenAIBackend("node", cfg, **extra)
    made.append(backend)
    return backend


async def drain(
    stream: AsyncIterator[StreamChunk], fragments: list[dict] | None = None
) -> tuple[list[str], CallResult]:
    """The content deltas and the closing result; tool-call fragments go to `fragments`."""
    deltas: list[str] = []
    done = None
    async for chunk in stream:
        assert done is None, "nothing may follow the closing chunk"
        if chunk.done is not None:
            done = chunk.done
        else:
            assert chunk.delta or chunk.tool_calls
            if chunk.delta:
                deltas.append(chunk.delta)
            if fragments is not None:
                fragments.extend(chunk.tool_calls or ())
    assert done is not None, "a stream always ends with its CallResult"
    return deltas, done


# ------------------------------------------------------------------------- openai: normal


async def test_complete_returns_text_logprobs_tokens_and_configured_cost(fake, made, monkeypatch):
    monkeypatch.setenv("CASCADE_TEST_UPSTREAM_KEY", "sekrit")
    b = openai(
        made,
        fake,
        price_in_per_mtok=1.0,
        price_out_per_mtok=2.0,
        api_key_env="CASCADE_TEST_UPSTREAM_KEY",
    )
    params = {"temperature": 0.2, "max_tokens": 64, "n": 3, "stream": True, "cascade": {"x": 1}}
    params |= {"unknown_thing": 1, "seed": 7, "stop": ["\n\n"]}
    r = await b.complete(MSGS, params)
    assert r.ok and r.error is None
    assert r.text == ANSWER
    assert r.token_logprobs == [("The", 0.0), (" answer", 0.0), (" is", 0.0), (" B", CONF)]
    # n is forwarded (the proxy sets it for a passthrough model only): the usage and the
    # cost cover the three choices, all of them kept for the response
    assert (r.tokens_in, r.tokens_out) == (5, 3 * 4)
    assert r.cost_usd == pytest.approx(5 * 1e-6 + 3 * 4 * 2e-6)
    assert [(c["index"], c["message"]["content"]) for c in r.extra["choices"]] == [
        (i, ANSWER) for i in range(3)
    ]
    assert r.model == "node" and r.served_model == "fake-small"
    assert (r.status, r.attempts, r.finish_reason) == (200, 1, "stop")
    assert 0 < r.latency_ms < 5000
    sent = fake.last_request()
    assert sent["model"] == "fake-small" and sent["messages"] == MSGS
    assert sent["logprobs"] is True and sent["top_logprobs"] == 1
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 64 and sent["n"] == 3
    assert sent["seed"] == 7 and sent["stop"] == ["\n\n"]
    assert not {"stream", "cascade", "unknown_thing", "stream_options"} & set(sent)
    assert fake.auth == ["Bearer sekrit"]


async def test_without_logprobs_config_none_are_asked_and_no_key_no_header(fake, made):
    b = openai(made, fake, logprobs=False)
    r = await b.complete(MSGS, {"logprobs": True, "top_logprobs": 5})
    assert r.ok and r.token_logprobs is None
    assert "logprobs" not in fake.last_request() and "top_logprobs" not in fake.last_request()
    assert fake.auth == [None]


async def test_cost_falls_back_to_the_price_map_and_is_none_when_unknown(fake, made):
    r = await openai(made, fake, model="gpt-4o-mini").complete(MSGS, {})
    _, p_in, p_out = lookup_price("gpt-4o-mini")
    assert r.ok and r.text == "Paris" and (r.tokens_in, r.tokens_out) == (5, 1)
    assert r.cost_usd == pytest.approx(5 * p_in + 1 * p_out) and r.cost_usd > 0
    unknown = await openai(made, fake, model="fake-small").complete(MSGS, {})
    assert unknown.ok and unknown.cost_usd is None  # never a silent 0


async def test_a_gpu_hourly_rate_prices_the_busy_time(fake, made):
    fake.state.set_faults({"latency_ms": 200})
    r = await openai(made, fake, model="fake-small", gpu_hourly_usd=3.6).complete(MSGS, {})
    assert r.ok and r.latency_ms >= 200
    assert r.cost_usd == pytest.approx(3.6 * r.latency_ms / 3_600_000.0)
    priced = await openai(
        made, fake, model="fake-small", gpu_hourly_usd=3.6, price_in_per_mtok=1.0,
        price_out_per_mtok=2.0,
    ).complete(MSGS, {})  # fmt: skip
    expected = (priced.tokens_in * 1.0 + priced.tokens_out * 2.0) / 1e6
    assert priced.cost_usd == pytest.approx(expected)  # per-token prices win


async def test_missing_usage_is_counted_with_tiktoken(made):
    async def handler(_request: web.Request) -> web.Response:
        body = {"model": "bare", "choices": [{"message": {"content": "Paris"}}]}
        return web.json_response(body)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    async with serve(app) as up:
        cfg = ModelConfig(backend="openai", base_url=up.url + "/v1", price_in_per_mtok=3)
        b = OpenAIBackend("bare", ModelConfig(**{**cfg.model_dump(), "price_out_per_mtok": 5}))
        made.append(b)
        r = await b.complete(MSGS, {})
    assert r.ok and r.text == "Paris" and r.token_logprobs is None
    assert r.tokens_in == count_message_tokens(MSGS) and r.tokens_out == count_tokens("Paris")
    assert r.cost_usd == pytest.approx((r.tokens_in * 3 + r.tokens_out * 5) / 1e6)


# ------------------------------------------------------------------------- openai: faults


async def test_a_500_is_retried_then_answers(fake, made):
    fake.state.set_faults({"error_rate": 1, "count": 1})
    r = await openai(made, fake, max_retries=2).complete(MSGS, {})
    assert r.ok and r.text == ANSWER
    assert r.attempts == 2 and fake.calls() == 2


async def test_a_429_waits_at_least_its_retry_after(fake, made):
    fake.state.set_faults({"rate_limit": 1, "retry_after": 0.4, "count": 1})
    t0 = time.perf_counter()
    r = await openai(made, fake, max_retries=1).complete(MSGS, {})
    waited = time.perf_counter() - t0
    assert r.ok and r.attempts == 2 and fake.calls() == 2
    assert waited >= 0.4  # retry-after-ms: 400 (Retry-After: 1, rounded up, is the fallback)


async def test_a_huge_retry_after_is_capped(fake, made):
    fake.state.set_faults({"rate_limit": 1, "retry_after": 60, "count": 1})
    t0 = time.perf_counter()
    r = await openai(made, fake, max_retries=1, max_retry_after_s=0.05).complete(MSGS, {})
    assert r.ok and r.attempts == 2
    assert time.perf_counter() - t0 < 5


def test_retry_after_headers_are_parsed() -> None:
    from multidict import CIMultiDict

    assert parse_retry_after(CIMultiDict({"Retry-After": "2"})) == 2.0
    assert parse_retry_after(CIMultiDict({"retry-after": "0.5"})) == 0.5
    assert parse_retry_after(CIMultiDict({"Retry-After": "2", "retry-after-ms": "250"})) == 0.25
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 7, usegmt=True)
    assert parse_retry_after(CIMultiDict({"Retry-After": date}), now=now) == pytest.approx(7)
    past = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after(CIMultiDict({"Retry-After": past}), now=now) == 0.0
    assert parse_retry_after(CIMultiDict({"Retry-After": "soon"})) is None
    assert parse_retry_after(CIMultiDict()) is None


async def test_exhausted_retries_give_the_last_error(fake, made):
    fake.state.set_faults({"error_rate": 1, "error_status": 503})
    r = await openai(made, fake, max_retries=2).complete(MSGS, {})
    assert not r.ok and r.text is None
    assert r.error == "http_503" and r.status == 503
    assert r.attempts == 3 and fake.calls() == 3
    assert "overloaded" in r.error_detail


async def test_a_timeout_is_reported_and_not_retried(fake, made):
    fake.state.set_faults({"latency_ms": 3000})
    t0 = time.perf_counter()
    r = await openai(made, fake, timeout_s=0.3, max_retries=2).complete(MSGS, {})
    elapsed = time.perf_counter() - t0
    assert r.error == "timeout" and r.text is None and r.attempts == 1
    assert 0.25 <= elapsed < 2.5
    assert fake.calls() == 1


async def test_a_dropped_connection_is_retried_and_reported_when_it_persists(fake, made):
    fake.state.set_faults({"drop": 1, "count": 1})
    r = await openai(made, fake, max_retries=1).complete(MSGS, {})
    assert r.ok and r.attempts == 2
    fake.state.set_faults({"drop": 1})
    r = await openai(made, fake, max_retries=1).complete(MSGS, {})
    assert r.error == "connection" and r.attempts == 2 and r.status is None


async def test_a_malformed_body_is_an_error_not_an_exception(fake, made):
    fake.state.set_faults({"malformed": 1})
    r = await openai(made, fake, max_retries=2).complete(MSGS, {})
    assert r.error == "malformed" and r.status == 200 and r.text is None
    assert r.attempts == 1 and fake.calls() == 1


async def test_client_errors_are_never_retried_nor_open_the_circuit(fake, made):
    fake.state.set_faults({"error_rate": 1, "error_status": 404})
    b = openai(made, fake, max_retries=3, breaker=CircuitBreaker(failure_threshold=1))
    r = await b.complete(MSGS, {})
    assert r.error == "http_404" and r.attempts == 1 and fake.calls() == 1
    missing = await openai(made, fake, model="no-such-model", max_retries=3).complete(MSGS, {})
    assert missing.error == "http_404" and missing.attempts == 1
    assert "does not exist" in missing.error_detail
    assert b.breaker.state == CLOSED and b.breaker.failures == 0


async def test_the_connector_caps_concurrent_requests(fake, made):
    fake.state.set_faults({"latency_ms": 100})
    b = openai(made, fake, max_concurrency=2)
    results = await asyncio.gather(*(b.complete(MSGS, {}) for _ in range(6)))
    assert all(r.ok for r in results)
    assert fake.state.stats["fake-small"].max_in_flight == 2


async def test_health_and_aclose(fake, made):
    b = openai(made, fake)
    assert await b.health() is True
    await b.aclose()
    assert (await b.complete(MSGS, {})).ok  # a closed backend reopens its session
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = ModelConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
    dead = OpenAIBackend("dead", cfg)
    made.append(dead)
    assert await dead.health() is False
    r = await dead.complete(MSGS, {})
    assert r.error == "connection" and r.status is None


# ------------------------------------------------------------------------- circuit breaker


async def test_the_circuit_opens_fails_fast_half_opens_and_closes(fake, made):
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=0.3)
    b = openai(made, fake, max_retries=0, breaker=breaker)
    fake.state.set_faults({"error_rate": 1})
    assert (await b.complete(MSGS, {})).error == "http_500"
    assert breaker.state == CLOSED
    assert (await b.complete(MSGS, {})).error == "http_500"
    assert breaker.state == OPEN
    t0 = time.perf_counter()
    fast = await b.complete(MSGS, {})
    assert fast.error == "circuit_open" and fast.attempts == 0
    assert time.perf_counter() - t0 < 0.1 and fake.calls() == 2  # no upstream call
    _, done = await drain(b.stream(MSGS, {}))
    assert done.error == "circuit_open" and fake.calls() == 2
    await asyncio.sleep(0.35)
    assert breaker.state == HALF_OPEN
    trial = await b.complete(MSGS, {})  # the trial fails: open again at once
    assert trial.error == "http_500" and breaker.state == OPEN
    assert (await b.complete(MSGS, {})).error == "circuit_open"
    await asyncio.sleep(0.35)
    fake.state.clear_faults()
    assert (await b.complete(MSGS, {})).ok
    assert breaker.state == CLOSED and breaker.failures == 0
    assert fake.calls() == 4


def test_half_open_lets_one_trial_through_at_a_time() -> None:
    now = [0.0]
    cb = CircuitBreaker(failure_threshold=3, cooldown_s=10, clock=lambda: now[0])
    for _ in range(2):
        cb.failure()
    assert cb.allow() and cb.state == CLOSED
    cb.failure()
    assert cb.state == OPEN and not cb.allow() and cb.retry_in() == 10
    now[0] = 10.0
    assert cb.allow()  # the trial
    assert not cb.allow()  # everybody else waits for it
    cb.release()  # the trial was cancelled: the next caller may try
    assert cb.allow()
    cb.success()
    assert cb.state == CLOSED and cb.allow() and cb.retry_in() == 0
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)


# ------------------------------------------------------------------------- openai: streams


async def test_a_stream_yields_deltas_that_join_to_the_answer(fake, made):
    b = openai(made, fake, price_in_per_mtok=1.0, price_out_per_mtok=2.0)
    deltas, done = await drain(b.stream(MSGS, {"temperature": 0, "stream": False}))
    assert deltas == ["The", " answer", " is", " B"]
    assert done.ok and done.text == "".join(deltas) == ANSWER
    assert (done.tokens_in, done.tokens_out) == (5, 4)
    assert done.cost_usd == pytest.approx(5e-6 + 8e-6)
    assert done.token_logprobs[-1] == (" B", CONF)
    assert done.finish_reason == "stop" and done.served_model == "fake-small"
    assert 0 < done.ttft_ms <= done.latency_ms
    sent = fake.last_request()
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_a_slow_first_token_ends_the_stream_with_ttft_timeout(fake, made):
    fake.state.set_faults({"ttft_ms": 3000})
    b = openai(made, fake, ttft_timeout_s=0.3, timeout_s=10, max_retries=2)
    t0 = time.perf_counter()
    deltas, done = await drain(b.stream(MSGS, {}))
    assert deltas == [] and done.error == "ttft_timeout" and done.text is None
    assert 0.25 <= time.perf_counter() - t0 < 2.5
    assert fake.calls() == 1


async def test_a_stalled_stream_ends_by_the_timeout(fake, made):
    fake.state.set_faults({"stall_stream_after": 2})
    b = openai(made, fake, timeout_s=0.5, ttft_timeout_s=0.4)
    t0 = time.perf_counter()
    deltas, done = await drain(b.stream(MSGS, {}))
    assert deltas == ["The", " answer"]
    assert done.error == "timeout" and done.text is None
    assert done.extra["partial_text"] == "The answer" and done.ttft_ms is not None
    assert 0.45 <= time.perf_counter() - t0 < 3


async def test_a_stream_retries_only_before_its_first_token(fake, made):
    b = openai(made, fake, max_retries=2)
    fake.state.set_faults({"drop_stream_after": 0, "count": 1})  # role chunk, then cut
    deltas, done = await drain(b.stream(MSGS, {}))
    assert done.ok and done.text == ANSWER and done.attempts == 2 and fake.calls() == 2
    fake.state.set_faults({"error_rate": 1, "error_status": 502, "count": 1})
    deltas, done = await drain(b.stream(MSGS, {}))
    assert done.ok and done.attempts == 2 and "".join(deltas) == ANSWER
    fake.state.reset_stats()
    fake.state.set_faults({"drop_stream_after": 2})  # cut after two tokens: no retry
    deltas, done = await drain(b.stream(MSGS, {}))
    assert deltas == ["The", " answer"]
    assert done.error == "connection" and done.attempts == 1 and fake.calls() == 1
    assert done.extra["partial_text"] == "The answer"


async def test_a_malformed_stream_event_is_an_error(fake, made):
    fake.state.set_faults({"malformed": 1})
    deltas, done = await drain(openai(made, fake).stream(MSGS, {}))
    assert deltas == [] and done.error == "malformed"


# ------------------------------------------------------------------------- replay

ROWS = [
    {
        "id": "r-0",
        "task": "mmlu",
        "reference": "C",
        "messages": [
            {"role": "system", "content": "Answer with one letter."},
            {"role": "user", "content": "Largest planet? A) Mars B) Venus C) Jupiter"},
        ],
        "models": {
            "small": {"answer": "C", "correct": True, "confidence": -0.3, "cost_usd": 2e-06,
                      "latency_ms": 120.0, "tokens_in": 30, "tokens_out": 1},
            "large": {"answer": "The answer is C.", "correct": True, "confidence": -0.01,
                      "cost_usd": 3e-04, "latency_ms": 900.0, "tokens_in": 30, "tokens_out": 5},
        },
    },
    {
        "id": "r-1",
        "task": "mmlu",
        "reference": "A",
        "messages": [{"role": "user", "content": "Smallest planet? A) Mercury B) Earth"}],
        "models": {
            "small": {"answer": "So it is\nA then, surely", "correct": True, "confidence": None,
                      "cost_usd": None, "latency_ms": None, "tokens_in": None, "tokens_out": None},
            "large": {"answer": None, "correct": False, "confidence": None, "cost_usd": None,
                      "latency_ms": None, "tokens_in": None, "tokens_out": None},
        },
    },
]  # fmt: skip


@pytest.fixture
def trace_file(tmp_path):
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def replay(name: str, files, simulate_latency: bool = False, **kw) -> ReplayBackend:
    cfg = ModelConfig(backend="replay", traces=[str(f) for f in files], **kw)
    return ReplayBackend(name, cfg, simulate_latency=simulate_latency)


async def test_replay_answers_recorded_prompts(trace_file):
    b = replay("small", [trace_file], price_in_per_mtok=1.0, price_out_per_mtok=2.0)
    assert len(b) == 2 and await b.health()
    r = await b.complete(ROWS[0]["messages"], {})
    assert r.ok and r.text == "C" and r.confidence == -0.3
    assert (r.tokens_in, r.tokens_out, r.cost_usd, r.latency_ms) == (30, 1, 2e-06, 120.0)
    assert r.served_model == "small" and r.extra["trace_id"] == "r-0"
    # another system prompt: found by the last user message
    other = [{"role": "system", "content": "Be brief."}, ROWS[0]["messages"][1]]
    assert (await b.complete(other, {})).text == "C"
    # nothing recorded but the answer: tokens counted, cost priced from the config
    r1 = await b.complete(ROWS[1]["messages"], {})
    answer = ROWS[1]["models"]["small"]["answer"]
    assert r1.ok and r1.text == answer and r1.confidence is None
    assert r1.tokens_in == count_message_tokens(ROWS[1]["messages"])
    assert r1.tokens_out == count_tokens(answer)
    assert r1.cost_usd == pytest.approx((r1.tokens_in + 2 * r1.tokens_out) / 1e6)
    deltas, done = await drain(b.stream(ROWS[1]["messages"], {}))
    assert len(deltas) >= 2 and "".join(deltas) == answer and done.text == answer
    assert done.ttft_ms is not None


async def test_replay_errors_unknown_prompts_and_missing_answers(trace_file):
    large = replay("big", [trace_file], model="large")
    r = await large.complete([{"role": "user", "content": "What is 2 + 2?"}], {})
    assert r.error == "unknown_prompt" and r.text is None
    assert "only answers the prompts of its traces" in r.error_detail
    assert str(trace_file) in r.error_detail
    deltas, done = await drain(large.stream([{"role": "user", "content": "Hi"}], {}))
    assert deltas == [] and done.error == "unknown_prompt"
    assert (await large.complete(ROWS[1]["messages"], {})).error == "no_answer"
    t0 = time.perf_counter()
    assert (await large.complete(ROWS[0]["messages"], {})).text == "The answer is C."
    assert time.perf_counter() - t0 < 0.5  # 900 ms recorded, not slept
    slow = replay("big", [trace_file], model="large", simulate_latency=True)
    t0 = time.perf_counter()
    r = await slow.complete(ROWS[0]["messages"], {})
    assert r.latency_ms == 900.0 and time.perf_counter() - t0 >= 0.9


def test_replay_rejects_bad_files_and_missing_models(tmp_path, trace_file):
    with pytest.raises(ValueError, match="no model column 'medium'"):
        replay("medium", [trace_file])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "messages": []}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl"):
        replay("small", [bad])
    with pytest.raises(ValueError, match=r"nowhere\.jsonl"):
        replay("small", [tmp_path / "nowhere.jsonl"])


async def test_replay_a_real_gsm8k_row_is_priced_from_the_price_map(tmp_path):
    line = demo.TEST.open(encoding="utf-8").readline()  # the shipped RouteLLM traces
    row = json.loads(line)
    one = tmp_path / "gsm8k-one.jsonl"
    one.write_text(line, encoding="utf-8")
    b = replay("gpt4", [one], model="gpt-4-1106-preview")
    r = await b.complete(row["messages"], {"temperature": 0})
    answer = row["models"]["gpt-4-1106-preview"]["answer"]
    assert r.ok and r.text == answer
    _, p_in, p_out = lookup_price("gpt-4-1106-preview")
    assert r.tokens_out == count_tokens(answer) > 10
    assert r.cost_usd == pytest.approx(r.tokens_in * p_in + r.tokens_out * p_out)


# ------------------------------------------------------------------------- litellm, factory


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # litellm's
async def test_litellm_backend_through_the_openai_compatible_route(fake, monkeypatch):
    monkeypatch.setenv("CASCADE_TEST_LITELLM_KEY", "dummy-key")
    cfg = ModelConfig(
        backend="litellm",
        model="openai/gpt-4o-mini",
        base_url=fake.url + "/v1",
        api_key_env="CASCADE_TEST_LITELLM_KEY",
        timeout_s=5,
        max_retries=0,
    )
    b = LiteLLMBackend("ext", cfg)
    r = await b.complete(MSGS, {"temperature": 0, "cascade": {}, "max_tokens": 8})
    assert r.ok and r.text == "Paris" and r.served_model == "gpt-4o-mini"
    assert r.token_logprobs == [("Paris", -0.2)]
    assert (r.tokens_in, r.tokens_out) == (5, 1)
    _, p_in, p_out = lookup_price("gpt-4o-mini")
    assert r.cost_usd == pytest.approx(5 * p_in + p_out)
    sent = fake.last_request("gpt-4o-mini")
    assert sent["logprobs"] is True and sent["top_logprobs"] == 1 and sent["max_tokens"] == 8
    assert "cascade" not in sent
    assert fake.auth[-1] == "Bearer dummy-key"
    deltas, done = await drain(b.stream(MSGS, {}))
    assert "".join(deltas) == "Paris" and done.ok and done.tokens_out == 1
    assert done.cost_usd == pytest.approx(5 * p_in + p_out)

    fake.state.set_faults({"error_rate": 1, "error_status": 503})
    failed = await b.complete(MSGS, {})
    assert failed.error == "http_503" and failed.status == 503 and failed.text is None
    fake.state.set_faults({"malformed": 1})
    assert (await b.complete(MSGS, {})).error == "malformed"
    fake.state.set_faults({"latency_ms": 3000})
    slow = LiteLLMBackend("ext", cfg.model_copy(update={"timeout_s": 0.3}))
    t0 = time.perf_counter()
    assert (await slow.complete(MSGS, {})).error == "timeout"
    assert time.perf_counter() - t0 < 2.5
    unknown = LiteLLMBackend("ext", cfg.model_copy(update={"model": "openai/fake-small"}))
    fake.state.clear_faults()
    r2 = await unknown.complete(MSGS, {})
    assert r2.ok and r2.text == ANSWER and r2.cost_usd is None


async def test_factory_picks_the_backend_by_config(fake, trace_file):
    models = {
        "a": ModelConfig(backend="openai", base_url=fake.url + "/v1"),
        "b": ModelConfig(backend="litellm", model="openai/gpt-4o-mini"),
        "small": ModelConfig(backend="replay", traces=[str(trace_file)]),
    }
    built = {name: make_backend(name, cfg) for name, cfg in models.items()}
    assert isinstance(built["a"], OpenAIBackend) and built["a"].model == "a"
    assert isinstance(built["b"], LiteLLMBackend)
    assert isinstance(built["small"], ReplayBackend)
    assert all(b.name == n for n, b in built.items())
    for b in built.values():
        await b.aclose()


def test_forwarded_params_drop_what_upstreams_reject() -> None:
    out = forward_params({"temperature": 0, "top_p": None, "stream": True, "n": 4}, True)
    assert out == {"temperature": 0, "n": 4, "logprobs": True, "top_logprobs": 1}
    assert forward_params(None, False) == {}
    assert math.isclose(forward_params({"min_p": 0.1}, False)["min_p"], 0.1)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # litellm's
@pytest.mark.parametrize("priced", [True, False], ids=["priced", "no-price"])
async def test_an_open_circuit_is_reported_alike_by_both_http_backends(fake, made, priced):
    """No call is made; the cost is 0 for a priced model and unknown (None) for a model
    without a price, whichever backend: an open circuit must not make a model look priced."""
    fake.state.set_faults({"error_rate": 1, "error_status": 500})
    prices = {"price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0} if priced else {}
    cfg = ModelConfig(
        backend="litellm",
        model="openai/fake-small",
        base_url=fake.url + "/v1",
        timeout_s=5,
        max_retries=0,
        **prices,
    )
    backends = [
        LiteLLMBackend("ext", cfg, breaker=CircuitBreaker(failure_threshold=1, cooldown_s=60)),
        openai(
            made,
            fake,
            max_retries=0,
            breaker=CircuitBreaker(failure_threshold=1, cooldown_s=60),
            **prices,
        ),
    ]
    results = []
    for b in backends:
        assert (await b.complete(MSGS, {})).error == "http_500"
        calls = fake.calls()
        results.append(await b.complete(MSGS, {}))
        assert fake.calls() == calls  # fails fast, without calling the upstream
    for r, name in zip(results, ("ext", "node"), strict=True):
        assert (r.error, r.attempts, r.text) == ("circuit_open", 0, None)
        assert r.error_detail.startswith(f"{name}: circuit open after 1 consecutive")
        assert r.cost_usd == (0.0 if priced else None)


# ------------------------------------------------------------------------- broken streams


def priced_backend(kind: str, made, fake, monkeypatch) -> Backend:
    """An `openai` or `litellm` backend on the fake upstream at $1 / $2 per million tokens,
    with two retries."""
    prices = {"price_in_per_mtok": 1.0, "price_out_per_mtok": 2.0}
    if kind == "openai":
        return openai(made, fake, max_retries=2, **prices)
    monkeypatch.setenv("CASCADE_TEST_LITELLM_KEY", "dummy-key")
    cfg = ModelConfig(backend="litellm", model="openai/fake-small", max_retries=2,
                      base_url=fake.url + "/v1", api_key_env="CASCADE_TEST_LITELLM_KEY",
                      timeout_s=5, **prices)  # fmt: skip
    return LiteLLMBackend("ext", cfg)


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # litellm's
@pytest.mark.parametrize("kind", ["openai", "litellm"])
async def test_a_stream_broken_after_tokens_is_charged_for_them_once(fake, made, kind, monkeypatch):
    """The tokens a stream sent before it broke were generated (and billed): the failed
    result carries them (the prompt counted as elsewhere, the text with tiktoken, capped at
    max_tokens) and their cost, keeps its error, and is not retried (one costed attempt);
    a stream that broke before any token costs 0."""
    b = priced_backend(kind, made, fake, monkeypatch)
    fake.state.set_faults({"drop_stream_after": 2})  # "The", " answer", then cut
    deltas, done = await drain(b.stream(MSGS, {}))
    assert "".join(deltas) == "The answer" and done.error is not None and done.text is None
    assert fake.calls() == 1  # not retried
    tokens_in, tokens_out = count_message_tokens(MSGS), count_tokens("The answer")
    assert (done.tokens_in, done.tokens_out) == (tokens_in, tokens_out)
    assert done.cost_usd == pytest.approx((tokens_in * 1.0 + tokens_out * 2.0) / 1e6)
    assert done.extra["partial_text"] == "The answer"
    deltas, capped = await drain(b.stream(MSGS, {"max_tokens": 1}))
    assert capped.tokens_out == 1  # no more than max_tokens is generated or billed
    fake.state.reset_stats()
    fake.state.set_faults({"drop_stream_after": 0})  # cut before any token, every attempt
    deltas, nothing = await drain(b.stream(MSGS, {}))
    assert deltas == [] and nothing.error is not None
    assert nothing.cost_usd == 0.0 and nothing.tokens_out is None


async def test_a_timed_out_stream_is_charged_for_its_tokens_and_gpu_time_stays(fake, made):
    """A stream that timed out after some tokens is charged for them; a GPU-hourly model's
    broken stream costs its busy time, as any of its calls."""
    fake.state.set_faults({"stall_stream_after": 2})
    b = openai(made, fake, timeout_s=0.5, price_in_per_mtok=1.0, price_out_per_mtok=2.0)
    _, done = await drain(b.stream(MSGS, {}))
    assert done.error == "timeout" and done.tokens_out == count_tokens("The answer")
    assert done.cost_usd == pytest.approx(
        (count_message_tokens(MSGS) + 2 * count_tokens("The answer")) / 1e6
    )
    gpu = openai(made, fake, timeout_s=0.5, gpu_hourly_usd=3.6)
    _, busy = await drain(gpu.stream(MSGS, {}))
    assert busy.error == "timeout" and busy.tokens_out == count_tokens("The answer")
    assert busy.cost_usd == pytest.approx(busy.latency_ms / 1e6, rel=0.05)


# ------------------------------------------------------------------------- streamed tool calls

WEATHER_ARGS = '{"city": "Paris", "unit": "celsius"}'  # streamed in 4 argument fragments
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning")  # litellm's
@pytest.mark.parametrize("kind", ["openai", "litellm"])
async def test_a_streamed_tool_call_is_relayed_assembled_and_charged(fake, made, kind, monkeypatch):
    """A stream of tool-call deltas (no content) passes its fragments through, closes with
    the assembled call (as a non-streamed answer carries it) and finish_reason tool_calls;
    its first fragment is the first token, so a stream cut after two fragments is not
    retried and is charged for the name and argument text it sent."""
    b = priced_backend(kind, made, fake, monkeypatch)
    call = {"name": "get_weather", "arguments": WEATHER_ARGS}
    fake.state.set_answer("fake-small", "", None, tool_calls=[call])
    fragments: list[dict] = []
    deltas, done = await drain(b.stream(MSGS, {"tools": TOOLS}), fragments)
    assert deltas == [] and done.ok and done.text == ""
    assert done.finish_reason == "tool_calls" and done.ttft_ms is not None
    assert done.extra["tool_calls"] == [{"id": "call_0", "type": "function", "function": call}]
    assert fragments[0] == {"index": 0, "id": "call_0", "type": "function",
                            "function": {"name": "get_weather"} if kind == "litellm"
                            else {"name": "get_weather", "arguments": ""}}  # fmt: skip
    assert "".join(f["function"].get("arguments", "") for f in fragments) == WEATHER_ARGS
    assert done.tokens_out == 5  # the fake's usage: one token per fragment

    fake.state.reset_stats()
    fake.state.set_faults({"drop_stream_after": 2})  # the head, '{"city":', then cut
    deltas, broken = await drain(b.stream(MSGS, {"tools": TOOLS}))
    assert broken.error is not None and broken.text is None
    assert fake.calls() == 1  # not retried: the tool call had begun
    sent = 'get_weather{"city":'
    tokens_in, tokens_out = count_message_tokens(MSGS), count_tokens(sent)
    assert (broken.tokens_in, broken.tokens_out) == (tokens_in, tokens_out) and tokens_out > 0
    assert broken.cost_usd == pytest.approx((tokens_in * 1.0 + tokens_out * 2.0) / 1e6)
    assert broken.extra["partial_text"] == sent
