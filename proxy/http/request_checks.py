"""Reading and checking a chat request before anything is spent on it: the client's key,
the body (size limit, strict JSON, a bounded depth), and the fields the proxy relies on.
Every refusal is an ApiError (OpenAI format); a body that passes can be forwarded as is.
"""

from __future__ import annotations

import codecs
import json
import math
from typing import Any

import orjson
from starlette.requests import Request

from proxy.engine.cascade import OverrideError, Overrides
from proxy.http.errors import ApiError

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
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


def request_header(request: Request, name: bytes) -> str:
    """One request header (`name` lower-case, as ASGI servers give them), "" if absent: a
    scan of the raw list, cheaper than building Starlette's Headers on the hot path."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return ""


def authenticate(request: Request, client_keys: set[str], admin_key: str | None) -> str | None:
    """The client's API key (None when the proxy requires none); 401 when it is wrong."""
    header = request_header(request, b"authorization")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not client_keys:
        return key or None
    if not key:
        raise ApiError(
            401,
            "Missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
        )
    if key not in client_keys and key != admin_key:
        raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")
    return key


def authenticate_admin(request: Request, client_keys: set[str], admin_key: str | None) -> None:
    """Admin endpoints: 401 without a valid key, 403 with a key that is not the admin key."""
    header = request_header(request, b"authorization")
    key = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not key:
        raise ApiError(
            401, "Missing API key: send 'Authorization: Bearer <admin key>'", code="missing_api_key"
        )
    if admin_key is not None and key == admin_key:
        return
    if key in client_keys:
        raise ApiError(403, "This endpoint needs the admin key", code="admin_key_required")
    raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")


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
    that `_validate` then refuses naming its field)."""
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


def _is_number(value: object) -> bool:
    """A finite JSON number (not a boolean, not an integer too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"The request body is larger than {limit} bytes", code="request_too_large")


def validate(body: dict) -> tuple[str, list[dict], bool, bool]:
    """The fields the proxy relies on, checked; each refusal names its field (`param`) and
    has a code: invalid_model, invalid_messages, or invalid_parameter."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(
            400, "'model' is required and must be a string", param="model", code="invalid_model"
        )
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(
            400,
            "'messages' is required and must be a non-empty array",
            param="messages",
            code="invalid_messages",
        )
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(
                400,
                f"messages[{i}] must be an object with a role in {sorted(ROLES)}",
                param=f"messages[{i}]",
                code="invalid_messages",
            )
        content = m.get("content")
        if content is not None and not (
            isinstance(content, str) or (isinstance(content, list) and _parts_ok(content))
        ):
            raise ApiError(
                400,
                f"messages[{i}].content must be a string or an array of parts (objects with "
                "a string 'type' and, if any, a string 'text')",
                param=f"messages[{i}].content",
                code="invalid_messages",
            )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", param="stream", code=INVALID_PARAMETER)
    options = body.get("stream_options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise ApiError(
            400,
            "'stream_options' must be an object",
            param="stream_options",
            code=INVALID_PARAMETER,
        )
    include_usage = options.get("include_usage")
    if include_usage is not None and not isinstance(include_usage, bool):
        raise ApiError(
            400,
            "'stream_options.include_usage' must be a boolean",
            param="stream_options",
            code=INVALID_PARAMETER,
        )
    for key in NUMBER_PARAMS:
        value = body.get(key)
        if value is not None and not _is_number(value):
            raise ApiError(
                400, f"'{key}' must be a finite number", param=key, code=INVALID_PARAMETER
            )
    for key in COUNT_PARAMS:
        value = body.get(key)
        if isinstance(value, float) and value.is_integer():
            value = body[key] = int(value)  # 16.0 is an integer in JSON
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise ApiError(
                400, f"'{key}' must be a positive integer", param=key, code=INVALID_PARAMETER
            )
    n = body.get("n")
    if n is not None and n > MAX_N:
        raise ApiError(400, f"'n' must be at most {MAX_N}", param="n", code=INVALID_PARAMETER)
    return model, messages, stream, bool(include_usage)


def _parts_ok(parts: list) -> bool:
    return all(
        isinstance(p, dict)
        and isinstance(p.get("type"), str)
        and isinstance(p.get("text", ""), str)
        for p in parts
    )


def parse_overrides(raw: object) -> Overrides:
    try:
        return Overrides.parse(raw)
    except OverrideError as exc:
        raise ApiError(400, str(exc), param=exc.param, code="invalid_cascade_override") from None
