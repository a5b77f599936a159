"""The chat request's contract, in one place: who may ask (the API key), what the body may be
(a size limit, strict JSON, a bounded depth) and what its fields must hold.

`ChatRequest` is both the check every request passes and the request body of the OpenAPI
schema (`chat_request_schema`, what the fuzz tests generate bodies from). Its validators
carry the messages a client reads, so a refusal names its field (`param`) and carries a code
a client can branch on. Every refusal is an ApiError; a body that passes is forwarded as is,
the integral floats of the count fields (`"max_tokens": 16.0`) sent on as integers.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args

import orjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from starlette.requests import Request

from proxy.engine.cascade import POLICIES, Overrides
from proxy.http.errors import ApiError

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
NUMBER_PARAMS = (
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "min_p",
    "repetition_penalty",
)
COUNT_PARAMS = ("max_tokens", "max_completion_tokens", "n")
MAX_N = 128  # choices per request: OpenAI's limit, and vLLM's
# JSON nested deeper than this is refused: encoders (orjson: 255 levels) must be able to
# forward whatever is accepted
MAX_DEPTH = 128
# Error codes of a body that is JSON but not a chat request (OpenAI's own are as coarse).
INVALID_PARAMETER = "invalid_parameter"
INVALID_MESSAGES = "invalid_messages"
INVALID_OVERRIDE = "invalid_cascade_override"


# ---------------------------------------------------------------- the key


def request_header(request: Request, name: bytes) -> str:
    """One request header (`name` lower-case, as ASGI servers give them), "" if absent: a
    scan of the raw list, cheaper than building Starlette's Headers on the hot path."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def _bearer(request: Request) -> str:
    header = request_header(request, b"authorization")
    return header[7:].strip() if header.lower().startswith("bearer ") else ""


def authenticate(
    request: Request,
    client_keys: set[str],
    admin_key: str | None,
    database_key: Callable[[str], bool] | None = None,
) -> str | None:
    """The client's API key (None when the proxy requires none); 401 when it is wrong.
    `database_key` (with `server.database_keys`) accepts a key of the ledger database, or
    raises why not (proxy/http/keys.py)."""
    key = _bearer(request)
    if not client_keys and database_key is None:
        return key or None
    if not key:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
        )
    if key in client_keys or key == admin_key:
        return key
    if database_key is not None and database_key(key):
        return key
    raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


def authenticate_admin(request: Request, client_keys: set[str], admin_key: str | None) -> None:
    """Admin endpoints: 401 without a valid key, 403 with a key that is not the admin key."""
    key = _bearer(request)
    if not key:
        raise ApiError(
            401, "Missing API key: send 'Authorization: Bearer <admin key>'", code="missing_api_key"
        )
    if admin_key is not None and key == admin_key:
        return
    if key in client_keys:
        raise ApiError(403, "This endpoint needs the admin key", code="admin_key_required")
    raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


# ---------------------------------------------------------------- the body


