"""The fake OpenAI/vLLM upstream over real HTTP: a subprocess on a free port, driven by the
official `openai` client (protocol) and by httpx (faults, errors, admin)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.fake_upstream import (
    UPSTREAM_KEY,
    build_app,
    load_trace_answers,
    serve,
    tokenize,
)
from tests.serving import fake_upstream, upstream_admin

Q_SHORT = "Which planet is largest?\nA) Mars\nB) Venus\nC) Jupiter\nD) Earth\nAnswer:"
Q_LONG = "Natalia sold 48 clips in April and half as many in May. How many in total?"
LONG_ANSWER = "She sold 48 / 2 = 24 in May, so 48 + 24 = 72 in total.\n#### 72"
ROWS = [
    {
        "id": "t-0",
        "task": "mmlu",
        "reference": "C",
        "messages": [
            {"role": "system", "content": "Answer with one letter."},
            {"role": "user", "content": Q_SHORT},
        ],
        "models": {
            "small": {"answer": "C", "correct": True, "confidence": -0.7, "tokens_in": 41},
            "large": {"answer": "The answer is (C).", "correct": True, "confidence": -0.05},
        },
    },
    {
        "id": "t-1",
        "task": "gsm8k",
        "reference": "72",
        "messages": [{"role": "user", "content": Q_LONG}],
        "models": {
            "small": {"answer": "#### 70", "correct": False, "confidence": None},
            "large": {"answer": LONG_ANSWER, "correct": True, "confidence": -0.25},
        },
    },
]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Iterator[str]:
    """The server as a subprocess on port 0; yields its base URL (without /v1)."""
    traces = tmp_path_factory.mktemp("fake-upstream") / "traces.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    log = traces.with_name("stderr.txt")
    args = ["--traces", str(traces), "--answer", "B", "--confidence", "-0.5"]
    with fake_upstream("small,large", *args, log=log) as server:
        yield server.url
    stderr = log.read_text(encoding="utf-8")
    assert server.proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Error" not in stderr, stderr  # quiet, even on faults


@pytest.fixture
def http(upstream: str) -> Iterator[httpx.Client]:
    """An httpx client on a clean server: no faults, counters at zero."""
    with upstream_admin(upstream) as client:
        yield client


@pytest.fixture
def oai(upstream: str, http: httpx.Client) -> OpenAI:
    return OpenAI(base_url=f"{upstream}/v1", api_key="unused", max_retries=0, timeout=5.0)


def chat(http: httpx.Client, model: str = "small", prompt: str = Q_SHORT, **kw) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": user(prompt), **kw})


def faults(http: httpx.Client, body) -> dict:
    r = http.post("/admin/faults", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stats(http: httpx.Client, model: str) -> dict:
    return http.get("/admin/stats").json()["models"][model]


# ------------------------------------------------------------------------------ protocol


def test_completion_with_logprobs_answers_from_the_trace(oai: OpenAI) -> None:
    messages = [{"role": "system", "content": "Answer with one letter."}, *user(Q_SHORT)]
    r = oai.chat.completions.create(model="small", messages=messages, logprobs=True, top_logprobs=3)
    assert r.object == "chat.completion" and r.model == "small" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "C"
    assert choice.finish_reason == "stop"
    (tok,) = choice.logprobs.content
    assert tok.token == "C" and tok.bytes == [67] and tok.logprob == pytest.approx(-0.7)
    tops = tok.top_logprobs
    assert len(tops) == 3 and {t.token for t in tops} <= set("ABCDEFGH")
    assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
    assert sum(math.exp(t.logprob) for t in tops) <= 1.0 + 1e-9
    assert "C" in {t.token for t in tops}  # p=0.50 beats the best alternative (0.25)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (41, 1)  # tokens_in of trace
    assert r.usage.total_tokens == 42


def test_multi_token_answer_puts_the_confidence_on_its_last_token(oai: OpenAI) -> None:
    r = oai.chat.completions.create(model="large", messages=user(Q_LONG), logprobs=True)
    choice = r.choices[0]
    assert choice.message.content == LONG_ANSWER
    toks = choice.logprobs.content
    assert "".join(t.token for t in toks) == LONG_ANSWER
    assert toks[-1].token.strip() == "72" and toks[-1].logprob == pytest.approx(-0.25)
    assert sum(t.logprob for t in toks) == pytest.approx(-0.25)
    assert all(t.top_logprobs == [] for t in toks)
    assert r.usage.completion_tokens == len(toks) == len(LONG_ANSWER.split())


def test_unknown_prompt_gets_the_canned_answer_and_no_logprobs_unless_asked(oai: OpenAI) -> None:
    r = oai.chat.completions.create(model="large", messages=user("something else"))
    assert r.choices[0].message.content == "B" and r.choices[0].logprobs is None
    r = oai.chat.completions.create(model="small", messages=user("x"), logprobs=True)
    assert r.choices[0].logprobs.content[0].logprob == pytest.approx(-0.5)
    # a null confidence in the trace also takes the server's --confidence
    r = oai.chat.completions.create(model="small", messages=user(Q_LONG), logprobs=True)
    assert r.choices[0].message.content == "#### 70"
    assert r.choices[0].logprobs.content[-1].logprob == pytest.approx(-0.5)


def test_streaming_with_include_usage(oai: OpenAI, http: httpx.Client) -> None:
    stream = oai.chat.completions.create(
        model="large",
        messages=user(Q_LONG),
        stream=True,
        logprobs=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks[1:] if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in body) == LONG_ANSWER
    assert all(len(c.choices[0].logprobs.content) == 1 for c in body)
    assert body[-1].choices[0].logprobs.content[0].logprob == pytest.approx(-0.25)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(body)
    assert all(c.usage is None for c in chunks[:-1])
    # on the wire: SSE events, the last one [DONE]
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={"model": "small", "messages": user(Q_SHORT), "stream": True},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)
    assert "usage" not in json.loads(events[-2][6:])  # no include_usage: no usage chunk


def test_models_list_and_health(oai: OpenAI, http: httpx.Client) -> None:
    assert [m.id for m in oai.models.list()] == ["small", "large"]
    r = http.get("/health")
    assert r.status_code == 200


def test_max_tokens_truncates_with_finish_reason_length(http: httpx.Client) -> None:
    r = chat(http, "large", Q_LONG, max_tokens=3, logprobs=True).json()
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"] == "She sold 48"
    assert len(choice["logprobs"]["content"]) == r["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        (b'{"model": "small", "messages": [', 400, None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', 400, "model"),
        (b'{"model": "small"}', 400, "messages"),
        (b'{"model": "small", "messages": []}', 400, "messages"),
        (b'{"model": "small", "messages": [{"content": "no role"}]}', 400, "messages"),
        (b'{"model": "small", "messages": [{"role": "user"}], "top_logprobs": 2}', 400, None),
        (b'{"model": "nope", "messages": [{"role": "user", "content": "hi"}]}', 404, "model"),
    ],
)
def test_bad_requests_get_openai_error_objects(http: httpx.Client, body, status, param) -> None:
    r = http.post("/v1/chat/completions", content=body)
    assert r.status_code == status
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param
    s = http.get("/admin/stats").json()
    assert s["bad_requests"] == 1 and s["calls"] == 0


# -------------------------------------------------------------------------------- faults


def test_latency_applies_only_to_its_model(http: httpx.Client) -> None:
    faults(http, {"model": "small", "latency_ms": 250})
    t0 = time.perf_counter()
    assert chat(http, "small").status_code == 200
    slow = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert chat(http, "large").status_code == 200
    fast = time.perf_counter() - t0
    assert slow >= 0.25 and fast < 0.2


@pytest.mark.parametrize("status", [500, 503])
def test_server_errors_for_the_next_n_calls(http: httpx.Client, status: int) -> None:
    faults(http, {"error_rate": 1.0, "error_status": status, "count": 2})
    got = [chat(http, m) for m in ("small", "large", "small")]
    assert [r.status_code for r in got] == [status, status, 200]
    assert got[0].json()["error"]["type"] == "server_error"
    assert http.get("/admin/faults").json() == {}  # the spec expired
    assert stats(http, "small")["faults"]["error"] == 1
    assert stats(http, "small")["ok"] == 1


def test_rate_limit_sends_retry_after(http: httpx.Client, oai: OpenAI) -> None:
    faults(http, {"model": "large", "rate_limit": True, "retry_after": 1.5})
    r = chat(http, "large")
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "2" and r.headers["retry-after-ms"] == "1500"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    import openai

    with pytest.raises(openai.RateLimitError):
        oai.chat.completions.create(model="large", messages=user("hi"))
    assert chat(http, "small").status_code == 200


def test_dropped_connection_gets_no_response(http: httpx.Client) -> None:
    faults(http, {"drop": True, "count": 1})
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
        chat(http)
    assert chat(http).status_code == 200
    assert stats(http, "small")["faults"]["drop"] == 1


def test_malformed_body_is_not_json(http: httpx.Client) -> None:
    faults(http, {"malformed": True})
    r = chat(http)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.content)
    r = chat(http, stream=True)
    first = next(line for line in r.text.splitlines() if line)
    with pytest.raises(json.JSONDecodeError):
        json.loads(first.removeprefix("data: "))


def test_stalled_stream_stops_sending_without_closing(http: httpx.Client) -> None:
    faults(http, {"model": "large", "stall_stream_after": 2})
    events = []
    timeout = httpx.Timeout(5.0, read=0.4)
    body = {"model": "large", "messages": user(Q_LONG), "stream": True}
    with (
        pytest.raises(httpx.ReadTimeout),
        http.stream("POST", "/v1/chat/completions", json=body, timeout=timeout) as r,
    ):
        assert r.status_code == 200
        events.extend(line for line in r.iter_lines() if line)
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events]
    assert deltas == [
        {"role": "assistant", "content": ""},
        {"content": "She"},
        {"content": " sold"},
    ]
    assert stats(http, "large")["faults"]["stall"] == 1
    deadline = time.monotonic() + 2.0  # the server lets go once the client has hung up
    while stats(http, "large")["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats(http, "large")["in_flight"] == 0


def test_stream_cut_midway_and_time_to_first_token(http: httpx.Client) -> None:
    faults(http, {"model": "large", "drop_stream_after": 1})
    body = {"model": "large", "messages": user(Q_LONG), "stream": True}
    events = []
    with (
        pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        events.extend(line for line in r.iter_lines() if line)
    assert len(events) == 2 and "[DONE]" not in events[-1]

    faults(http, {"model": "large", "ttft_ms": 300})
    t0 = time.perf_counter()
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        headers_at = time.perf_counter() - t0
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        first_at = time.perf_counter() - t0
        rest = [line for line in lines if line]
    assert headers_at < 0.25 and first_at >= 0.3  # headers at once, first chunk after ttft
    assert '"role":"assistant"' in first and rest[-1] == "data: [DONE]"


def test_seeded_error_rate_is_reproducible(http: httpx.Client) -> None:
    def pattern() -> list[int]:
        faults(http, {"error_rate": 0.5, "seed": 7})
        return [chat(http, "small").status_code for _ in range(24)]

    first, second = pattern(), pattern()
    assert first == second
    assert 4 <= first.count(500) <= 20 and first.count(200) == 24 - first.count(500)
    faults(http, {"error_rate": 0.5, "seed": 8})
    assert [chat(http, "small").status_code for _ in range(24)] != first


def test_fault_admin_validates_and_model_specs_override_the_global_one(
    http: httpx.Client,
) -> None:
    for bad in ({"latency": 5}, {"model": "nope", "drop": True}, {"error_rate": 2}, [1]):
        r = http.post("/admin/faults", json=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_fault"
    assert http.post("/admin/faults", content=b"{").status_code == 400
    got = faults(http, [{"error_rate": 1, "error_status": 503}, {"model": "large", "count": 3}])
    assert got["large"]["remaining"] == 3 and got["*"]["error_status"] == 503
    assert chat(http, "large").status_code == 200  # large's own (harmless) spec wins
    assert chat(http, "small").status_code == 503
    assert http.get("/admin/faults").json()["large"]["remaining"] == 2
    faults(http, {"model": "*"})  # a spec with no fault clears its key
    assert set(http.get("/admin/faults").json()) == {"large"}
    assert http.delete("/admin/faults").json() == {}


def test_stats_count_calls_per_model_and_reset(http: httpx.Client) -> None:
    for model in ("small", "small", "large"):
        chat(http, model, logprobs=True)
    chat(http, "small", stream=True).read()
    s = http.get("/admin/stats").json()
    assert s["calls"] == 4
    assert (s["models"]["small"]["calls"], s["models"]["small"]["stream"]) == (3, 1)
    assert s["models"]["large"]["ok"] == 1
    assert s["models"]["small"]["last_request"]["stream"] is True
    assert s["models"]["large"]["last_request"]["logprobs"] is True
    after = http.delete("/admin/stats").json()
    assert after["calls"] == 0 and after["models"]["small"]["last_request"] is None


def test_answers_can_be_set_at_run_time(http: httpx.Client) -> None:
    r = http.post(
        "/admin/answers",
        json=[
            {"model": "small", "prompt": "2+2?", "answer": "4", "confidence": -0.3},
            {"model": "extra", "answer": "D"},
        ],
    )
    assert r.status_code == 200 and "extra" in r.json()["models"]
    got = chat(http, "small", "2+2?", logprobs=True).json()["choices"][0]
    assert got["message"]["content"] == "4"
    assert got["logprobs"]["content"][0]["logprob"] == pytest.approx(-0.3)
    assert chat(http, "extra", "anything").json()["choices"][0]["message"]["content"] == "D"
    assert http.post("/admin/answers", json={"model": "small"}).status_code == 400


def test_tool_calls_are_answered_when_tools_are_offered(http: httpx.Client, oai: OpenAI) -> None:
    """A model given tool_calls answers a request with `tools` with them (whole, or streamed
    as OpenAI's fragments the SDK assembles, each fragment one token of usage and of
    drop_stream_after), and one without `tools` with its content."""
    call = {"name": "lookup", "arguments": '{"q": "two words"}'}
    body = {"model": "small", "prompt": "tool?", "answer": "", "tool_calls": [call]}
    assert http.post("/admin/answers", json=body).status_code == 200
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    whole = chat(http, "small", "tool?", tools=tools).json()
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    assert whole["choices"][0]["message"]["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": call}
    ]
    assert whole["usage"]["completion_tokens"] == 4  # the head and 3 argument fragments
    with oai.chat.completions.stream(model="small", messages=user("tool?"), tools=tools) as s:
        final = s.get_final_completion()
    (got,) = final.choices[0].message.tool_calls
    assert (got.function.name, got.function.arguments) == (call["name"], call["arguments"])
    assert final.choices[0].finish_reason == "tool_calls"
    assert chat(http, "small", "tool?").json()["choices"][0]["message"]["tool_calls"] == []
    faults(http, {"model": "small", "drop_stream_after": 2, "count": 1})
    body = {"model": "small", "messages": user("tool?"), "tools": tools, "stream": True}
    lines: list[str] = []
    with (
        pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)),
        http.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        lines.extend(line for line in r.iter_lines() if line.startswith("data: "))
    deltas = [json.loads(x[6:])["choices"][0]["delta"] for x in lines]
    assert [d.get("tool_calls", [{}])[0].get("index") for d in deltas] == [None, 0, 0]
    bad = {"model": "small", "answer": "", "tool_calls": [{"name": "x"}]}
    assert http.post("/admin/answers", json=bad).status_code == 400


# ---------------------------------------------------------------------------- in process


def test_in_process_app_serves_and_exposes_its_state() -> None:
    async def run() -> tuple[list[str], int, int]:
        app = build_app(["m"], answers={"m": ("Paris is the capital", -1.2)})
        async with serve(app) as up, httpx.AsyncClient(base_url=up.url) as client:
            req = {"model": "m", "messages": user("capital?"), "n": 2, "logprobs": True}
            r = (await client.post("/v1/chat/completions", json=req)).json()
            contents = [c["message"]["content"] for c in r["choices"]]
            lp = r["choices"][1]["logprobs"]["content"][-1]["logprob"]
            assert lp == pytest.approx(-1.2)
            assert app[UPSTREAM_KEY] is up.state
            return contents, r["usage"]["completion_tokens"], up.state.stats["m"].calls

    contents, completion_tokens, calls = asyncio.run(run())
    assert contents == ["Paris is the capital"] * 2
    assert completion_tokens == 8 and calls == 1


def test_tokens_concatenate_to_the_content() -> None:
    for text in ["", " ", "A", " lead and trail \n", "a\n\nb  c"]:
        assert "".join(tokenize(text)) == text
    assert tokenize("a b") == ["a", " b"]


@pytest.fixture(params=["synthetic", pytest.param("mmlu", marks=pytest.mark.research_traces)])
def trace_file(request) -> Path:
    """A whole trace file: the synthetic test traces, or the real MMLU ones (the research
    twin: its param carries the marker)."""
    if request.param == "synthetic":
        return request.getfixturevalue("synthetic")[1]
    return request.getfixturevalue("traces_dir") / "mmlu-llama-test.jsonl"


def test_answer_table_from_a_whole_trace_file(trace_file: Path, tmp_path: Path) -> None:
    path = trace_file
    with path.open(encoding="utf-8") as f:
        row = json.loads(f.readline())
    table = load_trace_answers(path)
    prompt = row["messages"][-1]["content"]
    for model, rec in row["models"].items():
        ans = table[(model, prompt)]
        assert ans.content == rec["answer"]
        assert ans.confidence == pytest.approx(rec["confidence"])
        assert ans.logprobs(0)[-1]["logprob"] == pytest.approx(rec["confidence"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + '{"models": {}}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not a trace row"):
        load_trace_answers(bad)
