"""JSON to and from bytes on the hot path: orjson (a tenth of the stdlib's time), with the
stdlib behind it for the few documents only the stdlib takes."""

from __future__ import annotations

import json
from typing import Any

import orjson

_encode = json.JSONEncoder(separators=(",", ":")).encode


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN and infinities become null (orjson), and what orjson refuses
    (more than 255 levels of nesting, an integer past 64 bits) goes through the stdlib."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return _encode(obj).encode("ascii")


def loads_lenient(raw: bytes | str) -> Any:
    """Parse an upstream's JSON: orjson, or the stdlib for what only it reads (NaN, a
    -Infinity logprob, an integer past 64 bits). ValueError if neither can."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)
