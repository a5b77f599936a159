"""Tool calls in a streamed passthrough: a client that asks a configured model with `tools`
and `stream: true` gets the upstream's `delta.tool_calls` relayed as OpenAI streams them,
so the `openai` SDK assembles the call; the tool-call deltas are the answer's tokens (the
first one is the first token: a stream broken after it is not retried, and is ledgered
with the tokens it sent and their cost). Through a real `cascade serve` process, the
`openai` client and the fake upstream, for the openai backend and the litellm one."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.serving import db_upgrade, running_proxy, sqlite_env, upstream_admin, write_config
from upstreams.pricing import count_message_tokens, count_tokens

KEY_ENV = "CASCADE_TEST_LITELLM_KEY"
ARGS = '{"city": "Paris", "unit": "celsius"}'  # the fake streams it in four fragments
CALL = {"name": "get_weather", "arguments": ARGS}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            },
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
PRICE_IN, PRICE_OUT = 1.0, 2.0  # USD per million tokens
# the model asked by name -> the fake upstream's model answering it
MODELS = {"small": "small", "ext": "large"}


@pytest.fixture(scope="module")
def served(upstream: str, tmp_path_factory) -> Iterator[tuple[str, str, Path]]:
    """The proxy (its URL), the fake upstream's URL and the ledger: `small` through the
    openai backend, `ext` through litellm (the fake's `large`), both retrying twice."""
    folder = tmp_path_factory.mktemp("tools")
    prices = {"price_in_per_mtok": PRICE_IN, "price_out_per_mtok": PRICE_OUT, "max_retries": 2}
    direct = {"backend": "openai", "base_url": f"{upstream}/v1", **prices}
    external = {"backend": "litellm", "model": "openai/large", "base_url": f"{upstream}/v1",
                "api_key_env": KEY_ENV, **prices}  # fmt: skip
    config = {"models": {"small": direct, "ext": external}}
    env = sqlite_env(folder / "ledger.db", **{KEY_ENV: "dummy-key"})
    db_upgrade(env)
    with upstream_admin(upstream) as admin:
        for model in MODELS.values():
            body = {"model": model, "answer": "", "tool_calls": [CALL]}
            admin.post("/admin/answers", json=body).raise_for_status()
        with running_proxy(write_config(folder, config), env, ready_s=60.0) as proxy:
            yield proxy.url, upstream, folder / "ledger.db"


def _ledgered(ledger: Path, request_id: str) -> tuple:
    """The one call of `request_id`: (status, error, tokens in, tokens out, cost)."""
    with sqlite3.connect(ledger) as db:
        rows = db.execute(
            "SELECT status, error, tokens_in, tokens_out, cost_usd FROM ledger_calls "
            "WHERE request_id = ?",
            (request_id,),
        ).fetchall()
    assert len(rows) == 1, rows
    return rows[0]


def _until_ledgered(ledger: Path, request_id: str) -> tuple:
    """`_ledgered`, once the proxy's writer has written it (it writes in the background)."""
    deadline = time.monotonic() + 10.0
    while True:
        try:
            return _ledgered(ledger, request_id)
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@pytest.mark.parametrize("model", list(MODELS))
def test_a_streamed_passthrough_tool_call_reaches_the_openai_sdk(
    served: tuple[str, str, Path], model: str
) -> None:
    """The SDK's stream assembles the call (its name and full arguments) with
    finish_reason tool_calls, and the ledger has the call's tokens (the upstream's usage:
    one per fragment, five) and their cost."""
    url, upstream, ledger = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with upstream_admin(upstream) as admin:
        with client.chat.completions.stream(
            model=model, messages=MESSAGES, tools=TOOLS, stream_options={"include_usage": True}
        ) as stream:
            final = stream.get_final_completion()
        sent = admin.get("/admin/stats").json()["models"][MODELS[model]]
    assert sent["calls"] == 1
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.id, call.type) == ("call_0", "function")
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGS)
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert final.usage is not None and final.usage.completion_tokens == 5
    status, error, tokens_in, tokens_out, cost = _until_ledgered(ledger, final.id)
    assert (status, error) == ("ok", None)
    assert tokens_out == 5 and tokens_in > 0
    assert cost == pytest.approx((tokens_in * PRICE_IN + 5 * PRICE_OUT) / 1e6)


@pytest.mark.parametrize("model", list(MODELS))
def test_a_tool_call_stream_broken_midway_is_not_retried_and_is_charged(
    served: tuple[str, str, Path], model: str
) -> None:
    """The upstream cuts the stream after the call's head and one argument fragment: the
    client got both fragments and then an error event, the upstream was asked once (no
    retry, though two are configured), and the ledger row keeps the error with the
    fragments' tokens (the name and argument text, counted with tiktoken) and their cost."""
    url, upstream, ledger = served
    body = {"model": model, "messages": MESSAGES, "tools": TOOLS, "stream": True}
    with upstream_admin(upstream) as admin:
        fault = {"model": MODELS[model], "drop_stream_after": 2, "count": 1}
        admin.post("/admin/faults", json=fault).raise_for_status()
        events = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as reply:
            assert reply.status_code == 200
            request_id = reply.headers["x-request-id"]
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    data = line.removeprefix("data: ")
                    events.append(data if data == "[DONE]" else json.loads(data))
        calls = admin.get("/admin/stats").json()["models"][MODELS[model]]["calls"]
    assert calls == 1  # not retried: the tool call had begun
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "upstream_failed"
    fragments = [f for e in events[:-2] for f in e["choices"][0]["delta"].get("tool_calls", ())]
    assert [f["function"].get("name") for f in fragments] == ["get_weather", None]
    assert fragments[1]["function"]["arguments"] == '{"city":'
    status, error, tokens_in, tokens_out, cost = _until_ledgered(ledger, request_id)
    assert status != "ok" and error
    sent = 'get_weather{"city":'
    assert (tokens_in, tokens_out) == (count_message_tokens(MESSAGES), count_tokens(sent))
    assert tokens_out > 0
    assert cost == pytest.approx((tokens_in * PRICE_IN + tokens_out * PRICE_OUT) / 1e6)


@pytest.mark.parametrize("model", list(MODELS))
def test_a_plain_passthrough_tool_call_comes_back_too(
    served: tuple[str, str, Path], model: str
) -> None:
    """Without `stream`, one choice: the message carries the upstream's tool calls (only
    the n > 1 choices used to)."""
    url, _, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model=model, messages=MESSAGES, tools=TOOLS)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert (call.id, call.function.name, call.function.arguments) == ("call_0", *CALL.values())
