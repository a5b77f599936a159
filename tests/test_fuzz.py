"""Fuzzing the proxy: schemathesis over its OpenAPI schema, then hand-written hostile bodies.

A real `cascade serve` process (as in test_proxy_e2e) runs in front of the fake upstream and of
a "leaky" upstream that echoes the Authorization header it received into its error message.
Every key (two upstream keys, the client key, the admin key) holds the marker `FUZZSECRET`.
Whatever is sent, the proxy must answer: no 5xx but the designed 502 when every upstream failed,
every error an OpenAI error object, no Python exception text, no secret in any response or in
anything the process printed, and it still serves a normal request afterwards.

`CASCADE_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py` explores further with fresh random
examples; by default the examples are derandomized, so CI is reproducible and takes seconds.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serving import QUESTION, db_upgrade, running_proxy, sqlite_env, write_config

MARKER = "FUZZSECRET"
UPSTREAM_KEY = f"sk-upstream-{MARKER}-4f1d2c9e"
LEAKY_KEY = f"sk-leaky-{MARKER}-8e7a61b0"
CLIENT_KEY = f"sk-client-{MARKER}-0b9c3d77"
ADMIN_KEY = f"sk-admin-{MARKER}-55aa17f3"
SECRETS = (UPSTREAM_KEY, LEAKY_KEY, CLIENT_KEY, ADMIN_KEY)
MAX_BODY = 100_000
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}
EXAMPLES = int(os.environ.get("CASCADE_FUZZ_EXAMPLES", "0")) or None
PYTHON_TEXT = re.compile(
    r"Traceback \(most recent call last\)"
    r"|File \"[^\"]*\", line \d+"
    r"|\b[A-Z][A-Za-z]*(Error|Exception)\b"
)


@dataclasses.dataclass
class Proxy:
    """The running proxy: its URL, process and captured output."""

    url: str
    proc: subprocess.Popen
    stdout: Path
    stderr: Path

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")


class _LeakyUpstream(BaseHTTPRequestHandler):
    """An upstream that refuses every chat call, echoing the key it was sent."""

    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._send(200, b'{"object": "list", "data": []}')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        message = f"Incorrect API key provided: {self.headers.get('authorization')}"
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        self._send(401, json.dumps({"error": error}).encode())

    def log_message(self, *_: Any) -> None:
        """Quiet."""


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def leaky() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _LeakyUpstream)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def proxy(
    upstream: str, leaky: str, policy: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    folder = tmp_path_factory.mktemp("fuzz-proxy")

    def model(base_url: str, key_env: str, price: float) -> dict:
        return {
            "backend": "openai",
            "base_url": f"{base_url}/v1",
            "api_key_env": key_env,
            "price_in_per_mtok": price,
            "price_out_per_mtok": price,
            "timeout_s": 2.0,
            "max_retries": 1,
        }

    config = {
        "models": {
            "small": model(upstream, "FUZZ_UPSTREAM_KEY", 0.1),
            "large": model(upstream, "FUZZ_UPSTREAM_KEY", 10.0),
            "leaky": model(leaky, "FUZZ_LEAKY_KEY", 1.0),
        },
        "cascades": {
            "qa": {"nodes": ["small", "large"], "reference": "large", "policy": str(policy)},
            "echo": {"nodes": ["leaky"], "reference": "leaky"},
        },
        "server": {
            "api_keys_env": "FUZZ_CLIENT_KEYS",
            "admin_key_env": "FUZZ_ADMIN_KEY",
            "max_body_bytes": MAX_BODY,
        },
    }
    path = write_config(folder, config)
    env = sqlite_env(
        folder / "ledger.db",
        FUZZ_UPSTREAM_KEY=UPSTREAM_KEY,
        FUZZ_LEAKY_KEY=LEAKY_KEY,
        FUZZ_CLIENT_KEYS=CLIENT_KEY,
        FUZZ_ADMIN_KEY=ADMIN_KEY,
        PYTHONUNBUFFERED="1",
    )
    db_upgrade(env)
    out, err = folder / "stdout.log", folder / "stderr.log"
    with running_proxy(path, env, stdout=out, stderr=err) as served:
        yield Proxy(served.url, served.proc, out, err)


@pytest.fixture()
def http(proxy: Proxy) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy.url, headers=AUTH, timeout=20.0) as client:
        yield client


# ---------------------------------------------------------------- the audit of one response


def audit(
    status: int, headers: Mapping[str, str], content: bytes, echoed: tuple[str, ...] = ()
) -> dict | None:
    """Assert what must hold for any response; the error object when it is an error.
    `echoed`: what the client sent that an error may repeat ("Unknown report 'AError'")."""
    text = content.decode("utf-8", "replace") + json.dumps(dict(headers))
    assert MARKER not in text, f"a secret leaked: {text[:500]}"
    own = text
    for value in sorted(echoed, key=len, reverse=True):
        own = own.replace(value, "").replace(json.dumps(value)[1:-1], "")
    assert not PYTHON_TEXT.search(own), f"Python exception text: {text[:500]}"
    if status < 400:
        return None
    assert headers.get("content-type", "").startswith("application/json"), (status, text[:300])
    body = json.loads(content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    if status >= 500:
        assert status == 502 and error["code"] == "upstream_failed", (status, error)
    return error


def check(resp: httpx.Response) -> dict | None:
    return audit(resp.status_code, resp.headers, resp.content)


def post_raw(http: httpx.Client, content: bytes | str, **headers: str) -> httpx.Response:
    return http.post(
        "/v1/chat/completions",
        content=content,
        headers={"content-type": "application/json", **headers},
    )


def _raw_http(http: httpx.Client, data: bytes) -> bytes:
    """Send bytes as they are on a new connection to the proxy; the first bytes back."""
    with socket.create_connection((http.base_url.host, http.base_url.port), timeout=5) as s:
        s.sendall(data)
        return s.recv(65536)


def body(**fields: Any) -> dict:
    """A valid request to the `qa` cascade, with `fields` set (None values removed)."""
    base = {"model": "qa", "messages": [{"role": "user", "content": QUESTION}]}
    return {k: v for k, v in {**base, **fields}.items() if v is not None}


# ---------------------------------------------------------------- the schema


def test_the_schema_describes_the_chat_request_and_its_errors(proxy: Proxy) -> None:
    spec = httpx.get(f"{proxy.url}/openapi.json").json()
    post = spec["paths"]["/v1/chat/completions"]["post"]
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert schema["required"] == ["model", "messages"]
    assert schema["properties"]["cascade"]["additionalProperties"] is False
    assert {"200", "400", "401", "404", "413", "502"} <= set(post["responses"])
    error = post["responses"]["400"]["content"]["application/json"]["schema"]
    assert error["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]


@pytest.fixture(scope="module")
def api(proxy: Proxy) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{proxy.url}/openapi.json")


CONFORMANCE = [status_code_conformance, content_type_conformance, response_schema_conformance]
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES or 150,
    derandomize=EXAMPLES is None,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)


def _call(proxy: Proxy, case: schemathesis.Case, headers: dict[str, str]) -> Any:
    response = case.call(base_url=proxy.url, headers=headers, timeout=20)
    case.validate_response(response, checks=CONFORMANCE, headers=headers)
    got = {k: ", ".join(v) for k, v in response.headers.items()}  # lists of values here
    sent = [*(case.path_parameters or {}).values(), *(case.query or {}).values()]
    audit(response.status_code, got, response.content, tuple(str(v) for v in sent if v))
    return response


# model -> the statuses a schema-valid body may get, and the error codes of a 400
# (n_not_supported: n > 1 for a cascade, or with a passthrough stream; checked below)
VALID_OUTCOMES = {
    "qa": ({200, 400}, {"budget_too_small", "invalid_cascade_override", "n_not_supported"}),
    "small": ({200, 400}, {"n_not_supported"}),
    "echo": ({502, 400}, {"n_not_supported"}),  # its only model refuses: the designed 502
    "leaky": ({502, 200, 400}, {"n_not_supported"}),  # 200: a stream ends with an error event
    "no-such-model": ({404}, set()),
}
CASCADES = {"qa", "echo"}


def test_schema_valid_bodies_are_answered_or_get_the_designed_errors(
    proxy: Proxy, api: schemathesis.BaseSchema
) -> None:
    """Positive fuzzing: every body the schema allows, sent to each kind of model."""
    strategy = api["/v1/chat/completions"]["POST"].as_strategy()
    seen: dict[str, set[int]] = {m: set() for m in VALID_OUTCOMES}

    @FUZZ_SETTINGS
    @given(case=strategy, model=st.sampled_from(sorted(VALID_OUTCOMES)))
    def run(case: schemathesis.Case, model: str) -> None:
        case.body["model"] = model
        response = _call(proxy, case, AUTH)
        statuses, codes = VALID_OUTCOMES[model]
        assert response.status_code in statuses, (model, response.status_code, response.text)
        if response.status_code == 400:
            code = response.json()["error"]["code"]
            assert code in codes, response.text
            if code == "n_not_supported":  # only where one answer is all there is
                assert (case.body.get("n") or 1) > 1, response.text
                assert model in CASCADES or case.body.get("stream") is True, response.text
        if model == "leaky" and response.status_code == 200:  # the stream's error event
            assert "upstream_failed" in response.text and "[redacted]" in response.text
        if response.status_code == 502:
            attempts = response.json()["error"]["attempts"]
            assert attempts and all("[redacted]" in a["detail"] for a in attempts)
        seen[model].add(response.status_code)

    run()
    assert 200 in seen["qa"] and 200 in seen["small"] and 502 in seen["echo"], seen


def test_schema_violating_bodies_are_400s(proxy: Proxy, api: schemathesis.BaseSchema) -> None:
    """Negative fuzzing: each body breaks the schema somewhere; the proxy must say 400."""
    strategy = api["/v1/chat/completions"]["POST"].as_strategy(
        generation_mode=schemathesis.GenerationMode.NEGATIVE
    )

    params: Counter[str | None] = Counter()

    @FUZZ_SETTINGS
    @given(case=strategy, model=st.sampled_from(["qa", "small", "echo"]))
    def run(case: schemathesis.Case, model: str) -> None:
        sent = case.body.get("model") if isinstance(case.body, dict) else None
        if isinstance(sent, str) and sent:  # keep a model that is itself the violation
            case.body["model"] = model
        response = _call(proxy, case, AUTH)
        assert response.status_code == 400, (case.body, response.status_code, response.text)
        params[response.json()["error"]["param"]] += 1

    run()
    assert params.total() >= 100 and len(params) >= 8, params  # many fields were hit


def test_every_other_operation_holds_up_to_fuzzing(
    proxy: Proxy, api: schemathesis.BaseSchema
) -> None:
    """The GET endpoints, reports with fuzzed names and query strings, under each key."""
    keys = st.sampled_from([CLIENT_KEY, ADMIN_KEY, "sk-wrong", ""])
    reports = st.sampled_from(["spend", "savings", "exits", "latency", "errors"])

    def fuzz(path: str) -> Counter[int]:
        seen: Counter[int] = Counter()
        names = st.none() | reports if "{name}" in path else st.none()

        @settings(FUZZ_SETTINGS, max_examples=EXAMPLES or 60)
        @given(case=api[path]["GET"].as_strategy(), key=keys, name=names)
        def run(case: schemathesis.Case, key: str, name: str | None) -> None:
            if name is not None:  # else the fuzzed name
                case.path_parameters["name"] = name
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            response = _call(proxy, case, headers)
            assert response.status_code in (200, 400, 401, 403, 404), response.text
            seen[response.status_code] += 1

        run()
        return seen

    paths = ("/v1/models", "/health", "/metrics", "/v1/cascade/reports/{name}")
    statuses = {path: fuzz(path) for path in paths}
    assert set(statuses["/v1/models"]) == {200, 401}, statuses
    assert {200, 400, 401, 403, 404} <= set(statuses[paths[-1]]), statuses


# ---------------------------------------------------------------- hostile bodies


def test_bodies_just_under_and_over_the_limit(http: httpx.Client) -> None:
    def sized(n: int) -> bytes:
        """A valid request of exactly `n` bytes (an unknown field pads it)."""
        compact = {"separators": (",", ":")}
        pad = n - len(json.dumps({**body(), "padding": ""}, **compact))
        raw = json.dumps({**body(), "padding": "x" * pad}, **compact).encode()
        assert len(raw) == n, (len(raw), n)
        return raw

    assert post_raw(http, sized(MAX_BODY)).status_code == 200
    big = body(messages=[{"role": "user", "content": "y " * (MAX_BODY // 2 - 200)}])
    assert post_raw(http, json.dumps(big)).status_code == 200  # a huge prompt, just under
    for raw in (sized(MAX_BODY + 1), sized(10 * MAX_BODY)):
        r = post_raw(http, raw)
        assert r.status_code == 413 and check(r)["code"] == "request_too_large"

    def chunked() -> Iterator[bytes]:  # no content-length: the limit applies as it streams
        yield b'{"model": "qa", "messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY // 1000 + 1):
            yield b"z" * 1000
        yield b'"}]}'

    r = post_raw(http, chunked())
    assert r.status_code == 413 and check(r)["code"] == "request_too_large"
    head = (  # a declared length over the limit is refused before the body is read
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}"
        f"\r\nContent-Type: application/json\r\nContent-Length: {10 * MAX_BODY}\r\n\r\n"
    )
    assert _raw_http(http, head.encode() + b'{"model": "qa"').startswith(b"HTTP/1.1 413")


@pytest.mark.parametrize(
    "raw",
    [
        "[" * 10_000 + "]" * 10_000,
        '{"a":' * 10_000 + "1" + "}" * 10_000,
        json.dumps(body())[:-1] + ', "tools": ' + "[" * 10_000 + "]" * 10_000 + "}",
        json.dumps(body())[:-3] + ', "content": ' + "[" * 9_000 + "]" * 9_000 + "}]}",
    ],
    ids=["top-level-list", "nested-objects", "in-a-forwarded-field", "in-a-message"],
)
def test_ten_thousand_levels_of_nesting_are_a_400(http: httpx.Client, raw: str) -> None:
    r = post_raw(http, raw)
    assert r.status_code == 400 and check(r)["code"] == "invalid_json", r.text


def test_nesting_is_forwarded_up_to_the_documented_depth_and_refused_past_it(
    http: httpx.Client,
) -> None:
    """MAX_DEPTH levels of JSON (counting the body itself) are answered; one more is a 400
    that says so, whichever encoder would have had to forward it."""
    from proxy.http.contract import MAX_DEPTH

    def nested(levels: int) -> str:  # a body whose "tools" field makes it `levels` deep
        inner = levels - 1
        return json.dumps(body(model="small"))[:-1] + f', "tools": {"[" * inner}{"]" * inner}}}'

    r = post_raw(http, nested(MAX_DEPTH))
    assert r.status_code == 200, r.text
    r = post_raw(http, nested(MAX_DEPTH + 1))
    assert r.status_code == 400 and check(r)["code"] == "invalid_json", r.text
    assert "nested too deeply" in r.json()["error"]["message"]
    brackets = json.dumps(body(model="small", user="[" * 500 + "{" * 500))  # in a string
    assert post_raw(http, brackets).status_code == 200


@pytest.mark.parametrize("depth", [50, 200, 500, 700, 800, 900, 950, 990, 1_100])
def test_nesting_near_the_recursion_limit_never_breaks_the_proxy(
    http: httpx.Client, depth: int
) -> None:
    """Deep but perhaps parseable JSON in fields forwarded to the upstream."""
    nested = "[" * depth + "]" * depth
    for field in ("response_format", "tools", "logit_bias", "user"):
        raw = json.dumps(body(model="small"))[:-1] + f', "{field}": {nested}}}'
        r = post_raw(http, raw)
        check(r)
        assert r.status_code in (200, 400), (field, r.status_code, r.text)


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe\xfa",
        b'{"model": "qa", "messages": [{"role": "user", "content": "\xff"}]}',
        b'{"model": "qa", "messages": [{"role": "user", "content": "caf\xe9"}]}',  # latin-1
        b'{"model": "qa", "messages": [{"role": "user", "content": "\xc0\xaf"}]}',  # overlong
        b'{"model": "qa", "messages": [{"role": "user", "content": "\xe2\x82"}]}',  # truncated
        b'{"model": "qa", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',  # CESU
        b'{"model": "small", "messages": [{"role": "user", "content": "\xed\xb0\x80"}]}',
        json.dumps(body()).encode("utf-16"),
        b"\x00" * 64,
        b'{"model": "qa", "messages": [{"role": "user", "content": "a\x00b"}]}',
        b'{"model": "qa", "messages": [{"role": "user", "content": "\\ud800"}]}',
        b'{"model": "small", "messages": [{"role": "user", "content": "x\\udfff"}]}',
        b'{"model": "small", "messages": [{"role": "user", "content": "hi"}], "user": "\\udbff"}',
        b'{"model": "qa\\ud800", "messages": [{"role": "user", "content": "hi"}]}',
    ],
    ids=[
        "binary",
        "xff",
        "latin1",
        "overlong",
        "truncated",
        "utf8-encoded-high-surrogate",
        "utf8-encoded-low-surrogate-passthrough",
        "utf16",
        "nul-bytes",
        "raw-nul-in-string",
        "lone-high-surrogate-escape",
        "lone-low-surrogate-passthrough",
        "lone-surrogate-forwarded-field",
        "lone-surrogate-in-model",
    ],
)
def test_undecodable_bytes_are_a_400(http: httpx.Client, raw: bytes) -> None:
    r = post_raw(http, raw)
    assert r.status_code == 400 and check(r)["code"] == "invalid_json", r.text


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ('{"model": "qa", "messages": [{"role": "user", "content": "a\\u0000b"}]}', 200),
        ('{"model": "small", "messages": [{"role": "user", "content": "\\u0000"}]}', 200),
        ('{"model": "q\\u0000a", "messages": [{"role": "user", "content": "hi"}]}', 404),
        ('{"model": "small", "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}', 200),
        ('{"model": "small", "messages": [{"role": "user", "content": "\\\\ud800"}]}', 200),
        ("\ufeff" + json.dumps(body()), 200),  # a UTF-8 byte order mark is tolerated
    ],
    ids=["nul-escape", "only-nul", "nul-in-model", "surrogate-pair", "escaped-backslash", "bom"],
)
def test_valid_but_odd_text_is_served(http: httpx.Client, raw: str, status: int) -> None:
    r = post_raw(http, raw.encode("utf-8"))
    assert r.status_code == status, r.text
    check(r)


WRONG_TYPES: list[tuple[str, dict, str]] = [
    *(("model", {"model": v}, "model") for v in (1, 1.5, [], {}, "", True, False)),
    *(("messages", {"messages": v}, "messages") for v in ("hi", {}, [], None, 1)),
    *(
        ("message", {"messages": v}, "messages[0]")
        for v in (
            [1],
            [None],
            [[]],
            [{}],
            [{"role": None}],
            [{"role": 1}],
            [{"role": ["user"]}],
            [{"role": {"user": 1}}],
            [{"role": "robot"}],
            [{"content": "no role"}],
        )
    ),
    *(
        ("content", {"messages": [{"role": "user", "content": v}]}, "messages[0].content")
        for v in (
            1,
            True,
            {"text": "x"},
            [1],
            ["x"],
            [None],
            [{"text": "x"}],
            [{"type": 1}],
            [{"type": None, "text": "x"}],
            [{"type": "text", "text": 5}],
            [{"type": "text", "text": None}],
            [{"type": "text", "text": ["a"]}],
            [{"type": "text", "text": {"t": "x"}}],
        )
    ),
    *(
        (k, {k: v}, k)
        for k in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p")
        for v in ("1", True, [], {})
    ),
    *(
        (k, {k: v}, k)
        for k in ("max_tokens", "max_completion_tokens", "n")
        for v in (-1, 0, 1.5, 0.0, "10", True, [], {})
    ),
    *(("stream", {"stream": v}, "stream") for v in ("true", 1, [], {}, "")),
    *(
        ("stream_options", {"stream_options": v}, "stream_options")
        for v in ("x", [], 1, True, False, {"include_usage": "yes"}, {"include_usage": 1})
    ),
    *(("cascade", {"cascade": v}, "cascade") for v in ("x", [], 1, True, {"bogus": 1})),
    *(
        ("cascade.policy", {"cascade": {"policy": v}}, "cascade.policy")
        for v in (1, ["index"], {}, None, "nope", "")
    ),
    *(
        ("cascade.max_cost_usd", {"cascade": {"max_cost_usd": v}}, "cascade.max_cost_usd")
        for v in (-1, -1e-9, "1", True, [], {})
    ),
    *(
        ("cascade.lambda", {"cascade": {"lambda": v}}, "cascade.lambda")
        for v in (0, 2, -1, 1.0000001, "0.5", True, [], {})
    ),
    ("cascade-on-a-model", {"model": "small", "cascade": {"bogus": 1}}, "cascade"),
]


@pytest.mark.parametrize(
    ("fields", "param"),
    [(f, p) for _, f, p in WRONG_TYPES],
    ids=[f"{name}-{i}" for i, (name, _, _) in enumerate(WRONG_TYPES)],
)
def test_every_field_of_the_wrong_type_is_a_400_naming_it(
    http: httpx.Client, fields: dict, param: str
) -> None:
    payload = {**body(), **fields}
    r = post_raw(http, json.dumps(payload))
    assert r.status_code == 400, r.text
    assert check(r)["param"] == param, r.text


NUMBERS = '{"model": "qa", "messages": [{"role": "user", "content": "hi"}], %s}'


@pytest.mark.parametrize(
    ("extra", "status", "param"),
    [
        ('"temperature": NaN', 400, None),
        ('"temperature": Infinity', 400, None),
        ('"top_p": -Infinity', 400, None),
        ('"cascade": {"max_cost_usd": NaN}', 400, None),
        ('"cascade": {"lambda": NaN}', 400, None),
        ('"temperature": 1e309', 400, "temperature"),  # overflows to inf
        ('"temperature": -1e309', 400, "temperature"),
        ('"max_tokens": 0.5', 400, "max_tokens"),
        ('"max_tokens": 1e400', 400, "max_tokens"),
        ('"max_tokens": -1', 400, "max_tokens"),
        (f'"temperature": {10**400}', 400, "temperature"),  # an int past a float's range
        (f'"cascade": {{"max_cost_usd": {10**400}}}', 400, "cascade.max_cost_usd"),
        ('"cascade": {"max_cost_usd": 1e309}', 400, "cascade.max_cost_usd"),
        (f'"max_tokens": {"9" * 5000}', 400, None),  # past Python's int-parsing limit
        ('"temperature": 1e9', 200, None),  # absurd but finite: the upstream's to judge
        ('"temperature": -5', 200, None),
        ('"top_p": 1e-320', 200, None),
        (f'"max_tokens": {10**30}', 200, None),
        ('"max_tokens": 1e308', 200, None),  # an integer, as JSON counts: sent on as one
        ('"max_completion_tokens": 16.0', 200, None),
        ('"n": 1000000', 400, "n"),  # at most 128 (and a cascade returns one answer)
        ('"n": 2', 400, "n"),  # a cascade returns one decided answer
        ('"cascade": {"max_cost_usd": 1e308}', 200, None),
        ('"unknown_field": {"deep": [1, 2, {"x": null}]}, "another": 1', 200, None),
    ],
)
def test_absurd_numbers_are_refused_or_passed_on_never_a_500(
    http: httpx.Client, extra: str, status: int, param: str | None
) -> None:
    r = post_raw(http, NUMBERS % extra)
    assert r.status_code == status, r.text
    error = check(r)
    if param is not None:
        assert error["param"] == param
    elif status == 400:
        assert error["code"] == "invalid_json"


def test_integral_floats_are_sent_on_as_integers(http: httpx.Client, upstream: str) -> None:
    r = post_raw(http, json.dumps(body(model="small", max_tokens=16.0, temperature=0.5)))
    assert r.status_code == 200, r.text
    sent = httpx.get(f"{upstream}/admin/stats").json()["models"]["small"]["last_request"]
    assert sent["max_tokens"] == 16 and isinstance(sent["max_tokens"], int)
    assert sent["temperature"] == 0.5


@pytest.mark.parametrize("raw", ["", " ", "null", "[]", "[1, 2]", '"s"', "1", "true", "{", "}"])
def test_empty_or_non_object_bodies_are_a_400(http: httpx.Client, raw: str) -> None:
    r = post_raw(http, raw)
    assert r.status_code == 400 and check(r)["code"] == "invalid_json", r.text


MULTIPART = '--x\r\nContent-Disposition: form-data; name="model"\r\n\r\nqa\r\n--x--\r\n'


@pytest.mark.parametrize(
    ("content_type", "content", "status"),
    [
        ("text/plain", json.dumps(body()), 200),  # JSON is read whatever the label says
        ("application/x-www-form-urlencoded", "model=qa&messages=hi", 400),
        ("multipart/form-data; boundary=x", MULTIPART, 400),
        ("application/xml", "<model>qa</model>", 400),
        ("application/json; charset=utf-16", json.dumps(body()).encode("utf-16"), 400),
    ],
)
def test_wrong_content_types(
    http: httpx.Client, content_type: str, content: str | bytes, status: int
) -> None:
    r = http.post("/v1/chat/completions", content=content, headers={"content-type": content_type})
    assert r.status_code == status, r.text
    check(r)


def test_huge_and_hostile_headers(proxy: Proxy, http: httpx.Client) -> None:
    payload = json.dumps(body())
    huge_key = {"Authorization": "Bearer " + "A" * 60_000}
    r = post_raw(http, payload, **huge_key)
    assert r.status_code == 401 and check(r)["code"] == "invalid_api_key"
    many = {f"x-fuzz-{i}": "v" * 100 for i in range(300)}
    r = post_raw(http, payload, **many)
    assert r.status_code == 200, r.text
    for header in ("Basic " + CLIENT_KEY, "Bearer", "Token " + CLIENT_KEY, "Bearer sk-wrong"):
        r = post_raw(http, payload, Authorization=header)
        assert r.status_code == 401, (header, r.text)
        check(r)
    assert post_raw(http, payload, Authorization=f"bearer  {CLIENT_KEY}").status_code == 200
    assert post_raw(http, payload, Authorization=f"Bearer {ADMIN_KEY}").status_code == 200
    try:  # a megabyte of header: refused by the HTTP layer or answered 401, never a 5xx
        r = post_raw(http, payload, Authorization="Bearer " + "B" * 1_000_000)
        assert r.status_code in (400, 401, 413, 431), r.status_code
        assert MARKER not in r.text
    except httpx.RemoteProtocolError:
        pass  # the server closed the connection on it: also a refusal
    assert proxy.proc.poll() is None


def test_methods_paths_and_admin_endpoints_answer_openai_errors(http: httpx.Client) -> None:
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "POST" in r.headers.get("allow", "")
    check(r)
    r = http.post("/v1/nothing-here", json=body())
    assert r.status_code == 404 and check(r)["code"] == "not_found"
    r = http.get("/v1/cascade/reports/spend")
    assert r.status_code == 403 and check(r)["code"] == "admin_key_required"
    r = http.get("/v1/cascade/reports/spend", headers={"Authorization": ""})
    assert r.status_code == 401
    check(r)
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    for query, status in [
        ({"since": "99999999999d"}, 400),
        ({"since": "999999999d"}, 400),
        ({"since": "0001-01-01T00:00:00+05:00"}, 400),
        ({"since": "9999-12-31T23:59:59-05:00"}, 400),
        ({"since": "yesterday"}, 400),
        ({"since": "\x00"}, 400),
        ({"by": "bogus"}, 400),
        ({"by": ""}, 200),
        ({"since": "30m", "by": "key"}, 200),
    ]:
        r = http.get("/v1/cascade/reports/errors", params=query, headers=admin)
        assert r.status_code == status, (query, r.text)
        check(r)
    r = http.get("/v1/cascade/reports/%00", headers=admin)
    assert r.status_code == 404
    check(r)


def test_an_upstream_echoing_its_key_is_redacted(http: httpx.Client) -> None:
    """The leaky upstream puts its key in its error message; the 502 masks it."""
    for model in ("echo", "leaky"):
        r = post_raw(http, json.dumps(body(model=model)))
        assert r.status_code == 502
        error = check(r)
        assert error["code"] == "upstream_failed"
        assert "Incorrect API key provided: Bearer [redacted]" in error["attempts"][0]["detail"]
    r = post_raw(http, json.dumps(body(model="leaky", stream=True)))
    assert r.status_code == 200 and "Bearer [redacted]" in r.text and MARKER not in r.text


def test_garbage_http_is_refused_without_echoing_it(http: httpx.Client) -> None:
    for garbage in (
        f"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {CLIENT_KEY}\r\n"
        f"Content-Length: -5\r\n\r\n{ADMIN_KEY}",
        f"\x00\x01\x02 {UPSTREAM_KEY} HTTP/9.9\r\n\r\n",
    ):
        reply = _raw_http(http, garbage.encode("latin-1"))
        assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
        assert MARKER.encode() not in reply


# ---------------------------------------------------------------- afterwards


def test_the_proxy_still_serves_and_printed_no_secret_or_traceback(
    proxy: Proxy, http: httpx.Client
) -> None:
    """Runs last in this module: everything above was sent to the same process."""
    r = post_raw(http, json.dumps(body()))
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert proxy.proc.poll() is None
    for path in ("/health", "/metrics", "/v1/models"):
        check(http.get(path))
    output = proxy.output()
    assert "Invalid HTTP request received" in output  # the capture works: garbage was logged
    assert MARKER not in output
    assert "Traceback" not in output, output[-3000:]
    ledger = proxy.stdout.parent / "ledger.db"  # the upstream's echoed key never lands there
    deadline = time.monotonic() + 10
    errors: list[str] = []
    while not any("[redacted]" in e for e in errors) and time.monotonic() < deadline:
        time.sleep(0.2)
        with sqlite3.connect(ledger) as db:
            errors = [r[0] for r in db.execute("SELECT error FROM ledger_calls") if r[0]]
    assert any("Bearer [redacted]" in e for e in errors), errors[:5]
    assert not [e for e in errors if MARKER in e]