async def read_body(request: Request, max_body: int) -> bytes:
    """The request body, refused (413) as soon as it passes `max_body`; a client that hangs
    up while sending it gets the 499 nobody reads."""
    declared = request_header(request, b"content-length")
    if declared.isdigit() and int(declared) > max_body:
        raise _too_large(max_body)
    chunks, size = [], 0
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            raise ApiError(499, "client disconnected", code="client_disconnected")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_body:
            raise _too_large(max_body)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_json(request: Request, max_body: int) -> dict:
    raw = (await read_body(request, max_body)).removeprefix(codecs.BOM_UTF8)
    try:
        body = orjson.loads(raw)  # strict: UTF-8, no NaN/Infinity, no unpaired surrogate
    except orjson.JSONDecodeError:
        body = _parse_refused(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    # brackets counted first (a C loop); the real depth only when they could exceed it
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and _depth(body) > MAX_DEPTH:
        raise ApiError(
            400,
            f"The request body is nested too deeply (more than {MAX_DEPTH} levels)",
            code="invalid_json",
        )
    return body


def _parse_refused(raw: bytes) -> Any:
    """A body orjson refused, read by the stdlib: either the precise reason it is not JSON
    the proxy takes, or the few documents only the stdlib reads (1e309 overflows to a float
    that the contract then refuses naming its field)."""
    try:
        body = _DECODER.decode(raw.decode("utf-8"))  # strict UTF-8
    except UnicodeDecodeError:
        raise ApiError(400, "The request body is not valid UTF-8", code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise ApiError(
            400,
            f"The request body is not valid JSON: {exc.msg} (line {exc.lineno} column {exc.colno})",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise ApiError(400, "The request body is nested too deeply", code="invalid_json") from None
    except ValueError:  # NaN/Infinity (_reject_constant), or an integer of > 4300 digits
        raise ApiError(
            400,
            "The request body is not valid JSON: NaN, Infinity and integers of more than "
            "4300 digits are not numbers",
            code="invalid_json",
        ) from None
    if _has_lone_surrogate(body):
        raise ApiError(
            400, "The request body holds an unpaired UTF-16 surrogate", code="invalid_json"
        )
    return body


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def _has_lone_surrogate(body: dict) -> bool:
    """True if a string of `body` cannot be sent on as UTF-8 (a lone \\udXXX escape)."""
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return True
    return False


def _depth(value: Any) -> int:
    """How many arrays and objects deep `value` goes (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        deepest = max(deepest, level)
        stack.extend((c, level + 1) for c in children if isinstance(c, dict | list))
    return deepest


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {limit} bytes", code="request_too_large")


# ---------------------------------------------------------------- the fields
#
# Pydantic's own strict types check nearly every field in its core (no Python per field: the
# contract costs a few microseconds per request). Only the counts need a rule of ours: JSON
# has one number type, so 16.0 is the integer 16 (sent on as 16), while "16" and true are not.


def _count(value: object) -> object:
    if value is None:
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PydanticCustomError("positive_integer", "must be a positive integer")
    return value


Number = Annotated[float, Field(strict=True, allow_inf_nan=False)] | None
Count = Annotated[Annotated[int, Field(ge=1)] | None, BeforeValidator(_count)]
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class _Open(BaseModel):
    """Other OpenAI fields are accepted; the body is forwarded as sent, not this model."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)


class ContentPart(_Open):
    type: str
    text: str = ""


class Message(_Open):
    role: Role
    content: str | list[ContentPart] | None = None


class StreamOptions(_Open):
    include_usage: bool | None = None


class CascadeOverrides(BaseModel):
    """The optional `cascade` object: which policy decides, at which lambda, under what cap."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    policy: Literal["index", "threshold", "agreement", "single"] = "index"
    max_cost_usd: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    lam: Annotated[
        Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None, Field(alias="lambda")
    ] = None

    def value(self) -> Overrides:
        return Overrides(policy=self.policy, max_cost_usd=self.max_cost_usd, lam=self.lam)


class ChatRequest(_Open):
    """POST /v1/chat/completions. `model` is a cascade (the engine decides, then answers) or
    a configured model (passthrough)."""

    model: Annotated[str, Field(min_length=1, description="a cascade or a model")]
    messages: Annotated[list[Message], Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Number = None
    top_p: Number = None
    presence_penalty: Number = None
    frequency_penalty: Number = None
    min_p: Number = None
    repetition_penalty: Number = None
    max_tokens: Count = None
    max_completion_tokens: Count = None
    n: Annotated[Annotated[int, Field(ge=1, le=MAX_N)] | None, BeforeValidator(_count)] = None
    cascade: CascadeOverrides | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def overrides(self) -> Overrides:
        return Overrides() if self.cascade is None else self.cascade.value()


assert set(NUMBER_PARAMS) | set(COUNT_PARAMS) <= set(ChatRequest.model_fields)
assert get_args(CascadeOverrides.model_fields["policy"].annotation) == POLICIES
assert get_args(Role) == ROLES


def check_chat_request(body: dict) -> ChatRequest:
    """`body` checked against the contract; the first problem as a 400 naming its field.
    Integral floats of the count fields are written back as integers, so the body forwarded
    upstream says `16`, not `16.0`."""
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as exc:
        raise _refusal(exc.errors(include_url=False, include_input=False)[0]) from None
    for key in COUNT_PARAMS:
        value = getattr(request, key)
        if value is not None and type(body[key]) is not int:
            body[key] = value
    return request


# the code of a refusal, by the top-level field it is about
_CODES = {"model": "invalid_model", "messages": INVALID_MESSAGES, "cascade": INVALID_OVERRIDE}
_WHOLE = frozenset({"stream_options"})  # refused as a whole, whatever part of it is wrong
# what a value must be, by pydantic's error type (else pydantic's own words)
_RULES = {
    "missing": "is required",
    "string_type": "must be a string",
    "bool_type": "must be a boolean",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "model_type": "must be an object",
    "dict_type": "must be an object",
    "list_type": "must be an array",
    "too_short": "must not be empty",
    "string_too_short": "must not be empty",
}
_BOUNDS = {  # pydantic's error type: (what the value must be, the context key of the bound)
    "less_than_equal": ("at most", "le"),
    "less_than": ("less than", "lt"),
    "greater_than_equal": ("at least", "ge"),
    "greater_than": ("more than", "gt"),
}
_MESSAGE_RULE = f"must be an object with a role in {sorted(ROLES)}"
_CONTENT_RULE = (
    "must be a string or an array of parts (objects with a string 'type' and, if any, a "
    "string 'text')"
)


def _refusal(error: Any) -> ApiError:
    """A pydantic error as the OpenAI error a client reads. `param` is the field: a message
    (`messages[0]`) or its content (`messages[0].content`), a `cascade` field
    (`cascade.lambda`; `cascade` itself for a field it does not take), else the top-level
    field."""
    loc, kind = list(error["loc"]), error["type"]
    top = str(loc[0]) if loc else ""
    if kind in _BOUNDS:
        phrase, bound = _BOUNDS[kind]
        rule = f"must be {phrase} {(error.get('ctx') or {}).get(bound)}"
    else:
        rule = _RULES.get(kind) or error["msg"].replace("Input should be", "must be")
    if top == "messages" and len(loc) > 2 and loc[2] == "content":
        loc, rule = loc[:3], _CONTENT_RULE
    elif top == "messages" and len(loc) > 1:
        loc, rule = loc[:2], _MESSAGE_RULE
    elif top == "cascade" and kind == "extra_forbidden":
        loc = loc[:1]
        rule = f"has no field {error['loc'][-1]!r} (it takes policy, lambda and max_cost_usd)"
    elif top in _WHOLE:
        loc = loc[:1]
    path = top
    for part in loc[1:2] if top != "messages" else loc[1:]:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    named = path if "[" in path else f"'{path}'"
    code = _CODES.get(top, INVALID_PARAMETER)
    return ApiError(400, f"{named} {rule}", param=path or None, code=code)


def chat_request_schema() -> dict:
    """The request body's JSON schema for the OpenAPI document, self-contained: definitions
    inlined, `anyOf [X, null]` written as X with `null` among its types, null defaults left
    out (as FastAPI writes the document)."""
    schema = ChatRequest.model_json_schema(mode="validation")
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            return inline(defs[node["$ref"].rsplit("/", 1)[-1]])
        node = {k: inline(v) for k, v in node.items() if not (k == "default" and v is None)}
        options = node.get("anyOf")
        if options and len(options) == 2 and {"type": "null"} in options:
            (kept,) = [o for o in options if o != {"type": "null"}]
            if isinstance(kept.get("type"), str):
                node.pop("anyOf")
                node = {**kept, **node, "type": [kept["type"], "null"]}
        return node

    return inline(schema)
